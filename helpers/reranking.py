"""Rankings for evaluation: the global ranking, CVNet re-ranking (clean and paper modes), SuperGlobal re-ranking.

Ranking matrices follow revisitop's layout: ``ranks`` is (n_db, n_queries), column i lists database indices
from most to least similar for query i.

CVNet re-ranking (Lee et al., CVPR 2022, Sec. 4): the final similarity of a re-ranked candidate is
``global cosine + weight * CVNet score`` (weight 0.5, :func:`models.functional.cvnet_score_mix`) over the top
``top_k`` (100) candidates. Two modes for ranking matrices (:func:`cvnet_rerank`):

- ``clean`` (default): the first ``top_k`` of the global ranking, the same for every protocol; no ground truth.
- ``paper``: the released evaluation's protocol, needed to match the paper's numbers. Walking the global ranking,
  ground-truth junk is skipped, an easy positive counts for Easy and Medium, a hard positive for Medium and Hard,
  a negative for all three, until each protocol has ``top_k``; the re-scored items are re-sorted only among the
  positions they held, every other position (interleaved junk included) keeps its place. It uses the ground
  truth at re-ranking time and gives one ranking matrix per protocol.

:func:`apply_cvnet_rerank` is the same rule for one query's search result (the retrieval API's ``clean`` mode).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn
from tqdm import tqdm

from common.constants import CVNET_RERANK_TOP_K, CVNET_SCORE_WEIGHT
from common.errors import InvalidValueError
from helpers.distributed import split_evenly
from helpers.evaluation.metrics import PROTOCOLS
from models.functional import blockwise_topk, cvnet_score_mix

logger = logging.getLogger(__name__)

RERANK_MODES = ("clean", "paper")
#: A pair scorer: (P, 2) int array of (query index, database index) -> (P,) scores.
PairScorer = Callable[[np.ndarray], np.ndarray]


def _as_tensor(x: Any) -> Tensor:
    return x if isinstance(x, Tensor) else torch.from_numpy(np.asarray(x))


# --------------------------------------------------------------------------------------------------------------
# Global ranking
# --------------------------------------------------------------------------------------------------------------


DbVectors = Tensor | np.ndarray | Sequence[Tensor | np.ndarray]
_SCORE_ROWS = 1 << 16  # database rows multiplied at a time (float16 parts are converted one block at a time)


def _db_parts(db_vectors: DbVectors) -> list[Tensor]:
    """The database as a list of (n_i, d) tensors: one array, or the parts of a logical concatenation."""
    if isinstance(db_vectors, (list, tuple)):
        return [_as_tensor(p) for p in db_vectors]
    return [_as_tensor(db_vectors)]


def db_rows(db_vectors: DbVectors, rows: Tensor) -> Tensor:
    """float32 rows ``rows`` (int64) of the logical concatenation of the database parts, (len(rows), d)."""
    parts = _db_parts(db_vectors)
    if len(parts) == 1:
        return parts[0][rows].float()
    offsets = np.cumsum([0] + [p.shape[0] for p in parts])
    out = torch.empty(rows.shape[0], parts[0].shape[1])
    which = np.searchsorted(offsets, rows.numpy(), side="right") - 1
    for i, part in enumerate(parts):
        sel = np.flatnonzero(which == i)
        if sel.size:
            out[sel] = part[rows[sel] - int(offsets[i])].float().cpu()
    return out


def global_ranking(query_vectors: Tensor | np.ndarray, db_vectors: DbVectors, *,
                   device: torch.device | str = "cpu", query_chunk: int = 16, with_similarities: bool = True,
                   rank_dtype: Any = np.int64) -> tuple[np.ndarray | None, np.ndarray]:
    """Rank the database by inner product (cosine for L2-normalised descriptors).

    ``query_vectors`` (nq, d), ``db_vectors`` (n_db, d) -> (similarities (n_db, nq) float32,
    ranks (n_db, nq) int64). Ties keep database order (stable sort), so a ranking is reproducible.

    Memory stays bounded for the +1M sets: ``db_vectors`` may be a list of parts (the database, then the
    distractors) ranked as their concatenation without building it; float16 parts are converted block by
    block; the outputs are written in place, one (n_db, query_chunk) block of scores at a time.
    ``with_similarities=False`` skips the similarity matrix (returns None for it) and ``rank_dtype=np.int32``
    halves the ranks (1M x 70: 280 MB instead of 560 MB).
    """
    xq = _as_tensor(query_vectors).to(device, torch.float32)
    parts = _db_parts(db_vectors)  # where the caller keeps them: parts in host memory stream to ``device`` by blocks
    d = xq.shape[1] if xq.dim() == 2 else -1
    if xq.dim() != 2 or any(p.dim() != 2 or p.shape[1] != d for p in parts):
        raise InvalidValueError(f"need (nq, d) queries and (n_db, d) database, got {tuple(xq.shape)}, "
                                f"{[tuple(p.shape) for p in parts]}")
    n_db, nq = sum(p.shape[0] for p in parts), xq.shape[0]
    if n_db > np.iinfo(rank_dtype).max:
        raise InvalidValueError(f"rank_dtype {np.dtype(rank_dtype)} cannot index {n_db} database items")
    sims = np.empty((n_db, nq), dtype=np.float32) if with_similarities else None
    ranks = np.empty((n_db, nq), dtype=rank_dtype)
    for start in range(0, nq, query_chunk):
        block = xq[start : start + query_chunk]
        # the full ranking (k = n_db), scored (rows, queries) _SCORE_ROWS rows at a time
        d, i = blockwise_topk(block, parts, n_db, block=_SCORE_ROWS, gemm_rows=_SCORE_ROWS, rows_first=True)
        if sims is not None:
            sims[:, start : start + block.shape[0]] = torch.empty_like(d).scatter_(1, i, d).T.cpu().numpy()
        ranks[:, start : start + block.shape[0]] = i.T.cpu().numpy()
    return sims, ranks


# --------------------------------------------------------------------------------------------------------------
# CVNet re-ranking: which positions are re-scored, and how they are re-sorted
# --------------------------------------------------------------------------------------------------------------


def paper_mode_positions(ranking: np.ndarray, *, easy: np.ndarray, hard: np.ndarray, junk: np.ndarray,
                         top_k: int) -> dict[str, np.ndarray]:
    """Positions (into one query's ``ranking`` (n_db,)) re-scored under each protocol in ``paper`` mode.

    An item is junk, else easy, else hard, else negative (the release's order of tests). Easy takes easy
    positives and negatives, Medium everything but junk, Hard hard positives and negatives; each the first
    ``top_k`` in ranking order.
    """
    is_junk = np.isin(ranking, junk)
    is_easy = np.isin(ranking, easy) & ~is_junk
    is_hard = np.isin(ranking, hard) & ~is_junk & ~is_easy
    eligible = {"easy": ~is_junk & ~is_hard, "medium": ~is_junk, "hard": ~is_junk & ~is_easy}
    return {p: np.flatnonzero(eligible[p])[:top_k] for p in PROTOCOLS}


def rerank_candidates(ranking: np.ndarray, *, mode: str, top_k: int,
                      gnd_entry: Mapping[str, Any] | None = None) -> dict[str, np.ndarray]:
    """Positions re-scored in one query's ``ranking`` (n_db,) per protocol: {'easy','medium','hard'} -> (k,)."""
    if mode not in RERANK_MODES:
        raise InvalidValueError(f"unknown re-ranking mode {mode!r}; expected one of {RERANK_MODES}")
    if top_k < 1:
        raise InvalidValueError(f"top_k must be >= 1, got {top_k}")
    if mode == "clean":
        first = np.arange(min(top_k, len(ranking)))
        return {p: first for p in PROTOCOLS}
    if gnd_entry is None:
        raise InvalidValueError("re-ranking mode 'paper' needs the ground truth (easy/hard/junk per query)")
    lists = {key: np.asarray(gnd_entry.get(key, []), dtype=np.int64).reshape(-1) for key in ("easy", "hard", "junk")}
    return paper_mode_positions(ranking, top_k=top_k, **lists)


def resort_positions(ranking: np.ndarray, positions: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Re-sort the items at ``positions`` of ``ranking`` by ``scores`` (descending, ties in ranking order)
    among those positions only; every other position keeps its item. Returns a new (n_db,) ranking."""
    out = ranking.copy()
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    out[positions] = ranking[positions][order]
    return out


def cvnet_rerank(
    *,
    ranks: np.ndarray,
    query_vectors: Tensor | np.ndarray,
    db_vectors: DbVectors,
    score_pairs: PairScorer,
    mode: str = "clean",
    gnd: Sequence[Mapping[str, Any]] | None = None,
    top_k: int = CVNET_RERANK_TOP_K,
    weight: float = CVNET_SCORE_WEIGHT,
) -> dict[str, np.ndarray]:
    """CVNet re-ranking of a global ranking: {'easy','medium','hard'} -> (n_db, nq) ranking matrices.

    ``ranks`` (n_db, nq) is the global ranking of ``query_vectors`` (nq, d) against ``db_vectors`` (n_db, d)
    (or its parts, as for :func:`global_ranking`); ``score_pairs`` scores (P, 2) (query, database) index pairs
    with CVNet-Rerank (e.g. :class:`CVNetPairScorer`).
    A re-scored candidate's similarity is ``query . candidate + weight * score``. Each distinct pair is scored
    once even when several protocols re-score it. In ``clean`` mode the three matrices are the same array.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise InvalidValueError(f"ranks must be (n_db, n_queries), got shape {ranks.shape}")
    nq = ranks.shape[1]
    if mode == "paper" and (gnd is None or len(gnd) != nq):
        raise InvalidValueError(f"re-ranking mode 'paper' needs one ground-truth entry per query ({nq})")
    positions = [rerank_candidates(ranks[:, i], mode=mode, top_k=top_k, gnd_entry=gnd[i] if gnd else None)
                 for i in range(nq)]
    pairs = np.array(sorted({(i, int(ranks[p, i])) for i in range(nq) for pos in positions[i].values()
                             for p in pos}), dtype=np.int64).reshape(-1, 2)
    xq = _as_tensor(query_vectors).float()
    qi, di = torch.from_numpy(pairs[:, 0]), torch.from_numpy(pairs[:, 1])
    global_sim = (xq[qi] * db_rows(db_vectors, di)).sum(dim=1).double().numpy()
    local = np.asarray(score_pairs(pairs), dtype=np.float64).reshape(-1)
    if local.shape[0] != pairs.shape[0]:
        raise InvalidValueError(f"score_pairs returned {local.shape[0]} scores for {pairs.shape[0]} pairs")
    mixed_scores = cvnet_score_mix(torch.from_numpy(global_sim), torch.from_numpy(local), weight).tolist()
    mixed = {(int(q), int(d)): m for (q, d), m in zip(pairs, mixed_scores)}
    logger.info("CVNet re-ranking (%s mode, top %d): %d distinct pairs scored", mode, top_k, len(pairs))

    out = {p: ranks.copy() for p in PROTOCOLS} if mode == "paper" else dict.fromkeys(PROTOCOLS, ranks.copy())
    for i in range(nq):
        col = ranks[:, i]
        done: dict[bytes, np.ndarray] = {}
        for p in PROTOCOLS:
            pos = positions[i][p]
            if pos.tobytes() not in done:  # clean mode: one re-sort shared by the three
                scores = np.array([mixed[(i, int(d))] for d in col[pos]])
                done[pos.tobytes()] = resort_positions(col, pos, scores)
            out[p][:, i] = done[pos.tobytes()]
    return out


def apply_cvnet_rerank(scores: Tensor, ids: Tensor, pair_scores: Tensor, *, weight: float = CVNET_SCORE_WEIGHT
                       ) -> tuple[Tensor, Tensor]:
    """CVNet re-ranking of one query's search result: the first ``t = len(pair_scores)`` of ``scores`` (m,) /
    ``ids`` (m,) (best first) re-scored with ``global + weight * pair score`` and re-sorted among their own
    positions (ties keep their order); positions t.. keep their place and score. Returns (scores, ids)."""
    t = pair_scores.numel()
    if t > scores.numel():
        raise InvalidValueError(f"{t} pair scores for a ranking of {scores.numel()}")
    head, order = cvnet_score_mix(scores[:t], pair_scores, weight).sort(descending=True, stable=True)
    return torch.cat([head, scores[t:]]), torch.cat([ids[:t][order], ids[t:]])


#: Elements of the 4D correlation a scoring batch may hold, (pairs x scales^2 x hq wq hk wk): 2^28 float32 is
#: 1 GB, three 1024x768 pairs; the faithful path builds that tensor, the fast path about as much in temporaries.
CORRELATION_BUDGET = 1 << 28


def pairs_per_batch(query_size: Sequence[int], key_size: Sequence[int], *, n_scales: int, batch_size: int,
                    budget: int = CORRELATION_BUDGET) -> int:
    """How many pairs of these map sizes (h, w) to score at once: ``batch_size`` unless the correlation of that
    many pairs exceeds ``budget`` elements (then as many as fit, at least one)."""
    per_pair = n_scales * n_scales * query_size[0] * query_size[1] * key_size[0] * key_size[1]
    return max(1, min(batch_size, budget // max(per_pair, 1)))


class CVNetPairScorer:
    """Scores (query, database) pairs with CVNet-Rerank, computing each image's reduced maps once.

    ``query_maps`` / ``db_maps`` are :class:`helpers.extraction.ReducedMapStore` over the cropped queries and the
    database (scale 1.0). Pairs are processed in chunks of database images (:meth:`chunks`) so each database map is
    computed once and reused by every query that needs it; a query's candidates of the same map size in a chunk are
    scored together with the query broadcast, in batches of up to ``batch_size`` pairs and at most
    ``correlation_budget`` correlation elements (:func:`pairs_per_batch`). ``fast`` scores through
    ``model.score_prepared`` (the query prepared once; the correlation as two GEMMs, the 4D network channels-last),
    equal to ``model.score_reduced`` within 1e-5.

    ``min_chunks``: cut the database images into at least that many chunks (when there are that many), so that
    ``share=(rank, world_size)`` can give each rank an even share of whole chunks: the scorer then computes the maps
    and scores of its chunks only (NaN for the other pairs). A chunk's maps and batches depend on the pairs alone,
    never on ``share``, so the ranks' scores are bit-identical to one process's.
    """

    def __init__(self, *, model: nn.Module, query_maps: Any, db_maps: Any, batch_size: int = 32,
                 chunk_images: int = 256, progress: bool = True, fast: bool = True,
                 correlation_budget: int = CORRELATION_BUDGET, min_chunks: int = 1,
                 share: tuple[int, int] = (0, 1)) -> None:
        if batch_size < 1 or chunk_images < 1 or min_chunks < 1:
            raise InvalidValueError(f"batch_size, chunk_images and min_chunks must be >= 1, got {batch_size}, "
                                    f"{chunk_images}, {min_chunks}")
        if not 0 <= share[0] < share[1]:
            raise InvalidValueError(f"share (rank, world_size) {share} is not valid")
        bound = getattr(db_maps, "max_items", None)
        self.model, self.query_maps, self.db_maps = model, query_maps, db_maps
        self.batch_size = batch_size
        self.chunk_images = min(chunk_images, bound) if bound else chunk_images
        self.progress = progress
        self.fast = fast and hasattr(model, "score_prepared")
        self.correlation_budget = correlation_budget
        self.min_chunks, self.share = min_chunks, share

    def _score(self, query: Any, keys: list[Tensor]) -> Tensor:
        """(B,) scores of the query (reduced maps, or prepared ones on the fast path) against B same-size keys."""
        if self.fast:
            return self.model.score_prepared(query, self.model.prepare_reduced(keys))
        return self.model.score_reduced(query, keys)

    def chunks(self, pairs: np.ndarray) -> list[np.ndarray]:
        """The database ids of ``pairs`` (P, 2), sorted, cut into chunks of at most ``chunk_images`` and at least
        ``min_chunks`` chunks (of equal sizes, the last shorter); the same for any ``share``."""
        db_ids = np.unique(np.asarray(pairs, dtype=np.int64).reshape(-1, 2)[:, 1])
        size = max(1, min(self.chunk_images, -(-len(db_ids) // self.min_chunks)))
        return [db_ids[start : start + size] for start in range(0, len(db_ids), size)]

    def my_chunks(self, pairs: np.ndarray) -> list[np.ndarray]:
        """The chunks of ``share``: contiguous blocks of about equal cost, a chunk's cost being its share of the
        images (maps to compute) plus its share of the pairs (correlations to score)."""
        chunks = self.chunks(pairs)
        rank, world_size = self.share
        if world_size == 1:
            return chunks
        db = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)[:, 1]
        n_pairs = [int(np.isin(db, c).sum()) for c in chunks]
        n_ids = sum(len(c) for c in chunks)
        costs = [len(c) * len(db) + p * n_ids for c, p in zip(chunks, n_pairs)]
        return [chunks[k] for k in split_evenly(costs, world_size)[rank]]

    @torch.inference_mode()
    def __call__(self, pairs: np.ndarray) -> np.ndarray:
        pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        scores = np.full(pairs.shape[0], np.nan, dtype=np.float64)
        if pairs.shape[0] == 0:
            return scores
        self.model.eval()
        chunks = self.my_chunks(pairs)
        total = int(np.isin(pairs[:, 1], np.concatenate(chunks)).sum()) if chunks else 0
        bar = tqdm(total=total, desc="CVNet re-ranking", unit="pair", disable=not self.progress)
        for chunk in chunks:
            self.db_maps.prefetch(chunk.tolist())
            in_chunk = np.flatnonzero(np.isin(pairs[:, 1], chunk))
            for q in np.unique(pairs[in_chunk, 0]):
                rows = in_chunk[pairs[in_chunk, 0] == q]
                self._score_query(int(q), rows, pairs, scores)
                bar.update(len(rows))
        bar.close()
        return scores

    def _score_query(self, q: int, rows: np.ndarray, pairs: np.ndarray, scores: np.ndarray) -> None:
        """Score the pairs ``rows`` of query ``q`` (their database maps in memory) into ``scores``: grouped by map
        size, in batches of :func:`pairs_per_batch`."""
        qmaps = self.query_maps.get(q)
        query = self.model.prepare_reduced(qmaps) if self.fast else qmaps
        by_size: dict[tuple, list[int]] = {}
        for r in rows:
            by_size.setdefault(tuple(self.db_maps.get(int(pairs[r, 1]))[-1].shape), []).append(int(r))
        for size, group in by_size.items():
            step = pairs_per_batch(qmaps[-1].shape[-2:], size[-2:], n_scales=len(qmaps),
                                   batch_size=self.batch_size, budget=self.correlation_budget)
            for b in range(0, len(group), step):
                batch = group[b : b + step]
                keys = [self.db_maps.get(int(pairs[r, 1])) for r in batch]
                stacked = [torch.cat([k[s] for k in keys]) for s in range(len(keys[0]))]
                scores[batch] = self._score(query, stacked).double().cpu().numpy()


# --------------------------------------------------------------------------------------------------------------
# SuperGlobal re-ranking
# --------------------------------------------------------------------------------------------------------------


_Columns = TypeVar("_Columns", Tensor, np.ndarray)


def top_then_rest(top: Sequence[_Columns], ranking: Sequence[_Columns], *, limit: int | None = None
                  ) -> list[_Columns]:
    """One query's "re-order the top M, the rest follows": ``top`` = (ids (m,), *columns), the re-ordered top of
    ``ranking`` = (ids (n,), *columns), e.g. scores (n,) or vectors (n, d) that go with the ids. Returns the same
    columns: the top's entries with a valid id (>= 0), then the ranking's entries whose id is valid and not in
    the top, in the ranking's order; cut to ``limit`` entries. Ids on the CPU (tensors or arrays)."""
    top_ids, ranking_ids = np.asarray(top[0]), np.asarray(ranking[0])
    keep = top_ids >= 0
    follow = (ranking_ids >= 0) & ~np.isin(ranking_ids, top_ids[keep])  # numpy's isin: 10x torch's on 1M ids

    def join(a: _Columns, b: _Columns) -> _Columns:
        if isinstance(a, Tensor):
            return torch.cat([a[torch.from_numpy(keep)], b[torch.from_numpy(follow)]])[:limit]
        return np.concatenate([a[keep], b[follow]])[:limit]

    return [join(a, b) for a, b in zip(top, ranking, strict=True)]


def merge_reranked(ranks: np.ndarray, reranked_ids: np.ndarray) -> np.ndarray:
    """Full rankings (n_db, nq): each query's re-ordered top ids (nq, M) (padding ids < 0 dropped), then the rest
    of its global ranking ``ranks`` (n_db, nq) in its original order (:func:`top_then_rest`)."""
    ranks = np.asarray(ranks)
    reranked_ids = np.asarray(reranked_ids)
    out = np.empty_like(ranks)
    for i in range(ranks.shape[1]):
        col = top_then_rest([reranked_ids[i]], [np.ascontiguousarray(ranks[:, i])])[0]  # one strided read
        if col.shape[0] != ranks.shape[0]:
            raise InvalidValueError(f"query {i}: re-ranked ids are not a subset of its ranking (duplicates or "
                                    "unknown ids)")
        out[:, i] = col
    return out


def superglobal_rerank_ranking(*, query_vectors: Tensor | np.ndarray, database: Any, ranks: np.ndarray,
                               reranker: nn.Module) -> np.ndarray:
    """SuperGlobal re-ranking (Shao et al., ICCV 2023, Sec. 3.3) as a full ranking matrix (n_db, nq).

    ``database``: the (n_db, d) L2-normalised descriptors (a tensor or array, or the list of parts of their
    concatenation as for :func:`global_ranking`) or any ``AbstractVectorDB`` holding them under ids 0..n_db-1;
    ``reranker``: a ``models.SuperGlobalRerank`` (M, K, beta). Descriptors given as arrays are not searched again:
    as in the release, the candidates are the top M of ``ranks``, gathered ``reranker.query_chunk`` queries at a
    time, so the +1M sets are never concatenated. The re-ordered top M come first, then the rest of the global
    ranking ``ranks`` unchanged.
    """
    xq = _as_tensor(query_vectors).float()
    if not isinstance(database, (Tensor, np.ndarray, list, tuple)):
        _, ids = reranker.rerank(xq, database)
        return merge_reranked(ranks, ids.cpu().numpy())
    m, chunk = min(int(reranker.M), ranks.shape[0]), int(reranker.query_chunk)
    top = torch.from_numpy(np.ascontiguousarray(np.asarray(ranks)[:m].T).astype(np.int64))  # (nq, M)
    out = []
    for start in range(0, xq.shape[0], chunk):
        ids = top[start : start + chunk]
        vectors = db_rows(database, ids.reshape(-1)).view(*ids.shape, -1).to(xq.device)
        out.append(reranker.rerank_candidates(xq[start : start + ids.shape[0]], vectors, ids)[1].cpu())
    return merge_reranked(ranks, torch.cat(out).numpy())
