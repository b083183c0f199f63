"""bench.search's HNSW rows: recall against the exact search, one graph searched at each ef_search."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from bench.search import build, recall_at_k, searches
from tests.support.spies import header_device, recording

needs_faiss = pytest.mark.skipif(importlib.util.find_spec("faiss") is None, reason="faiss is not installed")


def test_recall_at_k_counts_the_exact_top_k_found_in_any_order():
    ref = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert recall_at_k(ref.flip(1), ref) == 1.0
    assert recall_at_k(torch.tensor([[1, 2, 9, 9], [8, 0, 0, 0]]), ref) == 3 / 8


@needs_faiss
def test_hnsw_rows_share_one_graph_and_find_the_exact_neighbours():
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        built = {kind: build(kind, n=2000, d=16, seed=0, chunk_size=None,
                             hnsw={"hnsw_m": 16, "ef_construction": 64}) for kind in ("faiss", "hnsw")}
    finally:
        faiss.omp_set_num_threads(threads)
    plan = searches(built, [16, 256])
    assert list(plan) == ["faiss", "hnsw ef=16", "hnsw ef=256"]
    hnsw_db, _, index_mb = built["hnsw"]
    assert index_mb > built["faiss"][2]  # the vectors plus the graph's links
    xq = torch.nn.functional.normalize(torch.randn(20, 16, generator=torch.Generator().manual_seed(1)), dim=1)
    _, exact = built["faiss"][0].search(xq, 10)
    plan["hnsw ef=256"][1]()
    assert hnsw_db.ef_search == 256 and recall_at_k(hnsw_db.search(xq, 10)[1], exact) >= 0.95
    plan["hnsw ef=16"][1]()
    assert hnsw_db.ef_search == 16


def test_every_backend_is_built_for_the_benchmark_device(monkeypatch):
    """--device reaches the databases: tensor storage on it, faiss searching on that GPU, HNSW on the CPU (faiss
    has no GPU HNSW)."""
    import bench.search

    calls: list = []

    class Empty:
        hnsw_m = 16

        def reserve(self, n):
            pass

        def add(self, x, ids):
            pass

    monkeypatch.setattr(bench.search, "make_database", recording(calls, lambda backend, dim, **kw: Empty()))
    gpu = torch.device("cuda", 1)
    for kind in ("faiss", "tensor32", "tensor16", "hnsw"):
        build(kind, n=8, d=4, seed=0, chunk_size=None, hnsw={"hnsw_m": 16, "ef_construction": 8}, device=gpu)
    assert [c.get("device") for c in calls[:3]] == [gpu, gpu, gpu] and calls[3]["use_gpu"] is False
    assert header_device(monkeypatch, bench.search, ["--quick"]) == gpu


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tensor_backends_on_the_gpu_find_what_they_find_on_the_cpu():
    gpu = torch.device("cuda")
    xq = torch.nn.functional.normalize(torch.randn(5, 32, generator=torch.Generator().manual_seed(3)), dim=1)
    for kind in ("tensor32", "tensor16"):
        on_cpu = build(kind, n=3000, d=32, seed=0, chunk_size=1000)[0].search(xq, 10)
        db = build(kind, n=3000, d=32, seed=0, chunk_size=1000, device=gpu)[0]
        assert db.device.type == "cuda"
        scores, ids = (t.cpu() for t in db.search(xq, 10))
        assert torch.equal(ids, on_cpu[1])
        torch.testing.assert_close(scores, on_cpu[0], rtol=0, atol=1e-5)
