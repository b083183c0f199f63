"""Every equation of models/functional.py against a direct reference computation."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import functional as MF
from tests.support import release_reference as ref


def test_gem_matches_definition():
    x = torch.rand(2, 5, 4, 3, dtype=torch.float64)
    p = 3.7
    expected = torch.stack([
        torch.stack([(x[b, c].clamp(min=1e-6) ** p).mean() ** (1 / p) for c in range(5)]) for b in range(2)
    ])
    torch.testing.assert_close(MF.gem(x, p), expected)
    # the (B, C, N) layout of SuperGlobal's GeM+ gives the same numbers
    torch.testing.assert_close(MF.gem(x.flatten(2), p), expected)


def test_gem_limits():
    x = torch.rand(1, 3, 6, 6, dtype=torch.float64) + 0.1
    torch.testing.assert_close(MF.gem(x, 1.0), x.mean(dim=(2, 3)))
    assert torch.allclose(MF.gem(x, 200.0), x.amax(dim=(2, 3)), rtol=3e-2)


def test_regional_gem_matches_definition():
    torch.manual_seed(1)
    x = torch.rand(1, 2, 6, 7, dtype=torch.float64)
    p, k = 2.5, 5
    padded = F.pad(x, (2, 2, 2, 2), mode="reflect")
    expected = torch.empty_like(x)
    for i in range(6):
        for j in range(7):
            region = padded[:, :, i : i + k, j : j + k]
            # LP-pool of x / (k^2)^(1/p) == the power mean of the region
            expected[:, :, i, j] = 0.5 * (region**p).mean(dim=(2, 3)) ** (1 / p) + 0.5 * x[:, :, i, j]
    torch.testing.assert_close(MF.regional_gem(x, p, k), expected)


def test_scale_gem_max_and_mean():
    d = [torch.randn(3, 8, dtype=torch.float64) for _ in range(3)]
    normed = [v / v.norm(dim=1, keepdim=True) for v in d]
    expected_max = torch.stack([torch.stack([max(n[b, i] for n in normed) for i in range(8)]) for b in range(3)])
    torch.testing.assert_close(MF.scale_gem(d, "max"), expected_max)
    torch.testing.assert_close(MF.scale_gem(d, "mean"), (d[0] + d[1] + d[2]) / 3)
    with pytest.raises(ValueError):
        MF.scale_gem(d, "median")


def test_relu_up():
    x = torch.tensor([-1.0, 0.0, 0.01, 0.014, 0.5])
    assert MF.relu_up(x).tolist() == pytest.approx([0.014, 0.014, 0.014, 0.014, 0.5])


def test_correlation_size_uses_python_round():
    # 33 * sqrt(0.25) = 16.5 -> 16 (half to even), 35 * 0.5 = 17.5 -> 18
    assert MF.correlation_size(33, 35, 0.25) == (16, 18)
    assert MF.correlation_size(10, 20, 0.5) == (round(10 * math.sqrt(0.5)), round(20 * math.sqrt(0.5)))


def test_cosine_correlation_matches_loop():
    q = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    k = torch.randn(2, 6, 2, 5, dtype=torch.float64)
    out = MF.cosine_correlation(q, k)
    assert out.shape == (2, 3, 4, 2, 5)
    for b in range(2):
        for i in range(3):
            for j in range(4):
                for m in range(2):
                    for n in range(5):
                        a, c = q[b, :, i, j], k[b, :, m, n]
                        assert out[b, i, j, m, n].item() == pytest.approx(
                            (a @ c / (a.norm() * c.norm() + 1e-8)).item(), rel=1e-12
                        )


def test_interpolate_4d_matches_separable_matrices():
    x = torch.randn(2, 3, 4, 5, 2, dtype=torch.float64)
    size = (6, 7, 3, 4)
    torch.testing.assert_close(MF.interpolate_4d(x, size), ref.resize4d(x, size))


def test_cross_scale_correlation_layout_and_clamp():
    qs = [torch.randn(1, 4, h, h, dtype=torch.float64) for h in (2, 3, 5)]
    ks = [torch.randn(1, 4, h, h + 1, dtype=torch.float64) for h in (2, 3, 4)]
    out = MF.cross_scale_correlation(qs, ks, (5, 5, 4, 5))
    assert out.shape == (1, 9, 5, 5, 4, 5)
    assert out.min() >= 0
    # channel 3*i + j pairs query scale i with key scale j
    direct = ref.resize4d(MF.cosine_correlation(qs[1], ks[2]), (5, 5, 4, 5)).clamp(min=0)
    torch.testing.assert_close(out[:, 5], direct)


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 2)])
def test_center_pivot_conv4d_equals_naive_4d_conv(k, stride):
    torch.manual_seed(k + stride)
    x = torch.randn(2, 3, 5, 6, 4, 7, dtype=torch.float64)
    w1 = torch.randn(4, 3, k, k, dtype=torch.float64)
    w2 = torch.randn(4, 3, k, k, dtype=torch.float64)
    b1, b2 = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    out = MF.center_pivot_conv4d(x, w1, b1, w2, b2, (stride, stride), (k // 2, k // 2))
    expected = ref.naive_conv4d(x, ref.center_pivot_kernel(w1, w2), b1 + b2, (stride,) * 4, k // 2)
    torch.testing.assert_close(out, expected)


def test_refine_candidates_matches_loop():
    torch.manual_seed(3)
    cand = F.normalize(torch.randn(2, 12, 6, dtype=torch.float64), dim=-1)
    out = MF.refine_candidates(cand, k=3, beta=0.15)
    for q in range(2):
        for i in range(12):
            s = cand[q] @ cand[q, i]
            order = torch.argsort(-s)[:4]
            w = s[order] * 0.15
            w[0] = 1.0
            torch.testing.assert_close(out[q, i], (cand[q, order] * w[:, None]).sum(0) / w.sum())


def test_superglobal_rerank_matches_per_query_loop():
    torch.manual_seed(4)
    X = F.normalize(torch.randn(300, 16, dtype=torch.float64), dim=1)
    Q = F.normalize(torch.randn(7, 16, dtype=torch.float64), dim=1)
    M = 50
    top = (Q @ X.T).topk(M, dim=1).indices
    scores, ids = MF.superglobal_rerank(Q, X[top], top, k=9, beta=0.15)
    ref_scores, ref_ids = ref.superglobal_rerank_loop(Q, X, M=M, K=9, beta=0.15)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(ids, ref_ids)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_ema_update_is_the_momentum_rule_and_copies_counters():
    from models.functional import ema_update_

    g = torch.Generator().manual_seed(0)
    key = {"w": torch.randn(3, 4, generator=g), "n": torch.tensor(5)}
    query = {"w": torch.randn(3, 4, generator=g), "n": torch.tensor(9)}
    want = 0.9 * key["w"] + 0.1 * query["w"]
    ema_update_(key, query, 0.9)
    assert torch.allclose(key["w"], want) and int(key["n"]) == 9
    with pytest.raises(ValueError):
        ema_update_([torch.zeros(1)], [], 0.5)


# ----------------------------------------------------------------------------------------------------------------
# The blockwise exact top-k against brute force
# ----------------------------------------------------------------------------------------------------------------


def _unit64(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), dim=1)


@pytest.mark.parametrize("block", [1, 7, 16, 61, 1000])  # 7 and 16 do not divide 61
@pytest.mark.parametrize("k", [1, 10, 60, 61, 100])  # 61 = nb: the full ranking; 100 > nb
@pytest.mark.parametrize("nq", [1, 5, 12])  # 5: scored (rows, nq), 12: (nq, rows)
def test_blockwise_topk_equals_brute_force(block, k, nq):
    xb, xq = _unit64(61, 8, 1), _unit64(nq, 8, 2)
    d, i = MF.blockwise_topk(xq, xb, k, block=block, gemm_rows=5)
    ref_d, ref_i = (xq @ xb.T).sort(dim=1, descending=True)  # float64, random: no ties
    assert d.shape == i.shape == (nq, min(k, 61)) and i.dtype == torch.int64 and d.dtype == torch.float64
    assert torch.equal(i, ref_i[:, :k])
    torch.testing.assert_close(d, ref_d[:, :k], rtol=0, atol=1e-12)


def test_blockwise_topk_full_ranking_puts_ties_in_index_order():
    g = torch.Generator().manual_seed(3)
    xb = torch.randint(-1, 2, (50, 4), generator=g).float()  # small integers: exact products, many exact ties
    xq = torch.randint(-1, 2, (9, 4), generator=g).float()
    full = (xq @ xb.T).numpy()
    for block in (3, 50):
        d, i = MF.blockwise_topk(xq, xb, 50, block=block)
        for r in range(9):
            assert i[r].tolist() == np.argsort(-full[r], kind="stable").tolist()
        # below the full ranking a tie at the k-th place may go either way: the values are still the top k
        d, i = MF.blockwise_topk(xq, xb, 7, block=block)
        assert torch.equal(d, torch.from_numpy(-np.sort(-full, axis=1)[:, :7]))
        assert torch.equal(d, torch.from_numpy(full).gather(1, i)) and all(len(set(row)) == 7 for row in i.tolist())


def test_blockwise_topk_reads_a_database_held_elsewhere_block_by_block():
    """A database in host memory and queries on another device: blocks are copied to the queries' device as they
    are scored, never the whole database (a stand-in device, "meta", has shapes only: the call just has to work);
    on CUDA the values match the CPU's (a float16 part included)."""
    xb = _unit64(61, 8, 1).float()
    parts = [xb[:30], xb[30:].half()]
    d, i = MF.blockwise_topk(torch.empty(5, 8, device="meta"), parts, 10, block=16, gemm_rows=7)
    assert d.device.type == i.device.type == "meta" and d.shape == i.shape == (5, 10)
    if torch.cuda.is_available():
        xq = _unit64(5, 8, 2).float()
        ref_d, ref_i = MF.blockwise_topk(xq, parts, 10, block=16, gemm_rows=7)
        d, i = MF.blockwise_topk(xq.cuda(), parts, 10, block=16, gemm_rows=7)
        assert torch.equal(i.cpu(), ref_i)
        torch.testing.assert_close(d.cpu(), ref_d, rtol=0, atol=1e-6)


@pytest.mark.parametrize("rows_first", [True, False])
def test_blockwise_topk_over_float16_parts_equals_their_float32_concatenation(rows_first):
    xb, xq = _unit64(90, 16, 4).float(), _unit64(6, 16, 5).float()
    parts = [xb[:40], xb[40:].half()]  # e.g. a database and its float16 distractors, never concatenated
    whole = torch.cat([parts[0], parts[1].float()])
    ref_d, ref_i = (xq @ whole.T).topk(25, dim=1)
    for block, gemm_rows in ((7, 3), (64, None)):
        d, i = MF.blockwise_topk(xq, parts, 25, block=block, gemm_rows=gemm_rows, rows_first=rows_first)
        assert d.dtype == torch.float32 and torch.equal(i, ref_i)
        torch.testing.assert_close(d, ref_d, rtol=0, atol=1e-6)


def test_blockwise_topk_query_blocks_progress_and_edge_sizes():
    xb, xq = _unit64(30, 8, 6), _unit64(11, 8, 7)
    seen = []

    def progress(blocks):
        seen.append(len(blocks))
        return blocks

    d, i = MF.blockwise_topk(xq, xb, 4, block=8, query_block=3, progress=progress)
    want_d, want_i = MF.blockwise_topk(xq, xb, 4, block=8)
    assert torch.equal(i, want_i) and torch.equal(d, want_d)
    assert seen == [4] * 4  # 4 query blocks (3 + 3 + 3 + 2), each a scan of 4 database blocks (8 + 8 + 8 + 6)
    assert MF.blockwise_topk(xq[:0], xb, 4)[1].shape == (0, 4)
    assert MF.blockwise_topk(xq, xb[:0], 4)[1].shape == (11, 0)
    assert MF.blockwise_topk(xq, xb, 0)[0].shape == (11, 0)
    with pytest.raises(ValueError, match="database rows"):
        MF.blockwise_topk(xq, [xb, xb[:, :4]], 4)


def test_topk_merge_cuts_only_past_k():
    v, i = MF.topk_merge([torch.tensor([[3.0, 1.0]]), torch.tensor([[2.0]])], [torch.tensor([[7, 8]]),
                                                                              torch.tensor([[9]])], 3)
    assert v.tolist() == [[3.0, 1.0, 2.0]] and i.tolist() == [[7, 8, 9]]  # not more than k: left in order
    v, i = MF.topk_merge([v, torch.tensor([[5.0]])], [i, torch.tensor([[4]])], 2)
    assert v.tolist() == [[5.0, 3.0]] and i.tolist() == [[4, 7]]
