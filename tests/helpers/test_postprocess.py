"""helpers.postprocess: full mode equals the functional ops composed by hand; shortlist mode equals full mode on a
single query whose shortlist is the whole database, and leaves positions past the shortlist alone."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers.postprocess import PostProcessing, postprocess_ranking
from models import functional as MF


def _data(nq=3, n=40, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(5, d, generator=g)
    pts = F.normalize(centres[torch.randint(0, 5, (nq + n,), generator=g)]
                      + 0.5 * torch.randn(nq + n, d, generator=g), dim=1)
    return pts[:nq], pts[nq:]


def _ranks(xq, xb):
    return torch.argsort(xq @ xb.T, dim=1, descending=True, stable=True).T.numpy()


SETTINGS = [PostProcessing(aqe_k=2), PostProcessing(dba_k=3, dba_alpha=0.0), PostProcessing(aqe_k=3, dba_k=2),
            PostProcessing(kreciprocal=True, k1=5, k2=3), PostProcessing(aqe_k=2, dba_k=2, kreciprocal=True, k1=6)]


def _reference(xq, xb, post):
    """(ranks (n, nq), values (nq, n)): the functional ops composed by hand; values are what the ranking sorts."""
    xb2 = MF.database_side_augmentation(xb, post.dba_k, post.dba_alpha) if post.dba_k else xb
    xq2 = MF.alpha_query_expansion(xq, xb2, post.aqe_k, post.aqe_alpha) if post.aqe_k else xq
    if post.kreciprocal:
        dist = MF.k_reciprocal_distance(xq2, xb2, post.k1, post.k2, post.lambda_value)
        return torch.argsort(dist, dim=1, stable=True).T.numpy(), dist
    return _ranks(xq2, xb2), xq2 @ xb2.T


@pytest.mark.parametrize("post", SETTINGS, ids=lambda p: p.describe())
def test_full_mode_composes_the_functional_ops(post):
    xq, xb = _data()
    want, _ = _reference(xq, xb, post)
    assert np.array_equal(postprocess_ranking(xq, xb, _ranks(xq, xb), post), want)


@pytest.mark.parametrize("post", SETTINGS, ids=lambda p: p.describe())
def test_shortlist_of_the_whole_database_equals_full_mode_for_one_query(post):
    xq, xb = _data(nq=1)
    want, values = _reference(xq, xb, post)
    short = postprocess_ranking(xq, xb, _ranks(xq, xb), PostProcessing(**{**post.__dict__, "full_limit": 0,
                                                                           "shortlist": 40}))
    # the same ranking up to the order of exact ties (the shortlist lists candidates in another order)
    assert sorted(short[:, 0].tolist()) == list(range(40))
    assert torch.allclose(values[0, short[:, 0]], values[0, want[:, 0]], atol=1e-6)


def test_shortlist_reorders_only_the_shortlist_and_works_over_parts():
    xq, xb = _data(nq=2, n=60)
    ranks = _ranks(xq, xb).astype(np.int32)
    post = PostProcessing(aqe_k=2, full_limit=10, shortlist=15)
    parts = [xb[:25], xb[25:]]
    out = postprocess_ranking(xq, parts, ranks, post, gather=lambda rows: torch.cat(parts)[rows])
    assert out.dtype == np.int32 and np.array_equal(out[15:], ranks[15:])
    for i in range(2):
        assert sorted(out[:15, i].tolist()) == sorted(ranks[:15, i].tolist())
    q2 = MF.alpha_query_expansion(xq, xb[torch.from_numpy(ranks[:15, 0]).long()], k=2)
    assert out[0, 0] == int(ranks[:15, 0][int((xb[torch.from_numpy(ranks[:15, 0]).long()] @ q2[0]).argmax())])


def test_nothing_active_returns_the_ranking_and_describe_names_steps():
    xq, xb = _data()
    ranks = _ranks(xq, xb)
    assert postprocess_ranking(xq, xb, ranks, PostProcessing()) is ranks
    assert PostProcessing().describe() == "none"
    assert PostProcessing(aqe_k=2, kreciprocal=True).describe() == "α-QE k=2 α=3 + k-reciprocal k1=20 k2=6 λ=0.3"
    with pytest.raises(ValueError):
        PostProcessing(aqe_k=-1)


def test_every_invalid_field_is_named():
    """Issue 19.16 and 19.7: ``--shortlist 0 --aqe 2`` printed the whole PostProcessing(...) without naming the
    bad field, and NaN or inf exponents were accepted (every score became nan)."""
    with pytest.raises(ValueError, match=r"^invalid post-processing settings: shortlist=0 \(a whole number >= 1\)$"):
        PostProcessing(aqe_k=2, shortlist=0)
    with pytest.raises(ValueError) as caught:
        PostProcessing(aqe_alpha=float("inf"), dba_alpha=float("nan"), lambda_value=float("nan"), k1=0, dba_k=-1)
    message = str(caught.value)
    for named in ("aqe_alpha=inf", "dba_alpha=nan", "lambda_value=nan", "k1=0", "dba_k=-1"):
        assert named in message
    assert "shortlist" not in message and "aqe_k" not in message
    with pytest.raises(ValueError, match=r"lambda_value=1.5 \(a number in \[0, 1\]\)"):
        PostProcessing(lambda_value=1.5)
    assert PostProcessing(aqe_alpha=0, dba_alpha=0.0, lambda_value=1).active is False
