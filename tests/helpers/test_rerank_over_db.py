"""SuperGlobal re-ranking served from any vector database gives the tensor path's results."""
import pytest
import torch
import torch.nn.functional as F

from helpers import FaissVectorDB, TensorVectorDB
from models import SuperGlobalRerank


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(21)
    xb = F.normalize(torch.randn(600, 48, generator=g), dim=1)
    xq = F.normalize(torch.randn(11, 48, generator=g), dim=1)
    return xb, xq


@pytest.mark.parametrize("make_db", [
    lambda d: TensorVectorDB(d, chunk_size=128),
    lambda d: TensorVectorDB(d, dtype=torch.float32, chunk_size=1000),
    lambda d: FaissVectorDB(d, index="flat", use_gpu=False),
])
def test_rerank_over_database_equals_tensor_path(data, make_db):
    xb, xq = data
    reranker = SuperGlobalRerank(M=80, K=9, beta=0.15, query_chunk=4)
    ref_scores, ref_ids = reranker.rerank(xq, xb)
    db = make_db(48)
    db.add(xb)  # ids default to 0..n-1, the tensor path's row indices
    scores, ids = reranker.rerank(xq, db)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-6)


def test_rerank_returns_database_ids_not_rows(data):
    xb, xq = data
    db = TensorVectorDB(48)
    custom = torch.arange(600, dtype=torch.int64) * 7 + 1000
    db.add(xb, ids=custom)
    _, ref_rows = SuperGlobalRerank(M=50).rerank(xq, xb)
    _, ids = SuperGlobalRerank(M=50).rerank(xq, db)
    assert torch.equal(ids, custom[ref_rows])
