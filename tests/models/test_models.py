"""The four public models: parity with the released networks (official key layout, random weights), shapes,
batching and switches."""
import pytest
import torch
import torch.nn.functional as F

from models import CVNetGlobal, CVNetRerank, SuperGlobal, SuperGlobalRerank, load_official_checkpoint
from models import functional as MF
from tests.support import release_reference as ref

RTOL = 1e-4


@pytest.fixture(scope="module")
def released_r50():
    """A depth-50 network in the release's module tree with random weights; its state dict is the checkpoint."""
    net = ref.RerankReference(50).eval()
    ref.randomize_(net, seed=7)
    return net


@pytest.fixture(scope="module")
def images():
    g = torch.Generator().manual_seed(11)
    return torch.randn(2, 3, 128, 160, generator=g)


def _rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


def _loaded(model, released):
    load_official_checkpoint(model, {"model_state": released.state_dict()})
    return model.eval()


@torch.no_grad()
def test_cvnet_global_matches_release(released_r50, images):
    model = _loaded(CVNetGlobal(50), released_r50)
    out = model(images)
    expected = ref.cvnet_global(released_r50.encoder_q, images)
    assert out.shape == (2, 2048)
    assert _rel_err(out, expected) < RTOL
    # random weights make all descriptors alike: compare what tells the two images apart, too
    assert _rel_err(out[0] - out[1], expected[0] - expected[1]) < 10 * RTOL
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))


@torch.no_grad()
def test_superglobal_matches_release(released_r50, images):
    relup_encoder = ref.Encoder(50, relup=True).eval()
    relup_encoder.load_state_dict(released_r50.encoder_q.state_dict())
    model = _loaded(SuperGlobal(50), released_r50)
    out = model(images)
    expected = ref.superglobal(relup_encoder, images)
    assert out.shape == (2, 2048)
    assert _rel_err(out, expected) < RTOL
    assert _rel_err(out[0] - out[1], expected[0] - expected[1]) < 10 * RTOL


@torch.no_grad()
@pytest.mark.parametrize("switch", ["gemp", "rgem", "sgem"])
def test_superglobal_switches_match_release(released_r50, images, switch):
    relup_encoder = ref.Encoder(50, relup=True).eval()
    relup_encoder.load_state_dict(released_r50.encoder_q.state_dict())
    model = _loaded(SuperGlobal(50, **{switch: False}), released_r50)
    expected = ref.superglobal(relup_encoder, images[:1], **{switch: False})
    assert _rel_err(model(images[:1]), expected) < RTOL


@torch.no_grad()
def test_superglobal_relup_off_is_plain_relu(released_r50, images):
    plain = ref.Encoder(50, relup=False).eval()
    plain.load_state_dict(released_r50.encoder_q.state_dict())
    model = _loaded(SuperGlobal(50, relup=False), released_r50)
    expected = ref.superglobal(plain, images[:1])
    assert _rel_err(model(images[:1]), expected) < RTOL
    with_relup = _loaded(SuperGlobal(50), released_r50)
    assert _rel_err(with_relup(images[:1]), expected) > 1e-4  # the switch does change the descriptor


@torch.no_grad()
def test_cvnet_rerank_matches_release(released_r50, images):
    model = _loaded(CVNetRerank(50), released_r50)
    maps = model.extract_featuremap(images)
    assert maps.shape == (2, 1024, 8, 10)
    torch.testing.assert_close(maps, released_r50.encoder_q.s3_preact(images), rtol=RTOL, atol=1e-5)
    fq = maps[:1]
    fk = maps[1:].flip(-1)[:, :, :7, :]  # a key map of another size than the query's
    # the cross-scale correlation, the 4D network's logits and the score, each against the release
    corr = MF.cross_scale_correlation(model.reduce_featuremap(fq), model.reduce_featuremap(fk), (8, 10, 7, 10))
    ref_corr = released_r50.correlation(fq, fk)
    assert corr.shape == (1, 9, 8, 10, 7, 10)
    assert _rel_err(corr, ref_corr) < RTOL
    logits, ref_logits = model.cv_learner(ref_corr), released_r50.logits(ref_corr)
    assert _rel_err(logits, ref_logits) < RTOL
    assert abs((logits[0, 1] - logits[0, 0]) - (ref_logits[0, 1] - ref_logits[0, 0])) < 1e-4 * ref_logits.abs().max()
    score, ref_score = model.score(fq, fk), released_r50.score_maps(fq, fk)
    assert score.shape == (1,)
    assert abs(score.item() - ref_score.item()) < 1e-5
    # and end to end from images
    torch.testing.assert_close(model(images[:1], images[1:]), released_r50(images[:1], images[1:]), rtol=1e-5,
                               atol=1e-6)


@torch.no_grad()
def test_cvnet_rerank_batch_broadcasts_query(released_r50, images):
    model = _loaded(CVNetRerank(50), released_r50)
    q = images[:1]
    keys = torch.cat([images, images.flip(-1)])  # 4 keys
    batched = model(q, keys)
    single = torch.cat([model(q, keys[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)
    # and B queries against B keys pairwise
    pairwise = model(keys, keys.flip(0))
    torch.testing.assert_close(pairwise, torch.cat([model(keys[i : i + 1], keys.flip(0)[i : i + 1]) for i in range(4)]),
                               rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("cls", [CVNetGlobal, SuperGlobal])
def test_global_batch_consistency(released_r50, cls):
    model = _loaded(cls(50), released_r50)
    x = torch.randn(3, 3, 96, 128, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x), torch.cat([model(x[i : i + 1]) for i in range(3)]), rtol=1e-5, atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("depth", [50, 101])
def test_shapes_per_depth(depth):
    x = torch.randn(1, 3, 96, 96)
    assert CVNetGlobal(depth, reduction_dim=512).eval()(x).shape == (1, 512)
    assert SuperGlobal(depth, scales=(1.0,)).eval()(x).shape == (1, 2048)
    rr = CVNetRerank(depth).eval()
    assert rr.extract_featuremap(x).shape == (1, 1024, 6, 6)
    n_s3 = len(rr.backbone.layer3)
    assert n_s3 == {50: 6, 101: 23}[depth]


def test_bad_depth_rejected():
    with pytest.raises(ValueError, match="depth"):
        CVNetGlobal(depth=34)


def test_key_encoder_ema_and_gradients(released_r50):
    model = _loaded(CVNetGlobal(50), released_r50)
    # after loading, the key encoder is a copy of the query encoder
    for (n, k), q in zip(model.key_backbone.state_dict().items(), model.backbone.state_dict().values()):
        assert torch.equal(k, q), n
    assert not any(p.requires_grad for p in model.key_backbone.parameters())
    with torch.no_grad():
        model.backbone.conv1.weight.add_(1.0)
    before = model.key_backbone.conv1.weight.clone()
    model.update_key_encoder(momentum=0.9)
    torch.testing.assert_close(model.key_backbone.conv1.weight, 0.9 * before + 0.1 * model.backbone.conv1.weight)
    # the key encoder is not on the inference path and gets no gradient
    model.train()
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    assert model.backbone.conv1.weight.grad is not None
    assert model.key_backbone.conv1.weight.grad is None


def test_superglobal_rerank_tensor_database_matches_loop():
    g = torch.Generator().manual_seed(5)
    X = F.normalize(torch.randn(500, 32, generator=g), dim=1)
    Q = F.normalize(torch.randn(9, 32, generator=g), dim=1)
    rr = SuperGlobalRerank(M=60, K=9, beta=0.15, query_chunk=4)
    scores, ids = rr.rerank(Q, X)
    ref_scores, ref_ids = ref.superglobal_rerank_loop(Q, X, M=60)
    assert scores.shape == ids.shape == (9, 60)
    torch.testing.assert_close(scores.double(), ref_scores, rtol=1e-5, atol=1e-6)
    assert torch.equal(ids, ref_ids)


def test_superglobal_rerank_moves_a_tensor_database_once(monkeypatch):
    """The queries' device gets the database once per call, not once per chunk of queries (a stand-in device,
    "meta", has shapes only: every chunk must find the database there already)."""
    X = F.normalize(torch.randn(50, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    rr = SuperGlobalRerank(M=10, K=2, query_chunk=2)
    seen = []
    candidates = rr.candidates
    monkeypatch.setattr(rr, "candidates", lambda q, db, m: seen.append(db) or candidates(q, db, m))
    scores, ids = rr.rerank(torch.empty(5, 8, device="meta"), X)
    assert scores.shape == ids.shape == (5, 10) and len(seen) == 3
    assert all(db is seen[0] and db.device.type == "meta" for db in seen)


def test_superglobal_rerank_small_database_and_errors():
    X = F.normalize(torch.randn(20, 8), dim=1)
    scores, ids = SuperGlobalRerank(M=400).rerank(X[:2], X)
    assert ids.shape == (2, 20)
    assert sorted(ids[0].tolist()) == list(range(20))
    with pytest.raises(ValueError):
        SuperGlobalRerank().rerank(X[0], X)
    for beta in (float("nan"), float("inf"), -0.1):  # issue 19.7: a NaN beta made every re-ranked score NaN
        with pytest.raises(ValueError, match=f"beta must be a finite number >= 0, got {beta}"):
            SuperGlobalRerank(beta=beta)
