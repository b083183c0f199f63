"""The synthetic benchmark: deterministic, in the revisitop layout, with consistent and learnable labels."""
import csv
import hashlib
import json
import pickle
import platform
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

import datasets.synthetic.build as synthetic_build
from datasets.synthetic import (
    SyntheticConfig,
    ViewParams,
    build_synthetic,
    label_view,
    load_train_split,
    view_homography,
    visible_fraction,
)

ROOT = Path(__file__).resolve().parents[2]

TINY = SyntheticConfig(n_landmarks=3, views_per_landmark=4, queries_per_landmark=2, n_distractors=3,
                       image_size=(128, 96), train_landmarks=2, train_views_per_landmark=3)
SMALL = SyntheticConfig(n_landmarks=8, views_per_landmark=6, n_distractors=16, image_size=(160, 120),
                        train_landmarks=3, train_views_per_landmark=4)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Builtins plus numpy array reconstruction, nothing else: what a safe gnd reader allows."""

    ALLOWED = {("numpy._core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def _load_gnd(folder: Path, name: str) -> dict:
    with open(folder / f"gnd_{name}.pkl", "rb") as f:
        return _NumpyOnlyUnpickler(f).load()


def _views(folder: Path) -> dict[str, dict]:
    with open(folder / "views.csv", newline="") as f:
        return {r["image"]: r for r in csv.DictReader(f)}


def _image(folder: Path, image: str) -> np.ndarray:
    img = cv2.imread(str(folder / "jpg" / f"{image}.jpg"), cv2.IMREAD_COLOR)
    assert img is not None, image
    return img


def _average_precision(ranked_relevant: np.ndarray) -> float:
    """AP of one ranking given as a boolean relevance vector (junk already removed)."""
    hits = np.flatnonzero(ranked_relevant)
    return float(np.mean((np.arange(len(hits)) + 1) / (hits + 1)))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth_small")
    return build_synthetic(root, name="sm", config=SMALL, progress=False)


def test_same_seed_is_byte_identical_and_other_seed_differs(tmp_path):
    a = build_synthetic(tmp_path / "a", name="t", config=TINY, progress=False)
    b = build_synthetic(tmp_path / "b", name="t", config=TINY, progress=False)
    c = build_synthetic(tmp_path / "c", name="t", config=SyntheticConfig(**{**TINY.to_dict(), "seed": 1}),
                        progress=False)
    assert (a / "gnd_t.pkl").read_bytes() == (b / "gnd_t.pkl").read_bytes()
    assert (a / "views.csv").read_bytes() == (b / "views.csv").read_bytes()
    names = sorted(p.name for p in (a / "jpg").iterdir())
    assert names == sorted(p.name for p in (b / "jpg").iterdir())
    for n in names:
        assert np.array_equal(_image(a, n[:-4]), _image(b, n[:-4])), n
    train_a, train_b = tmp_path / "a" / "t_train", tmp_path / "b" / "t_train"
    assert (train_a / "train.csv").read_bytes() == (train_b / "train.csv").read_bytes()
    for p in (train_a / "jpg").iterdir():
        assert p.read_bytes() == (train_b / "jpg" / p.name).read_bytes(), p.name

    assert (a / "gnd_t.pkl").read_bytes() != (c / "gnd_t.pkl").read_bytes()
    same = [np.array_equal(_image(a, n[:-4]), _image(c, n[:-4])) for n in names]
    assert not any(same)


#: sha256 of a TINY build (every file's relative path and bytes), drawn by the OpenCV that requirements.txt pins.
#: Measured equal with OpenCV's AVX-512 code and Intel IPP's AVX-512 paths switched off (an AVX2-only CPU).
TINY_SHA256 = "34aa8b70eff9a79605238bd8bd7abec7815b583c196fc001365c193404fae2fd"


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="recorded on x86-64; OpenCV draws through other SIMD code on other architectures")
def test_the_pinned_opencv_draws_the_recorded_bytes(tmp_path):
    # OpenCV 4.10, 4.14, 5.0 and 5.1 each draw this build differently (anti-aliased shapes, warps, blurs), and the
    # built-in figures hold for one drawing only: requirements.txt pins the release, this test holds it to its bytes
    pinned = re.search(r"^opencv-python-headless==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    assert pinned, "requirements.txt must pin opencv-python-headless exactly: other releases draw other data"
    build_synthetic(tmp_path, name="t", config=TINY, progress=False)
    h = hashlib.sha256()
    for p in sorted(q for q in tmp_path.rglob("*") if q.is_file()):
        h.update(p.relative_to(tmp_path).as_posix().encode() + b"\0" + p.read_bytes())
    assert h.hexdigest() == TINY_SHA256, (f"OpenCV {cv2.__version__} drew other bytes than the recorded build "
                                          f"(requirements.txt pins {pinned.group(1)})")


def test_layout_and_pickle_types(small):
    name = "sm"
    assert small == small.parent / name
    gnd = _load_gnd(small, name)  # readable with numpy reconstruction as the only allowed globals
    assert set(gnd) == {"imlist", "qimlist", "gnd"}
    imlist, qimlist = gnd["imlist"], gnd["qimlist"]
    assert all(isinstance(s, str) and not s.endswith(".jpg") for s in imlist + qimlist)
    assert len(imlist) == SMALL.n_landmarks * SMALL.views_per_landmark + SMALL.n_distractors
    assert len(qimlist) == len(gnd["gnd"]) == SMALL.n_landmarks * SMALL.queries_per_landmark
    assert len(set(imlist)) == len(imlist) and not set(imlist) & set(qimlist)
    on_disk = {p.stem for p in (small / "jpg").glob("*.jpg")}
    assert on_disk == set(imlist) | set(qimlist)
    for g in gnd["gnd"]:
        assert set(g) == {"bbx", "easy", "hard", "junk"}
        assert isinstance(g["bbx"], list) and len(g["bbx"]) == 4 and all(type(v) is float for v in g["bbx"])
        for key in ("easy", "hard", "junk"):
            assert isinstance(g[key], np.ndarray) and np.issubdtype(g[key].dtype, np.integer) and g[key].ndim == 1
    long, short = SMALL.image_size
    for n in imlist[:20] + qimlist:
        assert sorted(_image(small, n).shape[:2]) == [short, long]
    meta = json.loads((small / "meta.json").read_text())
    assert meta["config"] == SMALL.to_dict() and meta["seed"] == SMALL.seed and meta["split"] == "test"
    assert meta["counts"]["database"] == len(imlist)


def test_ground_truth_is_consistent_with_the_drawn_views(small):
    gnd = _load_gnd(small, "sm")
    views = _views(small)
    imlist = gnd["imlist"]
    for q, g in zip(gnd["qimlist"], gnd["gnd"]):
        easy, hard, junk = (set(g[k].tolist()) for k in ("easy", "hard", "junk"))
        assert not (easy & hard) and not (easy & junk) and not (hard & junk)
        for k in ("easy", "hard", "junk"):
            assert np.all(g[k] >= 0) and np.all(g[k] < len(imlist))
            assert np.array_equal(np.unique(g[k]), g[k])  # sorted, no repeats
        assert easy and hard  # every query has positives of both kinds
        landmark = views[q]["landmark"]
        same = {i for i, n in enumerate(imlist) if views[n]["landmark"] == landmark}
        assert easy | hard | junk == same  # everything else (other landmarks, distractors) is a negative
        for i in same:
            r = views[imlist[i]]
            view = ViewParams(scale=float(r["scale"]), rotation=float(r["rotation"]), tilt_x=float(r["tilt_x"]),
                              tilt_y=float(r["tilt_y"]))
            expected = label_view(view, float(r["visible"]), config=SMALL)
            got = "easy" if i in easy else "hard" if i in hard else "junk"
            assert got == expected == r["label"], imlist[i]
    # the database order carries no landmark order
    landmarks = [views[n]["landmark"] for n in imlist]
    assert landmarks != sorted(landmarks)


def test_bbx_inside_query_image_and_around_the_landmark(small):
    gnd = _load_gnd(small, "sm")
    views = _views(small)
    for q, g in zip(gnd["qimlist"], gnd["gnd"]):
        h, w = _image(small, q).shape[:2]
        x1, y1, x2, y2 = g["bbx"]
        assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h
        # a query frames the whole landmark at about 0.8-0.95 of the canonical 75% of the frame
        assert float(views[q]["visible"]) >= 0.999
        assert (x2 - x1) / w > 0.3 or (y2 - y1) / h > 0.3
        assert x2 - x1 < w and y2 - y1 < h


def test_histogram_ranking_beats_random(small):
    """A colour histogram ranks easy positives far above chance: the benchmark is learnable."""
    gnd = _load_gnd(small, "sm")

    def descriptor(img: np.ndarray) -> np.ndarray:
        hist = cv2.calcHist([img], [0, 1, 2], None, [6, 6, 6], [0, 256] * 3).ravel()
        hist = np.sqrt(hist / hist.sum())
        return hist / np.linalg.norm(hist)

    db = np.stack([descriptor(_image(small, n)) for n in gnd["imlist"]])
    rng = np.random.default_rng(0)
    ap_hist, ap_random = [], []
    for q, g in zip(gnd["qimlist"], gnd["gnd"]):
        x1, y1, x2, y2 = (int(v) for v in g["bbx"])
        qd = descriptor(_image(small, q)[y1:y2, x1:x2])
        ignore = np.concatenate([g["hard"], g["junk"]])  # the Easy protocol
        order = np.argsort(-(db @ qd), kind="stable")
        order = order[~np.isin(order, ignore)]
        ap_hist.append(_average_precision(np.isin(order, g["easy"])))
        ap_random += [_average_precision(np.isin(rng.permutation(order), g["easy"])) for _ in range(20)]
    map_hist, map_random = np.mean(ap_hist), np.mean(ap_random)
    assert map_hist > map_random + 0.25, (map_hist, map_random)


def test_build_is_idempotent_and_guards_existing_folders(tmp_path, monkeypatch):
    out = build_synthetic(tmp_path, name="t", config=TINY, progress=False)
    stamp = (out / "gnd_t.pkl").stat().st_mtime_ns

    def must_not_run(*args, **kwargs):
        raise AssertionError("a complete build with the same config was regenerated")

    with monkeypatch.context() as m:
        m.setattr(synthetic_build, "_build_test_split", must_not_run)
        m.setattr(synthetic_build, "_build_train_split", must_not_run)
        assert build_synthetic(tmp_path, name="t", config=TINY, progress=False) == out
    assert (out / "gnd_t.pkl").stat().st_mtime_ns == stamp

    other = SyntheticConfig(**{**TINY.to_dict(), "seed": 3})
    with pytest.raises(FileExistsError, match="different config.*seed"):
        build_synthetic(tmp_path, name="t", config=other, progress=False)
    build_synthetic(tmp_path, name="t", config=other, overwrite=True, progress=False)
    assert json.loads((out / "meta.json").read_text())["config"]["seed"] == 3
    assert json.loads((tmp_path / "t_train" / "meta.json").read_text())["config"]["seed"] == 3

    (tmp_path / "foreign").mkdir()
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        build_synthetic(tmp_path, name="foreign", config=TINY, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign", "t", "t_train"]  # no temp folders left


def test_a_crash_leaves_no_dataset_behind(tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash while drawing the train split")

    monkeypatch.setattr(synthetic_build, "_build_train_split", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build_synthetic(tmp_path, name="t", config=TINY, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()

    out = build_synthetic(tmp_path, name="t", config=TINY, progress=False)
    # an interruption between the two renames leaves only the train split: the next call completes it
    import shutil
    shutil.rmtree(out)
    assert build_synthetic(tmp_path, name="t", config=TINY, progress=False) == out
    assert (out / "gnd_t.pkl").is_file()


def test_train_split_labels(tmp_path):
    with pytest.raises(FileNotFoundError, match="build_synthetic"):
        load_train_split(tmp_path, name="t")
    out = build_synthetic(tmp_path, name="t", config=TINY, progress=False)
    paths, labels = load_train_split(tmp_path, name="t")
    assert len(paths) == len(labels) == TINY.train_landmarks * TINY.train_views_per_landmark
    assert all(isinstance(p, Path) and p.is_file() and p.parent == tmp_path / "t_train" / "jpg" for p in paths)
    assert all(type(v) is int for v in labels)
    assert sorted(set(labels)) == list(range(TINY.train_landmarks))
    assert np.bincount(labels).tolist() == [TINY.train_views_per_landmark] * TINY.train_landmarks
    for p, label in zip(paths, labels):  # a name carries its landmark: lm<label>_<view>
        assert p.stem.startswith(f"lm{label:03d}_")
    # the train landmarks are other scenes than the test ones: no train image equals a test image
    test_imgs = [_image(out, p.stem) for p in (out / "jpg").glob("*.jpg")]
    for p in paths[:3]:
        img = cv2.imread(str(p))
        assert not any(t.shape == img.shape and np.array_equal(t, img) for t in test_imgs)
    meta = json.loads((tmp_path / "t_train" / "meta.json").read_text())
    assert meta["split"] == "train" and meta["counts"]["images"] == len(paths)


def test_view_homography_canonical_framing():
    box = (100.0, 50.0, 300.0, 250.0)  # 200 x 200 landmark
    out = (256, 192)
    hom = view_homography(ViewParams(), box=box, out_size=out)
    corners = np.array([[[100, 50], [300, 50], [300, 250], [100, 250]]], np.float64)
    mapped = cv2.perspectiveTransform(corners, hom)[0]
    # the limiting side (height 192) is spanned at 75%, centred
    side = 0.75 * 192
    expected = np.array([[128 - side / 2, 96 - side / 2], [128 + side / 2, 96 - side / 2],
                         [128 + side / 2, 96 + side / 2], [128 - side / 2, 96 + side / 2]])
    np.testing.assert_allclose(mapped, expected, atol=1e-3)
    # doubling the scale doubles the landmark's size around the same centre
    mapped2 = cv2.perspectiveTransform(corners, view_homography(ViewParams(scale=2.0), box=box, out_size=out))[0]
    np.testing.assert_allclose(mapped2 - (128, 96), 2 * (expected - (128, 96)), atol=1e-3)


def test_visible_fraction_counts_frame_and_occlusion():
    mask = np.zeros((100, 200), np.uint8)
    mask[20:60, 40:120] = 255  # 40 x 80 landmark
    shift = np.array([[1, 0, -80], [0, 1, 0], [0, 0, 1]], np.float64)  # view = canvas columns 80..179
    assert visible_fraction(mask, shift, out_size=(100, 100)) == pytest.approx(0.5)
    occluded = np.zeros((100, 100), np.uint8)
    occluded[20:40, 0:20] = 1  # hides canvas rows 20..39, columns 80..99 = 400 of the landmark's 3200 pixels
    assert visible_fraction(mask, shift, out_size=(100, 100), occluded=occluded) == pytest.approx(0.5 - 400 / 3200)
    with pytest.raises(ValueError, match="empty"):
        visible_fraction(np.zeros_like(mask), shift, out_size=(100, 100))


def test_label_rule_thresholds():
    cfg = SyntheticConfig()
    assert label_view(ViewParams(), 0.9, config=cfg) == "easy"
    assert label_view(ViewParams(), 0.69, config=cfg) == "hard"
    assert label_view(ViewParams(), 0.24, config=cfg) == "junk"
    assert label_view(ViewParams(tilt_x=0.2), 1.0, config=cfg) == "hard"
    assert label_view(ViewParams(rotation=-9.0), 1.0, config=cfg) == "hard"
    assert label_view(ViewParams(scale=0.5), 1.0, config=cfg) == "hard"
    assert label_view(ViewParams(scale=1.3, tilt_y=-0.1, rotation=7.0), 0.8, config=cfg) == "easy"
    assert label_view(ViewParams(scale=0.5, tilt_x=0.3), 0.1, config=cfg) == "junk"


@pytest.mark.parametrize("bad", [dict(seed=-1), dict(n_landmarks=0), dict(image_size=(64, 128)),
                                 dict(jpeg_quality=0), dict(junk_max_visible=0.8), dict(easy_fraction=0.9),
                                 dict(n_distractors=-1)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        SyntheticConfig(**bad)


def test_bad_name_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="plain folder name"):
        build_synthetic(tmp_path, name="a/b", config=TINY, progress=False)


def test_cli_builds_and_reports(tmp_path):
    argv = [sys.executable, str(ROOT / "prepare_data.py"), "synthetic", "--root", str(tmp_path), "--name", "cli",
            "--n-landmarks", "2", "--views-per-landmark", "2", "--n-distractors", "1", "--image-size", "96", "64",
            "--train-landmarks", "1", "--train-views-per-landmark", "2", "--no-progress"]
    run = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "cli" / "gnd_cli.pkl").is_file() and (tmp_path / "cli_train" / "train.csv").is_file()
    assert "2 queries" in run.stderr and "2 images of 1 landmarks" in run.stderr
    # the options given reach the config; the others keep SyntheticConfig's defaults
    expected = SyntheticConfig(n_landmarks=2, views_per_landmark=2, n_distractors=1, image_size=(96, 64),
                               train_landmarks=1, train_views_per_landmark=2)
    assert json.loads((tmp_path / "cli" / "meta.json").read_text())["config"] == expected.to_dict()

    again = subprocess.run(argv[:-1] + ["--seed", "5", "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                           timeout=120)  # another config, no --overwrite: one line naming what differs
    assert again.returncode != 0 and "Traceback" not in again.stderr
    assert again.stderr.strip().splitlines() == [again.stderr.strip()] and "differs in ['seed']" in again.stderr


def test_package_keeps_the_generator_name_in_meta(tmp_path):
    """meta.json names the package (datasets.synthetic), whichever module of it builds: older builds stay current."""
    out = build_synthetic(tmp_path, name="t", config=TINY, progress=False)
    assert json.loads((out / "meta.json").read_text())["generator"] == "datasets.synthetic"


def test_class_folder_holds_the_benchmark_in_the_clip_layout(tmp_path):
    """write_class_folder: the benchmark's images byte for byte as training/<class>/, test/query/<class>/ and
    test/gallery/<class>/, with the same positives (easy and hard), junk and query boxes as its revisitop build;
    deterministic, idempotent, and never over something else."""
    from datasets.folder import list_class_folder
    from datasets.revisited import load_ground_truth
    from datasets.synthetic.class_folder import write_class_folder

    config = SyntheticConfig(n_landmarks=3, views_per_landmark=6, n_distractors=2, image_size=(96, 64),
                             train_landmarks=2, train_views_per_landmark=2, junk_fraction=0.5, easy_fraction=0.2)
    out = write_class_folder(tmp_path / "classes", root=tmp_path / "data", config=config)
    synth = load_ground_truth(tmp_path / "data" / "synth" / "gnd_synth.pkl")
    listing = list_class_folder(out / "test")
    by_name = [Path(rel).stem for rel, _ in listing.gallery]
    assert sorted(by_name) == sorted(synth["imlist"]) and len(listing.queries) == 3
    assert [Path(rel).stem for rel, _ in listing.queries] == synth["qimlist"]
    assert sum(g["junk"].size for g in synth["gnd"]) > 0  # the config draws junk views: junk.txt is exercised
    for i, (ours, theirs) in enumerate(zip(listing.ground_truth(), synth["gnd"])):
        assert sorted(by_name[j] for j in ours["easy"]) == sorted(synth["imlist"][j] for j in
                                                                 np.concatenate([theirs["easy"], theirs["hard"]]))
        assert sorted(by_name[j] for j in ours["junk"]) == sorted(synth["imlist"][j] for j in theirs["junk"])
        assert listing.boxes[listing.queries[i][0]] == tuple(theirs["bbx"].tolist())
    assert [rel for rel, cls in listing.gallery if cls is None] == ["dis0000.jpg", "dis0001.jpg"]
    training = sorted(p.relative_to(out / "training").as_posix() for p in (out / "training").rglob("*.jpg"))
    assert training[0] == "landmark_03/lm000_000.jpg" and len(training) == 4  # numbered after the test landmarks
    image = listing.queries[0][0]
    assert (out / "test" / "query" / image).read_bytes() == \
        (tmp_path / "data" / "synth" / "jpg" / Path(image).name).read_bytes()

    def snapshot(folder):
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}

    # deterministic: a second folder from another build is byte-identical; the same call again changes nothing
    again = write_class_folder(tmp_path / "other", root=tmp_path / "data2", config=config)
    assert snapshot(again) == snapshot(out)
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert write_class_folder(out, root=tmp_path / "data", config=config) == out
    assert (out / "meta.json").stat().st_mtime_ns == stamp
    (tmp_path / "mine").mkdir()
    with pytest.raises(FileExistsError, match="overwrite"):
        write_class_folder(tmp_path / "mine", root=tmp_path / "data", config=config)
    with pytest.raises(ValueError, match="would replace the benchmark"):
        write_class_folder(tmp_path / "data" / "synth", root=tmp_path / "data", config=config, overwrite=True)
