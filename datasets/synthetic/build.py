"""Building the benchmark on disk: every image drawn from its own seeded stream, labels measured, the revisitop
layout written into a temporary folder and renamed into place (see the package docstring for the layout)."""
from __future__ import annotations

import csv
import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from common.errors import InvalidValueError, MissingFileError, OutputExistsError, ProjectRuntimeError
from datasets.synthetic.config import SyntheticConfig
from datasets.synthetic.draw import draw_landmark_scene, draw_unrelated_scene
from datasets.synthetic.views import (
    ViewParams,
    draw_occluders,
    label_view,
    landmark_bbox,
    render_view,
    sample_view,
    view_homography,
    view_size,
    visible_fraction,
)

log = logging.getLogger(__name__)

#: Bumped whenever the drawing or the layout changes, so that an older build on disk is not taken as current.
FORMAT_VERSION = 1
#: The generator named in meta.json (the package's public name, whatever module builds).
_GENERATOR = "datasets.synthetic"
#: pickle protocol of the gnd file: 4 stores numpy arrays through ``numpy._core.multiarray._reconstruct``,
#: ``numpy.ndarray`` and ``numpy.dtype`` only (protocol 5 would reference ``numpy._core.numeric._frombuffer``).
_PICKLE_PROTOCOL = 4

# Stream ids of the SeedSequence spawn keys: one per kind of draw.
_S_TEST_SCENE, _S_TEST_VIEW, _S_QUERY, _S_DISTRACTOR, _S_TRAIN_SCENE, _S_TRAIN_VIEW, _S_ORDER = range(7)


def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent stream for one named draw (scene, view, ...), so items do not depend on each other."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(int(k) for k in key)))


def _canvas_size(config: SyntheticConfig) -> tuple[int, int]:
    long, short = config.image_size
    return int(round(long * config.canvas_scale)), int(round(short * config.canvas_scale))


def _write_jpeg(path: Path, img: np.ndarray, quality: int) -> None:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ProjectRuntimeError(f"OpenCV could not encode {path}")
    path.write_bytes(buf.tobytes())


def _make_db_view(scene_mask: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator, *,
                  kind: str, config: SyntheticConfig, require: set[str] | None, max_tries: int = 200
                  ) -> tuple[ViewParams, np.ndarray, tuple[np.ndarray, np.ndarray], float, str]:
    """Draw view parameters (redrawing until the measured label is in ``require``, when given)."""
    for _ in range(max_tries):
        view = sample_view(rng, kind=kind, portrait_fraction=config.portrait_fraction)
        size = view_size(view, image_size=config.image_size)
        hom = view_homography(view, box=box, out_size=size)
        occ = draw_occluders(rng, out_size=size, count=view.occluders, area=view.occluder_area)
        visible = visible_fraction(scene_mask, hom, out_size=size, occluded=occ[1])
        label = label_view(view, visible, config=config)
        if require is None or label in require:
            return view, hom, occ, visible, label
    raise ProjectRuntimeError(f"could not draw a {sorted(require or [])} view in {max_tries} tries; "
                              "the labelling thresholds in SyntheticConfig are probably inconsistent")


def _view_row(image: str, role: str, landmark: int, view: ViewParams, visible: float, label: str) -> list:
    return [image, role, landmark, label, f"{visible:.4f}", f"{view.scale:.4f}", f"{view.offset_x:.4f}",
            f"{view.offset_y:.4f}", f"{view.rotation:.3f}", f"{view.tilt_x:.4f}", f"{view.tilt_y:.4f}",
            int(view.portrait), view.occluders]


_VIEW_COLUMNS = ["image", "role", "landmark", "label", "visible", "scale", "offset_x", "offset_y", "rotation",
                 "tilt_x", "tilt_y", "portrait", "occluders"]


def _build_test_split(out: Path, name: str, config: SyntheticConfig, progress: bool) -> dict:
    """Write ``jpg/``, ``gnd_<name>.pkl`` and ``views.csv`` under ``out``; returns counts for meta.json."""
    jpg = out / "jpg"
    jpg.mkdir(parents=True)
    width, height = _canvas_size(config)
    db_names: list[str] = []
    db_landmark: list[int] = []
    db_label: list[str] = []
    queries: list[tuple[str, int, list[float]]] = []
    rows: list[list] = []
    drawn_kinds = ["easy", "hard", "junk"]
    kind_p = [config.easy_fraction, 1.0 - config.easy_fraction - config.junk_fraction, config.junk_fraction]
    for lm in tqdm(range(config.n_landmarks), desc=f"{name}: landmarks", disable=not progress):
        scene, lm_mask, box = draw_landmark_scene(_rng(config.seed, _S_TEST_SCENE, lm), width=width, height=height)
        for v in range(config.views_per_landmark):
            rng = _rng(config.seed, _S_TEST_VIEW, lm, v)
            if v < 2:  # guarantee an easy and a hard positive for every query of this landmark
                kind = ("easy", "hard")[v]
                require = {kind}
            else:
                kind, require = drawn_kinds[int(rng.choice(3, p=kind_p))], None
            view, hom, occ, visible, label = _make_db_view(lm_mask, box, rng, kind=kind, config=config,
                                                           require=require)
            size = view_size(view, image_size=config.image_size)
            img = render_view(scene, hom, out_size=size, rng=rng, strength=view.strength, occluders=occ)
            image = f"lm{lm:03d}_v{v:03d}"
            _write_jpeg(jpg / f"{image}.jpg", img, config.jpeg_quality)
            db_names.append(image)
            db_landmark.append(lm)
            db_label.append(label)
            rows.append(_view_row(image, "database", lm, view, visible, label))
        for q in range(config.queries_per_landmark):
            rng = _rng(config.seed, _S_QUERY, lm, q)
            for _ in range(200):  # the whole landmark must be in the frame so that its bbx is not clipped
                view = sample_view(rng, kind="query", portrait_fraction=config.portrait_fraction)
                size = view_size(view, image_size=config.image_size)
                hom = view_homography(view, box=box, out_size=size)
                visible = visible_fraction(lm_mask, hom, out_size=size)
                if visible >= 0.999:
                    break
            else:
                raise ProjectRuntimeError(f"could not frame the whole landmark {lm} in a query view")
            img = render_view(scene, hom, out_size=size, rng=rng, strength=view.strength)
            image = f"lm{lm:03d}_q{q}"
            _write_jpeg(jpg / f"{image}.jpg", img, config.jpeg_quality)
            queries.append((image, lm, landmark_bbox(lm_mask, hom, out_size=size)))
            rows.append(_view_row(image, "query", lm, view, visible, "query"))
    for d in tqdm(range(config.n_distractors), desc=f"{name}: distractors", disable=not progress):
        rng = _rng(config.seed, _S_DISTRACTOR, d)
        scene, box = draw_unrelated_scene(rng, width=width, height=height)
        view = sample_view(rng, kind="easy", portrait_fraction=config.portrait_fraction)
        size = view_size(view, image_size=config.image_size)
        hom = view_homography(view, box=box, out_size=size)
        occ = draw_occluders(rng, out_size=size, count=view.occluders, area=view.occluder_area)
        # distractors carry no labels, so their scenes may continue as mirror images past the canvas
        img = render_view(scene, hom, out_size=size, rng=rng, strength=view.strength, occluders=occ,
                          border=cv2.BORDER_REFLECT_101)
        image = f"dis{d:04d}"
        _write_jpeg(jpg / f"{image}.jpg", img, config.jpeg_quality)
        db_names.append(image)
        db_landmark.append(-1)
        db_label.append("negative")
        rows.append(_view_row(image, "distractor", -1, view, float("nan"), "negative"))

    # shuffle the database so that an index says nothing about its landmark
    order = _rng(config.seed, _S_ORDER).permutation(len(db_names))
    imlist = [db_names[i] for i in order]
    lm_arr = np.asarray(db_landmark, np.int64)[order]
    label_arr = np.asarray(db_label)[order]
    gnd = []
    for _, lm, bbx in queries:
        same = lm_arr == lm
        gnd.append({"bbx": bbx,
                    "easy": np.flatnonzero(same & (label_arr == "easy")).astype(np.int64),
                    "hard": np.flatnonzero(same & (label_arr == "hard")).astype(np.int64),
                    "junk": np.flatnonzero(same & (label_arr == "junk")).astype(np.int64)})
    payload = {"imlist": imlist, "qimlist": [q[0] for q in queries], "gnd": gnd}
    (out / f"gnd_{name}.pkl").write_bytes(pickle.dumps(payload, protocol=_PICKLE_PROTOCOL))
    with open(out / "views.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_VIEW_COLUMNS)
        writer.writerows(rows)
    return {"database": len(imlist), "queries": len(queries), "distractors": config.n_distractors,
            "easy": int(np.sum(label_arr == "easy")), "hard": int(np.sum(label_arr == "hard")),
            "junk": int(np.sum(label_arr == "junk"))}


def _build_train_split(out: Path, name: str, config: SyntheticConfig, progress: bool) -> dict:
    """Write ``jpg/`` and ``train.csv`` (image,label) for landmarks drawn from streams the test split never uses."""
    jpg = out / "jpg"
    jpg.mkdir(parents=True)
    width, height = _canvas_size(config)
    rows = []
    for lm in tqdm(range(config.train_landmarks), desc=f"{name}_train: landmarks", disable=not progress):
        scene, lm_mask, box = draw_landmark_scene(_rng(config.seed, _S_TRAIN_SCENE, lm), width=width, height=height)
        for v in range(config.train_views_per_landmark):
            rng = _rng(config.seed, _S_TRAIN_VIEW, lm, v)
            kind = "easy" if rng.random() < 0.6 else "hard"
            view, hom, occ, _, _ = _make_db_view(lm_mask, box, rng, kind=kind, config=config,
                                                 require={"easy", "hard"})
            size = view_size(view, image_size=config.image_size)
            img = render_view(scene, hom, out_size=size, rng=rng, strength=view.strength, occluders=occ)
            image = f"lm{lm:03d}_{v:03d}"
            _write_jpeg(jpg / f"{image}.jpg", img, config.jpeg_quality)
            rows.append((image, lm))
    with open(out / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label"])
        writer.writerows(rows)
    return {"images": len(rows), "classes": config.train_landmarks}


def _meta(name: str, split: str, config: SyntheticConfig, counts: dict) -> dict:
    return {"generator": _GENERATOR, "format_version": FORMAT_VERSION, "name": name, "split": split,
            "seed": config.seed, "config": config.to_dict(), "counts": counts,
            "labels": {"junk": f"visible < {config.junk_max_visible}",
                       "easy": (f"visible >= {config.easy_min_visible} and |tilt| <= {config.easy_max_tilt} and "
                                f"|rotation| <= {config.easy_max_rotation} deg and max(scale, 1/scale) <= "
                                f"{config.easy_max_zoom}"),
                       "hard": "any other view of the landmark"}}


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == _GENERATOR else None


def _matches(meta: dict | None, config: SyntheticConfig) -> bool:
    return (meta is not None and meta.get("format_version") == FORMAT_VERSION
            and meta.get("config") == config.to_dict())


def _replace_dir(src: Path, dst: Path, trash: Path) -> None:
    """Move ``src`` to ``dst``, first moving an existing ``dst`` aside into ``trash`` (same file system)."""
    if dst.exists():
        os.replace(dst, trash / f"old-{dst.name}")
    os.replace(src, dst)


def build_synthetic(root: str | os.PathLike, name: str = "synth", config: SyntheticConfig | None = None,
                    overwrite: bool = False, *, progress: bool = True) -> Path:
    """Build the synthetic benchmark under ``root`` and return ``<root>/<name>`` (the test split).

    Idempotent: when ``<root>/<name>`` and ``<root>/<name>_train`` already hold a complete build with the same
    config (their meta.json), nothing is redrawn. A folder holding something else (another config, or not a
    synthetic build) raises FileExistsError unless ``overwrite``. Both splits are drawn in a temporary folder
    under ``root`` and renamed into place (train first, test last), so a crash never leaves a half dataset
    that looks complete.
    """
    config = config or SyntheticConfig()
    if not name or name != Path(name).name or name.startswith("."):
        raise InvalidValueError(f"name must be a plain folder name, got {name!r}")
    root = Path(root)
    test_dir, train_dir = root / name, root / f"{name}_train"
    metas = {d: _read_meta(d) for d in (test_dir, train_dir)}
    if all(_matches(m, config) for m in metas.values()):
        log.info("synthetic dataset %s already built with this config; nothing to do", test_dir)
        return test_dir
    if not overwrite:
        for d, m in metas.items():
            if not d.exists() or _matches(m, config):
                continue  # absent, or ours with this config but its sibling missing (build interrupted)
            if m is None:
                raise OutputExistsError(f"{d} exists and is not a synthetic dataset built by {_GENERATOR}; "
                                        "move it away or pass overwrite=True to replace it")
            differs = sorted(k for k, v in config.to_dict().items() if m.get("config", {}).get(k) != v)
            raise OutputExistsError(f"{d} was built with a different config (differs in {differs or ['format']});"
                                    " pass overwrite=True (prepare_data.py synthetic --overwrite) to rebuild it")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=root))
    try:
        counts_test = _build_test_split(tmp / name, name, config, progress)
        counts_train = _build_train_split(tmp / f"{name}_train", name, config, progress)
        # meta.json last: a folder without it is never mistaken for a finished build
        for folder, split, counts in ((tmp / name, "test", counts_test),
                                      (tmp / f"{name}_train", "train", counts_train)):
            (folder / "meta.json").write_text(json.dumps(_meta(name, split, config, counts), indent=2) + "\n")
        _replace_dir(tmp / f"{name}_train", train_dir, tmp)
        _replace_dir(tmp / name, test_dir, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built synthetic dataset %s: %d database images (%d easy, %d hard, %d junk, %d distractors), "
             "%d queries; train split %s: %d images of %d landmarks", test_dir, counts_test["database"],
             counts_test["easy"], counts_test["hard"], counts_test["junk"], counts_test["distractors"],
             counts_test["queries"], train_dir, counts_train["images"], counts_train["classes"])
    return test_dir


def load_train_split(root: str | os.PathLike, name: str = "synth") -> tuple[list[Path], list[int]]:
    """Image paths and integer landmark labels of ``<root>/<name>_train`` (from its train.csv)."""
    folder = Path(root) / f"{name}_train"
    csv_path = folder / "train.csv"
    if not csv_path.is_file():
        raise MissingFileError(f"{csv_path} not found: build it with build_synthetic(root={str(root)!r}, "
                               f"name={name!r}) or `python prepare_data.py synthetic --root {root} --name {name}`")
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["image", "label"]:
            raise InvalidValueError(f"{csv_path}: expected the header 'image,label', got {header}")
        rows = [(r[0], int(r[1])) for r in reader if r]
    paths = [folder / "jpg" / f"{image}.jpg" for image, _ in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise MissingFileError(f"{len(missing)} training images listed in {csv_path} are missing, e.g. "
                               f"{missing[0]}; rebuild with build_synthetic(..., overwrite=True)")
    return paths, [label for _, label in rows]
