"""The evaluation seen query by query: per-query APs, each query's top results with their scores and labels,
and mean precision-recall curves, for a ranking and for the global ranking a re-ranking started from.

The re-rankings return rankings only; :class:`RecordingScorer` (CVNet) and :class:`RecordingReranker`
(SuperGlobal) pass their engine through unchanged and keep the scores it computed, so the report can show the
score each re-ranked item was sorted by without computing anything twice.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from helpers.evaluation.metrics import (
    PROTOCOLS,
    evaluate_revisited,
    mean_precision_recall,
    protocol_ground_truth,
    protocol_ranking,
)
from helpers.reranking import db_rows
from helpers.visualize import result_labels
from models.functional import cvnet_score_mix

logger = logging.getLogger(__name__)

ScoreFn = Callable[[np.ndarray], np.ndarray]

#: What each method's scores are.
SCORE_SOURCES = {
    "cvnet_global": "global cosine similarity",
    "superglobal": "global cosine similarity",
    "timm_global": "global cosine similarity",
    "cvnet_rerank": "global cosine + {weight} x CVNet-Rerank score (re-scored items only)",
    "superglobal_rerank": "SuperGlobal re-ranking score (s1 + s2) / 2 (its top M only)",
}
#: The global method whose ranking a re-ranking method re-orders.


def pair_similarities(xq: torch.Tensor, xb: Any, queries: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Global similarities (P,) float64 of the (query, database item) pairs ``queries[p]``, ``items[p]``;
    ``xq`` (nq, d), ``xb`` the database's (n_db, d) descriptors or the list of its parts, as ranked."""
    if len(queries) == 0:
        return np.zeros(0)
    rows = db_rows(xb, torch.from_numpy(np.asarray(items, dtype=np.int64))).cpu()
    picked = xq.float().cpu()[torch.from_numpy(np.asarray(queries, dtype=np.int64))]
    return (picked * rows).sum(dim=1).double().numpy()


class RecordingScorer:
    """Passes a CVNet pair scorer through and keeps the pairs (P, 2) and scores (P,) of its last call."""

    def __init__(self, score_pairs: Callable[[np.ndarray], np.ndarray]) -> None:
        self.score_pairs = score_pairs
        self.pairs = np.zeros((0, 2), dtype=np.int64)
        self.scores = np.zeros(0)

    def __call__(self, pairs: np.ndarray) -> np.ndarray:
        scores = self.score_pairs(pairs)
        self.pairs = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
        self.scores = np.asarray(scores, dtype=np.float64).reshape(-1)
        return scores

    def mixed_scores(self, xq: torch.Tensor, xb: Any, *, weight: float, nq: int) -> list[dict[int, float]]:
        """Per query, {database id: global + weight x CVNet score}: the similarity the item was re-sorted by."""
        q, d = self.pairs[:, 0], self.pairs[:, 1]
        mixed = cvnet_score_mix(torch.from_numpy(pair_similarities(xq, xb, q, d)), torch.from_numpy(self.scores),
                                weight).tolist()
        out: list[dict[int, float]] = [{} for _ in range(nq)]
        for qi, di, m in zip(q.tolist(), d.tolist(), mixed):
            out[qi][di] = m
        return out


class RecordingReranker:
    """A SuperGlobal re-ranker that keeps the (scores (q, M), ids (q, M)) it returns, chunk after chunk; every
    other attribute is the wrapped re-ranker's."""

    def __init__(self, reranker: nn.Module) -> None:
        self._reranker = reranker
        self.outputs: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reranker, name)

    def _keep(self, out: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        self.outputs.append((out[0].detach().cpu(), out[1].detach().cpu()))
        return out

    def rerank_candidates(self, *args: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._keep(self._reranker.rerank_candidates(*args, **kw))

    def rerank(self, *args: Any, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self._keep(self._reranker.rerank(*args, **kw))

    def scores(self, nq: int) -> list[dict[int, float]]:
        """Per query, {database id: re-ranking score} (empty dicts when nothing was recorded)."""
        if not self.outputs:
            logger.warning("the SuperGlobal re-ranker returned no scores to record: the report shows none")
            return [{} for _ in range(nq)]
        scores = torch.cat([s for s, _ in self.outputs]).double().numpy()
        ids = torch.cat([i for _, i in self.outputs]).numpy()
        return [{int(j): float(v) for j, v in zip(ids[q], scores[q]) if j >= 0} for q in range(nq)]


@dataclass
class RankingDetail:
    """One ranking query by query: ``aps`` {protocol: (nq,) AP as a fraction, NaN without positives}, the first
    ``top`` database ids (nq, top) of its shown ranking (:func:`shown_ranking`) with their ``scores`` (nq, top)
    (NaN where the engine gives none) and Medium ``labels``, ``precision`` {protocol: (21,) mean interpolated
    precision at helpers.evaluation.PR_RECALL_LEVELS} and what the scores are (``score_source``)."""

    aps: dict[str, np.ndarray]
    ids: np.ndarray
    scores: np.ndarray
    labels: list[list[str]]
    precision: dict[str, np.ndarray]
    score_source: str


@dataclass
class MethodDetail:
    """A method's ranking (``after``) and, for a re-ranking method, the global ranking it re-ordered
    (``before``, the ranking of method ``base``)."""

    after: RankingDetail
    before: RankingDetail | None = None
    base: str | None = None


def shown_ranking(final: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
    """The ranking (n_db, nq) a report lists: ``final``, or its Medium ranking when it is given per protocol."""
    return np.asarray(final["medium"] if isinstance(final, Mapping) else final)


def ranking_detail(final: Any, evaluation: Mapping[str, Any], gnd: Sequence[Mapping], *, top: int,
                   score_of: ScoreFn, source: str) -> RankingDetail:
    """:class:`RankingDetail` of a ranking ``final`` ((n_db, nq), or a mapping protocol -> (n_db, nq)) whose
    :func:`evaluate_revisited` output is ``evaluation`` (its protocols are the detail's);
    ``score_of(ids (nq, top)) -> scores (nq, top)``."""
    protocols = list(evaluation)
    shown = shown_ranking(final)
    ids = shown[:top].T.astype(np.int64)
    truth = protocol_ground_truth(gnd, protocols)
    return RankingDetail(
        aps={p: np.asarray(evaluation[p]["aps"], dtype=np.float64) for p in protocols}, ids=ids,
        scores=np.asarray(score_of(ids), dtype=np.float64).reshape(ids.shape),
        labels=[result_labels(shown[:, i], gnd[i], top=top) for i in range(shown.shape[1])],
        precision={p: mean_precision_recall(protocol_ranking(final, p), truth[p]) for p in protocols},
        score_source=source)


def lookup_scores(per_query: Sequence[Mapping[int, float]]) -> ScoreFn:
    """``score_of`` for :func:`ranking_detail` from per-query {database id: score} (NaN for ids without one)."""
    def score_of(ids: np.ndarray) -> np.ndarray:
        return np.array([[per_query[q].get(int(j), np.nan) for j in row] for q, row in enumerate(ids)],
                        dtype=np.float64).reshape(ids.shape)

    return score_of


def global_scores(xq: torch.Tensor, xb: Any) -> ScoreFn:
    """``score_of`` for :func:`ranking_detail`: the global similarity of each listed (query, item) pair."""
    def score_of(ids: np.ndarray) -> np.ndarray:
        queries = np.repeat(np.arange(ids.shape[0]), ids.shape[1])
        return pair_similarities(xq, xb, queries, ids.reshape(-1)).reshape(ids.shape)

    return score_of


def global_detail(kind: str, ranked: Mapping[str, tuple[np.ndarray, Any, Any]], gnd: Sequence[Mapping], *,
                  kappas: Sequence[int], top: int, cache: dict[str, RankingDetail],
                  evaluation: Mapping[str, Any] | None = None, protocols: Sequence[str] = PROTOCOLS) -> RankingDetail:
    """The detail of global ranking ``kind`` (``ranked[kind]`` = (ranks, xq, xb)), made once per dataset in
    ``cache`` and shared by the global method and the re-ranking that starts from it; ``evaluation``, when
    given, is the ranking's :func:`evaluate_revisited` output (else computed under ``protocols``)."""
    if kind not in cache:
        ranks, xq, xb = ranked[kind]
        if evaluation is None:
            evaluation = evaluate_revisited(ranks, gnd, kappas, protocols=protocols)
        cache[kind] = ranking_detail(ranks, evaluation, gnd, top=top, score_of=global_scores(xq, xb),
                                     source=SCORE_SOURCES[kind])
    return cache[kind]
