"""Circle loss and the multi-similarity miner (pytorch-metric-learning's, as MetricLoss runs them) against plain
loops of the papers' formulas in float32 and float64, the miner's switch and its state."""
import pytest
import torch

from helpers.distributed import DistEnv
from helpers.training.metric import MetricLoss, gather_batch
from tests.support.metric_reference import circle_loss_loop, multi_similarity_pairs_loop

pytest.importorskip("pytorch_metric_learning")

TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


def _batch(dtype, seed=0, classes=4, per_class=4, dim=8):
    """Embeddings of ``classes`` x ``per_class`` images around one centre per class (so that mining has both
    easy and hard pairs to tell apart), not normalised; labels in class blocks of a shuffled order."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(per_class)[torch.randperm(classes * per_class, generator=g)]
    x = centres[labels] + 0.9 * torch.randn(len(labels), dim, generator=g, dtype=torch.float64)
    return (3 * x).to(dtype), labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m, gamma", [(0.4, 80.0), (0.25, 256.0), (0.1, 4.0)])
def test_circle_loss_and_its_gradient_match_the_paper_loop(dtype, m, gamma):
    x, labels = _batch(dtype)
    x.requires_grad_(True)
    loss, metrics = MetricLoss(m=m, gamma=gamma, env=DistEnv())(x, labels, step=0)
    (grad,) = torch.autograd.grad(loss, x)
    ref_x = x.detach().clone().requires_grad_(True)
    want = circle_loss_loop(ref_x, labels.tolist(), m=m, gamma=gamma)
    (want_grad,) = torch.autograd.grad(want, ref_x)
    assert loss.dtype == dtype and metrics["mining"] == 0.0
    assert torch.allclose(loss, want, **TOLERANCES[dtype])
    assert torch.allclose(grad, want_grad, **TOLERANCES[dtype])
    assert metrics["pairs_pos"] == 16 * 3 and metrics["pairs_neg"] == 16 * 12  # every pair, both directions


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("epsilon", [0.1, 0.3])
def test_multi_similarity_miner_keeps_the_pairs_of_eq_9_and_10(dtype, epsilon):
    x, labels = _batch(dtype, seed=1)
    miner = MetricLoss(m=0.4, gamma=80.0, env=DistEnv(), miner="multi_similarity", epsilon=epsilon).miner
    a1, p, a2, n = miner(x, labels)
    got_pos = set(zip(a1.tolist(), p.tolist()))
    got_neg = set(zip(a2.tolist(), n.tolist()))
    want_pos, want_neg, closest = multi_similarity_pairs_loop(x, labels.tolist(), epsilon=epsilon)
    assert closest > 1e-4  # no comparison is a near tie that rounding could flip
    assert got_pos == want_pos and got_neg == want_neg
    all_pos, all_neg = 16 * 3, 16 * 12
    assert 0 < len(want_pos) < all_pos and 0 < len(want_neg) < all_neg  # the miner chose: some pairs, not all


def test_miner_pairs_reach_nothing_without_a_positive_or_a_negative():
    x, _ = _batch(torch.float64, seed=2, classes=3, per_class=2)
    labels = torch.tensor([0, 0, 1, 1, 2, 3])  # classes 2 and 3: an anchor without a positive
    miner = MetricLoss(m=0.4, gamma=80.0, env=DistEnv(), miner="multi_similarity", epsilon=0.5).miner
    a1, p, a2, n = miner(x, labels)
    want_pos, want_neg, _ = multi_similarity_pairs_loop(x, labels.tolist(), epsilon=0.5)
    assert set(zip(a1.tolist(), p.tolist())) == want_pos and set(zip(a2.tolist(), n.tolist())) == want_neg
    assert not {4, 5} & set(a1.tolist() + a2.tolist())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_miner_switches_on_at_its_step_and_circle_loss_takes_its_pairs(dtype):
    x, labels = _batch(dtype, seed=3)
    loss = MetricLoss(m=0.4, gamma=80.0, env=DistEnv(), miner="multi_similarity", epsilon=0.1, miner_start_step=5)
    before, metrics_before = loss(x, labels, step=4)
    after, metrics_after = loss(x, labels, step=5)
    assert not loss.mining(4) and loss.mining(5) and loss.mining(6)
    assert metrics_before["mining"] == 0.0 and metrics_after["mining"] == 1.0
    assert torch.allclose(before, circle_loss_loop(x, labels.tolist(), m=0.4, gamma=80.0), **TOLERANCES[dtype])
    positives, negatives, _ = multi_similarity_pairs_loop(x, labels.tolist(), epsilon=0.1)
    want = circle_loss_loop(x, labels.tolist(), m=0.4, gamma=80.0, positives=positives, negatives=negatives)
    assert torch.allclose(after, want, **TOLERANCES[dtype])
    assert (metrics_after["pairs_pos"], metrics_after["pairs_neg"]) == (len(positives), len(negatives))
    assert metrics_after["pairs_pos"] < metrics_before["pairs_pos"]


def test_the_miner_start_step_is_state_and_a_resume_keeps_its_own():
    saved = MetricLoss(m=0.4, gamma=80.0, env=DistEnv(), miner="multi_similarity", miner_start_step=35).state_dict()
    assert saved == {"miner_start_step": 35}
    resumed = MetricLoss(m=0.4, gamma=80.0, env=DistEnv(), miner="multi_similarity", miner_start_step=70)
    resumed.load_state_dict(saved)
    assert resumed.miner_start_step == 35 and resumed.mining(35) and not resumed.mining(34)
    plain = MetricLoss(m=0.4, gamma=80.0, env=DistEnv())
    assert plain.miner is None and not plain.mining(10**6)
    with pytest.raises(ValueError, match="loss.miner.name"):
        MetricLoss(m=0.4, gamma=80.0, env=DistEnv(), miner="triplet")


def test_half_precision_embeddings_are_scored_in_float32():
    x, labels = _batch(torch.float32, seed=4)
    loss, _ = MetricLoss(m=0.4, gamma=80.0, env=DistEnv())(x.half(), labels, step=0)
    assert loss.dtype == torch.float32
    want = circle_loss_loop(x.half().float(), labels.tolist(), m=0.4, gamma=80.0)
    assert torch.allclose(loss, want, rtol=1e-5, atol=1e-5)


def test_one_rank_gathers_nothing():
    x, labels = _batch(torch.float32)
    joined, joined_labels = gather_batch(x, labels, DistEnv())
    assert joined is x and joined_labels is labels
