"""Post-processing of global descriptors (models.functional): alpha-QE, alpha-DBA, PCA whitening and k-reciprocal
re-ranking, each against a direct float64 loop (k-reciprocal against a restatement of the authors' published
function, which takes distance matrices)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models.functional import (
    _self_top_neighbours,
    alpha_query_expansion,
    apply_whitening,
    database_side_augmentation,
    database_side_augmentation_of,
    k_reciprocal_distance,
    k_reciprocal_shortlist,
    learn_pca_whitening,
    pairwise_squared_distances,
)


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _expand_loop(q, X, k, alpha, skip=None):
    sims = [(float(q @ X[j]), j) for j in range(X.shape[0]) if j != skip]
    sims.sort(key=lambda t: -t[0])
    out = q.clone()
    for s, j in sims[:k]:
        out = out + max(s, 0.0) ** alpha * X[j]
    return out / out.norm()


@pytest.mark.parametrize("k,alpha", [(1, 3.0), (3, 3.0), (5, 0.0), (2, 1.0)])
def test_alpha_query_expansion_against_loop(k, alpha):
    Q, X = _unit(4, 8, 0), _unit(20, 8, 1)
    got = alpha_query_expansion(Q, X, k=k, alpha=alpha, chunk=3)
    want = torch.stack([_expand_loop(Q[i], X, k, alpha) for i in range(4)])
    assert torch.allclose(got, want, atol=1e-12)
    assert torch.allclose(got.norm(dim=1), torch.ones(4, dtype=torch.float64))


def test_average_qe_weighs_every_neighbour_one():
    Q, X = _unit(3, 6, 2), _unit(10, 6, 3)
    top = (Q @ X.T).topk(4, dim=1).indices
    want = F.normalize(Q + X[top].sum(dim=1), dim=1)
    assert torch.allclose(alpha_query_expansion(Q, X, k=4, alpha=0.0), want, atol=1e-12)
    assert torch.equal(alpha_query_expansion(Q, X, k=0), Q)


@pytest.mark.parametrize("k,alpha", [(1, 3.0), (4, 3.0), (3, 0.0)])
def test_database_side_augmentation_against_loop_excludes_itself(k, alpha):
    X = _unit(15, 8, 4)
    got = database_side_augmentation(X, k=k, alpha=alpha, chunk=4)
    want = torch.stack([_expand_loop(X[i], X, k, alpha, skip=i) for i in range(15)])
    assert torch.allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("block", [1, 4, 7, 64])
def test_self_neighbours_read_each_pair_once_and_equal_a_full_search(block):
    X = _unit(30, 6, 14)
    sims = X @ X.T
    sims.fill_diagonal_(float("-inf"))
    for k in (1, 3, 29, 40):  # 40: more than the 29 other rows
        v, i = _self_top_neighbours(X, k, block=block)
        want_v, want_i = sims.topk(min(k, 29), dim=1)
        assert torch.equal(i, want_i) and torch.allclose(v, want_v, atol=1e-14)
    assert _self_top_neighbours(X[:1], 2)[1].shape == (1, 0)


def test_dba_shortlist_form_equals_the_full_form():
    X = _unit(12, 5, 5)
    full = database_side_augmentation(X, k=3, alpha=3.0)
    sims = X @ X.T
    sims.fill_diagonal_(float("-inf"))
    v, i = sims.topk(3, dim=1)
    assert torch.allclose(database_side_augmentation_of(X, v, X[i], alpha=3.0), full, atol=1e-12)


def test_whitening_whitens_the_learning_set_and_matches_an_eigen_loop():
    g = torch.Generator().manual_seed(6)
    X = torch.randn(200, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    w = learn_pca_whitening(X)
    Y = (X - w["mean"]) @ w["projection"]
    cov = Y.T @ Y / X.shape[0]
    assert torch.allclose(cov, torch.eye(6, dtype=torch.float64), atol=1e-9)
    # cirtorch's recipe, in numpy: eigen-decompose the symmetrised covariance, largest first, P = D^-1/2 E^T
    x = X.numpy().T
    xc = x - x.mean(axis=1, keepdims=True)
    c = xc @ xc.T
    c = (c + c.T) / (2 * x.shape[1])
    val, vec = np.linalg.eigh(c)
    order = val.argsort()[::-1]
    P = np.diag(1 / np.sqrt(val[order])) @ vec[:, order].T
    ref = (P @ xc).T
    ref /= np.linalg.norm(ref, axis=1, keepdims=True) + 1e-6
    got = apply_whitening(X, w).numpy()
    signs = np.sign((got * ref).sum(axis=0))  # eigenvectors are defined up to sign
    assert np.allclose(got, ref * signs, atol=1e-9)


def test_whitening_dimension_rules():
    X = _unit(10, 16, 7)
    w = learn_pca_whitening(X)
    assert w["projection"].shape == (16, 9)  # the centred data's rank
    assert apply_whitening(X, learn_pca_whitening(X, dim=4)).shape == (10, 4)
    with pytest.raises(ValueError, match="dim must be in"):
        learn_pca_whitening(X, dim=12)
    with pytest.raises(ValueError, match="at least 2"):
        learn_pca_whitening(X[:1])


def authors_re_ranking(q_g_dist, q_q_dist, g_g_dist, k1=20, k2=6, lambda_value=0.3):
    """The published re-ranking function of Zhong et al. (distance-matrix version), restated as loops."""
    original = np.concatenate([np.concatenate([q_q_dist, q_g_dist], axis=1),
                               np.concatenate([q_g_dist.T, g_g_dist], axis=1)], axis=0) ** 2
    original = (original / original.max(axis=0)).T
    n = original.shape[0]
    nq = q_g_dist.shape[0]
    rank = np.argsort(original, axis=1, kind="stable")

    def recip(i, k):
        fwd = rank[i, : k + 1]
        return fwd[[i in rank[j, : k + 1] for j in fwd]]

    V = np.zeros_like(original)
    for i in range(n):
        r = recip(i, k1)
        expansion = r
        for c in r:
            rc = recip(c, int(np.around(k1 / 2.0)))
            if len(np.intersect1d(rc, r)) > 2.0 / 3 * len(rc):
                expansion = np.append(expansion, rc)
        expansion = np.unique(expansion)
        w = np.exp(-original[i, expansion])
        V[i, expansion] = w / w.sum()
    if k2 != 1:
        V = np.stack([V[rank[i, :k2]].mean(axis=0) for i in range(n)])
    final = np.zeros((nq, n))
    for i in range(nq):
        for j in range(n):
            m = np.minimum(V[i], V[j]).sum()
            final[i, j] = (1 - (m / (2 - m))) * (1 - lambda_value) + original[i, j] * lambda_value
    return final[:, nq:]


def _cdist(a, b):
    return torch.cdist(a, b).numpy()


@pytest.mark.parametrize("nq,n,k1,k2,lam", [(3, 25, 5, 3, 0.3), (2, 40, 20, 6, 0.3), (4, 18, 4, 1, 0.5),
                                             (2, 9, 20, 6, 0.3), (5, 60, 7, 2, 0.1)])
def test_k_reciprocal_equals_the_authors_function(nq, n, k1, k2, lam):
    # clustered data, so that reciprocal sets and their expansions are non-trivial
    g = torch.Generator().manual_seed(8)
    centres = torch.randn(4, 16, generator=g, dtype=torch.float64)
    pts = centres[torch.randint(0, 4, (nq + n,), generator=g)] + 0.4 * torch.randn(nq + n, 16, generator=g,
                                                                                     dtype=torch.float64)
    pts = F.normalize(pts, dim=1)
    Q, X = pts[:nq], pts[nq:]
    got = k_reciprocal_distance(Q, X, k1=k1, k2=k2, lambda_value=lam)
    want = authors_re_ranking(_cdist(Q, X), _cdist(Q, Q), _cdist(X, X), k1=k1, k2=k2, lambda_value=lam)
    assert got.shape == (nq, n)
    assert np.allclose(got.numpy(), want, atol=1e-10)


def test_pool_distances_are_exactly_symmetric_squared_distances_across_blocks():
    pts = _unit(11, 6, 13) * torch.linspace(0.5, 2.0, 11, dtype=torch.float64)[:, None]  # not unit: sq terms matter
    got = pairwise_squared_distances(pts, block=4)  # blocks 4, 4, 3: every mirrored case
    assert torch.equal(got, got.T)
    assert torch.allclose(got, torch.cdist(pts, pts) ** 2, atol=1e-12)
    single = pairwise_squared_distances(pts.float(), block=4)
    assert torch.equal(single, single.T)


def test_k_reciprocal_shortlist_is_the_full_function_on_each_querys_candidates():
    Q, X = _unit(3, 8, 9), _unit(50, 8, 10)
    top = (Q @ X.T).topk(12, dim=1).indices
    got = k_reciprocal_shortlist(Q, X[top], k1=5, k2=3)
    for i in range(3):
        assert torch.allclose(got[i], k_reciprocal_distance(Q[i : i + 1], X[top[i]], k1=5, k2=3)[0], atol=1e-12)
    with pytest.raises(ValueError, match="candidates must be"):
        k_reciprocal_shortlist(Q, X[:12], k1=5)


def test_k_reciprocal_ranks_a_near_duplicate_first():
    X = _unit(30, 8, 11)
    Q = F.normalize(X[7:8] + 0.01 * _unit(1, 8, 12), dim=1)
    assert int(k_reciprocal_distance(Q, X, k1=6, k2=3).argmin()) == 7
