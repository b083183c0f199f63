"""The built-in benchmark written as a class folder (:class:`datasets.folder.ClassFolder`'s layout, that of the
reference CLIP retrieval system and of most users' own data), which ``eval.py "data.datasets=[folder:OUT/test]"``,
``fewshot.py --folder`` and the training scripts read; what is written where: :func:`write_class_folder`.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from pathlib import Path

from common.errors import InvalidValueError, OutputExistsError
from datasets.revisited import load_ground_truth
from datasets.synthetic.build import FORMAT_VERSION, build_synthetic, load_train_split
from datasets.synthetic.config import SyntheticConfig

log = logging.getLogger(__name__)

#: The layout this module writes (bumped when it changes).
CLASS_FOLDER_FORMAT = 1


def _landmark_of(test_dir: Path) -> dict[str, int]:
    """Each test image's landmark (-1 for a distractor), from the build's views.csv."""
    with open(test_dir / "views.csv", newline="") as f:
        return {row["image"]: int(row["landmark"]) for row in csv.DictReader(f)}


def _meta(config: SyntheticConfig, counts: dict[str, int] | None = None) -> dict:
    """meta.json: what decides the folder (generator, formats, config) and, once written, its ``counts``."""
    meta = {"generator": __name__, "format_version": FORMAT_VERSION, "class_folder_format": CLASS_FOLDER_FORMAT,
            "config": config.to_dict()}
    return meta if counts is None else {**meta, "counts": counts}


def _written_with(out: Path, config: SyntheticConfig) -> bool:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and {k: v for k, v in meta.items() if k != "counts"} == _meta(config)


def write_class_folder(out: str | os.PathLike, *, root: str | os.PathLike, name: str = "synth",
                       config: SyntheticConfig | None = None, overwrite: bool = False, progress: bool = False) -> Path:
    """Write the built-in benchmark (drawn first, idempotently, as ``<root>/<name>``: build_synthetic) as a class
    folder under ``out`` and return ``out``. Idempotent: a folder this function wrote with the same config is left as
    it is; anything else at ``out`` raises OutputExistsError unless ``overwrite``. Written into a temporary folder
    beside ``out`` and renamed into place::

        OUT/training/landmark_<id>/<image>.jpg       the training split (its landmarks numbered after the test ones)
        OUT/test/query/landmark_<id>/<image>.jpg     the queries, and OUT/test/query_boxes.csv (their boxes)
        OUT/test/gallery/landmark_<id>/<image>.jpg   every view of a landmark: easy, hard and junk
        OUT/test/gallery/<image>.jpg                 the distractors (no class)
        OUT/test/junk.txt                            the junk views (ignored for their landmark's queries)
        OUT/meta.json                                what was written, from which build

    The images are the benchmark's files, copied byte for byte, so ``OUT/test`` holds the same queries, boxes,
    positives (easy and hard) and junk as the revisitop-layout build: its one protocol is that build's Medium
    protocol, with the database in another order.
    """
    config = config or SyntheticConfig()
    out = Path(out)
    if _written_with(out, config):
        log.info("class folder %s already written with this config; nothing to do", out)
        return out
    if os.path.abspath(out) in (os.path.abspath(Path(root) / name), os.path.abspath(Path(root) / f"{name}_train")):
        raise InvalidValueError(f"the class folder {out} would replace the benchmark it is written from")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists and is not the class folder of this config; move it away or pass "
                                "overwrite=True (prepare_data.py synthetic --class-folder ... --overwrite)")
    test_dir = build_synthetic(root, name=name, config=config, progress=progress)
    gt = load_ground_truth(test_dir / f"gnd_{name}.pkl")
    landmark = _landmark_of(test_dir)
    width = max(2, len(str(config.n_landmarks + config.train_landmarks - 1)))

    def cls(lm: int) -> str:
        return f"landmark_{lm:0{width}d}"

    junk = {gt["imlist"][j] for g in gt["gnd"] for j in g["junk"]}
    files: list[tuple[Path, str]] = []  # (source, destination relative to out)
    for image in gt["imlist"]:
        lm = landmark[image]
        files.append((test_dir / "jpg" / f"{image}.jpg",
                      f"test/gallery/{cls(lm)}/{image}.jpg" if lm >= 0 else f"test/gallery/{image}.jpg"))
    boxes = []
    for image, g in zip(gt["qimlist"], gt["gnd"]):
        rel = f"{cls(landmark[image])}/{image}.jpg"
        files.append((test_dir / "jpg" / f"{image}.jpg", f"test/query/{rel}"))
        boxes.append([rel, *(repr(float(v)) for v in g["bbx"])])
    train_paths, train_labels = load_train_split(root, name)
    files += [(p, f"training/{cls(config.n_landmarks + lm)}/{p.name}") for p, lm in zip(train_paths, train_labels)]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.writing")
    shutil.rmtree(tmp, ignore_errors=True)
    for src, rel in files:
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, tmp / rel)
    (tmp / "test").mkdir(parents=True, exist_ok=True)
    with open(tmp / "test" / "query_boxes.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "x1", "y1", "x2", "y2"], *boxes])
    (tmp / "test" / "junk.txt").write_text(
        "# views that show too little of their landmark: ignored for its queries, negatives for the others\n"
        + "".join(f"{cls(landmark[image])}/{image}.jpg\n" for image in gt["imlist"] if image in junk))
    counts = {"classes": config.n_landmarks, "queries": len(gt["qimlist"]), "gallery": len(gt["imlist"]),
              "junk": len(junk), "training_classes": config.train_landmarks, "training_images": len(train_paths)}
    (tmp / "meta.json").write_text(json.dumps(_meta(config, counts), indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("class folder %s: %d query / %d gallery images of %d landmarks (%d junk) in test/, %d training images "
             "of %d other landmarks in training/", out, counts["queries"], counts["gallery"], counts["classes"],
             counts["junk"], counts["training_images"], counts["training_classes"])
    return out
