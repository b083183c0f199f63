"""CurricularFace and the momentum contrastive loss against hand-written per-sample loops (float64); the
re-ranker's training pairs and class-balanced cross-entropy."""
import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import (
    CurricularFace,
    LabelledQueue,
    MomentumContrastiveLoss,
    balanced_cross_entropy,
    curricular_face_logits,
    momentum_contrastive_loss,
    training_pairs,
)


def _unit(x):
    return F.normalize(x, dim=1)


# ---------------------------------------------------------------- references (plain python loops)


def _ref_curricular(emb, weight, labels, t, margin, scale, t_momentum=0.01):
    """Per-sample, per-class loops over python floats; returns (logits list of lists, t_new, hard count)."""
    e = [[float(v) for v in row] for row in emb]
    w = [[float(v) for v in row] for row in weight]

    def cosine(a, b):
        dot = sum(x * y for x, y in zip(a, b))
        return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))

    cos = [[max(-1.0, min(1.0, cosine(a, b))) for b in w] for a in e]
    ys = [int(y) for y in labels]
    t_new = t_momentum * sum(cos[i][ys[i]] for i in range(len(e))) / len(e) + (1 - t_momentum) * t
    logits, hard = [], 0
    for i, y in enumerate(ys):
        theta = math.acos(cos[i][y])
        cos_tm = math.cos(theta + margin)
        row = []
        for j in range(len(w)):
            c = cos[i][j]
            if j == y:
                row.append(cos_tm if theta + margin <= math.pi else c - math.sin(math.pi - margin) * margin)
            elif c > cos_tm:
                hard += 1
                row.append(c * (t_new + c))
            else:
                row.append(c)
        logits.append([scale * v for v in row])
    return logits, t_new, hard


def _ref_ce(logits, labels):
    total = 0.0
    for row, y in zip(logits, labels):
        top = max(row)
        total += -(row[int(y)] - top - math.log(sum(math.exp(v - top) for v in row)))
    return total / len(logits)


def _ref_contrastive(q, k, labels, queue, queue_labels, temperature, form):
    keys = [(list(map(float, k[j])), int(labels[j])) for j in range(len(k))]
    keys += [(list(map(float, queue[j])), int(queue_labels[j])) for j in range(len(queue))]
    total = 0.0
    for i in range(len(q)):
        qi, yi = list(map(float, q[i])), int(labels[i])
        pos, neg = [], []
        for key, lab in keys:
            if lab == -1:
                continue
            e = math.exp(sum(a * b for a, b in zip(qi, key)) / temperature)
            (pos if lab == yi else neg).append(e)
        if form == "supcon":
            total += -math.log(sum(pos) / (sum(pos) + sum(neg)))
        else:
            total += sum(-math.log(p / (p + sum(neg))) for p in pos) / len(pos)
    return total / len(q)


# ---------------------------------------------------------------- CurricularFace


def test_curricular_logits_match_reference_both_negative_branches():
    g = torch.Generator().manual_seed(1)
    emb = _unit(torch.randn(6, 4, generator=g, dtype=torch.float64))
    weight = torch.randn(7, 4, generator=g, dtype=torch.float64)
    labels = torch.tensor([0, 3, 6, 3, 1, 5])
    t = torch.tensor(0.3, dtype=torch.float64)
    logits, t_new = curricular_face_logits(emb, weight, labels, t, margin=0.15, scale=30.0)
    ref, ref_t, hard = _ref_curricular(emb, weight, labels, 0.3, 0.15, 30.0)
    assert 0 < hard < 6 * 6, "the data must exercise both the hard-negative and the plain-negative branch"
    torch.testing.assert_close(logits, torch.tensor(ref, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    assert t_new.item() == pytest.approx(ref_t, abs=1e-12)


def test_curricular_fallback_when_theta_plus_margin_passes_pi():
    g = torch.Generator().manual_seed(2)
    weight = torch.randn(3, 5, generator=g, dtype=torch.float64)
    # embeddings almost opposite to their class centre: theta_y ~ pi, so theta_y + m > pi
    emb = _unit(-_unit(weight[[1, 2]]) + 0.05 * torch.randn(2, 5, generator=g, dtype=torch.float64))
    labels = torch.tensor([1, 2])
    margin = 0.5
    cos_y = (emb * _unit(weight[labels])).sum(1)
    assert bool((torch.arccos(cos_y) + margin > math.pi).all())
    logits, _ = curricular_face_logits(emb, weight, labels, torch.tensor(0.0), margin=margin, scale=10.0)
    expected = 10.0 * (cos_y - math.sin(math.pi - margin) * margin)
    torch.testing.assert_close(logits[torch.arange(2), labels], expected, rtol=1e-10, atol=1e-10)
    ref, _, _ = _ref_curricular(emb, weight, labels, 0.0, margin, 10.0)
    # acos is ill-conditioned near -1, so the reference's cos(acos(c) + m) carries ~1e-9 of rounding
    torch.testing.assert_close(logits, torch.tensor(ref, dtype=torch.float64), rtol=1e-8, atol=1e-8)


def test_curricular_module_loss_t_update_and_eval_freeze():
    torch.manual_seed(3)
    head = CurricularFace(4, 5, margin=0.15, scale=30.0).double()
    emb = _unit(torch.randn(8, 4, dtype=torch.float64))
    labels = torch.randint(0, 5, (8,))
    weight0 = head.weight.detach().clone()
    loss = head(emb, labels)
    ref_logits, ref_t, _ = _ref_curricular(emb, weight0, labels, 0.0, 0.15, 30.0)
    assert loss.item() == pytest.approx(_ref_ce(ref_logits, labels), rel=1e-10)
    assert head.t.item() == pytest.approx(ref_t, abs=1e-12)
    # second step continues the running mean from the stored t
    head(emb, labels)
    _, ref_t2, _ = _ref_curricular(emb, weight0, labels, ref_t, 0.15, 30.0)
    assert head.t.item() == pytest.approx(ref_t2, abs=1e-12)
    head.eval()
    head(emb, labels)
    assert head.t.item() == pytest.approx(ref_t2, abs=1e-12)


def test_curricular_gradients_reach_embeddings_and_centres_float32():
    torch.manual_seed(4)
    head = CurricularFace(6, 4)
    emb = torch.randn(5, 6, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 3, 0])
    loss = head(emb, labels)
    loss.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    assert torch.isfinite(head.weight.grad).all() and head.weight.grad.abs().sum() > 0
    assert head.t.grad is None and not head.t.requires_grad
    # float32 module agrees with the float64 reference
    ref_logits, _, _ = _ref_curricular(_unit(emb.detach().double()), head.weight.detach().double(), labels, 0.0,
                                       0.15, 30.0)
    assert loss.item() == pytest.approx(_ref_ce(ref_logits, labels), rel=1e-4)


def test_curricular_state_dict_round_trip_keeps_t():
    torch.manual_seed(5)
    head = CurricularFace(4, 3)
    emb, labels = torch.randn(4, 4), torch.tensor([0, 1, 2, 1])
    for _ in range(3):
        head(emb, labels)
    state = head.state_dict()
    assert set(state) == {"weight", "t"} and state["t"].item() != 0.0
    other = CurricularFace(4, 3)
    other.load_state_dict(state)
    assert other.t.item() == head.t.item()
    head.eval()
    other.eval()
    torch.testing.assert_close(other.logits(emb, labels), head.logits(emb, labels))


def test_curricular_rejects_bad_labels_and_shapes():
    head = CurricularFace(4, 3)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        head(torch.randn(2, 4), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="share d"):
        curricular_face_logits(torch.randn(2, 4), torch.randn(3, 5), torch.tensor([0, 1]), torch.tensor(0.0))
    with pytest.raises(TypeError, match="integer"):
        head(torch.randn(2, 4), torch.tensor([0.0, 1.0]))


# ---------------------------------------------------------------- momentum contrastive loss


def _contrastive_inputs(seed=6):
    g = torch.Generator().manual_seed(seed)
    q = _unit(torch.randn(4, 3, generator=g, dtype=torch.float64))
    k = _unit(torch.randn(4, 3, generator=g, dtype=torch.float64))
    labels = torch.tensor([0, 1, 0, 2])
    queue = _unit(torch.randn(6, 3, generator=g, dtype=torch.float64))
    queue_labels = torch.tensor([1, -1, 0, 3, -1, 2])
    return q, k, labels, queue, queue_labels


@pytest.mark.parametrize("form", ["supcon", "per_positive"])
def test_contrastive_matches_reference(form):
    q, k, labels, queue, queue_labels = _contrastive_inputs()
    loss = momentum_contrastive_loss(q, k, labels, queue, queue_labels, temperature=0.1, form=form)
    ref = _ref_contrastive(q, k, labels, queue, queue_labels, 0.1, form)
    assert loss.item() == pytest.approx(ref, rel=1e-10)


def test_contrastive_forms_differ_and_supcon_with_one_positive_is_infonce():
    q, k, labels, queue, queue_labels = _contrastive_inputs()
    a = momentum_contrastive_loss(q, k, labels, queue, queue_labels, temperature=0.1, form="supcon")
    b = momentum_contrastive_loss(q, k, labels, queue, queue_labels, temperature=0.1, form="per_positive")
    assert abs(a.item() - b.item()) > 1e-6
    # all labels distinct: each query has only its own key -> both forms are MoCo's InfoNCE (cross-entropy)
    distinct = torch.tensor([10, 11, 12, 13])
    queue_labels = torch.tensor([20, -1, 21, 22, -1, 23])
    keep = queue_labels >= 0
    logits = q @ torch.cat([k, queue[keep]]).T / 0.1
    infonce = F.cross_entropy(logits, torch.arange(4))
    for form in ("supcon", "per_positive"):
        loss = momentum_contrastive_loss(q, k, distinct, queue, queue_labels, temperature=0.1, form=form)
        assert loss.item() == pytest.approx(infonce.item(), rel=1e-10)


def test_contrastive_ignores_empty_slots_whatever_they_hold():
    q, k, labels, queue, queue_labels = _contrastive_inputs()
    base = momentum_contrastive_loss(q, k, labels, queue, queue_labels, temperature=0.05)
    garbage = queue.clone()
    garbage[queue_labels == -1] = q[0] * 5.0  # would dominate the sums if counted
    again = momentum_contrastive_loss(q, k, labels, garbage, queue_labels, temperature=0.05)
    assert again.item() == pytest.approx(base.item(), rel=1e-12)


def test_contrastive_without_negatives_is_zero_and_finite_gradient():
    q = _unit(torch.randn(2, 3, dtype=torch.float64)).requires_grad_(True)
    k = _unit(torch.randn(2, 3, dtype=torch.float64))
    labels = torch.tensor([4, 4])
    empty_queue, empty_labels = torch.zeros(3, 3, dtype=torch.float64), torch.full((3,), -1)
    loss = momentum_contrastive_loss(q, k, labels, empty_queue, empty_labels, temperature=0.1, form="supcon")
    assert loss.item() == pytest.approx(0.0, abs=1e-12)
    loss.backward()
    assert torch.isfinite(q.grad).all()
    q.grad = None
    loss = momentum_contrastive_loss(q, k, labels, empty_queue, empty_labels, temperature=0.1, form="per_positive")
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-12) and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("form", ["supcon", "per_positive"])
def test_contrastive_gradcheck_wrt_queries(form):
    _, k, labels, queue, queue_labels = _contrastive_inputs(7)
    q = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: momentum_contrastive_loss(x, k, labels, queue, queue_labels, temperature=0.5, form=form), (q,)
    )


def test_labelled_queue_wraps_around_like_a_ring():
    queue = LabelledQueue(dim=2, size=5)
    assert len(queue) == 0 and (queue.labels == -1).all()
    expected_keys, expected_labels = [[0.0, 0.0]] * 5, [-1] * 5
    ptr, counter = 0, 0
    for batch in (3, 4, 2, 6):
        keys = torch.arange(counter, counter + 2 * batch, dtype=torch.float32).view(batch, 2)
        labels = torch.arange(counter, counter + batch)
        queue.enqueue(keys, labels)
        rows = list(zip(keys.tolist(), labels.tolist()))[-5:]
        for row, lab in rows:  # the plain-list simulation of a ring buffer
            expected_keys[ptr], expected_labels[ptr] = row, lab
            ptr = (ptr + 1) % 5
        counter += 2 * batch
        assert queue.queue.tolist() == expected_keys
        assert queue.labels.tolist() == expected_labels
        assert int(queue.ptr) == ptr
    # after 3 then 4 keys the ring had wrapped: slots 3, 4, 0, 1 came from the second batch
    assert len(queue) == 5


def test_labelled_queue_rejects_bad_input():
    queue = LabelledQueue(dim=3, size=4)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        queue.enqueue(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="-1"):
        queue.enqueue(torch.zeros(2, 3), torch.tensor([0, -1]))


def test_momentum_loss_uses_queue_before_enqueue_and_no_gradient_to_keys():
    torch.manual_seed(8)
    crit = MomentumContrastiveLoss(dim=3, queue_size=4, temperature=0.2)
    q1, k1, y1 = torch.randn(3, 3), torch.randn(3, 3), torch.tensor([0, 1, 0])
    crit(q1, k1, y1)  # fills 3 slots
    snapshot_q, snapshot_l = crit.queue.queue.clone(), crit.queue.labels.clone()
    q2 = torch.randn(2, 3, requires_grad=True)
    k2 = torch.randn(2, 3, requires_grad=True)
    y2 = torch.tensor([1, 2])
    loss = crit(q2, k2, y2)
    expected = momentum_contrastive_loss(_unit(q2.detach()), _unit(k2.detach()), y2, snapshot_q, snapshot_l,
                                         temperature=0.2)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    # the batch was enqueued afterwards (wrapping: slot 3 then slot 0), normalised
    torch.testing.assert_close(crit.queue.queue[[3, 0]], _unit(k2.detach()))
    assert crit.queue.labels.tolist() == [2, 1, 0, 1] and int(crit.queue.ptr) == 1
    loss.backward()  # the in-place enqueue must not break the graph
    assert q2.grad is not None and torch.isfinite(q2.grad).all() and q2.grad.abs().sum() > 0
    assert k2.grad is None
    assert not crit.queue.queue.requires_grad and crit.queue.queue.grad is None


def test_momentum_loss_eval_mode_leaves_queue_alone():
    crit = MomentumContrastiveLoss(dim=3, queue_size=4).eval()
    crit(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]))
    assert len(crit.queue) == 0 and int(crit.queue.ptr) == 0


def test_momentum_loss_state_dict_round_trip():
    torch.manual_seed(9)
    crit = MomentumContrastiveLoss(dim=3, queue_size=5, temperature=0.1)
    for _ in range(3):
        crit(torch.randn(2, 3), torch.randn(2, 3), torch.randint(0, 3, (2,)))
    state = crit.state_dict()
    assert set(state) == {"queue.queue", "queue.labels", "queue.ptr"}
    other = MomentumContrastiveLoss(dim=3, queue_size=5, temperature=0.1)
    other.load_state_dict(state)
    q, k, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1, 2])
    assert other(q, k, y).item() == pytest.approx(crit(q, k, y).item(), rel=1e-6)
    assert torch.equal(other.queue.queue, crit.queue.queue) and int(other.queue.ptr) == int(crit.queue.ptr)


def test_momentum_loss_gather_enqueues_the_keys_of_every_process():
    torch.manual_seed(10)
    other_keys, other_labels = _unit(torch.randn(2, 3)), torch.tensor([5, 6])
    # a stand-in for two processes: this one's tensor first, then the other's, as all_gather_cat orders them
    gather = lambda t: torch.cat([t, other_keys if t.is_floating_point() else other_labels])  # noqa: E731
    crit = MomentumContrastiveLoss(dim=3, queue_size=8, gather=gather)
    alone = MomentumContrastiveLoss(dim=3, queue_size=8)
    q, k, y = torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1, 2])
    assert crit(q, k, y).item() == alone(q, k, y).item()  # the loss is the local batch's against the old queue
    assert crit.queue.labels.tolist()[:4] == [1, 2, 5, 6] and int(crit.queue.ptr) == 4
    torch.testing.assert_close(crit.queue.queue[:4], torch.cat([_unit(k), other_keys]))
    assert len(alone.queue) == 2


def test_rerank_training_pairs_and_their_balanced_loss():
    labels = torch.tensor([0, 1, 1])
    key_labels = torch.cat([labels, torch.tensor([2, 0, 0])])  # positives, then mined negatives
    qi, kj, target = training_pairs(labels, key_labels, "mined")
    assert qi.tolist() == [0, 1, 2, 0, 1, 2] and kj.tolist() == [0, 1, 2, 3, 4, 5]
    assert target.tolist() == [1, 1, 1, 0, 0, 0]
    qi, kj, target = training_pairs(labels, key_labels, "all")
    assert len(qi) == 18
    assert all(target[p] == int(labels[qi[p]] == key_labels[kj[p]]) for p in range(18))
    assert target.view(3, 6).tolist()[1] == [0, 1, 1, 0, 0, 0]  # query 1 also matches query 2's positive
    logits = torch.randn(18, 2, generator=torch.Generator().manual_seed(0))
    ce = F.cross_entropy(logits, target, reduction="none")
    expected = 0.5 * (ce[target == 1].mean() + ce[target == 0].mean())
    assert torch.allclose(balanced_cross_entropy(logits, target), expected)
    only_negatives = torch.zeros(4, dtype=torch.long)  # a class absent from the batch does not count
    assert torch.allclose(balanced_cross_entropy(logits[:4], only_negatives),
                          F.cross_entropy(logits[:4], only_negatives))
    with pytest.raises(ValueError, match="pairs"):
        training_pairs(labels, key_labels, "some")


def test_contrastive_rejects_bad_arguments():
    q, k, labels, queue, queue_labels = _contrastive_inputs()
    with pytest.raises(ValueError, match="form"):
        momentum_contrastive_loss(q, k, labels, queue, queue_labels, form="infonce")
    with pytest.raises(ValueError, match="temperature"):
        momentum_contrastive_loss(q, k, labels, queue, queue_labels, temperature=0.0)
    with pytest.raises(ValueError, match="reserved"):
        momentum_contrastive_loss(q, k, torch.tensor([0, -1, 0, 2]), queue, queue_labels)
    with pytest.raises(ValueError, match="queue"):
        momentum_contrastive_loss(q, k, labels, queue[:, :2], queue_labels)
