"""bench.postprocess at tiny sizes: every timed output is what helpers.postprocess / models.functional give."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from bench.common import unit_vectors
from bench.postprocess import measure_full, measure_shortlist, settings
from helpers.postprocess import PostProcessing, postprocess_ranking
from models import functional as MF
from tests.support.spies import header_device, recording


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _descending(scores: torch.Tensor) -> np.ndarray:
    """(nq, n) scores -> (n, nq) ranks, best first."""
    return torch.argsort(scores, dim=1, descending=True, stable=True).T.numpy()


def test_full_mode_outputs_are_the_library_s_post_processing():
    out = measure_full(n=120, d=16, nq=5, k=10, aqe_k=2, dba_k=3, alpha=3.0, seed=4, repeats=1)
    xq, xb, ranks, res = out["xq"], out["xb"], out["ranks"], out["results"]
    assert torch.equal(xb, unit_vectors(120, 16, seed=4)) and torch.equal(xq, unit_vectors(5, 16, seed=5))
    assert set(out["seconds"]) == set(res) == set(out["peak_mb"])
    assert all(t > 0 for t in out["seconds"].values())
    _, ids = res["global search"]
    np.testing.assert_array_equal(ids.numpy(), ranks[:10].T)  # the reference search is the exact top-k
    np.testing.assert_array_equal(res["global ranking"], ranks)
    # each step alone, ranked by hand, is what postprocess_ranking gives with that step switched on
    np.testing.assert_array_equal(res["ranking: α-QE"], _descending(res["α-QE"] @ xb.T))
    np.testing.assert_array_equal(res["ranking: α-DBA"], _descending(xq @ res["α-DBA"].T))
    np.testing.assert_array_equal(res["ranking: k-reciprocal"],
                                  torch.argsort(res["k-reciprocal"], dim=1, stable=True).T.numpy())
    for name, post in settings(2, 3, 3.0).items():
        np.testing.assert_array_equal(res[f"ranking: {name}"], postprocess_ranking(xq, xb, ranks, post))
    assert not np.array_equal(res["ranking: α-DBA + α-QE + k-reciprocal"], ranks)  # it did re-order
    w = res["whitening: learn"]
    wq, wb = res["whitening: apply to queries"], res["whitening: apply to database"]
    torch.testing.assert_close(wq, MF.apply_whitening(xq, w))
    torch.testing.assert_close(wb, MF.apply_whitening(xb, w))
    assert wq.shape == (5, 16) and wb.shape == (120, 16)
    torch.testing.assert_close(wb.norm(dim=1), torch.ones(120))
    pool = torch.cat([xq, xb])
    torch.testing.assert_close(res["k-reciprocal's pool distances"], torch.cdist(pool, pool) ** 2, atol=1e-5, rtol=0)


def test_shortlist_mode_reorders_each_query_s_exact_shortlist_like_the_library():
    n, d, nq, short = 3000, 16, 4, 40
    out = measure_shortlist(n=n, d=d, nq=nq, shortlist=short, aqe_k=2, dba_k=2, alpha=3.0, seed=1, repeats=1)
    assert out["n"] == n and set(out["seconds"]) == set(out["results"])
    xb = unit_vectors(n, d, seed=1, dtype=torch.float16).float()  # the store's vectors, generated alike
    xq = unit_vectors(nq, d, seed=2)
    _, ids = out["results"]["global search"]
    expected = torch.topk(xq @ xb.T, short, dim=1).indices
    assert torch.equal(torch.sort(ids, dim=1).values, torch.sort(expected, dim=1).values)
    ranks = ids.T.numpy()
    for name, post in settings(2, 2, 3.0, shortlist=short).items():
        got = out["results"][name]
        assert got.shape == (short, nq)
        assert (np.sort(got, axis=0) == np.sort(ranks, axis=0)).all()  # a re-ordering of each shortlist
        # the library on the whole database in shortlist mode (full_limit=0) gives the same order
        whole = np.concatenate([ranks, np.zeros((n - short, nq), dtype=ranks.dtype)])
        lib = postprocess_ranking(xq, xb, whole, PostProcessing(**{**post.__dict__, "full_limit": 0}))
        np.testing.assert_array_equal(got, lib[:short])


def test_both_modes_measure_the_benchmark_device(monkeypatch, capsys):
    import bench.postprocess as bench_post

    calls: list = []
    monkeypatch.setattr(bench_post, "measure_full", recording(calls, measure_full))
    monkeypatch.setattr(bench_post, "measure_shortlist", recording(calls, measure_shortlist))
    monkeypatch.setattr(bench_post, "setup_process", lambda args: torch.device("cpu"))
    assert bench_post.main(["--n", "60", "--dim", "8", "--nq", "3", "--k", "5", "--large-n", "500",
                            "--shortlist", "20", "--repeats", "1"]) == 0
    assert [c["device"] for c in calls] == [torch.device("cpu")] * 2 and "cpu" in capsys.readouterr().out
    assert header_device(monkeypatch, bench_post, ["--quick"]) == torch.device("cuda", 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_mode_steps_on_the_gpu_give_the_cpu_s_results():
    kw = {"n": 120, "d": 16, "nq": 5, "k": 10, "aqe_k": 2, "dba_k": 3, "alpha": 3.0, "seed": 4, "repeats": 1}
    cpu, gpu = measure_full(**kw)["results"], measure_full(**kw, device=torch.device("cuda"))["results"]
    np.testing.assert_array_equal(gpu["global ranking"], cpu["global ranking"])
    for name in ("α-QE", "α-DBA", "whitening: apply to database"):
        torch.testing.assert_close(gpu[name], cpu[name], rtol=0, atol=1e-4)
