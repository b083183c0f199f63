"""helpers.reranking: CVNet re-ranking in clean and paper modes against hand-written loops, the same rule on one
search result (the retrieval API's), the batched CVNet scorer against pair-by-pair scores, and SuperGlobal
re-ranking as a full ranking."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers.extraction import ReducedMapStore
from helpers.reranking import (
    CVNetPairScorer,
    apply_cvnet_rerank,
    cvnet_rerank,
    global_ranking,
    merge_reranked,
    resort_positions,
    superglobal_rerank_ranking,
    top_then_rest,
)
from helpers.vector_db.tensor import TensorVectorDB
from models import CVNetRerank, SuperGlobalRerank

pytestmark = pytest.mark.usefixtures("one_thread")


N_DB, NQ, DIM, TOP_K = 40, 4, 16, 6


def stub_score(q: int, d: int) -> float:
    """A deterministic stand-in for CVNet's pair score, in [0, 1)."""
    return ((q * 7919 + d * 104729) % 1000) / 1000.0


class StubScorer:
    def __init__(self):
        self.calls = []

    def __call__(self, pairs):
        self.calls.extend(map(tuple, np.asarray(pairs).tolist()))
        return np.array([stub_score(q, d) for q, d in pairs])


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(0)
    xq = F.normalize(torch.randn(NQ, DIM, generator=g), dim=1)
    xb = F.normalize(torch.randn(N_DB, DIM, generator=g), dim=1)
    _, ranks = global_ranking(xq, xb)
    rng = np.random.default_rng(1)
    gnd = []
    for i in range(NQ):
        head = ranks[:15, i]  # labels among the top so that the walk has something to skip
        perm = rng.permutation(head)
        gnd.append({"easy": perm[:3], "hard": perm[3:6], "junk": np.concatenate([perm[6:9], [ranks[-1, i]]]),
                    "bbx": np.zeros(4)})
    return xq, xb, ranks, gnd


def reference_paper(ranks, sim, gnd, top_k, weight):
    """The released protocol, written out as a loop: walk the ranking; junk skipped; easy -> E, M; hard -> M, H;
    negative -> E, M, H; each protocol stops at top_k; re-sort among the positions taken."""
    out = {p: ranks.copy() for p in ("easy", "medium", "hard")}
    scored = set()
    for i in range(ranks.shape[1]):
        taken = {"easy": [], "medium": [], "hard": []}
        for j in range(ranks.shape[0]):
            d = ranks[j, i]
            if d in gnd[i]["junk"]:
                continue
            if d in gnd[i]["easy"]:
                wants = ("easy", "medium")
            elif d in gnd[i]["hard"]:
                wants = ("medium", "hard")
            else:
                wants = ("easy", "medium", "hard")
            for p in wants:
                if len(taken[p]) < top_k:
                    taken[p].append(j)
        for p, positions in taken.items():
            items = [ranks[j, i] for j in positions]
            scored |= {(i, int(d)) for d in items}
            scores = [sim[d, i] + weight * stub_score(i, d) for d in items]
            order = sorted(range(len(items)), key=lambda k: -scores[k])
            for j, k in zip(positions, order):
                out[p][j, i] = items[k]
    return out, scored


def reference_clean(ranks, sim, top_k, weight):
    out = ranks.copy()
    for i in range(ranks.shape[1]):
        items = list(ranks[:top_k, i])
        scores = [sim[d, i] + weight * stub_score(i, d) for d in items]
        out[:top_k, i] = [items[k] for k in sorted(range(top_k), key=lambda k: -scores[k])]
    return out


def test_paper_mode_matches_the_protocol_loop(setup):
    xq, xb, ranks, gnd = setup
    sim = (xb @ xq.T).double().numpy()
    scorer = StubScorer()
    got = cvnet_rerank(ranks=ranks, query_vectors=xq, db_vectors=xb, score_pairs=scorer, mode="paper", gnd=gnd,
                       top_k=TOP_K, weight=0.5)
    ref, scored = reference_paper(ranks, sim, gnd, TOP_K, 0.5)
    for p in ("easy", "medium", "hard"):
        np.testing.assert_array_equal(got[p], ref[p], err_msg=p)
        assert sorted(got[p][:, 0]) == list(range(N_DB))  # still a permutation
    assert not np.array_equal(got["easy"], got["hard"])  # the protocols really differ here
    # junk keeps its position in every protocol
    for i in range(NQ):
        for j in np.flatnonzero(np.isin(ranks[:, i], gnd[i]["junk"])):
            assert all(got[p][j, i] == ranks[j, i] for p in got)
    # every distinct pair some protocol re-scores is scored exactly once
    assert len(scorer.calls) == len(set(scorer.calls))
    assert set(scorer.calls) == scored
    assert len(scored) < 3 * NQ * TOP_K  # shared between protocols, not scored three times


def test_clean_mode_reranks_the_first_k_without_ground_truth(setup):
    xq, xb, ranks, _ = setup
    sim = (xb @ xq.T).double().numpy()
    scorer = StubScorer()
    got = cvnet_rerank(ranks=ranks, query_vectors=xq, db_vectors=xb, score_pairs=scorer, top_k=TOP_K, weight=0.5)
    ref = reference_clean(ranks, sim, TOP_K, 0.5)
    for p in ("easy", "medium", "hard"):
        np.testing.assert_array_equal(got[p], ref)
    np.testing.assert_array_equal(got["medium"][TOP_K:], ranks[TOP_K:])
    assert sorted(scorer.calls) == sorted((i, int(d)) for i in range(NQ) for d in ranks[:TOP_K, i])


def test_rerank_mode_errors(setup):
    xq, xb, ranks, gnd = setup
    with pytest.raises(ValueError, match="unknown re-ranking mode"):
        cvnet_rerank(ranks=ranks, query_vectors=xq, db_vectors=xb, score_pairs=StubScorer(), mode="oracle", gnd=gnd)
    with pytest.raises(ValueError, match="ground-truth"):
        cvnet_rerank(ranks=ranks, query_vectors=xq, db_vectors=xb, score_pairs=StubScorer(), mode="paper")


def test_apply_cvnet_rerank_resorts_the_head_and_keeps_the_tail():
    scores, ids = torch.tensor([0.9, 0.8, 0.7, 0.6]), torch.tensor([5, 6, 7, 8])
    new_s, new_i = apply_cvnet_rerank(scores, ids, torch.tensor([0.0, 0.5, 0.1]), weight=0.5)
    assert new_i.tolist() == [6, 5, 7, 8]
    torch.testing.assert_close(new_s, torch.tensor([1.05, 0.9, 0.75, 0.6]))
    with pytest.raises(ValueError, match="pair scores"):
        apply_cvnet_rerank(scores[:2], ids[:2], torch.zeros(3))


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_one_search_result_reranks_like_the_ranking_matrix(setup, weight):
    """The retrieval API's per-query rule and the evaluation's clean mode order the top k alike."""
    xq, xb, ranks, _ = setup
    got = cvnet_rerank(ranks=ranks, query_vectors=xq, db_vectors=xb, score_pairs=StubScorer(), top_k=TOP_K,
                       weight=weight)["medium"]
    for i in range(NQ):
        ids = torch.from_numpy(ranks[:, i])
        scores = (xb[ids] @ xq[i]).double()
        pair = torch.tensor([stub_score(i, int(d)) for d in ids[:TOP_K]], dtype=torch.float64)
        _, order = apply_cvnet_rerank(scores, ids, pair, weight=weight)
        np.testing.assert_array_equal(order.numpy(), got[:, i])


def test_resort_positions_touches_only_those_positions():
    ranking = np.array([10, 11, 12, 13, 14, 15])
    out = resort_positions(ranking, np.array([0, 2, 5]), np.array([0.1, 0.9, 0.5]))
    np.testing.assert_array_equal(out, [12, 11, 15, 13, 14, 10])


def test_global_ranking_is_descending_similarity():
    g = torch.Generator().manual_seed(3)
    xq, xb = torch.randn(3, 8, generator=g), torch.randn(25, 8, generator=g)
    sim, ranks = global_ranking(xq, xb, query_chunk=2)
    np.testing.assert_allclose(sim, (xb @ xq.T).numpy(), rtol=1e-6, atol=1e-6)  # BLAS sums in its own order
    for i in range(3):
        np.testing.assert_array_equal(ranks[:, i], np.argsort(-sim[:, i], kind="stable"))


class MapDataset(torch.utils.data.Dataset):
    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return [self.images[i]]


def test_batched_cvnet_scorer_equals_pair_by_pair():
    torch.manual_seed(0)
    model = CVNetRerank(50).eval()
    g = torch.Generator().manual_seed(5)
    queries = [torch.randn(3, 80, 96, generator=g), torch.randn(3, 96, 80, generator=g)]
    sizes = [(80, 80), (80, 112), (80, 80), (80, 80), (80, 112)]
    db = [torch.randn(3, h, w, generator=g) for h, w in sizes]
    pairs = np.array([(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 2), (1, 4), (1, 0)])
    scorer = CVNetPairScorer(
        model=model,
        query_maps=ReducedMapStore(model=model, dataset=MapDataset(queries), batch_size=2),
        db_maps=ReducedMapStore(model=model, dataset=MapDataset(db), batch_size=2, max_items=3),
        batch_size=2, chunk_images=3, progress=False)
    got = scorer(pairs)
    with torch.no_grad():  # one stage-3 map per image, then every pair scored on its own
        qmaps = [model.extract_featuremap(x[None]) for x in queries]
        dmaps = [model.extract_featuremap(x[None]) for x in db]
        ref = [float(model.score(qmaps[q], dmaps[d])[0]) for q, d in pairs]
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    assert scorer.db_maps.computed == len(db)  # each database map computed once across both queries


class BatchSensitiveMaps:
    """A map store whose maps carry how many images the prefetch call that made them held, as a model's float
    result can depend on its batch; ``prefetched`` records each call."""

    def __init__(self, n, max_items=None):
        self.n, self.max_items, self.prefetched, self._maps = n, max_items, [], {}

    def prefetch(self, indices):
        indices = [i for i in indices if i not in self._maps]
        self.prefetched.append(indices)
        for i in indices:
            size = (2, 3) if i % 3 else (3, 2)  # two map sizes: candidates are grouped by size
            self._maps[i] = [torch.full((1, 1, *size), float(i) + 0.001 * len(indices))]

    def get(self, i):
        if i not in self._maps:
            self.prefetch([i])
        return self._maps[i]


class BatchSensitiveModel:
    """``score_reduced`` of a query against B keys, plus a term in B: a pair's score shows the batch it was in."""

    def eval(self):
        return self

    def score_reduced(self, query, keys):
        q, k = query[-1].reshape(-1)[0], keys[-1].reshape(keys[-1].shape[0], -1)[:, 0]
        return torch.sigmoid(q * 0.01 - k * 0.02) + 0.001 * k.shape[0]


def test_ranks_score_their_chunks_with_one_process_bits():
    rng = np.random.default_rng(0)
    pairs = np.array(sorted({(q, int(d)) for q in range(5) for d in rng.choice(40, 12, replace=False)}))

    def scorer(share=(0, 1), min_chunks=4):
        db_maps = BatchSensitiveMaps(40, max_items=16)
        return CVNetPairScorer(model=BatchSensitiveModel(), query_maps=BatchSensitiveMaps(5), db_maps=db_maps,
                               batch_size=3, chunk_images=16, min_chunks=min_chunks, progress=False, fast=False,
                               share=share)

    one = scorer()
    full = one(pairs)
    ids = np.unique(pairs[:, 1])
    assert [len(c) for c in one.chunks(pairs)] == [-(-len(ids) // 4)] * 3 + [len(ids) - 3 * -(-len(ids) // 4)]
    assert not np.isnan(full).any()
    for world_size in (2, 3):
        ranks = [scorer(share=(r, world_size)) for r in range(world_size)]
        parts = [s(pairs) for s in ranks]
        scored = np.stack([~np.isnan(p) for p in parts])
        assert (scored.sum(axis=0) == 1).all() and scored.sum(axis=1).min() > 0  # each pair by one rank
        combined = np.where(scored, np.stack(parts), 0).sum(axis=0)
        np.testing.assert_array_equal(combined, full)  # bit for bit
        made = [i for s in ranks for call in s.db_maps.prefetched for i in call]
        assert sorted(made) == ids.tolist()  # each database map computed by one rank only
    # the stand-ins do show batching: other chunks give other scores
    assert not np.array_equal(scorer(min_chunks=1)(pairs), full)
    with pytest.raises(ValueError, match="share"):
        scorer(share=(2, 2))


def test_superglobal_ranking_is_reranked_top_m_then_the_rest():
    g = torch.Generator().manual_seed(7)
    xb = F.normalize(torch.randn(60, DIM, generator=g), dim=1)
    xq = F.normalize(torch.randn(5, DIM, generator=g), dim=1)
    _, ranks = global_ranking(xq, xb)
    reranker = SuperGlobalRerank(M=12, K=3, beta=0.15)
    got = superglobal_rerank_ranking(query_vectors=xq, database=xb, ranks=ranks, reranker=reranker)
    _, ids = reranker.rerank(xq, xb)
    for i in range(5):
        np.testing.assert_array_equal(got[:12, i], ids[i].numpy())
        assert set(got[:12, i]) == set(ranks[:12, i])  # the same M candidates, re-ordered
        np.testing.assert_array_equal(got[12:, i], ranks[12:, i])
        assert sorted(got[:, i]) == list(range(60))
    db = TensorVectorDB(DIM, progress=False)
    db.add(xb, ids=np.arange(60))
    np.testing.assert_array_equal(
        superglobal_rerank_ranking(query_vectors=xq, database=db, ranks=ranks, reranker=reranker), got)


def test_superglobal_ranking_over_parts_reads_candidates_off_the_ranking():
    # +1M layout: database and distractors stay two parts (float16 distractors allowed); the candidates come from
    # the global ranking in query chunks, and the result equals re-ranking the concatenation
    g = torch.Generator().manual_seed(8)
    db = F.normalize(torch.randn(30, DIM, generator=g), dim=1)
    distractors = F.normalize(torch.randn(50, DIM, generator=g), dim=1).half()
    xq = F.normalize(torch.randn(7, DIM, generator=g), dim=1)
    _, ranks = global_ranking(xq, [db, distractors], rank_dtype=np.int32, with_similarities=False)
    assert ranks.dtype == np.int32
    reranker = SuperGlobalRerank(M=15, K=3, beta=0.15, query_chunk=3)
    got = superglobal_rerank_ranking(query_vectors=xq, database=[db, distractors], ranks=ranks, reranker=reranker)
    whole = torch.cat([db, distractors.float()])
    np.testing.assert_array_equal(got, superglobal_rerank_ranking(query_vectors=xq, database=whole, ranks=ranks,
                                                                  reranker=SuperGlobalRerank(M=15, K=3)))
    _, ids = reranker.rerank(xq, whole)
    np.testing.assert_array_equal(got[:15].T, ids.numpy())
    with pytest.raises(ValueError, match="vectors"):
        reranker.rerank_candidates(xq, whole[:15], torch.zeros(7, 15, dtype=torch.int64))


def test_merge_reranked_keeps_global_order_of_the_rest():
    ranks = np.array([[3, 1], [1, 0], [0, 3], [2, 2]])
    out = merge_reranked(ranks, np.array([[0, 3], [2, -1]]))
    np.testing.assert_array_equal(out, [[0, 2], [3, 1], [1, 0], [2, 3]])


def _top_then_rest_loop(top, ranking, limit):
    """The rule written out entry by entry: the top's valid ids, then the ranking's valid ids not among them."""
    rows = [tuple(c[j] for c in top) for j in range(len(top[0])) if top[0][j] >= 0]
    taken = {int(r[0]) for r in rows}
    rows += [tuple(c[j] for c in ranking) for j in range(len(ranking[0]))
             if ranking[0][j] >= 0 and int(ranking[0][j]) not in taken]
    return rows[:limit]


@pytest.mark.parametrize("as_tensor", [True, False])
@pytest.mark.parametrize("limit", [None, 3, 15])
def test_top_then_rest_equals_a_direct_loop(as_tensor, limit):
    rng = np.random.default_rng(0)
    for _ in range(20):
        n, m = int(rng.integers(1, 12)), int(rng.integers(0, 8))
        ranking_ids = rng.permutation(20)[:n]
        ranking_ids[rng.random(n) < 0.2] = -1  # padding of a search that found fewer
        top_ids = rng.choice(np.arange(-1, 25), size=m, replace=False)  # may hold padding and ids not ranked
        ranking = [ranking_ids, rng.random(n), rng.random((n, 3))]  # ids, scores, vectors
        top = [top_ids, rng.random(m), rng.random((m, 3))]
        if as_tensor:
            ranking, top = [torch.from_numpy(c) for c in ranking], [torch.from_numpy(c) for c in top]
        got = top_then_rest(top, ranking, limit=limit)
        want = _top_then_rest_loop([np.asarray(c) for c in top], [np.asarray(c) for c in ranking], limit)
        assert all(isinstance(c, torch.Tensor if as_tensor else np.ndarray) for c in got)
        assert len(got[0]) == len(want)
        for c, column in enumerate(got):
            for j, row in enumerate(want):
                np.testing.assert_array_equal(np.asarray(column[j]), row[c])
