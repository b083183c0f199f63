"""The papers' formulas of the metric-learning recipe as plain loops over anchors and pairs, for the tests of
helpers/training/metric.py (which uses pytorch-metric-learning): Circle loss (Sun et al., CVPR 2020, Eq. 6 with
Eq. 4-5's weights and margins) and multi-similarity mining (Wang et al., CVPR 2019, Eq. 9-10)."""
import math

import torch


def cosine(x, i, j):
    """s_ij = <x_i, x_j> / (|x_i| |x_j|), one pair at a time."""
    return torch.dot(x[i], x[j]) / (x[i].norm() * x[j].norm())


def _log_sum_exp(terms):
    top = max(float(t.detach()) for t in terms)
    return top + torch.log(sum(torch.exp(t - top) for t in terms))


def circle_loss_loop(x, labels, *, m, gamma, positives=None, negatives=None):
    """Circle loss, averaged over the anchors that have at least one positive and one negative pair:

        L_i = log(1 + sum_j exp(gamma a_n^j (s_n^j - D_n)) * sum_k exp(-gamma a_p^k (s_p^k - D_p)))

    with a_p = [1 + m - s_p]_+, a_n = [s_n + m]_+ (held constant in the backward pass, as the released code
    does), D_p = 1 - m, D_n = m. ``positives`` / ``negatives``: the (anchor, other) pairs to use (a miner's),
    else every pair of the batch (other != anchor). The log(1 + a * b) is taken as softplus(log a + log b)."""
    n = len(labels)
    pos = {(i, j) for i in range(n) for j in range(n) if i != j and labels[i] == labels[j]}
    neg = {(i, j) for i in range(n) for j in range(n) if labels[i] != labels[j]}
    pos = pos if positives is None else set(positives)
    neg = neg if negatives is None else set(negatives)
    losses = []
    for i in range(n):
        terms_p, terms_n = [], []
        for j in range(n):
            if (i, j) in pos:
                s = cosine(x, i, j)
                terms_p.append(-gamma * max(0.0, 1 + m - float(s.detach())) * (s - (1 - m)))
            if (i, j) in neg:
                s = cosine(x, i, j)
                terms_n.append(gamma * max(0.0, float(s.detach()) + m) * (s - m))
        if terms_p and terms_n:
            losses.append(torch.nn.functional.softplus(_log_sum_exp(terms_n) + _log_sum_exp(terms_p)))
    return sum(losses) / len(losses)


def multi_similarity_pairs_loop(x, labels, *, epsilon):
    """The pairs multi-similarity mining keeps, as sets of (anchor, other):

    - a negative pair (i, j) when s_ij > min_{k: y_k = y_i, k != i} s_ik - epsilon (Eq. 9);
    - a positive pair (i, j) when s_ij < max_{k: y_k != y_i} s_ik + epsilon (Eq. 10).

    An anchor without a positive or without a negative keeps no pair. Also returns the smallest distance of any
    similarity to its threshold (a test checks that no comparison is a near tie)."""
    n = len(labels)
    positives, negatives, closest = set(), set(), math.inf
    for i in range(n):
        same = [j for j in range(n) if j != i and labels[j] == labels[i]]
        other = [j for j in range(n) if labels[j] != labels[i]]
        if not same or not other:
            continue
        hardest_pos = min(float(cosine(x, i, j).detach()) for j in same)
        hardest_neg = max(float(cosine(x, i, j).detach()) for j in other)
        for j in other:
            s = float(cosine(x, i, j).detach())
            closest = min(closest, abs(s + epsilon - hardest_pos))
            if s + epsilon > hardest_pos:
                negatives.add((i, j))
        for j in same:
            s = float(cosine(x, i, j).detach())
            closest = min(closest, abs(s - epsilon - hardest_neg))
            if s - epsilon < hardest_neg:
                positives.add((i, j))
    return positives, negatives, closest
