"""Google Landmarks Dataset v2 (Weyand et al., CVPR 2020), in the layout of the official download: the GLDv2-clean
train split CVNet and SuperGlobal train on (:class:`GoogleLandmarksV2`, also as RGLDv2-clean), the plan of its shard
download (:func:`plan_gldv2_download`), and the retrieval test split with its retrieval and recognition solutions
(:class:`GLDv2RetrievalTest`). Each class's docstring gives the layout it reads.
"""
from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from torch.utils.data import Dataset
from tqdm import tqdm

from common.convention import OFFICIAL_CONVENTION, InputConvention
from common.errors import InvalidValueError, MissingFileError
from datasets.download import (
    GLDV2_BASE_URL,
    GLDV2_NUM_TARS,
    GLDV2_RECOGNITION_SOLUTION,
    GLDV2_RETRIEVAL_SOLUTION,
    file_md5,
    gldv2_tar_urls,
    read_md5_file,
)
from datasets.transforms import CorruptImageError, ScaledImages, min_size_guard, read_image

logger = logging.getLogger(__name__)

__all__ = [
    "CorruptImageError",
    "GLDv2RetrievalTest",
    "GoogleLandmarksV2",
    "ShardStatus",
    "Solution",
    "plan_gldv2_download",
    "gldv2_shard_urls",
    "read_exclusion_file",
    "read_recognition_solution",
    "read_retrieval_solution",
]

GLDV2_NUM_SHARDS = GLDV2_NUM_TARS["train"]
RGLDV2_URL = "https://github.com/dealicious-inc/RGLDv2-clean"
# Published size of the RGLDv2-clean cut: 1,565 images fewer than GLDv2-clean. Its README says 17 classes fewer,
# this project's spec says 18 landmarks; the count of removed images is the figure both agree on.
RGLDV2_REMOVED_IMAGES = 1565


def gldv2_csv_url(split: str = "train_clean") -> str:
    return f"{GLDV2_BASE_URL}/metadata/{split}.csv"


def gldv2_shard_urls(shard: int) -> tuple[str, str]:
    """(tar url, md5 file url) of one of the 500 GLDv2 train shards."""
    return gldv2_tar_urls("train", shard)


def _missing_data_message(root: Path, split: str) -> str:
    tar0, md50 = gldv2_shard_urls(0)
    return (
        f"GLDv2 {split} metadata not found: {root / (split + '.csv')}.\n"
        f"Download {gldv2_csv_url(split)} into {root}/, and the 500 image shards "
        f"{GLDV2_BASE_URL}/train/images_{{000..499}}.tar (e.g. {tar0}) with their md5 files "
        f"{GLDV2_BASE_URL}/md5sum/train/md5.images_{{000..499}}.txt (e.g. {md50}) into {root / 'tars'}/, then "
        f"extract every tar into {root / 'train'}/ (giving train/a/b/c/<id>.jpg). "
        "plan_gldv2_download(root) lists the shards still missing or incomplete."
    )


def read_exclusion_file(path: str | os.PathLike) -> set[int]:
    """Landmark ids to drop, one integer per line; blank lines and ``#`` comments are ignored."""
    path = Path(path)
    ids: set[int] = set()
    with path.open("r", encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            try:
                ids.add(int(line))
            except ValueError:
                raise InvalidValueError(
                    f"{path}:{lineno}: expected one integer landmark id per line, got {raw.strip()!r}"
                ) from None
    if not ids:
        raise InvalidValueError(f"exclusion file {path} lists no landmark ids")
    return ids


def _read_gldv2_csv(csv_path: Path) -> tuple[list[int], list[list[str]]]:
    landmark_ids, images = [], []
    with csv_path.open("r", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"landmark_id", "images"} <= set(reader.fieldnames):
            raise InvalidValueError(f"{csv_path}: expected the columns landmark_id,images, got {reader.fieldnames}")
        for row in reader:
            ids = row["images"].split()
            if not ids:
                continue
            landmark_ids.append(int(row["landmark_id"]))
            images.append(ids)
    return landmark_ids, images


class GoogleLandmarksV2(Dataset):
    """GLDv2 train split from ``<root>/<split>.csv`` -> ``(BGR uint8 image, label)`` (label in 0..C-1).

    Labels are the csv's landmark ids remapped in increasing id order; ``landmark_ids[label]`` gives the original
    id back and ``class_to_idx`` the other way. ``targets`` (N,) int64 holds every image's label (cheap access for
    samplers and :class:`datasets.paired.PairedDataset`).

    Layout under ``root`` (the official download, tars extracted in place; ``root/tars/`` holds the tars only
    while downloading, :func:`plan_gldv2_download`)::

        root/train_clean.csv            landmark_id,images   (images: space-separated image ids)
        root/train/a/b/c/<id>.jpg       a, b, c = the first three characters of the id

    exclude_revisited=True builds RGLDv2-clean (Song et al., CVPR 2024, "revisited GLDv2-clean", :data:`RGLDV2_URL`):
    GLDv2-clean minus the landmarks that also appear among the ROxford/RParis queries. Its release is a table on
    Google Drive, not retrievable here, so the landmark ids listed in the user-supplied ``exclude_landmarks_file``
    (one per line) are dropped before remapping. min_class_size drops landmarks with fewer images (1 keeps all).
    A missing image raises FileNotFoundError naming the shard to fetch; an undecodable one CorruptImageError.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train_clean",
        transform: Callable[[np.ndarray], Any] | None = None,
        *,
        exclude_revisited: bool = False,
        exclude_landmarks_file: str | os.PathLike | None = None,
        min_class_size: int = 1,
    ) -> None:
        self.root = Path(root)
        self.split = split
        self.transform = transform
        if min_class_size < 1:
            raise InvalidValueError(f"min_class_size must be >= 1, got {min_class_size}")
        csv_path = self.root / f"{split}.csv"
        if not csv_path.is_file():
            raise MissingFileError(_missing_data_message(self.root, split))
        excluded = self._excluded_ids(exclude_revisited, exclude_landmarks_file)

        landmark_ids, images = _read_gldv2_csv(csv_path)
        per_landmark: dict[int, list[str]] = {}
        for lid, ids in zip(landmark_ids, images):
            per_landmark.setdefault(lid, []).extend(ids)  # a landmark split over several rows stays one class
        if excluded:
            present = excluded & per_landmark.keys()
            removed_images = sum(len(per_landmark.pop(lid)) for lid in present)
            logger.info(
                "RGLDv2-clean: dropped %d landmarks (%d images) listed in %s; the published cut removes %d images",
                len(present), removed_images, exclude_landmarks_file, RGLDV2_REMOVED_IMAGES,
            )
            if len(present) < len(excluded):
                logger.warning(
                    "%d landmark ids of %s are not in %s", len(excluded) - len(present), exclude_landmarks_file,
                    csv_path.name,
                )
        small = [lid for lid, ids in per_landmark.items() if len(ids) < min_class_size]
        for lid in small:
            del per_landmark[lid]
        if small:
            logger.info("dropped %d landmarks with fewer than %d images", len(small), min_class_size)
        if not per_landmark:
            raise InvalidValueError(f"no landmarks left in {csv_path} after exclusions")

        self.landmark_ids = np.array(sorted(per_landmark), dtype=np.int64)
        self.class_to_idx = {int(lid): i for i, lid in enumerate(self.landmark_ids)}
        all_ids: list[str] = []
        targets: list[int] = []
        for label, lid in enumerate(self.landmark_ids):
            ids = per_landmark[int(lid)]
            all_ids.extend(ids)
            targets.extend([label] * len(ids))
        # compact storage: 1.5M python strings would be copied page by page into every DataLoader worker
        self.image_ids = np.array(all_ids, dtype=np.bytes_)
        self.targets = np.array(targets, dtype=np.int64)
        logger.info(
            "GLDv2 %s: %d images, %d landmarks (root %s)", split, len(self.image_ids), len(self.landmark_ids),
            self.root,
        )

    @staticmethod
    def _excluded_ids(exclude_revisited: bool, path: str | os.PathLike | None) -> set[int]:
        if not exclude_revisited:
            if path is not None:
                raise InvalidValueError("exclude_landmarks_file is only read with exclude_revisited=True")
            return set()
        if path is None or not Path(path).is_file():
            where = f" ({path} does not exist)" if path is not None else ""
            raise MissingFileError(
                "exclude_revisited=True (RGLDv2-clean) needs exclude_landmarks_file: a text file with one GLDv2 "
                f"landmark id per line, the landmarks overlapping ROxford/RParis{where}. The list is published "
                f"with RGLDv2-clean (Song et al., CVPR 2024, {RGLDV2_URL}: the cleaned index table linked from its "
                "README); write the landmark ids it removes from GLDv2-clean, one per line, and pass that file."
            )
        return read_exclusion_file(path)

    @property
    def num_classes(self) -> int:
        return len(self.landmark_ids)

    def __len__(self) -> int:
        return len(self.image_ids)

    def image_id(self, index: int) -> str:
        return self.image_ids[index].decode("ascii")

    def image_path(self, index: int) -> Path:
        image_id = self.image_id(index)
        return self.root / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg"

    def __getitem__(self, index: int) -> tuple[Any, int]:
        path = self.image_path(index)
        if not path.is_file():
            raise MissingFileError(
                f"GLDv2 image {path} is missing: its shard is not downloaded or not extracted into "
                f"{self.root / 'train'} (plan_gldv2_download(root) lists the shards still to fetch)"
            )
        image = read_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


# ---------------------------------------------------------------------------------------------- download plan


@dataclass(frozen=True)
class ShardStatus:
    """What is left to do for one GLDv2 train shard.

    status: "missing" (nothing on disk), "partial" (``<tar>.part`` of ``part_bytes`` bytes: resume with an HTTP
    Range request from that offset), "no_md5" (tar present, md5 file absent: fetch ``md5_url`` then verify),
    "md5_mismatch" (tar complete but corrupt: delete and fetch again).
    """

    shard: int
    status: str
    url: str
    md5_url: str
    tar_path: Path
    md5_path: Path
    part_bytes: int = 0


def plan_gldv2_download(
    root: str | os.PathLike,
    shards: Iterable[int] = range(GLDV2_NUM_SHARDS),
    *,
    download_dir: str | os.PathLike | None = None,
    verify_md5: bool = True,
) -> list[ShardStatus]:
    """The GLDv2 train shards still to download, in shard order (offline: only looks at files on disk).

    Files live in ``download_dir`` (default ``<root>/tars``): ``images_XXX.tar``, its download in progress
    ``images_XXX.tar.part``, and ``md5.images_XXX.txt``. A shard is done when its tar matches its md5 file
    (verify_md5=False: when the tar and md5 file both exist), or when the marker ``images_XXX.extracted`` exists
    (written by whoever extracted the tar and deleted it).
    """
    root = Path(root)
    ddir = Path(download_dir) if download_dir is not None else root / "tars"
    todo: list[ShardStatus] = []
    wanted = sorted(set(int(s) for s in shards))
    # hashing 500 tars of ~1 GB takes a while: show progress then
    for shard in tqdm(wanted, desc="checking GLDv2 shards", disable=not verify_md5 or len(wanted) < 10):
        url, md5_url = gldv2_shard_urls(shard)
        tar_path = ddir / f"images_{shard:03d}.tar"
        md5_path = ddir / f"md5.images_{shard:03d}.txt"
        part_path = tar_path.with_name(tar_path.name + ".part")
        if (ddir / f"images_{shard:03d}.extracted").is_file():
            continue
        entry = dict(shard=shard, url=url, md5_url=md5_url, tar_path=tar_path, md5_path=md5_path)
        if not tar_path.is_file():
            if part_path.is_file():
                todo.append(ShardStatus(status="partial", part_bytes=part_path.stat().st_size, **entry))
            else:
                todo.append(ShardStatus(status="missing", **entry))
        elif not md5_path.is_file():
            todo.append(ShardStatus(status="no_md5", **entry))
        elif verify_md5 and file_md5(tar_path) != read_md5_file(md5_path):
            todo.append(ShardStatus(status="md5_mismatch", **entry))
    return todo


# ---------------------------------------------------------------------------------------------- retrieval test split


class Solution(NamedTuple):
    """A GLDv2 solution file as the challenge metrics (DELF's ``ReadSolution``) read it: ``public`` and
    ``private`` map a test id to its ground-truth ids (index image ids for retrieval, integer landmark ids for
    recognition); ``ignored`` lists the test ids that are not scored. Unpacks as (public, private, ignored)."""

    public: dict[str, list]
    private: dict[str, list]
    ignored: list[str]


_USAGES = ("Public", "Private", "Ignored")
#: GLDv2 ids are 16 hex digits; this keeps ids that could name a path outside the image folders out
_IMAGE_ID = re.compile(r"[0-9A-Za-z_-]{3,64}")


def _csv_rows(path: Path, columns: Sequence[str]) -> Iterable[tuple[int, dict[str, str]]]:
    """(line number, row) of a CSV with a header holding ``columns``; errors name the file."""
    with path.open("r", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None:
            raise InvalidValueError(f"{path} is empty: expected a header with the columns {','.join(columns)}")
        lacking = [c for c in columns if c not in reader.fieldnames]
        if lacking:
            raise InvalidValueError(f"{path}: expected the columns {','.join(columns)}, got "
                                    f"{','.join(reader.fieldnames)} "
                                    f"(missing {', '.join(repr(c) for c in lacking)})")
        for row in reader:
            yield reader.line_num, row


def _read_solution(path: str | os.PathLike, ids_column: str, parse: Callable[[str], list]) -> Solution:
    path = Path(path)
    public: dict[str, list] = {}
    private: dict[str, list] = {}
    ignored: list[str] = []
    seen: set[str] = set()
    for line, row in _csv_rows(path, ("id", ids_column, "Usage")):
        test_id, usage = row["id"], row["Usage"]
        if test_id in seen:
            raise InvalidValueError(f"{path}:{line}: test id {test_id} is listed twice")
        seen.add(test_id)
        if usage == "Ignored":
            ignored.append(test_id)
        elif usage in ("Public", "Private"):
            try:
                ids = parse(row[ids_column] or "")
            except ValueError as exc:
                raise InvalidValueError(f"{path}:{line}: bad {ids_column} for test id {test_id}: {exc}") from None
            (public if usage == "Public" else private)[test_id] = ids
        else:
            raise InvalidValueError(f"{path}:{line}: test id {test_id} has Usage {usage!r}; expected one of {_USAGES}")
    return Solution(public, private, ignored)


def read_retrieval_solution(path: str | os.PathLike) -> Solution:
    """``retrieval_solution_v2.1.csv`` (id,images,Usage) -> (public, private, ignored); each solution maps a
    test id to its list of relevant index image ids, in file order. Ignored rows (images "None") are not scored.
    A malformed file raises ValueError naming the file and line."""
    return _read_solution(path, "images", str.split)


def read_recognition_solution(path: str | os.PathLike) -> Solution:
    """``recognition_solution_v2.1.csv`` (id,landmarks,Usage) -> (public, private, ignored); each solution maps
    a test id to its list of integer landmark ids (empty: no landmark of the dataset is shown)."""
    return _read_solution(path, "landmarks", lambda text: [int(v) for v in text.split()])


def _find_csv(root: Path, name: str, split_dir: str) -> Path | None:
    for candidate in (root / name, root / split_dir / name):
        if candidate.is_file():
            return candidate
    return None


def _retrieval_download_hint(root: Path, missing: str) -> str:
    return (f"GLDv2 retrieval test: {missing} not found under {root} (nor in its index/ or test/ folder); "
            f"Fetch the split with `python prepare_data.py download --root {root.parent} --datasets "
            f"gldv2-retrieval-test` (it lands in {root.parent / 'gldv2'}), or by hand from {GLDV2_BASE_URL}: "
            f"metadata/index.csv, metadata/test.csv, ground_truth/{GLDV2_RETRIEVAL_SOLUTION}, and the tars "
            f"index/images_000..{GLDV2_NUM_TARS['index'] - 1:03d}.tar and test/images_000.."
            f"{GLDV2_NUM_TARS['test'] - 1:03d}.tar extracted into {root / 'index'}/ and {root / 'test'}/.")


def _read_ids(path: Path) -> list[str]:
    ids, seen = [], set()
    for line, row in _csv_rows(path, ("id",)):
        image_id = row["id"]
        if not _IMAGE_ID.fullmatch(image_id or ""):
            raise InvalidValueError(f"{path}:{line}: {image_id!r} is not a GLDv2 image id (16 hex digits)")
        if image_id in seen:
            raise InvalidValueError(f"{path}:{line}: image id {image_id} is listed twice")
        seen.add(image_id)
        ids.append(image_id)
    return ids


class GLDv2RetrievalTest(ScaledImages):
    """The GLDv2 retrieval test split, index or test side; item i -> list of (3, H_s, W_s) tensors, one per
    scale, like :class:`datasets.revisited.RevisitedDataset` (so the evaluation engine extracts it the same way).

    ``split="index"``: the 761,757 index images of ``index.csv``. ``split="test"``: the queries; ``queries``
    picks "scored" (default: the Public then the Private queries of the retrieval solution, in its order),
    "public", "private", or "all" (every id of ``test.csv``, most of them Ignored). ``solution`` holds the
    retrieval solution (test side; read lazily on the index side by :meth:`read_solution`).

    Images are read at their stored size in BGR (:func:`datasets.transforms.read_image`), enlarged to
    ``min_side`` when smaller (GLDv2 holds images a few pixels wide; see :data:`datasets.transforms.SMALLEST_SIDE`),
    and normalised with ``convention``. ``ids[i]`` is item i's image id.

    Layout under ``root`` (``python prepare_data.py download --root DATA --datasets gldv2-retrieval-test`` fetches
    it into ``DATA/gldv2``)::

        root/index.csv, root/test.csv       one column, id
        root/retrieval_solution_v2.1.csv    id,images,Usage (images: space-separated index ids; Usage Public,
                                            Private or Ignored, an ignored query's images "None")
        root/recognition_solution_v2.1.csv  id,landmarks,Usage
        root/index/a/b/c/<id>.jpg, root/test/a/b/c/<id>.jpg

    The CSVs may also sit in the split folders (``root/index/index.csv``, ``root/test/test.csv``,
    ``root/test/retrieval_solution_v2.1.csv``), where cvdfoundation's download script puts them.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "index",
        *,
        queries: str = "scored",
        convention: InputConvention = OFFICIAL_CONVENTION,
        scales: Sequence[float] = (1.0,),
        min_side: int | None = None,
    ) -> None:
        if split not in ("index", "test"):
            raise InvalidValueError(f"split must be 'index' or 'test', got {split!r}")
        if queries not in ("scored", "public", "private", "all"):
            raise InvalidValueError(f"queries must be 'scored', 'public', 'private' or 'all', got {queries!r}")
        self.root = Path(root)
        self.split, self.queries = split, queries
        self.convention, self.scales, self.min_side = convention, tuple(float(s) for s in scales), min_side
        self.image_dir = self.root / split
        self.solution: Solution | None = None
        if split == "index" or queries == "all":
            ids_csv = _find_csv(self.root, f"{split}.csv", split)
            if ids_csv is None:
                raise MissingFileError(_retrieval_download_hint(self.root, f"{split}.csv"))
            self.ids: list[str] = _read_ids(ids_csv)
        if split == "test":
            self.solution = self.read_solution()
            if queries != "all":
                public, private = list(self.solution.public), list(self.solution.private)
                self.ids = {"scored": public + private, "public": public, "private": private}[queries]
                bad = next((i for i in self.ids if not _IMAGE_ID.fullmatch(i)), None)
                if bad is not None:
                    raise InvalidValueError(f"{self.solution_path}: {bad!r} is not a GLDv2 image id (16 hex digits)")
        self.image_paths: list[str] = [str(self.image_dir / i[0] / i[1] / i[2] / f"{i}.jpg") for i in self.ids]
        logger.info("GLDv2 retrieval %s: %d images (root %s)", split, len(self.ids), self.root)

    @property
    def solution_path(self) -> Path:
        path = _find_csv(self.root, GLDV2_RETRIEVAL_SOLUTION, "test")
        if path is None:
            raise MissingFileError(_retrieval_download_hint(self.root, GLDV2_RETRIEVAL_SOLUTION))
        return path

    def read_solution(self) -> Solution:
        """The retrieval solution of this root (see :func:`read_retrieval_solution`)."""
        return read_retrieval_solution(self.solution_path)

    def read_recognition_solution(self) -> Solution:
        """The recognition solution of this root, for GAP (see :func:`read_recognition_solution`)."""
        path = _find_csv(self.root, GLDV2_RECOGNITION_SOLUTION, "test")
        if path is None:
            raise MissingFileError(_retrieval_download_hint(self.root, GLDV2_RECOGNITION_SOLUTION))
        return read_recognition_solution(path)

    def __len__(self) -> int:
        return len(self.ids)

    def read(self, index: int) -> np.ndarray:
        """The uint8 BGR (H, W, 3) image of item ``index``, enlarged to ``min_side`` when smaller."""
        path = self.image_paths[index]
        if not os.path.isfile(path):
            raise MissingFileError(
                f"GLDv2 {self.split} image {path} is missing: its tar is not downloaded or not extracted into "
                f"{self.image_dir} (python prepare_data.py download --root DATA --datasets gldv2-retrieval-test)")
        return min_size_guard(read_image(path, dataset=f"gldv2 {self.split}"), self.min_side)

    def describe(self, index: int) -> str:
        """Which image item ``index`` is (for error messages)."""
        text = f"gldv2 ({self.split}) item {index}: id {self.ids[index]}, {self.image_paths[index]}"
        if self.min_side is not None:
            text += f", short side enlarged to min_side {self.min_side} when below it"
        return text

    def __repr__(self) -> str:
        return (f"GLDv2RetrievalTest(root={str(self.root)!r}, split={self.split!r}, n={len(self)}, "
                f"scales={self.scales}, convention={self.convention})")
