"""The re-ranking stage of an evaluation: CVNet-Rerank over one dataset's global ranking (maps of the cropped
queries and the database images, pairs scored once), and SuperGlobal re-ranking over the database it names.

Under torchrun CVNet re-ranking is split: rank 0 picks the pairs and broadcasts them, each rank computes the maps
and scores of its even share of the chunks of database images (:class:`helpers.reranking.CVNetPairScorer`'s
``share``), and rank 0 gathers the scores and re-sorts. The chunks (at least :data:`RERANK_CHUNKS`) depend on the
pairs alone, so each pair is scored in the same batch as in one process: the same bits. SuperGlobal re-ranking (a
few matrix products per query over descriptors rank 0 holds) runs on rank 0."""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from common.constants import CVNET_RERANK_TOP_K, CVNET_SCORE_WEIGHT
from common.errors import ProjectRuntimeError
from helpers.builders import build_superglobal_reranker, make_database
from helpers.distributed import DistEnv, all_gather_objects, broadcast_object
from helpers.evaluation.data import GlobalRanking, open_distractors, open_revisited
from helpers.evaluation.detail import RecordingReranker, RecordingScorer
from helpers.extraction import ReducedMapStore
from helpers.reranking import CVNetPairScorer, cvnet_rerank, superglobal_rerank_ranking

logger = logging.getLogger(__name__)


def superglobal_database(xb: Any, *, kind: str, device: torch.device) -> Any:
    """What SuperGlobal re-ranks over: ``tensor`` passes the descriptors (or their parts) through, and the
    candidates are read off the global ranking; ``tensor_db`` / ``faiss`` index them and search again."""
    if kind == "tensor":
        return xb
    parts = list(xb) if isinstance(xb, (list, tuple)) else [xb]
    d = parts[0].shape[1]
    if kind == "tensor_db":
        db = make_database("tensor", d, device=device, progress=False)
        db.reserve(sum(p.shape[0] for p in parts))
    else:
        db = make_database(kind, d, index="flat", device=device)  # faiss on the GPU of cuda:N when built with it
    offset = 0
    for part in parts:
        db.add(part, ids=np.arange(offset, offset + part.shape[0]))
        offset += part.shape[0]
    return db


#: Chunks of database images CVNet re-ranking cuts its candidates into at least (when there are that many), in one
#: process as under torchrun: enough for each of up to 8 ranks to get an even share of whole chunks, whose maps and
#: batches are the same whichever rank scores them.
RERANK_CHUNKS = 32


def cvnet_pair_scorer(*, model: nn.Module, root: str, name: str, extra: str | None, min_side: int | None,
                      rr: Mapping[str, Any], ext_cfg: Mapping[str, Any], device: torch.device, weights_hash: str,
                      progress: bool, env: DistEnv | None = None) -> CVNetPairScorer:
    """The CVNet pair scorer of one dataset (``rerank.cvnet`` settings ``rr``): maps at scale 1.0 of its cropped
    queries and of its database followed, with ``extra``, by the distractors; scoring this rank's share of the
    chunks of ``env`` (every chunk in one process)."""
    env = env or DistEnv()
    kw = {"convention": model.input_convention, "scales": (1.0,), "min_side": min_side}
    queries = open_revisited(root=root, name=name, split="query", **kw)
    db: Dataset = open_revisited(root=root, name=name, split="db", **kw)
    if extra:
        db = ConcatDataset([db, open_distractors(root=root, **kw)])
    map_cache = (os.path.join(ext_cfg["cache_dir"], "rerank_maps")
                 if rr.get("cache_maps") and ext_cfg.get("cache_dir") else None)
    store_kw = {"model": model, "device": device, "cache_dir": map_cache, "batch_size": int(ext_cfg["batch_size"]),
                "num_workers": int(ext_cfg["num_workers"]), "weights_hash": weights_hash}
    return CVNetPairScorer(
        model=model,
        query_maps=ReducedMapStore(dataset=queries, **store_kw),
        db_maps=ReducedMapStore(dataset=db, max_items=int(rr["chunk_images"]), **store_kw),
        batch_size=int(rr["batch_size"]), chunk_images=int(rr["chunk_images"]), progress=progress,
        min_chunks=RERANK_CHUNKS, share=(env.rank, env.world_size))


def score_across_ranks(scorer: CVNetPairScorer, pairs: np.ndarray | None, env: DistEnv) -> np.ndarray | None:
    """CVNet scores (P,) of rank 0's ``pairs`` (P, 2), each rank scoring its share of the chunks (``scorer.share``)
    and rank 0 gathering them; None on the other ranks, which pass None for ``pairs``. Every rank must call it."""
    pairs = broadcast_object(pairs, env)
    mine = scorer(pairs)
    logger.info("CVNet re-ranking: rank %d/%d scored %d of the %d pairs", env.rank, env.world_size,
                int((~np.isnan(mine)).sum()), len(mine))
    parts = all_gather_objects(mine, env)
    if not env.is_main:
        return None
    scores = parts[0].copy()
    for part in parts[1:]:
        scores = np.where(np.isnan(scores), part, scores)
    if np.isnan(scores).any():
        raise ProjectRuntimeError(f"CVNet re-ranking: {int(np.isnan(scores).sum())} of {len(scores)} pairs were "
                                  "scored by no rank")
    return scores


def run_cvnet_rerank(*, model: nn.Module, root: str, name: str, extra: str | None, min_side: int | None,
                     rr: Mapping[str, Any], ext_cfg: Mapping[str, Any], ranked: GlobalRanking,
                     gnd: Sequence[Mapping], device: torch.device, weights_hash: str, progress: bool,
                     env: DistEnv | None = None) -> tuple[dict[str, np.ndarray], list[dict[int, float]]]:
    """CVNet re-ranking (``rerank.cvnet`` settings ``rr``) of one dataset's CVNet-Global ranking, over its database
    and, with ``extra``, the distractors (maps at scale 1.0: cropped queries, full images). Returns the rankings per
    protocol and, per query, {database id: the mixed score it was re-sorted by}.

    Rank 0 of ``env`` picks the pairs; every rank scores its share of them (the other ranks through
    :func:`serve_cvnet_rerank`, called at the same point) and rank 0 re-sorts with the gathered scores."""
    env = env or DistEnv()
    ranks, xq, xb = ranked
    scorer = cvnet_pair_scorer(model=model, root=root, name=name, extra=extra, min_side=min_side, rr=rr,
                               ext_cfg=ext_cfg, device=device, weights_hash=weights_hash, progress=progress, env=env)
    recorder = RecordingScorer(lambda pairs: score_across_ranks(scorer, pairs, env))
    weight = float(rr.get("weight", CVNET_SCORE_WEIGHT))
    final = cvnet_rerank(ranks=ranks, query_vectors=xq, db_vectors=xb, score_pairs=recorder, mode=rr["mode"],
                         gnd=gnd, top_k=int(rr.get("top_k", CVNET_RERANK_TOP_K)), weight=weight)
    return final, recorder.mixed_scores(xq, xb, weight=weight, nq=ranks.shape[1])


def serve_cvnet_rerank(*, env: DistEnv, **scorer_kw: Any) -> None:
    """A rank other than 0's part of :func:`run_cvnet_rerank`: the same scorer (``scorer_kw``: the keywords of
    :func:`cvnet_pair_scorer`), its share of rank 0's pairs, the scores sent to rank 0."""
    score_across_ranks(cvnet_pair_scorer(env=env, **scorer_kw), None, env)


def run_superglobal_rerank(ranked: GlobalRanking, sgr: Mapping[str, Any], *, device: torch.device
                           ) -> tuple[np.ndarray, list[dict[int, float]]]:
    """SuperGlobal re-ranking (``rerank.superglobal`` settings ``sgr``: M, K, beta, and the database it searches,
    :func:`superglobal_database`) of a SuperGlobal ranking. Returns the ranking (n_db, nq) and, per query,
    {database id: the re-ranking score it was sorted by}."""
    reranker = RecordingReranker(build_superglobal_reranker(M=sgr["M"], K=sgr["K"], beta=sgr["beta"]))
    database = superglobal_database(ranked.database, kind=sgr.get("database", "tensor"), device=device)
    final = superglobal_rerank_ranking(query_vectors=ranked.query.to(device), database=database, ranks=ranked.ranks,
                                       reranker=reranker)
    return final, reranker.scores(ranked.query.shape[0])
