"""The post-processed rows of an evaluation: parsing post.rows, their order and titles, and the learned whitening
(learned once on the training split, saved beside the weights with their sha256, reused, or loaded from a file)."""
import json
import os
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import helpers.evaluation.post as EP
from common.convention import OFFICIAL_CONVENTION
from helpers.config import ConfigError, load_config
from helpers.evaluation.post import (
    LEARN,
    WhiteningContext,
    obtain_whitening,
    post_processing,
    post_rows,
    row_order,
    whiten,
    whitening_path,
)
from helpers.schemas import EVAL, POST_ROWS, POST_STEPS
from models import functional as MF

POST = EVAL.defaults["post"]


def test_every_row_name_is_a_combination_of_steps_in_their_order():
    assert len(POST_ROWS) == 2 ** len(POST_STEPS) - 1 == len(set(POST_ROWS))
    for name in POST_ROWS:
        steps = name.split("+")
        assert [POST_STEPS.index(s) for s in steps] == sorted(POST_STEPS.index(s) for s in steps)
    cfg = load_config(None, ["post.rows=[dba+aqe, whitening]"], schema=EVAL)
    assert cfg["post"]["rows"] == ["dba+aqe", "whitening"]
    with pytest.raises(ConfigError, match=r"post.rows.*'dba\+aqe'"):  # the order the steps are applied in
        load_config(None, ["post.rows=[aqe+dba]"], schema=EVAL)


def test_rows_carry_their_settings_and_name_what_they_apply():
    cfg = json.loads(json.dumps(POST))
    cfg["rows"] = ["dba+aqe", "kreciprocal", "whitening+aqe"]
    cfg["aqe"] = {"k": 3, "alpha": 1.0}
    rows = post_rows(cfg, kinds=["cvnet_global", "superglobal"])
    assert [r.key for r in rows] == ["cvnet_global+dba+aqe", "cvnet_global+kreciprocal", "cvnet_global+whitening+aqe",
                                     "superglobal+dba+aqe", "superglobal+kreciprocal", "superglobal+whitening+aqe"]
    dba_aqe, krec, white = rows[3:]
    assert (dba_aqe.post.dba_k, dba_aqe.post.dba_alpha, dba_aqe.post.aqe_k, dba_aqe.post.aqe_alpha) == (2, 3.0, 3, 1.0)
    assert not dba_aqe.post.kreciprocal and not dba_aqe.whitening
    assert dba_aqe.applied() == "α-DBA k=2 α=3 + α-QE k=3 α=1"
    assert krec.applied() == "k-reciprocal k1=20 k2=6 λ=0.3" and krec.post.dba_k == krec.post.aqe_k == 0
    assert white.whitening and white.applied(128) == "learned whitening (d=128) + α-QE k=3 α=1"
    assert dba_aqe.settings() == {"dba": {"k": 2, "alpha": 3.0}, "aqe": {"k": 3, "alpha": 1.0}, "shortlist": 1000,
                                  "full_limit": 20000}
    assert post_rows(cfg, kinds=[]) == []
    only_white = post_rows({**cfg, "rows": ["whitening"]}, kinds=["superglobal"])[0]
    assert not only_white.post.active and only_white.applied(64) == "learned whitening (d=64)"
    assert only_white.settings({"dim": 64}) == {"whitening": {"dim": 64}}
    assert post_processing(["kreciprocal"], cfg).k1 == 20


def test_rows_follow_their_global_ranking_in_the_report():
    cfg = {**POST, "rows": ["aqe", "dba"]}
    rows = post_rows(cfg, kinds=["cvnet_global", "superglobal"])
    assert row_order(["cvnet_global", "cvnet_rerank", "superglobal", "superglobal_rerank"], rows) == [
        "cvnet_global", "cvnet_global+aqe", "cvnet_global+dba", "cvnet_rerank",
        "superglobal", "superglobal+aqe", "superglobal+dba", "superglobal_rerank"]
    # a global ranking that is not itself reported: its rows come after the first method starting from it
    assert row_order(["superglobal_rerank"], post_rows(cfg, kinds=["superglobal"])) == [
        "superglobal_rerank", "superglobal+aqe", "superglobal+dba"]


def test_whiten_in_chunks_keeps_the_storage_dtype():
    g = torch.Generator().manual_seed(0)
    x = F.normalize(torch.randn(50, 8, generator=g), dim=1)
    w = MF.learn_pca_whitening(torch.randn(30, 8, generator=g), dim=6)
    expected = MF.apply_whitening(x, w)
    torch.testing.assert_close(whiten(x, w, chunk=7), expected)
    half = whiten(x.half(), w, chunk=16)
    assert half.dtype == torch.float16 and half.shape == (50, 6)
    torch.testing.assert_close(half.float(), MF.apply_whitening(x.half().float(), w), atol=2e-3, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Learned whitening: learn, save beside the weights, reuse, load
# --------------------------------------------------------------------------------------------------------------


class _Model(nn.Module):
    """What the whitening code reads of a global model: its class, depth, options and input convention."""

    def __init__(self, antialias=True):
        super().__init__()
        self.depth, self.antialias, self.input_convention = 50, antialias, OFFICIAL_CONVENTION


@pytest.fixture
def train_split(tmp_path, monkeypatch):
    """A training split of 12 listed image files (never decoded: the descriptors are stubbed) and a counter of
    the extractions asked for."""
    folder = tmp_path / "data" / "synth_train" / "jpg"
    folder.mkdir(parents=True)
    paths = []
    for i in range(12):
        paths.append(folder / f"t{i}.jpg")
        paths[-1].write_bytes(b"x" * (i + 1))
    monkeypatch.setattr("datasets.synthetic.load_train_split", lambda root, name: (paths, list(range(12))))
    g = torch.Generator().manual_seed(0)
    vectors = F.normalize(torch.randn(12, 16, generator=g), dim=1)
    calls = []

    def fake_descriptors(*, model, dataset, label, weights_hash, **kw):
        calls.append((label, len(dataset), weights_hash))
        return vectors

    monkeypatch.setattr(EP, "cached_global_descriptors", fake_descriptors)
    return vectors, calls


def _ctx(tmp_path, *, source=LEARN, weights="w.pyth", train="synth", dim=None):
    return WhiteningContext(source=source, dim=dim, max_images=None,
                            weights_file=str(tmp_path / weights) if weights else None,
                            weights_sha256="ab" * 32 if weights else None, root=str(tmp_path / "data"),
                            train_name=train, min_side=None, cache_dir=str(tmp_path / "cache"), depth=50,
                            extract_kw={})


def test_whitening_is_learned_saved_beside_the_weights_and_reused(tmp_path, train_split):
    vectors, calls = train_split
    kw = {"kind": "superglobal", "model": _Model(), "state_hash": "s1", "d": 16, "scales": (1.0,)}
    saved, info = obtain_whitening(_ctx(tmp_path), **kw)
    expected = MF.learn_pca_whitening(vectors.double())
    torch.testing.assert_close(saved["projection"], expected["projection"].float())
    path = tmp_path / "w.pyth.whiten-superglobal.pt"
    assert info == {"file": str(path), "dim": 11, "learned_on": str(tmp_path / "data" / "synth_train"),
                    "n_images": 12, "weights_sha256": "ab" * 32}
    on_disk = torch.load(path, weights_only=True)
    assert on_disk["weights_sha256"] == "ab" * 32 and on_disk["kind"] == "superglobal"
    assert calls == [("synth_train-superglobal-r50", 12, "s1")]

    again, _ = obtain_whitening(_ctx(tmp_path), **kw)  # the same model: read back, nothing extracted
    assert len(calls) == 1 and torch.equal(again["projection"], saved["projection"])
    # other weights, other model settings, another dimension or other training images: learned again
    obtain_whitening(_ctx(tmp_path), **{**kw, "state_hash": "s2"})
    obtain_whitening(_ctx(tmp_path), **{**kw, "state_hash": "s2", "model": _Model(antialias=False)})
    obtain_whitening(_ctx(tmp_path, dim=4), **{**kw, "state_hash": "s2", "model": _Model(antialias=False)})
    (tmp_path / "data" / "synth_train" / "jpg" / "t0.jpg").write_bytes(b"longer")
    obtain_whitening(_ctx(tmp_path, dim=4), **{**kw, "state_hash": "s2", "model": _Model(antialias=False)})
    assert len(calls) == 5
    assert torch.load(path, weights_only=True)["projection"].shape == (16, 4)


def test_whitening_without_a_weights_file_lives_in_the_cache_folder(tmp_path, train_split):
    ctx = _ctx(tmp_path, weights=None)
    _, info = obtain_whitening(ctx, kind="cvnet_global", model=_Model(), state_hash="f" * 64, d=16, scales=(1.0,))
    assert info["file"] == str(whitening_path(ctx, "cvnet_global", "f" * 64))
    assert info["file"].startswith(str(tmp_path / "cache" / "whitening" / "cvnet_global-"))
    assert info["weights_sha256"] is None


def test_whitening_outside_the_builtin_benchmark_needs_a_saved_file(tmp_path, train_split):
    kw = {"kind": "superglobal", "model": _Model(), "state_hash": "s1", "d": 16, "scales": (1.0,)}
    with pytest.raises(ConfigError, match="class folder's training images.*has neither.*whiten-superglobal.pt"):
        obtain_whitening(_ctx(tmp_path, train=None), **kw)
    obtain_whitening(_ctx(tmp_path), **kw)  # a built-in run with the same weights saves it beside them ...
    saved, info = obtain_whitening(_ctx(tmp_path, train=None), **kw)  # ... where a run on real data finds it
    assert info["file"] == str(tmp_path / "w.pyth.whiten-superglobal.pt")
    with pytest.raises(ConfigError, match="does not fit.*other weights"):
        obtain_whitening(_ctx(tmp_path, train=None), **{**kw, "state_hash": "s2"})
    with pytest.raises(ConfigError, match="post.whitening.source is null"):
        obtain_whitening(_ctx(tmp_path, source=None), **kw)


def test_whitening_from_a_given_file_is_checked(tmp_path, train_split):
    kw = {"kind": "superglobal", "model": _Model(), "state_hash": "s1", "d": 16, "scales": (1.0,)}
    saved, _ = obtain_whitening(_ctx(tmp_path), **kw)
    given = str(tmp_path / "w.pyth.whiten-{kind}.pt")
    loaded, info = obtain_whitening(_ctx(tmp_path, source=given, train=None), **kw)
    assert torch.equal(loaded["mean"], saved["mean"]) and info["file"].endswith("whiten-superglobal.pt")
    with pytest.raises(ConfigError, match="learned for superglobal, not cvnet_global.*{kind}"):
        obtain_whitening(_ctx(tmp_path, source=str(tmp_path / "w.pyth.whiten-superglobal.pt")),
                         **{**kw, "kind": "cvnet_global"})
    with pytest.raises(ConfigError, match="other weights"):
        obtain_whitening(_ctx(tmp_path, source=given), **{**kw, "state_hash": "s2"})
    with pytest.raises(ConfigError, match="16-d descriptors; superglobal's are 32-d"):
        obtain_whitening(_ctx(tmp_path, source=given), **{**kw, "d": 32})
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        obtain_whitening(_ctx(tmp_path, source=str(tmp_path / "nope.pt")), **kw)
    bare = tmp_path / "bare.pt"  # e.g. learned elsewhere: accepted, with a warning that it cannot be checked
    torch.save({"mean": saved["mean"], "projection": saved["projection"]}, bare)
    assert obtain_whitening(_ctx(tmp_path, source=str(bare)), **kw)[1]["dim"] == 11
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="junk.pt cannot be read"):
        obtain_whitening(_ctx(tmp_path, source=str(tmp_path / "junk.pt")), **kw)
    torch.save({"mean": torch.zeros(3)}, tmp_path / "half.pt")
    with pytest.raises(ConfigError, match="half.pt is not a whitening"):
        obtain_whitening(_ctx(tmp_path, source=str(tmp_path / "half.pt")), **kw)


def test_too_few_training_images_is_a_clear_error(tmp_path, train_split):
    with pytest.raises(ConfigError, match=r"synth_train \(12 images\).*post.whitening.dim"):
        obtain_whitening(_ctx(tmp_path, dim=40), kind="superglobal", model=_Model(), state_hash="s1", d=16,
                         scales=(1.0,))


def test_the_training_images_can_be_thinned_evenly(tmp_path, train_split):
    from helpers.evaluation.post import TrainImages

    kw = {"convention": OFFICIAL_CONVENTION, "scales": (1.0,), "min_side": None}
    all_images = TrainImages.builtin(tmp_path / "data", "synth", **kw)
    some = TrainImages.builtin(tmp_path / "data", "synth", max_images=4, **kw)
    assert len(all_images) == 12 and all_images.name == "synth_train"
    assert all_images.folder == str(tmp_path / "data" / "synth_train")
    assert [os.path.basename(p) for p in some.image_paths] == ["t0.jpg", "t4.jpg", "t7.jpg", "t11.jpg"]
    assert len(TrainImages.builtin(tmp_path / "data", "synth", max_images=50, **kw)) == 12


def test_a_class_folders_whitening_is_learned_on_its_training_images(tmp_path, monkeypatch):
    """``train_dir``: every image under the folder's training/ (its classes, and loose images), thinned evenly;
    the whitening records where it was learned."""
    from helpers.evaluation.post import TrainImages
    from tests.support.class_folder import write_image

    training = tmp_path / "shoes" / "training"
    for i in range(6):
        write_image(training / f"c{i % 2}" / f"{i}.jpg", 8, 8, 10 * i)
    write_image(training / "loose.jpg", 8, 8, 99)
    images = TrainImages.class_folder(training, convention=OFFICIAL_CONVENTION, scales=(1.0,), min_side=None)
    assert len(images) == 7 and images.root == str(training) and images.name == "folder-shoes-training"
    assert images.read(6).shape == (8, 8, 3) and images.image_paths[6] == str(training / "loose.jpg")
    g = torch.Generator().manual_seed(1)
    vectors = F.normalize(torch.randn(7, 16, generator=g), dim=1)
    calls = []
    monkeypatch.setattr(EP, "cached_global_descriptors",
                        lambda *, dataset, label, **kw: calls.append((label, len(dataset))) or vectors)
    ctx = replace(_ctx(tmp_path, train=None), train_dir=str(training))
    saved, info = obtain_whitening(ctx, kind="superglobal", model=_Model(), state_hash="s1", d=16, scales=(1.0,))
    assert calls == [("folder-shoes-training-superglobal-r50", 7)]
    assert info["learned_on"] == str(training) and info["n_images"] == 7 and info["dim"] == 6
    torch.testing.assert_close(saved["projection"], MF.learn_pca_whitening(vectors.double())["projection"].float())
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images under"):
        TrainImages.class_folder(tmp_path / "empty", convention=OFFICIAL_CONVENTION, scales=(1.0,), min_side=None)
