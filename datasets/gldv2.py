"""Google Landmarks Dataset v2 (Weyand et al., CVPR 2020), the GLDv2-clean train split CVNet and SuperGlobal use.

Layout expected under ``root`` (the layout of the official download, tars extracted in place)::

    root/train_clean.csv            landmark_id,images   (images: space-separated image ids)
    root/train/a/b/c/<id>.jpg       a, b, c = the first three characters of the id
    root/tars/images_000.tar ...    only while downloading (see plan_gldv2_download)

RGLDv2-clean (Song et al., CVPR 2024, "revisited GLDv2-clean", https://github.com/dealicious-inc/RGLDv2-clean)
is GLDv2-clean minus the landmarks that also appear among the ROxford/RParis queries. Its release is a table on
Google Drive, not retrievable here, so the landmark ids to drop are read from a user-supplied file.
"""
from __future__ import annotations

import csv
import hashlib
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset
from tqdm import tqdm

from datasets.folder import CorruptImageError, read_bgr_image

logger = logging.getLogger(__name__)

__all__ = [
    "CorruptImageError",
    "GoogleLandmarksV2",
    "ShardStatus",
    "plan_gldv2_download",
    "gldv2_shard_urls",
    "read_exclusion_file",
]

GLDV2_BASE_URL = "https://s3.amazonaws.com/google-landmark"
GLDV2_NUM_SHARDS = 500
RGLDV2_URL = "https://github.com/dealicious-inc/RGLDv2-clean"
# Published size of the RGLDv2-clean cut: 1,565 images fewer than GLDv2-clean. Its README says 17 classes fewer,
# this project's spec says 18 landmarks; the count of removed images is the figure both agree on.
RGLDV2_REMOVED_IMAGES = 1565


def gldv2_csv_url(split: str = "train_clean") -> str:
    return f"{GLDV2_BASE_URL}/metadata/{split}.csv"


def gldv2_shard_urls(shard: int) -> tuple[str, str]:
    """(tar url, md5 file url) of one of the 500 GLDv2 train shards."""
    if not 0 <= shard < GLDV2_NUM_SHARDS:
        raise ValueError(f"GLDv2 train shards are 0..{GLDV2_NUM_SHARDS - 1}, got {shard}")
    return (
        f"{GLDV2_BASE_URL}/train/images_{shard:03d}.tar",
        f"{GLDV2_BASE_URL}/md5sum/train/md5.images_{shard:03d}.txt",
    )


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
                raise ValueError(
                    f"{path}:{lineno}: expected one integer landmark id per line, got {raw.strip()!r}"
                ) from None
    if not ids:
        raise ValueError(f"exclusion file {path} lists no landmark ids")
    return ids


def _read_gldv2_csv(csv_path: Path) -> tuple[list[int], list[list[str]]]:
    landmark_ids, images = [], []
    with csv_path.open("r", newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"landmark_id", "images"} <= set(reader.fieldnames):
            raise ValueError(f"{csv_path}: expected the columns landmark_id,images, got {reader.fieldnames}")
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

    exclude_revisited=True builds RGLDv2-clean: the landmark ids listed in ``exclude_landmarks_file`` (one per
    line) are dropped before remapping. min_class_size drops landmarks with fewer images (1 keeps all).
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
            raise ValueError(f"min_class_size must be >= 1, got {min_class_size}")
        csv_path = self.root / f"{split}.csv"
        if not csv_path.is_file():
            raise FileNotFoundError(_missing_data_message(self.root, split))
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
            raise ValueError(f"no landmarks left in {csv_path} after exclusions")

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
                raise ValueError("exclude_landmarks_file is only read with exclude_revisited=True")
            return set()
        if path is None or not Path(path).is_file():
            where = f" ({path} does not exist)" if path is not None else ""
            raise FileNotFoundError(
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
            raise FileNotFoundError(
                f"GLDv2 image {path} is missing: its shard is not downloaded or not extracted into "
                f"{self.root / 'train'} (plan_gldv2_download(root) lists the shards still to fetch)"
            )
        image = read_bgr_image(path)
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


def _file_md5(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.md5()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _expected_md5(md5_path: Path) -> str:
    # md5sum format: "<32 hex>  images_000.tar"
    text = md5_path.read_text(encoding="utf-8").split()
    if not text or len(text[0]) != 32:
        raise ValueError(f"{md5_path}: not an md5sum line")
    return text[0].lower()


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
        elif verify_md5 and _file_md5(tar_path) != _expected_md5(md5_path):
            todo.append(ShardStatus(status="md5_mismatch", **entry))
    return todo
