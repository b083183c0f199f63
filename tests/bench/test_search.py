"""bench.search's HNSW rows: recall against the exact search, one graph searched at each ef_search."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from bench.search import build, recall_at_k, searches

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
