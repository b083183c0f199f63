"""The field's standard post-processing of a global ranking, over any database size: alpha-DBA, alpha-QE and
k-reciprocal re-ranking (the maths is in :mod:`models.functional`), applied whole to a small database and to each
query's shortlist of a large one (:func:`postprocess_ranking`).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.errors import InvalidValueError, shorten
from models import functional as MF

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PostProcessing:
    """Which post-processing to apply; every step is off by default.

    ``aqe_k`` / ``dba_k``: neighbours of alpha-QE / alpha-DBA (0 = off) with exponents ``aqe_alpha`` /
    ``dba_alpha`` (0 = average QE / DBA); ``kreciprocal`` with ``k1``, ``k2``, ``lambda_value`` (Zhong et al.'s
    20, 6, 0.3); ``shortlist``: candidates per query in shortlist mode; ``full_limit``: the largest database
    post-processed whole.
    """

    aqe_k: int = 0
    aqe_alpha: float = 3.0
    dba_k: int = 0
    dba_alpha: float = 3.0
    kreciprocal: bool = False
    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3
    shortlist: int = 1000
    full_limit: int = 20000

    def __post_init__(self) -> None:
        problems = [f"{name}={shorten(getattr(self, name))} ({need})" for name, need, ok in _FIELD_RULES
                    if not ok(getattr(self, name))]
        if problems:
            raise InvalidValueError("invalid post-processing settings: " + "; ".join(problems))

    @property
    def active(self) -> bool:
        return bool(self.aqe_k or self.dba_k or self.kreciprocal)

    def describe(self) -> str:
        """What is applied, for tables: e.g. ``"a-DBA k=2 a=3 + a-QE k=2 a=3 + k-reciprocal 20/6/0.3"``."""
        steps = []
        if self.dba_k:
            steps.append(f"α-DBA k={self.dba_k} α={self.dba_alpha:g}")
        if self.aqe_k:
            steps.append(f"α-QE k={self.aqe_k} α={self.aqe_alpha:g}")
        if self.kreciprocal:
            steps.append(f"k-reciprocal k1={self.k1} k2={self.k2} λ={self.lambda_value:g}")
        return " + ".join(steps) if steps else "none"


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite real number (NaN and inf pass every ``v < bound`` test, so they are refused by name)."""
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
        and math.isfinite(value)


#: (field, what it needs, check) for every :class:`PostProcessing` field: an invalid one is named.
_FIELD_RULES: tuple[tuple[str, str, Any], ...] = (
    ("aqe_k", "a whole number >= 0", lambda v: _is_int(v) and v >= 0),
    ("aqe_alpha", "a finite number >= 0", lambda v: _is_number(v) and v >= 0),
    ("dba_k", "a whole number >= 0", lambda v: _is_int(v) and v >= 0),
    ("dba_alpha", "a finite number >= 0", lambda v: _is_number(v) and v >= 0),
    ("kreciprocal", "True or False", lambda v: isinstance(v, (bool, np.bool_)) or (_is_int(v) and v in (0, 1))),
    ("k1", "a whole number >= 1", lambda v: _is_int(v) and v >= 1),
    ("k2", "a whole number >= 1", lambda v: _is_int(v) and v >= 1),
    ("lambda_value", "a number in [0, 1]", lambda v: _is_number(v) and 0 <= v <= 1),
    ("shortlist", "a whole number >= 1", lambda v: _is_int(v) and v >= 1),
    ("full_limit", "a whole number >= 0", lambda v: _is_int(v) and v >= 0),
)


def _as_float_tensor(x: Any) -> Tensor:
    return (x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))).float()


def _order_descending(scores: Tensor) -> Tensor:
    return torch.argsort(scores, dim=-1, descending=True, stable=True)


def postprocess_full(xq: Tensor, xb: Tensor, post: PostProcessing, *, chunk: int = 1024) -> np.ndarray:
    """Full mode: (n_db, nq) int64 ranks of the whole database after DBA, alpha-QE and k-reciprocal."""
    xq, xb = _as_float_tensor(xq), _as_float_tensor(xb)
    if post.dba_k:
        xb = MF.database_side_augmentation(xb, k=post.dba_k, alpha=post.dba_alpha)
    if post.aqe_k:
        xq = MF.alpha_query_expansion(xq, xb, k=post.aqe_k, alpha=post.aqe_alpha, chunk=chunk)
    if post.kreciprocal:
        dist = MF.k_reciprocal_distance(xq, xb, k1=post.k1, k2=post.k2, lambda_value=post.lambda_value)
        return torch.argsort(dist, dim=1, stable=True).T.numpy()
    return torch.cat([_order_descending(xq[s : s + chunk] @ xb.T) for s in range(0, xq.shape[0], chunk)]).T.numpy()


def post_scores(q: Tensor, candidates: Tensor, post: PostProcessing) -> Tensor:
    """Shortlist mode for one query: ``q`` (d,), its ``candidates`` (N, d) best first -> (N,) scores, higher
    better, that order them: the inner product of the expanded query with the augmented candidates, or minus the
    k-reciprocal distance."""
    q, cand = q.float(), candidates.float()
    if post.dba_k:
        cand = MF.database_side_augmentation(cand, k=post.dba_k, alpha=post.dba_alpha)
    q = q.unsqueeze(0)
    if post.aqe_k:
        q = MF.alpha_query_expansion(q, cand, k=post.aqe_k, alpha=post.aqe_alpha)
    if post.kreciprocal:
        return -MF.k_reciprocal_distance(q, cand, k1=post.k1, k2=post.k2, lambda_value=post.lambda_value)[0]
    return cand @ q[0]


def postprocess_candidates(q: Tensor, candidates: Tensor, post: PostProcessing) -> Tensor:
    """Shortlist mode for one query: ``q`` (d,), its ``candidates`` (N, d) best first -> the new order (N,) of
    the candidates (indices into ``candidates``), best first (:func:`post_scores`, ties in the given order)."""
    return _order_descending(post_scores(q, candidates, post))


def postprocess_ranking(xq: Any, xb: Any, ranks: np.ndarray, post: PostProcessing, *,
                        gather: Any = None) -> np.ndarray:
    """Apply ``post`` to a global ranking ``ranks`` (n_db, nq) of queries ``xq`` (nq, d) over the database ``xb``
    ((n_db, d), or any object the ``gather(rows) -> (len(rows), d)`` callable reads rows of, e.g. the parts of a
    +1M database). Returns the new ranks, same shape and dtype.

    The steps run in the order the literature applies them: database-side augmentation first, then query expansion
    against the augmented database, then either a plain re-ranking by inner product or k-reciprocal re-ranking.
    Two modes, chosen by the database size:

    - **full** (``xb`` one tensor of ``n_db <= post.full_limit`` rows): DBA augments every database vector, alpha-QE
      expands each query with its top-k augmented neighbours, and the whole database is re-ranked (k-reciprocal:
      one pool of all queries and the database, as the authors' function). Memory O(n_db^2) for k-reciprocal,
      O(chunk x n_db) otherwise.
    - **shortlist** (larger databases, e.g. +1M): each query's top ``post.shortlist`` candidates of ``ranks`` are
      post-processed among themselves (DBA neighbours searched within the shortlist, alpha-QE's neighbours are the
      query's top-k, k-reciprocal pools the query with its candidates) and re-ordered; the rest of the ranking keeps
      its order. Memory O(query_chunk x shortlist x d + shortlist^2), whatever the database size.

    Learned PCA whitening changes the descriptors themselves and is applied before ranking (:func:`whiten_parts`,
    :func:`models.functional.apply_whitening`), not here.
    """
    if not post.active:
        return ranks
    n_db, nq = ranks.shape
    if gather is None and n_db <= post.full_limit:
        log.info("post-processing (%s) over the whole database of %d", post.describe(), n_db)
        return postprocess_full(_as_float_tensor(xq), _as_float_tensor(xb), post).astype(ranks.dtype, copy=False)
    if gather is None:
        xb_t = _as_float_tensor(xb)

        def gather(rows: Tensor) -> Tensor:
            return xb_t[rows]

    n = min(post.shortlist, n_db)
    log.info("post-processing (%s) of each query's top %d of %d (shortlist mode)", post.describe(), n, n_db)
    xq_t = _as_float_tensor(xq)
    out = ranks.copy()
    for i in range(nq):
        ids = torch.from_numpy(np.ascontiguousarray(ranks[:n, i]).astype(np.int64))
        order = postprocess_candidates(xq_t[i], gather(ids), post)
        out[:n, i] = ids[order].numpy().astype(ranks.dtype, copy=False)
    return out


def whiten_parts(vectors: Tensor | Sequence[Tensor], whitening: dict[str, Tensor]) -> Tensor | list[Tensor]:
    """Learned whitening of descriptors, or of each part of a +1M database."""
    if isinstance(vectors, (list, tuple)):
        return [MF.apply_whitening(_as_float_tensor(v), whitening) for v in vectors]
    return MF.apply_whitening(_as_float_tensor(vectors), whitening)
