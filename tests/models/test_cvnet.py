"""CVNet-Rerank's pair logits: what training optimises is what scoring computes (one copy of the maths)."""
import pytest
import torch

from helpers.training.objectives import RerankHead
from models import functional as MF
from models.cvnet import CVNetRerank


@pytest.fixture(scope="module")
def rerank():
    torch.manual_seed(0)
    return CVNetRerank(50)


def _maps(seed, b, h, w):
    return torch.randn(b, 1024, h, w, generator=torch.Generator().manual_seed(seed))


def _old_pair_logits(model, query_maps, key_maps, query_index, key_index):
    """The training script's former PairLogits.forward, written out."""
    def reduce(maps):
        h, w = maps.shape[-2:]
        return [conv(MF.resize_featuremap(maps, MF.correlation_size(h, w, s)))
                for s, conv in zip(model.scales, model.conv2ds)]

    q = [t[query_index] for t in reduce(query_maps)]
    k = [t[key_index] for t in reduce(key_maps)]
    size = (*q[-1].shape[-2:], *k[-1].shape[-2:])
    return model.cv_learner(MF.cross_scale_correlation(q, k, size))


def test_pair_logits_equal_the_former_training_copy_and_the_scores(rerank):
    queries, keys = _maps(1, 3, 5, 4), _maps(2, 4, 4, 5)
    qi, kj = torch.tensor([0, 1, 2, 0, 2]), torch.tensor([3, 0, 1, 2, 2])
    with torch.no_grad():
        logits = rerank.pair_logits(queries, keys, qi, kj)
        old = _old_pair_logits(rerank, queries, keys, qi, kj)
        scores = rerank.score(queries[qi], keys[kj])
    assert logits.shape == (5, 2)
    assert torch.equal(logits, old)
    torch.testing.assert_close(torch.softmax(logits, dim=1)[:, 1], scores, rtol=0, atol=1e-6)
    assert scores.std() > 1e-5  # the pairs really differ, so an indexing mistake would show


def test_rerank_head_wraps_only_the_trainable_head(rerank):
    head = RerankHead(rerank)
    assert [id(p) for p in head.parameters()] == [id(p) for p in (*rerank.conv2ds.parameters(),
                                                                   *rerank.cv_learner.parameters())]
    queries, keys = _maps(3, 2, 4, 4), _maps(4, 4, 4, 4)
    qi, kj = torch.tensor([0, 1, 0, 1]), torch.arange(4)
    logits = head(queries, keys, qi, kj)
    with torch.no_grad():
        assert torch.equal(logits, rerank.pair_logits(queries, keys, qi, kj))
    logits[:, 1].sum().backward()
    assert rerank.conv2ds[0].weight.grad is not None and rerank.cv_learner.mlp[0].weight.grad is not None
    rerank.zero_grad(set_to_none=True)
