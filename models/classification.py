"""Classification by retrieval: a global descriptor model plus an index of labelled embeddings; a query's class
logits aggregate the similarities of its nearest indexed neighbours per class. No training; classes are added or
removed by adding or removing index entries; one example per class is enough (few-shot); the logits are
differentiable with respect to the query embedding (and the backbone, when it is trained).

    cbr = ClassificationByRetrieval(backbone=SuperGlobal(), embedding_dim=2048, k=10)
    cbr.add_index_data(embeddings, labels)        # (n, d) L2-normalised, n labels
    logits = cbr(images)                          # (B, n_classes), columns in cbr.classes order
    cbr.predict(images)                           # the labels of the best logits
"""
from __future__ import annotations

from collections.abc import Hashable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import InvalidValueError

AGGREGATIONS = ("max", "mean", "sum")


def class_logits(similarities: Tensor, neighbour_classes: Tensor, num_classes: int, aggregation: str = "max",
                 empty: float = -1.0) -> Tensor:
    """Per-class aggregation of neighbour similarities.

    ``similarities``: (B, k) query-neighbour similarities; ``neighbour_classes``: (B, k) class columns (-1 for
    padding); -> (B, num_classes): ``max``, ``mean`` or ``sum`` over each class's neighbours among the k, and
    ``empty`` for a class with none (the lowest cosine, so that any present class beats it).
    """
    if aggregation not in AGGREGATIONS:
        raise InvalidValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    b, k = similarities.shape
    valid = neighbour_classes >= 0
    one_hot = F.one_hot(neighbour_classes.clamp(min=0), num_classes).to(similarities.dtype)
    one_hot = one_hot * valid.unsqueeze(-1).to(similarities.dtype)  # (B, k, C)
    present = one_hot.sum(dim=1) > 0
    if aggregation == "max":
        masked = torch.where(one_hot.bool(), similarities.unsqueeze(-1), torch.full_like(one_hot, float("-inf")))
        out = masked.amax(dim=1)
    else:
        out = torch.einsum("bk,bkc->bc", similarities, one_hot)
        if aggregation == "mean":
            out = out / one_hot.sum(dim=1).clamp(min=1)
    return torch.where(present, out, torch.full_like(out, empty))


class ClassificationByRetrieval(nn.Module):
    """A classifier whose "weights" are an index of labelled embeddings.

    Args:
        backbone: any global model ``images -> (B, embedding_dim)`` L2-normalised descriptors; None to feed
            embeddings directly (``model(embeddings)``).
        embedding_dim: the descriptor dimension d.
        k: neighbours retrieved per query.
        aggregation: ``max`` (default), ``mean`` or ``sum`` of the neighbours' similarities per class.
        database: an external vector database (any object with ``add(vectors, ids=...)``, ``search(queries, k)
            -> (scores, ids)``, ``get(ids)``, ``delete(ids)``, e.g. :class:`helpers.TensorVectorDB`,
            FAISS or Pinecone); None keeps the index as a tensor inside the module (saved in its state dict).
            Either way the similarities are recomputed from the stored vectors, so gradients reach the query.
    """

    def __init__(self, backbone: nn.Module | None = None, embedding_dim: int = 2048, *, k: int = 10,
                 aggregation: str = "max", database: Any = None) -> None:
        super().__init__()
        if aggregation not in AGGREGATIONS:
            raise InvalidValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
        if k < 1:
            raise InvalidValueError(f"k must be >= 1, got {k}")
        self.backbone = backbone
        self.embedding_dim = int(embedding_dim)
        self.k = int(k)
        self.aggregation = aggregation
        self.database = database
        self.classes: list[Hashable] = []
        self.register_buffer("index_vectors", torch.empty(0, self.embedding_dim))
        self.register_buffer("index_labels", torch.empty(0, dtype=torch.long))  # class column of each row
        self._next_id = 0
        self._external_labels: dict[int, int] = {}  # database id -> class column

    # ------------------------------------------------------------------ index
    def __len__(self) -> int:
        return len(self._external_labels) if self.database is not None else int(self.index_vectors.shape[0])

    def _column(self, label: Hashable) -> int:
        if label not in self.classes:
            self.classes.append(label)
        return self.classes.index(label)

    def add_index_data(self, embeddings: Tensor, labels: Sequence[Hashable]) -> None:
        """Index (n, d) L2-normalised embeddings with their n labels (any hashable); new labels become classes."""
        embeddings = torch.as_tensor(embeddings, dtype=torch.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise InvalidValueError(f"embeddings must be (n, {self.embedding_dim}), got {tuple(embeddings.shape)}")
        labels = list(labels.tolist() if isinstance(labels, Tensor) else labels)
        if len(labels) != embeddings.shape[0]:
            raise InvalidValueError(f"{len(labels)} labels for {embeddings.shape[0]} embeddings")
        if not torch.isfinite(embeddings).all():
            raise InvalidValueError("embeddings contain NaN or Inf")
        columns = torch.tensor([self._column(label) for label in labels], dtype=torch.long)
        if self.database is not None:
            ids = torch.arange(self._next_id, self._next_id + len(labels))
            self.database.add(embeddings, ids=ids)
            self._external_labels.update(zip(ids.tolist(), columns.tolist()))
            self._next_id += len(labels)
            return
        device = self.index_vectors.device
        self.index_vectors = torch.cat([self.index_vectors, embeddings.to(device)])
        self.index_labels = torch.cat([self.index_labels, columns.to(device)])

    def remove_class(self, label: Hashable) -> int:
        """Drop every indexed example of ``label`` and its logit column; returns how many were removed."""
        if label not in self.classes:
            raise KeyError(f"unknown class {label!r}; classes: {self.classes}")
        col = self.classes.index(label)
        if self.database is not None:
            ids = [i for i, c in self._external_labels.items() if c == col]
            if ids:
                self.database.delete(ids)
            self._external_labels = {i: (c - (c > col)) for i, c in self._external_labels.items() if c != col}
            removed = len(ids)
        else:
            keep = self.index_labels != col
            removed = int((~keep).sum())
            self.index_vectors = self.index_vectors[keep]
            labels = self.index_labels[keep]
            self.index_labels = labels - (labels > col).long()
        self.classes.pop(col)
        return removed

    # ------------------------------------------------------------------ inference
    def embed(self, x: Tensor) -> Tensor:
        """Images through the backbone (or embeddings as they are when there is no backbone): (B, d)."""
        out = self.backbone(x) if self.backbone is not None else x
        if out.ndim != 2 or out.shape[1] != self.embedding_dim:
            raise InvalidValueError(f"expected (B, {self.embedding_dim}) embeddings, got {tuple(out.shape)}")
        return out

    def _neighbours(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """(similarities (B, k), class columns (B, k)) of each query's nearest indexed embeddings, the
        similarities recomputed from the vectors so that they carry gradients."""
        if len(self) == 0:
            raise InvalidValueError("the index is empty: add_index_data(embeddings, labels) first")
        if self.database is None:
            k = min(self.k, self.index_vectors.shape[0])
            with torch.no_grad():
                idx = (q.detach() @ self.index_vectors.T).topk(k, dim=1).indices
            sims = torch.einsum("bd,bkd->bk", q, self.index_vectors[idx])
            return sims, self.index_labels[idx]
        with torch.no_grad():
            _, ids = self.database.search(q.detach().float().cpu(), self.k)
        ids = ids.cpu()
        valid = ids >= 0
        vectors = torch.zeros(*ids.shape, self.embedding_dim, dtype=q.dtype, device=q.device)
        if bool(valid.any()):
            vectors[valid] = self.database.get(ids[valid]).to(q)
        sims = torch.einsum("bd,bkd->bk", q, vectors)
        columns = torch.tensor([[self._external_labels.get(int(i), -1) for i in row] for row in ids.tolist()],
                               dtype=torch.long, device=q.device)
        return sims, columns

    def forward(self, x: Tensor) -> Tensor:
        """(B, 3, H, W) images (or (B, d) embeddings without a backbone) -> (B, len(classes)) logits."""
        sims, columns = self._neighbours(self.embed(x))
        return class_logits(sims, columns, len(self.classes), self.aggregation)

    @torch.no_grad()
    def predict(self, x: Tensor) -> list[Hashable]:
        """The label of each input's best logit."""
        return [self.classes[i] for i in self(x).argmax(dim=1).tolist()]
