"""Labelled image collections: a class-per-folder tree and CIFAR-10 for training and quick experiments, and a class
folder as a retrieval evaluation set (:class:`ClassFolderSet`; the layout: :class:`ClassFolder`), which can also be
written in the revisitop layout (:func:`write_revisitop`). Training items are ``(image, label)`` with the image a
uint8 (H, W, 3) BGR array (the releases' OpenCV convention, :mod:`datasets.transforms`) unless a ``transform``
turns it into something else.
"""
from __future__ import annotations

import csv
import logging
import math
import os
import pickle
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from common.convention import OFFICIAL_CONVENTION, InputConvention
from common.errors import InvalidValueError, MissingFileError, OutputExistsError
from common.io import atomic_write
from datasets.transforms import CorruptImageError, ScaledImages, crop_query, min_size_guard, read_image

logger = logging.getLogger(__name__)

__all__ = ["CLASS_FOLDER_PREFIX", "ClassFolder", "ClassFolderSet", "CorruptImageError", "ImageFiles",
           "ImageFolderDataset", "cifar10", "class_images", "list_class_folder", "read_bgr_image", "read_image",
           "revisitop_ground_truth", "write_revisitop"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"


#: The one image reader (cv2.IMREAD_COLOR, truncated JPEGs refused): a missing file raises FileNotFoundError,
#: one that exists but does not decode whole raises CorruptImageError. Kept under the name the training
#: datasets have always imported.
read_bgr_image = read_image


class ImageFolderDataset(Dataset):
    """``root/<class>/<image>`` -> ``(BGR uint8 image, label)``; classes are the sub-folders in sorted order.

    Attributes: ``classes`` (folder names), ``class_to_idx``, ``samples`` [(path, label)], ``targets`` [label].
    Files whose extension is not in ``extensions`` (case-insensitive) are ignored; sub-folders are searched
    recursively within each class folder.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        transform: Callable[[np.ndarray], Any] | None = None,
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise MissingFileError(f"image folder {self.root} does not exist (expected root/<class>/<images>)")
        self.transform = transform
        exts = tuple(e.lower() for e in extensions)
        self.classes = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.samples: list[tuple[str, int]] = []
        for name in self.classes:
            files = sorted(p for p in (self.root / name).rglob("*") if p.is_file() and p.suffix.lower() in exts)
            self.samples.extend((str(p), self.class_to_idx[name]) for p in files)
        if not self.samples:
            raise MissingFileError(
                f"no images with extensions {exts} found in class sub-folders of {self.root} "
                "(expected root/<class>/<images>)"
            )
        self.targets = [label for _, label in self.samples]
        logger.info("ImageFolderDataset %s: %d images, %d classes", self.root, len(self.samples), len(self.classes))

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path, label = self.samples[index]
        image = read_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


class _BGRView(Dataset):
    """A torchvision dataset whose PIL RGB images are returned as uint8 (H, W, 3) BGR arrays."""

    def __init__(self, base: Dataset, transform: Callable[[np.ndarray], Any] | None) -> None:
        self.base = base
        self.transform = transform
        self.targets = list(base.targets)
        self.classes = list(getattr(base, "classes", []))

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image, label = self.base[index]
        bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"), dtype=np.uint8)[:, :, ::-1])
        if self.transform is not None:
            bgr = self.transform(bgr)
        return bgr, int(label)


def cifar10(
    root: str | os.PathLike,
    *,
    train: bool = True,
    transform: Callable[[Any], Any] | None = None,
    bgr: bool = True,
) -> Dataset:
    """CIFAR-10 from ``root/cifar-10-batches-py`` (torchvision, never downloaded here).

    bgr=True (default): items are (uint8 (32, 32, 3) BGR array, label), like the rest of this package;
    bgr=False: torchvision's own items (PIL RGB image, label). ``transform`` applies to the image either way.
    ``.targets`` lists the labels.
    """
    from torchvision.datasets import CIFAR10

    try:
        base = CIFAR10(os.fspath(root), train=train, download=False, transform=None if bgr else transform)
    except RuntimeError as err:
        raise MissingFileError(
            f"CIFAR-10 not found under {os.fspath(root)}: download {CIFAR10_URL} and extract it there, so that "
            f"{os.path.join(os.fspath(root), 'cifar-10-batches-py')}/data_batch_1 exists ({err})"
        ) from err
    return _BGRView(base, transform) if bgr else base


# ----------------------------------------------------------------------------------------------------
# A class folder as an evaluation set
# ----------------------------------------------------------------------------------------------------

#: ``data.datasets`` names a class folder as ``folder:PATH``.
CLASS_FOLDER_PREFIX = "folder:"
JUNK_FILE = "junk.txt"
QUERY_BOX_FILE = "query_boxes.csv"
BOX_HEADER = ["path", "x1", "y1", "x2", "y2"]
#: The split folders of the reference CLIP system's layout: a folder with one of these names is titled with its
#: parent's (``shoes/test``).
SPLIT_NAMES = ("test", "val", "valid", "validation", "eval", "training", "train")


def class_images(folder: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS
                 ) -> list[tuple[str, str | None]]:
    """Every image under ``folder`` as (its path relative to ``folder``, posix; its class), sorted by path: an image
    in a sub-folder belongs to the class its first folder names, one directly in ``folder`` to none (None).
    Files and folders whose name starts with a dot are skipped; linked folders are followed."""
    root = Path(folder)
    exts = tuple(e.lower() for e in extensions)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found += [Path(dirpath, f).relative_to(root).as_posix() for f in filenames
                  if not f.startswith(".") and f.lower().endswith(exts)]
    return [(rel, rel.split("/", 1)[0] if "/" in rel else None) for rel in sorted(found)]


def class_folder_title(path: str | os.PathLike) -> str:
    """What a report calls a class folder: its name, or ``<parent>/<name>`` for a split folder (``shoes/test``)."""
    parts = Path(os.path.normpath(os.path.abspath(path))).parts
    return "/".join(parts[-2:]) if parts[-1].lower() in SPLIT_NAMES and len(parts) > 2 else parts[-1]


@dataclass
class ClassFolder:
    """A class folder as an evaluation set: its queries and gallery images (paths relative to ``query/`` and
    ``gallery/``, with their class; a gallery image may have none), the gallery images listed as junk and the query
    boxes (x1, y1, x2, y2) by query path. The layout (the reference CLIP retrieval system's ``test/`` folder)::

        PATH/query/<class>/...          the queries, one sub-folder per class (nested folders belong to their class)
        PATH/gallery/<class>/...        the searched images; a gallery image of a query's class is a positive of it
        PATH/gallery/<image>            an image directly in gallery/ has no class: a negative for every query
        PATH/junk.txt                   optional: gallery images to ignore for the queries of their own class, one
                                        path per line relative to gallery/ (``eiffel/0042.jpg``; ``#`` comments);
                                        such an image is neither a positive nor a negative for them (revisitop's
                                        junk) and a negative for every other query
        PATH/query_boxes.csv            optional: ``path,x1,y1,x2,y2`` (path relative to query/, pixels): the query
                                        is cropped to its box before any resizing, as revisitop's queries; a query
                                        not listed is used whole

    Folders whose name starts with a dot are skipped; images are the files with an extension of
    :data:`IMAGE_EXTENSIONS`, in sorted order of their path.
    """

    path: Path
    queries: list[tuple[str, str]]
    gallery: list[tuple[str, str | None]]
    junk: frozenset[str] = frozenset()
    boxes: dict[str, tuple[float, float, float, float]] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        """The query classes, sorted."""
        return sorted({c for _, c in self.queries})

    def ground_truth(self) -> list[dict[str, Any]]:
        """Per query, revisitop's fields over the gallery's indices: ``easy`` its positives (the gallery images of
        its class not listed as junk), ``hard`` none, ``junk`` the listed gallery images of its class, and its
        ``class``. Positives are 'easy' so that revisitop's Easy and Medium protocols both give this folder's one
        protocol (and Hard has no positives)."""
        ok: dict[str, list[int]] = {}
        junk: dict[str, list[int]] = {}
        for j, (rel, cls) in enumerate(self.gallery):
            if cls is not None:
                (junk if rel in self.junk else ok).setdefault(cls, []).append(j)
        return [{"class": cls, "easy": np.asarray(ok.get(cls, []), dtype=np.int64),
                 "hard": np.empty(0, dtype=np.int64), "junk": np.asarray(junk.get(cls, []), dtype=np.int64)}
                for _, cls in self.queries]


def _read_junk(path: Path, gallery: Sequence[tuple[str, str | None]]) -> frozenset[str]:
    classes = dict(gallery)
    junk = set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.split("#", 1)[0].strip().replace("\\", "/").removeprefix("./")
        if not entry:
            continue
        if entry not in classes:
            raise InvalidValueError(f"{path}:{n}: {entry} is not an image of {path.parent / 'gallery'} (junk lists "
                                    "gallery images by their path relative to gallery/, e.g. eiffel/0042.jpg)")
        if classes[entry] is None:
            raise InvalidValueError(f"{path}:{n}: {entry} has no class folder, so it cannot be junk for a class "
                                    "(an image directly in gallery/ is a negative for every query)")
        junk.add(entry)
    return frozenset(junk)


def _read_boxes(path: Path, queries: Sequence[tuple[str, str]]) -> dict[str, tuple[float, float, float, float]]:
    known = {rel for rel, _ in queries}
    boxes: dict[str, tuple[float, float, float, float]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0]] != BOX_HEADER:
        raise InvalidValueError(f"{path}: expected the header {','.join(BOX_HEADER)}, got "
                                f"{','.join(rows[0]) if rows else 'an empty file'}")
    for n, row in enumerate(rows[1:], start=2):
        if not row or not "".join(row).strip():
            continue
        rel = row[0].strip().replace("\\", "/").removeprefix("./")
        try:
            box = tuple(float(v) for v in row[1:])
        except ValueError:
            box = ()
        if len(box) != 4 or not all(math.isfinite(v) for v in box) or min(box) < 0 or box[2] <= box[0] \
                or box[3] <= box[1]:
            raise InvalidValueError(f"{path}:{n}: a box is 4 numbers x1,y1,x2,y2 with 0 <= x1 < x2 and 0 <= y1 < y2 "
                                    f"(pixels), got {','.join(row[1:])!r}")
        if rel not in known:
            raise InvalidValueError(f"{path}:{n}: {rel} is not a query of {path.parent / 'query'} (paths are "
                                    "relative to query/, e.g. eiffel/0001.jpg)")
        if rel in boxes:
            raise InvalidValueError(f"{path}:{n}: a second box for {rel}")
        boxes[rel] = box  # type: ignore[assignment]
    return boxes


def list_class_folder(path: str | os.PathLike) -> ClassFolder:
    """Read a class folder's listing, junk list and query boxes (layout: :class:`ClassFolder`), checking them: a missing
    folder, a query outside a class folder, a junk entry or box naming no image, or a bad box is an error that
    names the file and line."""
    root = Path(path)
    layout = f"expected {root / 'query'}/<class>/<images> and {root / 'gallery'}/<class>/<images>"
    for folder in (root, root / "query", root / "gallery"):
        if not folder.is_dir():
            raise MissingFileError(f"class folder {root}: {folder} is not a folder ({layout})")
    queries = class_images(root / "query")
    gallery = class_images(root / "gallery")
    loose = [rel for rel, cls in queries if cls is None]
    if loose:
        raise InvalidValueError(f"class folder {root}: query images must be in class folders; "
                                f"{root / 'query' / loose[0]} is not ({len(loose)} such)")
    for images, side in ((queries, "query"), (gallery, "gallery")):
        if not images:
            raise MissingFileError(f"class folder {root}: no images in {root / side} ({layout}; extensions "
                                   f"{', '.join(IMAGE_EXTENSIONS)})")
    junk = _read_junk(root / JUNK_FILE, gallery) if (root / JUNK_FILE).is_file() else frozenset()
    boxes = _read_boxes(root / QUERY_BOX_FILE, queries) if (root / QUERY_BOX_FILE).is_file() else {}
    folder = ClassFolder(path=root, queries=queries, gallery=gallery, junk=junk, boxes=boxes)  # type: ignore[arg-type]
    without = sorted({cls for (_, cls), g in zip(queries, folder.ground_truth()) if not g["easy"].size})
    if without:
        logger.warning("class folder %s: %d query classes have no gallery image (e.g. %s): their queries have no "
                       "positive and are left out of the means", root, len(without), without[0])
    return folder


class ClassFolderSet(ScaledImages):
    """One side of a class folder as an evaluation set, in the interface of
    :class:`datasets.revisited.RevisitedDataset`: ``split`` 'query' (cropped to their boxes) or 'db' (the gallery);
    item i -> list of (3, H_s, W_s) tensors, one per scale.

    ``gnd`` is revisitop's ground truth of the queries (:meth:`ClassFolder.ground_truth`), ``item_names`` the
    images' paths relative to their split folder (``eiffel/0042.jpg``), ``labels`` their classes, ``bbxs`` the
    query boxes (None for a query used whole; None on the gallery side or without a box file). ``min_side`` as for
    RevisitedDataset. ``folder``: a listing already read (both sides then index the same images)."""

    def __init__(self, path: str | os.PathLike, split: str = "db", *, convention: InputConvention = OFFICIAL_CONVENTION,
                 scales: Sequence[float] = (1.0,), min_side: int | None = None,
                 folder: ClassFolder | None = None) -> None:
        if split not in ("db", "query"):
            raise InvalidValueError(f"split must be 'db' or 'query', got {split!r}")
        self.folder = folder or list_class_folder(path)
        self.root = self.data_dir = os.fspath(self.folder.path)
        self.name, self.split = class_folder_title(self.root), split
        self.convention, self.scales, self.min_side = convention, tuple(float(s) for s in scales), min_side
        items = self.folder.queries if split == "query" else self.folder.gallery
        side = "query" if split == "query" else "gallery"
        self.item_names = [rel for rel, _ in items]
        self.labels: list[str | None] = [cls for _, cls in items]
        self.image_paths = [os.path.join(self.root, side, *rel.split("/")) for rel in self.item_names]
        self.gnd = self.folder.ground_truth()
        self.gnd_path: str | None = None  # no revisitop file: revisitop_ground_truth() writes one
        self.bbxs: list[np.ndarray | None] | None = None
        if split == "query" and self.folder.boxes:
            self.bbxs = [None if rel not in self.folder.boxes else np.asarray(self.folder.boxes[rel], dtype=np.float64)
                         for rel in self.item_names]

    def read(self, index: int) -> np.ndarray:
        """The uint8 BGR (H, W, 3) image, cropped to its box on the query side."""
        img = read_image(self.image_paths[index], dataset=f"{self.name} ({self.split})")
        if self.bbxs is not None and self.bbxs[index] is not None:
            img = crop_query(img, self.bbxs[index])
        return min_size_guard(img, self.min_side)

    def describe(self, index: int) -> str:
        """Which image item ``index`` is: folder, split, file, and the box and resizing applied."""
        text = f"class folder {self.name} ({self.split}) item {index}: {self.image_paths[index]}"
        if self.bbxs is not None and self.bbxs[index] is not None:
            text += f", cropped to box {tuple(float(v) for v in self.bbxs[index])}"
        if self.min_side is not None:
            text += f", short side enlarged to min_side {self.min_side} when below it"
        return text

    def __repr__(self) -> str:
        return (f"ClassFolderSet(root={self.root!r}, split={self.split!r}, n={len(self)}, scales={self.scales}, "
                f"convention={self.convention})")


class ImageFiles(ScaledImages):
    """Image files as engine items: item i is one normalised (3, H_s, W_s) tensor per scale of ``paths[i]``
    (uint8 BGR, its short side enlarged to ``min_side`` when below it). ``root``, ``name`` and ``split`` are what
    the feature cache keys it by (names relative to ``root``) and what errors call it."""

    def __init__(self, paths: Sequence[str | os.PathLike], *, root: str | os.PathLike, name: str, split: str = "images",
                 convention: InputConvention = OFFICIAL_CONVENTION, scales: Sequence[float] = (1.0,),
                 min_side: int | None = None) -> None:
        self.root, self.name, self.split = os.fspath(root), name, split
        self.convention, self.scales, self.min_side = convention, tuple(float(s) for s in scales), min_side
        self.image_paths = [os.fspath(p) for p in paths]

    def read(self, index: int) -> np.ndarray:
        return min_size_guard(read_image(self.image_paths[index], dataset=self.name), self.min_side)


# ----------------------------------------------------------------------------------------------------
# A class folder in the revisitop layout
# ----------------------------------------------------------------------------------------------------


def _flat_names(side: str, rels: Sequence[str]) -> list[str]:
    """revisitop names (one folder, no extension) of a side's images: ``gallery/eiffel/0042.jpg`` ->
    ``gallery__eiffel__0042``."""
    return [f"{side}__" + os.path.splitext(rel)[0].replace("/", "__") for rel in rels]


def revisitop_ground_truth(folder: ClassFolder) -> dict[str, Any]:
    """A class folder as revisitop's ground truth, in :class:`ClassFolderSet`'s order: ``imlist`` (the gallery)
    and ``qimlist`` (the queries) as flat names (:func:`_flat_names`), and per query ``bbx`` (its box, or the
    whole image: the query is read for its size), ``easy`` / ``hard`` / ``junk`` and ``class``
    (:meth:`ClassFolder.ground_truth`)."""
    imlist = _flat_names("gallery", [rel for rel, _ in folder.gallery])
    qimlist = _flat_names("query", [rel for rel, _ in folder.queries])
    seen: dict[str, str] = {}
    for name, rel in zip(imlist + qimlist, [r for r, _ in folder.gallery] + [r for r, _ in folder.queries]):
        if name in seen:
            raise InvalidValueError(f"class folder {folder.path}: {seen[name]} and {rel} would both be named {name} "
                                    "in the revisitop layout (names drop the extension); rename one")
        seen[name] = rel
    gnd = []
    for (rel, _), entry in zip(folder.queries, folder.ground_truth()):
        box = folder.boxes.get(rel)
        if box is None:
            h, w = read_image(folder.path / "query" / rel).shape[:2]
            box = (0.0, 0.0, float(w), float(h))
        gnd.append({"bbx": np.asarray(box, dtype=np.float64), **entry})
    return {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}


def write_ground_truth(path: str | os.PathLike, ground_truth: dict[str, Any]) -> Path:
    """Pickle revisitop's ground truth to ``path`` (atomically)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump(ground_truth, f)

    atomic_write(path, write)
    return Path(path)


def write_revisitop(path: str | os.PathLike, root: str | os.PathLike, name: str, *, overwrite: bool = False) -> Path:
    """Write the class folder ``path`` as the revisitop-layout dataset ``<root>/<name>/`` (``gnd_<name>.pkl`` and
    ``jpg/<flat name>.jpg``, :func:`revisitop_ground_truth`) for tools that read only that layout; returns the
    folder. Images are copied byte for byte (a PNG keeps its bytes under the ``.jpg`` name: OpenCV and PIL read
    by content), so the written set gives the same pixels and figures as the class folder."""
    if not name or name != Path(name).name or name.startswith("."):
        raise InvalidValueError(f"name must be a plain folder name, got {name!r}")
    folder = list_class_folder(path)
    ground_truth = revisitop_ground_truth(folder)
    out = Path(root) / name
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} exists; pass overwrite=True (prepare_data.py revisitop --overwrite) to "
                                "replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{name}.writing")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "jpg").mkdir(parents=True)
    sources = [folder.path / "gallery" / rel for rel, _ in folder.gallery]
    sources += [folder.path / "query" / rel for rel, _ in folder.queries]
    for src, flat in zip(sources, ground_truth["imlist"] + ground_truth["qimlist"]):
        shutil.copyfile(src, tmp / "jpg" / f"{flat}.jpg")
    write_ground_truth(tmp / f"gnd_{name}.pkl", ground_truth)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    logger.info("wrote %s: %d gallery images, %d queries of %d classes (revisitop layout)", out,
                len(ground_truth["imlist"]), len(ground_truth["qimlist"]), len(folder.classes))
    return out
