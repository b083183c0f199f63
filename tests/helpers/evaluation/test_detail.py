"""Per-query detail: the recorders pass their engine through unchanged and keep its scores; pair similarities
over database parts; a ranking's detail (APs, top ids, scores, labels, curves)."""
import numpy as np
import pytest
import torch

from helpers.builders import build_superglobal_reranker
from helpers.evaluation.detail import (
    RecordingReranker,
    RecordingScorer,
    global_scores,
    lookup_scores,
    pair_similarities,
    ranking_detail,
)
from helpers.evaluation.metrics import build_protocols, compute_map, evaluate_revisited
from helpers.reranking import cvnet_rerank, global_ranking, superglobal_rerank_ranking


def _vectors(nq=3, n_db=12, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    norm = torch.nn.functional.normalize
    return norm(torch.randn(nq, d, generator=gen), dim=1), norm(torch.randn(n_db, d, generator=gen), dim=1)


def test_pair_similarities_over_database_parts():
    xq, xb = _vectors()
    q, d = np.array([0, 2, 1, 2]), np.array([11, 0, 5, 7])
    want = (xq[q] * xb[d]).sum(1).double().numpy()
    assert pair_similarities(xq, xb, q, d) == pytest.approx(want, abs=1e-6)
    assert pair_similarities(xq, [xb[:5], xb[5:].half()], q, d) == pytest.approx(want, abs=2e-3)
    assert pair_similarities(xq, xb, np.array([], dtype=int), np.array([], dtype=int)).shape == (0,)


def test_cvnet_recorder_keeps_the_scores_and_changes_nothing():
    xq, xb = _vectors()
    _, ranks = global_ranking(xq, xb)
    local = lambda pairs: np.sin(pairs[:, 0] * 7.0 + pairs[:, 1])  # noqa: E731 - any deterministic scorer
    plain = cvnet_rerank(ranks=ranks, query_vectors=xq, db_vectors=xb, score_pairs=local, top_k=5, weight=0.5)
    recorder = RecordingScorer(local)
    recorded = cvnet_rerank(ranks=ranks, query_vectors=xq, db_vectors=xb, score_pairs=recorder, top_k=5, weight=0.5)
    assert all(np.array_equal(plain[p], recorded[p]) for p in plain)
    mixed = recorder.mixed_scores(xq, xb, weight=0.5, nq=3)
    for q in range(3):
        top = recorded["medium"][:5, q]
        assert set(mixed[q]) == set(ranks[:5, q].tolist())  # the re-scored candidates
        scores = [mixed[q][int(j)] for j in top]
        assert scores == sorted(scores, reverse=True)  # the order the re-ranking sorted by
        j = int(top[0])
        assert scores[0] == pytest.approx(float(xq[q] @ xb[j]) + 0.5 * np.sin(q * 7.0 + j), abs=1e-6)


def test_superglobal_recorder_keeps_the_scores_and_changes_nothing():
    xq, xb = _vectors(n_db=30)
    _, ranks = global_ranking(xq, xb)
    plain = superglobal_rerank_ranking(query_vectors=xq, database=xb, ranks=ranks,
                                       reranker=build_superglobal_reranker(M=10, K=3, beta=0.15))
    recorder = RecordingReranker(build_superglobal_reranker(M=10, K=3, beta=0.15))
    recorded = superglobal_rerank_ranking(query_vectors=xq, database=xb, ranks=ranks, reranker=recorder)
    assert np.array_equal(plain, recorded) and recorder.M == 10
    scores = recorder.scores(3)
    for q in range(3):
        assert set(scores[q]) == set(ranks[:10, q].tolist())
        top = [scores[q][int(j)] for j in recorded[:10, q]]
        assert top == sorted(top, reverse=True)
    assert RecordingReranker(build_superglobal_reranker(M=10, K=3, beta=0.15)).scores(2) == [{}, {}]


def test_ranking_detail_matches_the_evaluation():
    xq, xb = _vectors()
    _, ranks = global_ranking(xq, xb)
    gnd = [{"easy": [int(ranks[1, 0])], "hard": [3], "junk": [int(ranks[0, 0])]},
           {"easy": [0, 1], "hard": [], "junk": []}, {"easy": [], "hard": [], "junk": []}]
    ev = evaluate_revisited(ranks, gnd, [1])
    detail = ranking_detail(ranks, ev, gnd, top=4, score_of=global_scores(xq, xb), source="cosine")
    protocols = build_protocols(gnd)
    for p in ("easy", "medium", "hard"):
        np.testing.assert_array_equal(detail.aps[p], compute_map(ranks, protocols[p])[1])
        assert detail.precision[p].shape == (21,)
    assert np.isnan(detail.precision["easy"]).sum() == 0 and np.isnan(detail.aps["easy"][2])
    assert detail.ids.tolist() == ranks[:4].T.tolist()
    assert detail.labels[0][:2] == ["junk", "positive"]
    sims = (xq @ xb.T).numpy()
    assert detail.scores == pytest.approx(np.take_along_axis(sims, detail.ids, axis=1), abs=1e-6)
    missing = lookup_scores([{int(ranks[0, q]): 0.5} for q in range(3)])(detail.ids)
    assert (missing[:, 0] == 0.5).all() and np.isnan(missing[:, 1:]).all()


def test_ranking_detail_of_a_class_folder_has_its_one_protocol():
    """Under a class folder's protocol the detail holds its APs and curve only; a per-protocol ranking (CVNet's
    paper mode) is listed and scored at 'medium', whose ground truth the class protocol shares."""
    xq, xb = _vectors()
    _, ranks = global_ranking(xq, xb)
    gnd = [{"easy": [int(ranks[1, q]), 5], "hard": [], "junk": [int(ranks[0, q])]} for q in range(3)]
    per_protocol = {"easy": ranks[::-1].copy(), "medium": ranks, "hard": ranks[::-1].copy()}
    ev = evaluate_revisited(per_protocol, gnd, [1], protocols=("class",), recall=True)
    detail = ranking_detail(per_protocol, ev, gnd, top=3, score_of=global_scores(xq, xb), source="cosine")
    assert list(detail.aps) == ["class"] and list(detail.precision) == ["class"]
    np.testing.assert_array_equal(detail.aps["class"], compute_map(ranks, build_protocols(gnd)["medium"])[1])
    assert detail.ids.tolist() == ranks[:3].T.tolist() and detail.labels[0][:2] == ["junk", "positive"]
