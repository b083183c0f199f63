"""The Retriever: index your own images into a vector database and query it, with optional post-processing
and SuperGlobal or CVNet re-ranking. No training needed.

    model = build_model("superglobal", depth=50, weights="weights/CVPR2022_CVNet_R50.pyth")
    retriever = Retriever(model, TensorVectorDB(2048), reranker=SuperGlobalRerank(),
                          weights="weights/CVPR2022_CVNet_R50.pyth")
    retriever.index(["photos/a.jpg", "photos/b.jpg"])          # -> ids tensor([0, 1])
    for hit in retriever.query("photos/query.jpg", k=10):       # best first
        print(hit.id, hit.score, hit.path)
    retriever.save("my_index"); retriever = Retriever.load("my_index")

Descriptors come from the evaluation's engine (helpers.extraction), CVNet maps from its ReducedMapStore; images
are read and sized by helpers.retrieval.images, saves written by helpers.retrieval.saved.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from common.constants import CVNET_RERANK_TOP_K, CVNET_SCORE_WEIGHT, CVNET_TEST_SCALES
from common.errors import InvalidValueError, shorten
from common.timing import timed
from helpers.builders import (
    GLOBAL_KINDS,
    global_dim,
    kind_of,
)
from helpers.extraction import ImageArrays, ReducedMapStore, extract_global_descriptors
from helpers.postprocess import PostProcessing, post_scores
from helpers.reranking import CVNetPairScorer, apply_cvnet_rerank, top_then_rest
from helpers.retrieval.images import DEFAULT_MAX_SIDE, DEFAULT_MIN_SIDE, PATH_KEY, StoredImages, load_bgr, prepare_image
from helpers.retrieval.saved import load_parts, read_config, save_retriever
from helpers.vector_db.base import AbstractVectorDB, as_id_vector, check_metadata, check_unique
from models.cvnet import CVNetRerank
from models.inference import fast_runner
from models.superglobal import SuperGlobalRerank

logger = logging.getLogger(__name__)

_ADD_EVERY = 256  # descriptors accumulated before one database write (bounds memory and lost work)


class _Recorded:
    """The default of ``Retriever.load(reranker=...)``: the re-ranker the save recorded (None is "no re-ranker")."""

    def __repr__(self) -> str:
        return "RECORDED"


RECORDED: Any = _Recorded()


@dataclass(frozen=True)
class Hit:
    """One result of a query.

    ``score`` is what the ranking used at that position: the global cosine without re-ranking, SuperGlobal's
    (s1 + s2) / 2 or ``global + mix * CVNet score`` for re-ranked positions. ``global_score`` is always the
    cosine of the global descriptors (about 1 for an exact duplicate).
    """

    id: int
    score: float
    metadata: dict[str, Any] | None = None
    global_score: float | None = None

    @property
    def path(self) -> str | None:
        """The indexed image file, when it was indexed from a path."""
        return None if self.metadata is None else self.metadata.get(PATH_KEY)


# --------------------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------------------


# --------------------------------------------------------------------------------------------------------------
# Models: configuration, fingerprint
# --------------------------------------------------------------------------------------------------------------






# --------------------------------------------------------------------------------------------------------------
# Retriever
# --------------------------------------------------------------------------------------------------------------


class Retriever:
    """Index images into a vector database and query it, with optional SuperGlobal or CVNet re-ranking.

    Args:
        model: a :class:`models.SuperGlobal` or :class:`models.CVNetGlobal` (its ``input_convention`` is used);
            moved to ``device`` and put in eval mode. Descriptors are computed by the engine's fast copy of it
            (BatchNorm folded, made at first use), so its weights must not change afterwards.
        database: any :class:`helpers.vector_db.base.AbstractVectorDB` of the model's descriptor dimension.
        reranker: None, a :class:`models.SuperGlobalRerank` or a :class:`models.CVNetRerank`.
        rerank_top_k: global candidates CVNet re-scores (100 in the paper).
        mix: weight of the CVNet score in ``global + mix * score`` (0.5 in the paper).
        device: where the networks and the re-ranking run (:meth:`load` opens a saved local database there too).
        batch_size: images of equal size described together; CVNet pairs scored together.
        max_side: longer image side after downscaling (None: never downscale).
        min_side: short side below which an image is enlarged (None: never).
        scales: CVNet-Global's multi-scale test scales (SuperGlobal's live in the model).
        map_cache_size: database images whose reduced CVNet maps are kept in memory (LRU; about 5 MB each at
            1024 x 768).
        weights, seed: where the model's weights came from (a checkpoint path, or the seed of a random
            initialisation); recorded by :meth:`save` so that :meth:`load` can rebuild the model, and named by
            errors. With neither, :meth:`save` writes the weights themselves into the index folder.
        rerank_weights, rerank_seed: the same for a CVNet re-ranker.
        post: the default post-processing of queries (:class:`helpers.postprocess.PostProcessing`, or its
            fields as a dict; None: none); :meth:`query` may override it.
        flip: flip test-time augmentation of every descriptor, indexed and queried alike
            (:func:`helpers.extraction.extract_global_descriptors`).
        max_pixels: the most pixels an image file may have to be read (checked in its header before decoding;
            None: :data:`datasets.transforms.DEFAULT_MAX_PIXELS`). A limit of this process, not recorded by
            :meth:`save`.
    """

    def __init__(
        self,
        model: nn.Module,
        database: AbstractVectorDB,
        *,
        reranker: nn.Module | None = None,
        rerank_top_k: int = CVNET_RERANK_TOP_K,
        mix: float = CVNET_SCORE_WEIGHT,
        device: torch.device | str = "cpu",
        batch_size: int = 4,
        max_side: int | None = DEFAULT_MAX_SIDE,
        min_side: int | None = DEFAULT_MIN_SIDE,
        scales: Sequence[float] = CVNET_TEST_SCALES,
        map_cache_size: int = 128,
        weights: str | os.PathLike | None = None,
        seed: int | None = None,
        rerank_weights: str | os.PathLike | None = None,
        rerank_seed: int | None = None,
        post: PostProcessing | Mapping[str, Any] | None = None,
        flip: bool = False,
        max_pixels: int | None = None,
    ) -> None:
        self.kind = kind_of(model, among=GLOBAL_KINDS)
        if not isinstance(database, AbstractVectorDB):
            raise TypeError(f"database must be an AbstractVectorDB, got {type(database).__name__}")
        dim = global_dim(model)
        if database.dim != dim:
            raise InvalidValueError(f"the database holds {database.dim}-d vectors but {type(model).__name__} gives "
                                    f"{dim}-d descriptors: use a database built for this model")
        if reranker is not None and not isinstance(reranker, (SuperGlobalRerank, CVNetRerank)):
            raise TypeError(f"reranker must be None, SuperGlobalRerank or CVNetRerank, got {type(reranker).__name__}")
        if rerank_top_k < 1 or batch_size < 1 or map_cache_size < 0:
            raise InvalidValueError("need rerank_top_k >= 1, batch_size >= 1, map_cache_size >= 0; got "
                                    f"{rerank_top_k}, "
                                    f"{batch_size}, {map_cache_size}")
        if not math.isfinite(mix):
            raise InvalidValueError(f"mix must be finite, got {mix}")
        if max_pixels is not None and (isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer))
                                       or max_pixels < 1):
            raise InvalidValueError(f"max_pixels must be a positive integer or None, got {shorten(max_pixels)}")
        if max_side is not None and min_side is not None and max_side < min_side:
            raise InvalidValueError(f"max_side ({max_side}) must be >= min_side ({min_side})")
        if isinstance(reranker, CVNetRerank) and reranker.input_convention != model.input_convention:
            logger.warning("the global model and the CVNet re-ranker have different input conventions (%s vs %s)",
                           model.input_convention, reranker.input_convention)
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.database = database
        self.reranker = None if reranker is None else reranker.to(self.device).eval()
        self.rerank_top_k = int(rerank_top_k)
        self.mix = float(mix)
        self.batch_size = int(batch_size)
        self.max_side = max_side
        self.min_side = min_side
        self.scales = tuple(float(s) for s in scales)
        self.map_cache_size = int(map_cache_size)
        self.weights = None if weights is None else os.fspath(weights)
        self.seed = seed
        self.rerank_weights = None if rerank_weights is None else os.fspath(rerank_weights)
        self.rerank_seed = rerank_seed
        self.post = _post_settings(post)
        self.flip = bool(flip)
        self.max_pixels = None if max_pixels is None else int(max_pixels)
        self._runner: nn.Module | None = None
        self._db_maps: ReducedMapStore | None = None

    @property
    def dim(self) -> int:
        """Descriptor dimension d."""
        return self.database.dim

    def __len__(self) -> int:
        return len(self.database)

    def settings(self) -> dict[str, Any]:
        """The constructor settings :meth:`save` records (model, database and re-ranker excluded)."""
        return {"rerank_top_k": self.rerank_top_k, "mix": self.mix, "batch_size": self.batch_size,
                "max_side": self.max_side, "min_side": self.min_side, "scales": list(self.scales),
                "map_cache_size": self.map_cache_size, "flip": self.flip,
                "post": None if self.post is None else dataclasses.asdict(self.post)}

    def set_reranker(self, reranker: nn.Module | None, *, weights: str | os.PathLike | None = None,
                     seed: int | None = None) -> None:
        """Use ``reranker`` (None, a SuperGlobalRerank or a CVNetRerank; moved to the device) from now on;
        ``weights`` / ``seed``: where a CVNet re-ranker's weights came from (what errors and :meth:`save` name)."""
        if reranker is not None and not isinstance(reranker, (SuperGlobalRerank, CVNetRerank)):
            raise TypeError(f"reranker must be None, SuperGlobalRerank or CVNetRerank, got {type(reranker).__name__}")
        self.reranker = None if reranker is None else reranker.to(self.device).eval()
        self.rerank_weights = None if weights is None else os.fspath(weights)
        self.rerank_seed = seed

    # ------------------------------------------------------------------ descriptors
    def _prepare(self, image: Any, bbox: Sequence[float] | None, channel_order: str) -> np.ndarray:
        return prepare_image(load_bgr(image, channel_order=channel_order, max_pixels=self.max_pixels),
                             max_side=self.max_side, min_side=self.min_side, bbox=bbox)

    @staticmethod
    def _weights_source(weights: str | None, seed: int | None) -> str:
        if weights is not None:
            return weights
        return f"random (seed {seed})" if seed is not None else "in-memory model (no file or seed recorded)"

    def _describe_prepared(self, images: Sequence[np.ndarray], names: Sequence[str] | None = None) -> Tensor:
        if not images:
            return torch.empty(0, self.dim)
        if self._runner is None:  # the engine's fast copy of the model, made once rather than per batch
            self._runner = fast_runner(self.model)
        # SuperGlobal resizes to its scales inside the model (Scale-GeM); CVNet-Global is fed one image per scale
        scales = (1.0,) if self.kind == "superglobal" else self.scales
        dataset = ImageArrays(images, scales=scales, convention=self.model.input_convention, names=names)
        return extract_global_descriptors(model=self.model, dataset=dataset, device=self.device,
                                          batch_size=self.batch_size, progress=False, runner=self._runner,
                                          weights_source=self._weights_source(self.weights, self.seed),
                                          flip=self.flip)

    def describe(
        self,
        images: Sequence[str | os.PathLike | np.ndarray],
        *,
        bboxes: Sequence[Sequence[float] | None] | None = None,
        channel_order: str = "BGR",
    ) -> Tensor:
        """Global descriptors (n, d) float32 (CPU, L2-normalised) of images or paths, optionally cropped to
        ``bboxes`` (x1, y1, x2, y2 in original pixels; None for no crop)."""
        bboxes = _per_item(bboxes, len(images), "bboxes")
        return self._describe_prepared([self._prepare(img, box, channel_order) for img, box in zip(images, bboxes)],
                                       [_image_name(img, r) for r, img in enumerate(images)])

    # ------------------------------------------------------------------ indexing
    def index(
        self,
        images: Sequence[str | os.PathLike | np.ndarray],
        ids: Sequence[int] | Tensor | None = None,
        metadata: Sequence[dict[str, Any] | None] | None = None,
        *,
        channel_order: str = "BGR",
        on_error: str = "raise",
        progress: bool = True,
    ) -> Tensor:
        """Describe ``images`` (paths or uint8 (H, W, 3) BGR arrays) and add them to the database.

        ``ids`` (n,) default to the database's next free integers; an existing id is replaced (upsert).
        ``metadata``: one dict (or None) per image; for a path, ``{"path": absolute path}`` is added (that is
        what CVNet re-ranking reads the image back from). ``on_error="skip"`` logs and skips an image that
        cannot be read (its id is returned as -1) instead of raising. Descriptors are written every 256 images,
        so after an error the images before that batch stay indexed.
        Returns the ids (n,) int64.
        """
        if on_error not in ("raise", "skip"):
            raise InvalidValueError(f"on_error must be 'raise' or 'skip', got {shorten(on_error)}")
        images = list(images)
        n = len(images)
        id_t = None
        if ids is not None:
            id_t = as_id_vector(ids)
            if id_t.numel() != n:
                raise InvalidValueError(f"got {id_t.numel()} ids for {n} images")
            check_unique(id_t)
        meta = check_metadata(metadata, n) or [None] * n
        out = torch.full((n,), -1, dtype=torch.int64)
        pending: list[int] = []
        pending_desc: list[Tensor] = []
        meta_rows: dict[int, dict[str, Any] | None] = {}

        def flush() -> None:
            if not pending:
                return
            rows = list(pending)
            added = self.database.add(torch.cat(pending_desc), None if id_t is None else id_t[rows],
                                      [meta_rows[r] for r in rows])
            out[rows] = added
            if self._db_maps is not None:  # a replaced image must not be re-ranked with its old maps
                self._db_maps.forget(added.tolist())
            pending.clear()
            pending_desc.clear()

        bar = tqdm(total=n, desc="index", unit="img", disable=not progress)
        try:
            for start in range(0, n, self.batch_size):
                rows, prepared = [], []
                for r in range(start, min(start + self.batch_size, n)):
                    try:
                        prepared.append(self._prepare(images[r], None, channel_order))
                    except (OSError, ValueError) as exc:
                        if on_error == "raise":
                            raise
                        logger.warning("skipping image %d: %s", r, exc)
                        continue
                    rows.append(r)
                    entry = dict(meta[r]) if meta[r] is not None else None
                    if isinstance(images[r], (str, os.PathLike)):
                        entry = {**(entry or {}), PATH_KEY: str(Path(images[r]).resolve())}
                    meta_rows[r] = entry
                if prepared:
                    pending.extend(rows)
                    pending_desc.append(self._describe_prepared(prepared, [_image_name(images[r], r) for r in rows]))
                if len(pending) >= _ADD_EVERY:
                    flush()
                bar.update(min(start + self.batch_size, n) - start)
            flush()
        finally:
            bar.close()
        skipped = int((out < 0).sum())
        if skipped:
            logger.warning("%d of %d images were skipped (unreadable)", skipped, n)
        return out

    # ------------------------------------------------------------------ querying
    def query(
        self,
        image: str | os.PathLike | np.ndarray,
        k: int = 10,
        *,
        bbox: Sequence[float] | None = None,
        channel_order: str = "BGR",
        post: PostProcessing | Mapping[str, Any] | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[Hit]:
        """The ``k`` best database entries for one image or path, best first (see :class:`Hit`); a ``k`` past the
        database size gives every entry.

        ``bbox`` = (x1, y1, x2, y2) crops the query (original pixels), as for the revisited benchmarks' queries.
        ``post``: post-processing for this query (None: the retriever's ``post``; ``PostProcessing()``: none).
        ``timings``: a dict to fill with the seconds each stage took (see :meth:`query_batch`).
        """
        return self.query_batch([image], k, bboxes=[bbox], channel_order=channel_order, post=post,
                                timings=timings)[0]

    def query_batch(
        self,
        images: Sequence[str | os.PathLike | np.ndarray],
        k: int = 10,
        *,
        bboxes: Sequence[Sequence[float] | None] | None = None,
        channel_order: str = "BGR",
        post: PostProcessing | Mapping[str, Any] | None = None,
        timings: dict[str, float] | None = None,
    ) -> list[list[Hit]]:
        """:meth:`query` for several images: one list of hits per image.

        Order of the work: the global search; with post-processing active (α-DBA, α-QE, k-reciprocal), each
        query's top ``post.shortlist`` candidates (with their stored vectors) re-ordered among themselves by
        :func:`helpers.postprocess.post_scores`, the rest following in global order; then the re-ranker, over
        that order: SuperGlobal re-ranks its top ``M``, CVNet re-scores its top ``rerank_top_k`` with
        ``global cosine + mix * CVNet score``. A hit's score is what placed it: the re-ranker's, else the
        post-processed similarity (k-reciprocal: minus its distance), else the global cosine.
        ``timings`` (a dict) gets the seconds of each stage run: ``prepare query`` (read, resize, crop),
        ``describe query``, ``search``, ``post-processing``, ``re-ranking``, ``metadata``, added to what it holds.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise InvalidValueError(f"k must be a positive integer, got {shorten(k)}")
        count = len(self.database)
        if count == 0:
            raise InvalidValueError("the database is empty: index some images first")
        post = self.post if post is None else _post_settings(post)
        k = min(int(k), count)  # more than the database holds is all of it (never a result padded to a huge k)
        bboxes = _per_item(bboxes, len(images), "bboxes")
        with timed(timings, "prepare query"):
            prepared = [self._prepare(img, box, channel_order) for img, box in zip(images, bboxes)]
        with timed(timings, "describe query"):
            queries = self._describe_prepared(prepared,
                                              [f"query {_image_name(img, r)}" for r, img in enumerate(images)])
        if post is not None and post.active:
            candidates = self._post_rows(queries, k, post, timings)
            if self.reranker is None:
                rows = [(s, i, g) for s, i, g, _ in candidates]
            else:
                with timed(timings, "re-ranking"):
                    if isinstance(self.reranker, SuperGlobalRerank):
                        rows = self._superglobal_over(queries, candidates, k)
                    else:
                        rows = self._cvnet_rows(queries, prepared, k, candidates=candidates)
        elif self.reranker is None:
            with timed(timings, "search"):
                scores, ids = self.database.search(queries, k)
            rows = [(s, i, s) for s, i in zip(scores.cpu(), ids.cpu())]
        elif isinstance(self.reranker, SuperGlobalRerank):
            with timed(timings, "re-ranking"):  # SuperGlobal searches its top M itself
                rows = self._superglobal_rows(queries, k)
        else:
            with timed(timings, "search"):
                scores, ids = (t.cpu() for t in self.database.search(queries, max(k, self.rerank_top_k)))
            with timed(timings, "re-ranking"):
                rows = self._cvnet_rows(queries, prepared, k, searched=(scores, ids))
        with timed(timings, "metadata"):
            return self._hits(rows, k)

    def _post_rows(self, queries: Tensor, k: int, post: PostProcessing, timings: dict[str, float] | None
                   ) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per query: (scores, ids, global cosines, vectors) of its top ``max(k, post.shortlist)`` candidates, the
        first ``post.shortlist`` re-ordered by the post-processing (the rest keep the global order)."""
        n = min(max(k, post.shortlist), len(self.database))
        with timed(timings, "search"):
            scores, ids, vectors = (t.cpu() for t in self.database.search_with_vectors(queries, n))
        rows = []
        with timed(timings, "post-processing"):
            for r in range(queries.shape[0]):
                valid = ids[r] >= 0
                s, i, v = scores[r][valid], ids[r][valid], vectors[r][valid].float()
                t = min(post.shortlist, i.numel())
                head = post_scores(queries[r].cpu(), v[:t], post)
                order = torch.argsort(head, descending=True, stable=True)  # positions: the rest follow by position
                keep, new_s = top_then_rest([order, head[order]], [torch.arange(i.numel()), s])
                rows.append((new_s, i[keep], s[keep], v[keep]))
        return rows

    def _superglobal_over(self, queries: Tensor, candidates: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]],
                          k: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        """SuperGlobal re-ranking of the top ``M`` of given (post-processed) candidates; the rest follow."""
        rows = []
        for r, (s, i, g, v) in enumerate(candidates):
            m = min(int(self.reranker.M), i.numel())
            q = queries[r : r + 1].to(self.device)
            positions = torch.arange(m, device=self.device)[None]  # re-ranked as positions: the columns follow them
            new_s, order = self.reranker.rerank_candidates(q, v[None, :m].to(self.device), positions)
            order = order[0].cpu()
            new_i, new_s, new_g = top_then_rest([i[order], new_s[0].cpu(), g[order]], [i, s, g], limit=k)
            rows.append((new_s, new_i, new_g))
        return rows

    def _superglobal_rows(self, queries: Tensor, k: int) -> list[tuple[Tensor, Tensor, Tensor]]:
        # on the retriever's device, as _superglobal_over: the re-ranking follows the queries' device
        scores, ids = self.reranker.rerank(queries.to(self.device), self.database)
        scores, ids = scores.cpu(), ids.cpu()
        m = ids.shape[1]
        tail_s = tail_i = None
        if k > m and len(self.database) > m:  # positions past the re-ranked M keep the global order
            tail_s, tail_i = (t.cpu() for t in self.database.search(queries, k))
        rows = []
        for r in range(queries.shape[0]):
            rest = [ids[r][:0], scores[r][:0]] if tail_i is None else [tail_i[r], tail_s[r]]
            i, s = top_then_rest([ids[r], scores[r]], rest, limit=k)
            globals_ = self.database.get(i).cpu() @ queries[r] if i.numel() else s.clone()
            rows.append((s, i, globals_))
        return rows

    def _cvnet_rows(self, queries: Tensor, prepared: Sequence[np.ndarray], k: int, *,
                    searched: tuple[Tensor, Tensor] | None = None,
                    candidates: Sequence[tuple[Tensor, Tensor, Tensor, Tensor]] | None = None) -> list[tuple]:
        """CVNet re-ranking of the global search result ``searched`` (scores, ids), or of post-processed
        ``candidates``: their top ``rerank_top_k`` re-scored with global cosine + mix * CVNet score, the rest
        keeping their order and scores."""
        found, pairs = [], []
        for r in range(queries.shape[0]):
            if candidates is not None:
                post_s, i, g, _ = candidates[r]
                t = min(self.rerank_top_k, i.numel())
                s = torch.cat([g[:t], post_s[t:]])  # CVNet's mix is over the global cosine
                by_id = dict(zip(i.tolist(), g.tolist()))
            else:
                valid = searched[1][r] >= 0
                s, i = searched[0][r][valid], searched[1][r][valid]
                t = min(self.rerank_top_k, i.numel())
                by_id = dict(zip(i.tolist(), s.tolist()))
            found.append((s, i, t, by_id))
            pairs.extend((r, j) for j in i[:t].tolist())
        store = self._map_store()
        store.dataset.load_paths(j for _, j in pairs if not store.in_memory(j))
        query_maps = ReducedMapStore(model=self.reranker, device=self.device, batch_size=self.batch_size,
                                     dataset=ImageArrays(prepared, convention=self.reranker.input_convention),
                                     weights_source=self._weights_source(self.rerank_weights, self.rerank_seed))
        scorer = CVNetPairScorer(model=self.reranker, query_maps=query_maps, db_maps=store,
                                 batch_size=self.batch_size, progress=False)
        pair_scores = torch.from_numpy(scorer(np.asarray(pairs, dtype=np.int64).reshape(-1, 2))).float()
        if self.map_cache_size == 0:
            store.clear()
        rows, start = [], 0
        for s, i, t, by_id in found:
            new_s, new_i = apply_cvnet_rerank(s, i, pair_scores[start : start + t], weight=self.mix)
            start += t
            globals_ = torch.tensor([by_id[j] for j in new_i.tolist()], dtype=torch.float32)
            rows.append((new_s[:k], new_i[:k], globals_[:k]))
        return rows

    def _hits(self, rows: Sequence[tuple[Tensor, Tensor, Tensor]], k: int) -> list[list[Hit]]:
        wanted = torch.unique(torch.cat([i[i >= 0] for _, i, _ in rows]))
        meta = dict(zip(wanted.tolist(), self.database.get_metadata(wanted))) if wanted.numel() else {}
        out = []
        for s, i, g in rows:
            out.append([Hit(id=int(j), score=float(sc), metadata=meta[int(j)], global_score=float(gs))
                        for sc, j, gs in zip(s[:k].tolist(), i[:k].tolist(), g[:k].tolist()) if j >= 0])
        return out

    # ------------------------------------------------------------------ CVNet database maps
    def _map_store(self) -> ReducedMapStore:
        """The reduced CVNet maps of database images by id (LRU, ``map_cache_size``), for the current re-ranker."""
        if not isinstance(self.reranker, CVNetRerank):
            raise InvalidValueError("database maps need a CVNetRerank re-ranker")
        if self._db_maps is None or self._db_maps.model is not self.reranker:
            images = StoredImages(self.database, convention=self.reranker.input_convention,
                                  max_side=self.max_side, min_side=self.min_side, max_pixels=self.max_pixels)
            # a cache of 0 still holds one query's candidates while they are scored (then it is cleared)
            self._db_maps = ReducedMapStore(model=self.reranker, dataset=images, device=self.device,
                                            max_items=max(1, self.map_cache_size), batch_size=self.batch_size,
                                            weights_source=self._weights_source(self.rerank_weights,
                                                                                self.rerank_seed))
        return self._db_maps

    def database_maps(self, ids: Tensor | Sequence[int]) -> list[list[Tensor]]:
        """Reduced CVNet maps of database ids, recomputed from their stored image paths (LRU-cached by id): per
        id, the list of (1, 256, h_s, w_s) maps, one per correlation scale."""
        store = self._map_store()
        id_list = [int(i) for i in (ids.tolist() if isinstance(ids, Tensor) else ids)]
        store.dataset.load_paths(i for i in id_list if not store.in_memory(i))
        return [store.get(i) for i in id_list]

    def cached_map_ids(self) -> list[int]:
        """Ids whose CVNet maps are cached, least recently used first."""
        return [] if self._db_maps is None else self._db_maps.cached_indices()

    def clear_cache(self) -> None:
        """Forget the cached CVNet maps (e.g. after image files changed on disk)."""
        if self._db_maps is not None:
            self._db_maps.clear()

    # ------------------------------------------------------------------ persistence
    def save(self, directory: str | os.PathLike, *, remote: Mapping[str, Any] | None = None) -> Path:
        """Write the retriever into ``directory``: the database (local back-ends: ``database-<save id>.pt`` /
        ``.faiss``), the weights when their origin is unknown (no ``weights`` path, no ``seed``; likewise for a
        CVNet re-ranker), then ``retriever.json``: model config and weights fingerprint, re-ranker (kind and
        settings, or CVNet's weights source), settings, database description, and every file's sha256.

        Atomic as a whole: ``retriever.json`` is written last (the commit) and names files no other save uses;
        the files of the previous save are removed only after it (with temporary files of an interrupted one).
        A crash at any point leaves the old save or the new one loadable. Saves to one folder take turns.
        A remote database (Pinecone) persists by itself: ``remote`` gives the connection settings to record
        (``host``, ``index_name``; the namespace is read from the database). API keys are never written.
        Returns the path of ``retriever.json`` (the format: :mod:`helpers.retrieval.saved`).
        """
        return save_retriever(self, directory, remote=remote)

    @staticmethod
    def read_config(directory: str | os.PathLike) -> dict[str, Any]:
        """The ``retriever.json`` of a saved retriever, checked for format and version."""
        return read_config(directory)

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        model: nn.Module | None = None,
        *,
        database: AbstractVectorDB | None = None,
        reranker: nn.Module | None = RECORDED,
        weights: str | os.PathLike | None = None,
        rerank_weights: str | os.PathLike | None = None,
        device: torch.device | str = "cpu",
        check_weights: bool = True,
        api_key: str | None = None,
        **settings: Any,
    ) -> Retriever:
        """Open a retriever written by :meth:`save`, checking the sha256 of every file it names.

        ``model``: the global model to use; it must match the recorded class, depth, dimension and input
        convention, and (``check_weights``) the recorded weights fingerprint. Without it the model is rebuilt
        from the recorded checkpoint path (``weights`` overrides a moved file), the weights saved with the index,
        or the recorded random seed. ``reranker``: by default the recorded one (SuperGlobal with its M, K, beta;
        CVNet rebuilt like the model, ``rerank_weights`` overriding a moved file); None for none, or a module.
        ``database``: use this one instead of opening the recorded one. ``settings`` override the recorded
        constructor settings (e.g. ``rerank_top_k=50``). A save running meanwhile is waited out: when a file
        named by ``retriever.json`` disappears because a new save replaced it, the new ``retriever.json`` is read.
        """
        parts = load_parts(directory, model=model, database=database, reranker=reranker, weights=weights,
                           rerank_weights=rerank_weights, check_weights=check_weights, api_key=api_key,
                           recorded_reranker=RECORDED, device=device)
        recorded = parts.pop("settings")
        return cls(**parts, device=device, **{**recorded, **settings})


def _image_name(image: Any, row: int) -> str:
    """What errors call an image: its path, or its position in the call."""
    return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"image {row} (array)"


def _post_settings(post: PostProcessing | Mapping[str, Any] | None) -> PostProcessing | None:
    """A :class:`PostProcessing` from itself, its fields as a dict (a save's record), or None."""
    if post is None or isinstance(post, PostProcessing):
        return post
    if isinstance(post, Mapping):
        return PostProcessing(**post)
    raise TypeError(f"post must be a helpers.postprocess.PostProcessing, a dict of its fields or None, got "
                    f"{type(post).__name__}")


def _per_item(values: Sequence[Any] | None, n: int, name: str) -> list[Any]:
    if values is None:
        return [None] * n
    values = list(values)
    if len(values) != n:
        raise InvalidValueError(f"{name} has {len(values)} entries for {n} images")
    return values


# --------------------------------------------------------------------------------------------------------------
# What `python retrieve.py build` and `query` run
# --------------------------------------------------------------------------------------------------------------


