"""SuperGlobal (Shao et al., ICCV 2023): improved global descriptors and training-free re-ranking."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
import torchvision.transforms.functional as TF
from torch import Tensor, nn

from common.constants import SUPERGLOBAL_SCALES
from common.errors import InvalidValueError

from . import functional as MF
from .backbone import ResNetBackbone
from .checkpoint import OFFICIAL_CONVENTION, InputConvention
from .layers import GeMPlus, GlobalHead, RegionalGeM, ScaleGeM, l2n

log = logging.getLogger(__name__)



class SuperGlobal(nn.Module):
    """SuperGlobal global descriptor on the CVNet weights.

    Per scale: ResNet (ReLU-up) -> Regional-GeM -> GeM+ (p=4.6) -> L2 -> fc; then Scale-GeM (L2 per scale,
    element-wise max) over ``scales`` and a final L2. Each of the four can be switched off: ``gemp=False`` uses
    the checkpoint's learned GeM, ``rgem=False`` skips Regional-GeM, ``sgem=False`` averages the scales,
    ``relup=False`` uses plain ReLU (the release's switch leaves stage 1's inner clamps on; this one does not).
    Scales are resized inside the model with torchvision's tensor resize to (int(h*s), int(w*s)), bilinear;
    ``antialias=True`` is that function's default since torchvision 0.17.

    ``model(images)``: (B, 3, H, W) normalised images -> (B, 2048) L2-normalised descriptors.
    """

    official_ignored_prefixes = ("conv2ds.", "cv_learner.")
    derived_prefixes = ()

    def __init__(
        self,
        depth: int = 50,
        gemp: bool = True,
        rgem: bool = True,
        sgem: bool = True,
        relup: bool = True,
        scales: Sequence[float] = SUPERGLOBAL_SCALES,
        antialias: bool = True,
        reduction_dim: int = 2048,
        input_convention: InputConvention = OFFICIAL_CONVENTION,
    ) -> None:
        super().__init__()
        self.depth = depth
        self.gemp, self.rgem, self.sgem, self.relup = gemp, rgem, sgem, relup
        self.scales = tuple(scales)
        self.antialias = antialias
        self.input_convention = input_convention
        self.backbone = ResNetBackbone(depth, num_stages=4)
        self.head = GlobalHead(2048, reduction_dim)
        self.regional_gem = RegionalGeM()
        self.gem_plus = GeMPlus()
        self.scale_gem = ScaleGeM("max" if sgem else "mean")

    def forward_single_scale(self, images: Tensor) -> Tensor:
        """One scale: (B, 3, H, W) -> (B, reduction_dim), the fc output (not normalised)."""
        x = self.backbone(images, relup=self.relup)
        if self.rgem:
            x = self.regional_gem(x)
        x = x.flatten(2)
        x = self.gem_plus(x) if self.gemp else self.head.pool(x)
        return self.head.fc(l2n(x))

    def forward(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        per_scale = [
            self.forward_single_scale(
                TF.resize(images, [int(h * s), int(w * s)], antialias=self.antialias)
            )
            for s in self.scales
        ]
        return l2n(self.scale_gem(per_scale))


def _as_tensor_database(database: Any) -> Tensor | None:
    if isinstance(database, Tensor):
        return database
    try:
        import numpy as np
    except ImportError:  # pragma: no cover
        return None
    if isinstance(database, np.ndarray):
        return torch.from_numpy(database)
    return None


class SuperGlobalRerank(nn.Module):
    """SuperGlobal's training-free re-ranking of the top ``M`` (default 400) global candidates.

    ``rerank(queries (q, d), database)`` with ``database`` an (n, d) tensor of L2-normalised descriptors or any
    :class:`helpers.AbstractVectorDB` (via ``search_with_vectors``); returns ``(scores (q, M), ids (q, M))`` best
    first. Vectorised over queries; ``query_chunk`` queries are searched at a time, which bounds memory (a chunk
    holds its (chunk, M, d) candidate vectors) while each database scan serves many queries (with 8, a 1M-vector
    float16 index was scanned 9 times for 70 queries: 254 ms/query end to end instead of 81).
    """

    def __init__(self, M: int = 400, K: int = 9, beta: float = 0.15, query_chunk: int = 64) -> None:
        super().__init__()
        if M < 1 or K < 0:
            raise InvalidValueError(f"need M >= 1 and K >= 0, got M={M}, K={K}")
        if not (math.isfinite(beta) and beta >= 0):  # a NaN beta would make every re-ranked score NaN
            raise InvalidValueError(f"beta must be a finite number >= 0, got {beta}")
        self.M, self.K, self.beta, self.query_chunk = M, K, beta, query_chunk

    def candidates(self, queries: Tensor, database: Any, m: int) -> tuple[Tensor, Tensor]:
        """Top-``m`` candidates of each query: (vectors (q, m, d), ids (q, m)); a tensor database is scanned in
        blocks (:func:`models.functional.blockwise_topk`), each scored as ``queries @ block.T``."""
        xb = _as_tensor_database(database)
        if xb is not None:
            xb = xb.to(queries.device)
            _, ids = MF.blockwise_topk(queries, xb, m, rows_first=False)
            return xb[ids].to(queries.dtype), ids
        _, ids, vectors = database.search_with_vectors(queries, m)
        return vectors.to(queries.device, queries.dtype), ids.to(queries.device)

    @torch.no_grad()
    def rerank(self, queries: Tensor, database: Any) -> tuple[Tensor, Tensor]:
        queries = torch.as_tensor(queries)
        if queries.dim() != 2:
            raise InvalidValueError(f"queries must be (q, d), got shape {tuple(queries.shape)}")
        m = min(self.M, len(database))
        if m == 0:
            raise InvalidValueError("the database is empty")
        xb = _as_tensor_database(database)
        if xb is not None:  # moved to the queries' device once, not once per chunk of queries
            database = xb.to(queries.device)
        scores, ids = [], []
        for start in range(0, queries.shape[0], self.query_chunk):
            chunk = queries[start : start + self.query_chunk]
            s, i = self.rerank_candidates(chunk, *self.candidates(chunk, database, m))
            scores.append(s)
            ids.append(i)
        return torch.cat(scores), torch.cat(ids)

    @torch.no_grad()
    def rerank_candidates(self, queries: Tensor, vectors: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Re-rank given candidates: ``queries`` (q, d), their top-M ``vectors`` (q, M, d) and ``ids`` (q, M), e.g.
        read off an existing global ranking instead of searched again -> (scores (q, M), ids (q, M)) best first."""
        if vectors.dim() != 3 or vectors.shape[:2] != ids.shape or vectors.shape[0] != queries.shape[0]:
            raise InvalidValueError(f"need vectors (q, M, d) and ids (q, M) for {queries.shape[0]} queries, got "
                                    f"{tuple(vectors.shape)} and {tuple(ids.shape)}")
        return MF.superglobal_rerank(queries, vectors.to(queries.device, queries.dtype), ids, k=self.K,
                                     beta=self.beta)

    def forward(self, queries: Tensor, database: Any) -> tuple[Tensor, Tensor]:
        return self.rerank(queries, database)
