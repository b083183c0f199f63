"""Fast paths against the faithful paths they replace (equal within 1e-5), and smoke runs of the benchmarks.

No timing is asserted anywhere: speed is what the benchmarks print, correctness is what these tests check.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers.vector_db.tensor import TensorVectorDB
from models import functional as MF
from models.cvnet import CVNetGlobal, CVNetRerank
from models.inference import fold_batchnorm_, inference_copy
from models.superglobal import SuperGlobal


@pytest.fixture(autouse=True)
def _restore_process_state():
    """One thread (OpenMP threads spinning against each other on a shared 2-core machine cost 10-100x), and
    denormals flushed to zero (random weights produce them; tens of times slower on x86; equality at 1e-5 does not
    see them). The benchmarks' main() sets both for the whole process: restore them after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    yield
    torch.set_num_threads(threads)
    torch.set_flush_denormal(False)


def reduced_maps(b: int, sizes, c: int = 8, dtype=torch.float64, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, c, h, w, generator=g, dtype=dtype) for h, w in sizes]


def random_groupnorm_(model: nn.Module, seed: int = 0) -> None:
    """Non-trivial GroupNorm affine parameters, so a layout mistake in the channels-last path cannot hide."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.GroupNorm):
            m.weight.data.copy_(torch.rand(m.num_channels, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_channels, generator=g) - 0.5)


# ----------------------------------------------------------------------------------------------------------------
# models.functional: the fast formulation of the correlation and of the 4D network
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bq", [1, 2])
@pytest.mark.parametrize("stride", [(2, 2), (1, 1), (2, 1)])
def test_pivot_correlations_are_the_slices_of_the_full_correlation(bq, stride):
    q = reduced_maps(bq, [(3, 4), (4, 6), (6, 8)], seed=1)
    k = reduced_maps(2, [(3, 3), (4, 5), (5, 7)], seed=2)
    full = MF.cross_scale_correlation([t.expand(2, -1, -1, -1) for t in q], k, (6, 8, 5, 7))  # (B, 9, 6, 8, 5, 7)
    by_key, by_query = MF.pivot_correlations(MF.normalized_upsampled(q, (6, 8)), MF.normalized_upsampled(k, (5, 7)),
                                             stride)
    sq, sk = stride
    # float64: what is left is the release's eps on the norm product, eps / (|q| |k|) ~ 1e-9 here
    torch.testing.assert_close(by_key, full[..., ::sk, ::sk].permute(0, 4, 5, 2, 3, 1), rtol=0, atol=1e-7)
    torch.testing.assert_close(by_query, full[:, :, ::sq, ::sq].permute(0, 2, 3, 4, 5, 1), rtol=0, atol=1e-7)


def test_normalized_upsampled_correlation_equals_interpolated_cosine():
    """The identity the fast path rests on: interpolate_4d(cosine(q, k)) = <resize(q / |q|), resize(k / |k|)>."""
    q, k = reduced_maps(1, [(3, 5)], seed=3)[0], reduced_maps(1, [(4, 2)], seed=4)[0]
    direct = MF.interpolate_4d(MF.cosine_correlation(q, k), (7, 9, 6, 5))
    qn = MF.normalized_upsampled([q], (7, 9))[0, 0]  # (7, 9, C)
    kn = MF.normalized_upsampled([k], (6, 5))[0, 0]
    torch.testing.assert_close(torch.einsum("abc,dec->abde", qn, kn)[None], direct, rtol=0, atol=1e-7)


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 2)])
def test_center_pivot_conv4d_channels_last_equals_channels_first(k, stride):
    g = torch.Generator().manual_seed(k * 10 + stride)
    x = torch.randn(2, 3, 5, 6, 4, 7, generator=g, dtype=torch.float64)
    w1, w2 = (torch.randn(4, 3, k, k, generator=g, dtype=torch.float64) for _ in range(2))
    b1, b2 = (torch.randn(4, generator=g, dtype=torch.float64) for _ in range(2))
    args = (w1, b1, w2, b2, (stride, stride), (k // 2, k // 2))
    expected = MF.center_pivot_conv4d(x, *args)
    got = MF.center_pivot_conv4d_channels_last(x.permute(0, 2, 3, 4, 5, 1).contiguous(), *args)
    torch.testing.assert_close(got, expected.permute(0, 2, 3, 4, 5, 1))


@pytest.mark.parametrize("relu", [False, True])
def test_group_norm_channels_last_equals_group_norm(relu):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, 3, 4, 5, 2, generator=g, dtype=torch.float64) * 3 + 1
    w, b = torch.rand(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    expected = F.group_norm(x, 4, w, b, 1e-5)
    expected = expected.relu() if relu else expected
    got = MF.group_norm_channels_last_(x.permute(0, 2, 3, 4, 5, 1).contiguous(), 4, w, b, 1e-5, relu=relu)
    torch.testing.assert_close(got, expected.permute(0, 2, 3, 4, 5, 1))
    with pytest.raises(ValueError, match="groups"):
        MF.group_norm_channels_last_(torch.zeros(1, 3, 6), 4, None, None)


def test_group_norm_channels_last_is_accurate_on_a_large_offset_group():
    """10^6 values with mean 5 and std 0.1 in float32: torch's own channels-last kernel is off by ~1e-2 here;
    the two-pass version must stay within 1e-4 of the float64 result."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 250_000, 4, generator=g) * 0.1 + 5
    w, b = torch.rand(4, generator=g) + 0.5, torch.randn(4, generator=g)
    expected = F.group_norm(x.double().transpose(1, 2), 2, w.double(), b.double()).transpose(1, 2)
    got = MF.group_norm_channels_last_(x.clone(), 2, w, b)
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-4)


@pytest.fixture(scope="module")
def rerank_model() -> CVNetRerank:
    torch.manual_seed(0)
    model = CVNetRerank(50).eval()
    random_groupnorm_(model)
    return model


@pytest.mark.parametrize("bq", [1, 3])
def test_prepared_fast_path_equals_score_reduced(rerank_model, bq):
    with torch.inference_mode():
        q = rerank_model.reduce_featuremap(torch.randn(bq, 1024, 9, 11))
        k = rerank_model.reduce_featuremap(torch.randn(3, 1024, 10, 7))
        faithful = rerank_model.score_reduced(q, k)
        fast = rerank_model.score_prepared(rerank_model.prepare_reduced(q), rerank_model.prepare_reduced(k))
    assert fast.shape == (3,)
    torch.testing.assert_close(fast, faithful, rtol=0, atol=1e-5)
    assert faithful.std() > 1e-4  # the three pairs really differ, so a broadcast mistake would show


def test_cached_batched_reranking_equals_pair_by_pair_forward(rerank_model):
    from bench.rerank_cvnet import FastReranker

    g = torch.Generator().manual_seed(6)
    query = torch.randn(1, 3, 96, 128, generator=g)
    sizes = [(96, 128), (128, 96), (96, 128), (80, 128), (96, 128)]
    candidates = [torch.randn(1, 3, h, w, generator=g) for h, w in sizes]
    fast = FastReranker(rerank_model, device=torch.device("cpu"), batch_size=2, dtype=torch.float32)
    got = fast.scores(query, candidates, list(range(len(candidates))))
    assert fast.db_maps.computed == len(candidates)
    again = fast.scores(query, candidates, [4, 0])  # from the cache, in another order
    assert fast.db_maps.computed == len(candidates) and fast.query_maps.computed == 2
    with torch.inference_mode():
        expected = torch.cat([rerank_model(query, c) for c in candidates])
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, expected[[4, 0]], rtol=0, atol=1e-5)


def _pairs(seed: int = 6):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(1, 3, 96, 128, generator=g)
    return query, [torch.randn(1, 3, h, w, generator=g) for h, w in [(96, 128), (128, 96), (80, 128)]]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_scores_stay_within_the_benchmark_s_tolerance(rerank_model, dtype):
    """bench.rerank_cvnet's --dtype check: the fast path under autocast (here the CPU's, which rounds the same
    convolutions and GEMMs to the same dtype as CUDA's) against the faithful float32 scores, within the tolerance
    the benchmark takes for that dtype, and really computed in it (float32's 1e-5 would fail)."""
    from bench.rerank_cvnet import FastReranker, baseline_scores, score_tolerance

    query, candidates = _pairs()
    faithful = baseline_scores(rerank_model, query, candidates, torch.device("cpu"))
    half = FastReranker(rerank_model, device=torch.device("cpu"), batch_size=2, dtype=dtype)
    diff = (half.scores(query, candidates, [0, 1, 2]) - faithful).abs().max().item()
    assert score_tolerance(torch.float32) < diff <= score_tolerance(dtype)
    assert score_tolerance(dtype, atol=0.5) == 0.5  # --atol, when given, wins


def test_the_fast_path_s_profile_runs_under_its_autocast(rerank_model, monkeypatch):
    import bench.rerank_cvnet as bench_cvnet

    states = []

    def stage(rows, name, fn, device, repeats):
        states.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        out = fn()
        rows.append([name, 0.0])
        return out

    monkeypatch.setattr(bench_cvnet, "_stage", stage)
    query, candidates = _pairs()
    fast = bench_cvnet.FastReranker(rerank_model, device=torch.device("cpu"), batch_size=2, dtype=torch.bfloat16)
    rows = bench_cvnet.profile_fast(fast, query, candidates[0], torch.device("cpu"), 1)
    assert len(rows) == len(states) >= 5 and all(state == (True, torch.bfloat16) for state in states)
    states.clear()
    bench_cvnet.profile_faithful(rerank_model, query, candidates[0], torch.device("cpu"), 1)
    assert states and not any(enabled for enabled, _ in states)  # the faithful path stays in float32


@pytest.mark.parametrize("m,k", [(40, 9), (6, 9)])
def test_refine_candidates_equals_the_dense_weight_matrix_formulation(m, k):
    """The gathered weighted sum (embedding_bag) against the previous formulation: a dense (M x M) matrix of the
    k + 1 neighbour weights times the candidates."""
    cand = F.normalize(torch.randn(3, m, 16, generator=torch.Generator().manual_seed(m)), dim=-1)
    sim = torch.bmm(cand, cand.transpose(1, 2))
    vals, idx = sim.topk(min(k + 1, m), dim=-1)
    weights = vals * 0.15
    weights[..., 0] = 1.0
    dense = torch.zeros_like(sim).scatter_(-1, idx, weights)
    expected = torch.bmm(dense, cand) / weights.sum(-1, keepdim=True)
    torch.testing.assert_close(MF.refine_candidates(cand, k=k, beta=0.15), expected, rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------------
# Extraction: BatchNorm folding, channels-last, size buckets
# ----------------------------------------------------------------------------------------------------------------


def test_fold_batchnorm_keeps_the_backbone_output():
    from bench.extract import randomise_batchnorm_

    torch.manual_seed(1)
    model = CVNetRerank(50).eval()
    randomise_batchnorm_(model, seed=1)
    x = torch.randn(2, 3, 64, 80)
    with torch.inference_mode():
        expected = model.extract_featuremap(x)
        folded = inference_copy(model, channels_last=False)
        got = folded.extract_featuremap(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.backbone.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.modules())  # the original is untouched
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))
    with pytest.raises(AttributeError):
        fold_batchnorm_(nn.Linear(2, 2))


@pytest.mark.parametrize("bias", [False, True])
def test_fuse_conv_bn_rounds_as_the_direct_formula(bias):
    """w' = w * s, b' = (b - mean) * s + beta with s = gamma / sqrt(var + eps), bit for bit (torch's own fusion
    rounds s through rsqrt and differs in the last bit: the figures would move)."""
    from models.inference import fuse_conv_bn

    torch.manual_seed(2)
    conv, bn = nn.Conv2d(8, 16, 3, bias=bias).eval(), nn.BatchNorm2d(16).eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.01, 3.0)
    bn.weight.data.normal_()
    bn.bias.data.normal_()
    s = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    b = conv.bias.detach() if bias else torch.zeros(16)
    original = conv.weight.detach().clone()
    fused = fuse_conv_bn(conv, bn)
    assert torch.equal(fused.weight, conv.weight.detach() * s.view(-1, 1, 1, 1))
    assert torch.equal(fused.bias, (b - bn.running_mean) * s + bn.bias.detach())
    assert torch.equal(conv.weight, original)  # the conv itself is untouched


@pytest.mark.parametrize("name", ["cvnet", "superglobal"])
def test_bucketed_batched_extraction_equals_one_by_one(name):
    from bench.extract import baseline_descriptors, library_descriptors, make_images, randomise_batchnorm_
    from common.constants import CVNET_TEST_SCALES
    from common.convention import OFFICIAL_CONVENTION
    from datasets.transforms import multiscale_tensors
    from helpers.extraction import bucket_batches

    torch.manual_seed(2)
    model = (CVNetGlobal(50) if name == "cvnet" else SuperGlobal(50)).eval()
    randomise_batchnorm_(model, seed=2)
    scales = CVNET_TEST_SCALES if name == "cvnet" else (1.0,)
    images = make_images(4, seed=3, scale=0.125 if name == "cvnet" else 0.1875)
    items = [multiscale_tensors(im, scales, OFFICIAL_CONVENTION) for im in images]
    batches = [ids for ids, _ in bucket_batches(enumerate(items), batch_size=2)]
    assert sorted(len(b) for b in batches) == [1, 1, 2]  # 3 sizes, the repeated one batched
    cpu = torch.device("cpu")
    expected = baseline_descriptors(model, items, cpu)
    for fast in (True, False):
        got = library_descriptors(model, items, cpu, batch_size=2, fast=fast)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(4))
    with pytest.raises(ValueError, match="CUDA"):
        library_descriptors(model, items, cpu, batch_size=2, dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------------------------
# Search: the tuned chunked scan against brute force
# ----------------------------------------------------------------------------------------------------------------


def unit(n: int, d: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("nq", [5, 12])  # a few queries scan as matrix-vector products, more as one GEMM
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("chunk", [1, 7, 64, 199, 200, 1000])
def test_tensor_db_scan_equals_brute_force(dtype, chunk, nq, monkeypatch):
    import helpers.vector_db.tensor as tensor_db

    monkeypatch.setattr(tensor_db, "_GEMM_BYTES", 24 * 4 * 16)  # blocks of 16 rows inside each chunk
    xb, xq = unit(200, 24, 7).to(dtype), unit(nq, 24, 8)
    db = TensorVectorDB(24, dtype=dtype, chunk_size=chunk, progress=False)
    db.add(xb)
    scores, rows = db._search_rows(xq, 30)
    full = xq @ xb.float().T
    ref_s, ref_i = full.topk(30, dim=1)
    assert scores.dtype == torch.float32 and rows.dtype == torch.int64
    assert torch.equal(rows, ref_i)
    torch.testing.assert_close(scores, ref_s, rtol=0, atol=1e-6)


def test_tensor_db_scan_sorts_when_k_exceeds_the_rows():
    """Several chunks that hold fewer than k rows in all are never merged by top-k: the result must still be
    sorted, best first."""
    xb, xq = unit(10, 8, 9), unit(3, 8, 10)
    db = TensorVectorDB(8, chunk_size=4, progress=False)
    db.add(xb)
    scores, rows = db._search_rows(xq, 25)
    ref = (xq @ xb.T).sort(dim=1, descending=True)
    assert scores.shape == (3, 10)
    assert torch.equal(rows, ref.indices)
    torch.testing.assert_close(scores, ref.values, rtol=0, atol=1e-6)


def test_reserve_then_bulk_add_searches_like_brute_force():
    xb, xq = unit(300, 16, 11), unit(4, 16, 12)
    db = TensorVectorDB(16, dtype=torch.float16, chunk_size=64)
    db.add(xb[:10])
    db.reserve(300)
    capacity = db._vectors.shape[0]
    for start in range(10, 300, 50):
        db.add(xb[start : start + 50])
    assert db._vectors.shape[0] == capacity  # never regrown
    scores, ids = db.search(xq, 20)
    ref_s, ref_i = (xq @ xb.half().float().T).topk(20, dim=1)
    assert torch.equal(ids, ref_i)
    torch.testing.assert_close(scores, ref_s, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="capacity"):
        db.reserve(-1)


# ----------------------------------------------------------------------------------------------------------------
# The benchmarks run end to end on tiny sizes
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("module,extra,expect", [
    ("bench.rerank_cvnet", ["--no-profile"], "equality scores"),
    ("bench.extract", [], "equality superglobal"),  # --quick's images leave Regional-GeM a 3x3 stage-4 map
    ("bench.search", [], "hnsw ef="),
    ("bench.postprocess", ["--large-n", "20000"], "shortlist mode"),
    ("bench.rerank_superglobal", ["--db-sizes", "3000", "--dim", "256"], "speed-up"),
])
def test_benchmark_quick_run(module, extra, expect, capsys):
    import importlib

    main = importlib.import_module(module).main
    assert main(["--quick", "--threads", "1", *extra]) == 0
    out = capsys.readouterr().out
    assert expect in out and "FAIL" not in out


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("module,extra,expect", [
    ("bench.rerank_cvnet", ["--no-profile"], "equality scores"),
    ("bench.rerank_cvnet", ["--dtype", "float16"], "equality scores"),
    ("bench.rerank_cvnet", ["--dtype", "bfloat16"], "equality scores"),
    ("bench.extract", [], "equality superglobal"),
    ("bench.search", [], "hnsw ef="),
    ("bench.postprocess", ["--large-n", "20000"], "shortlist mode"),
    ("bench.rerank_superglobal", ["--db-sizes", "3000", "--dim", "256"], "speed-up"),
])
def test_benchmark_quick_run_on_cuda(module, extra, expect, capsys):
    """Each benchmark with --device cuda: it measures the GPU (named in its header) and its equality checks hold
    there, TF32 off (float32's tolerances) and under autocast (the dtype's)."""
    import importlib

    main = importlib.import_module(module).main
    assert main(["--quick", "--threads", "1", "--device", "cuda", *extra]) == 0
    out = capsys.readouterr().out
    assert expect in out and "FAIL" not in out and "gpu=" in out


# ----------------------------------------------------------------------------------------------------------------
# Evaluation wiring: bounded-memory global ranking, batched pair scoring under a correlation budget
# ----------------------------------------------------------------------------------------------------------------


def test_global_ranking_over_parts_in_int32_equals_the_concatenation():
    from helpers.reranking import global_ranking

    xq, xb = unit(7, 16, 20), unit(90, 16, 21)
    sims, ranks = global_ranking(xq, xb, query_chunk=3)
    parts = [xb[:40], xb[40:].half()]  # the distractors may be stored in float16
    none, ranks32 = global_ranking(xq, parts, query_chunk=4, with_similarities=False, rank_dtype=np.int32)
    assert none is None and ranks32.dtype == np.int32 and ranks32.shape == (90, 7)
    expected = np.argsort(-np.concatenate([sims[:40], (xb[40:].half().float() @ xq.T).numpy()]), axis=0,
                          kind="stable")
    np.testing.assert_array_equal(ranks32, expected)
    np.testing.assert_array_equal(ranks[:, 0], np.argsort(-sims[:, 0], kind="stable"))
    with pytest.raises(ValueError, match="cannot index"):
        global_ranking(xq, unit(200, 16, 23), rank_dtype=np.int8)  # 200 items do not fit in int8


def test_pair_scorer_fast_and_budgeted_equals_faithful_pair_by_pair(rerank_model):
    from helpers.reranking import CVNetPairScorer, pairs_per_batch

    assert pairs_per_batch((64, 48), (64, 48), n_scales=3, batch_size=32) == 3  # 1024x768 maps: 3 pairs per GB
    assert pairs_per_batch((8, 8), (8, 8), n_scales=3, batch_size=32) == 32
    assert pairs_per_batch((8, 8), (8, 8), n_scales=3, batch_size=32, budget=1) == 1

    class Maps:  # precomputed reduced maps by index, the ReducedMapStore interface the scorer uses
        def __init__(self, maps):
            self.maps = maps

        def prefetch(self, ids):
            pass

        def get(self, i):
            return self.maps[i]

    g = torch.Generator().manual_seed(22)
    with torch.inference_mode():
        qmaps = [rerank_model.reduce_featuremap(torch.randn(1, 1024, 6, 7, generator=g)) for _ in range(2)]
        dmaps = [rerank_model.reduce_featuremap(torch.randn(1, 1024, *hw, generator=g))
                 for hw in [(6, 5), (6, 5), (5, 6), (6, 5)]]
        pairs = np.array([(0, 0), (0, 1), (0, 2), (1, 3), (1, 0)])
        expected = [float(rerank_model.score_reduced(qmaps[q], dmaps[d])) for q, d in pairs]
    for fast, budget in ((True, 1 << 28), (True, 1), (False, 1)):
        scorer = CVNetPairScorer(model=rerank_model, query_maps=Maps(qmaps), db_maps=Maps(dmaps), batch_size=4,
                                 progress=False, fast=fast, correlation_budget=budget)
        np.testing.assert_allclose(scorer(pairs), expected, rtol=0, atol=1e-5)
