"""Images for retrieval: read (a path, or a uint8 array in BGR or RGB order), sized (downscaled to ``max_side``,
the query box cropped, enlarged to ``min_side``), listed from a folder, and read back by database id for CVNet
re-ranking (:class:`StoredImages`)."""
from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor
from torch.utils.data import Dataset

from common.errors import InvalidValueError, MissingFileError, shorten
from common.io import printable_path
from datasets.folder import IMAGE_EXTENSIONS
from datasets.transforms import crop_query, downscale_to_max_side, enlarge_within, read_image, to_tensor
from helpers.extraction import MIN_SIDE
from helpers.vector_db.base import AbstractVectorDB

logger = logging.getLogger(__name__)

#: Short side below which an image is enlarged (see :data:`helpers.extraction.MIN_SIDE`: Regional-GeM's padding).
DEFAULT_MIN_SIDE = MIN_SIDE
#: Longer side images are downscaled to (the revisited benchmarks are at most 1024 a side).
DEFAULT_MAX_SIDE = 1024
#: The metadata key of an indexed image's file (what CVNet re-ranking reads the image back from).
PATH_KEY = "path"


def load_bgr(image: str | os.PathLike | np.ndarray, *, channel_order: str = "BGR",
             max_pixels: int | None = None) -> np.ndarray:
    """A path (read by :func:`datasets.transforms.read_image`, refusing more than ``max_pixels`` pixels; None:
    its default) or a uint8 (H, W, 3) array in ``channel_order`` -> uint8 (H, W, 3) BGR."""
    if channel_order not in ("BGR", "RGB"):
        raise InvalidValueError(f"channel_order must be 'BGR' or 'RGB', got {shorten(channel_order)}")
    if isinstance(image, (str, os.PathLike)):
        return read_image(image, max_pixels=max_pixels)
    if not isinstance(image, np.ndarray):
        raise TypeError(f"expected an image path or a uint8 (H, W, 3) numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise InvalidValueError(f"expected a colour image of shape (H, W, 3), got {image.shape} "
                                "(convert grey images with cv2.cvtColor(img, cv2.COLOR_GRAY2BGR))")
    if image.dtype != np.uint8:
        raise InvalidValueError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise InvalidValueError(f"empty image of shape {image.shape}")
    return np.ascontiguousarray(image[:, :, ::-1]) if channel_order == "RGB" else image


def prepare_image(
    img: np.ndarray,
    *,
    max_side: int | None,
    min_side: int | None,
    bbox: Sequence[float] | None = None,
) -> np.ndarray:
    """Downscale to ``max_side``, crop the query box (given in the original image's pixels), enlarge to
    ``min_side`` without passing ``max_side`` (:func:`datasets.transforms.enlarge_within`). The crop follows the
    downscale so that a query is seen at the scale of the database images."""
    img, factor = downscale_to_max_side(img, max_side)
    if bbox is not None:
        box = np.asarray(bbox, dtype=np.float64).reshape(-1)
        if box.shape != (4,) or not np.isfinite(box).all():
            raise InvalidValueError(f"bbox must be 4 finite numbers (x1, y1, x2, y2), got {shorten(bbox)}")
        img = crop_query(img, box * factor)
    return enlarge_within(img, min_side=min_side, max_side=max_side)


def list_images(
    root: str | os.PathLike, *, extensions: Sequence[str] = IMAGE_EXTENSIONS, exclude: str | os.PathLike | None = None
) -> list[Path]:
    """Image files under ``root`` (recursive, extension case-insensitive, sorted), skipping anything under
    ``exclude`` (the index folder, when it lies inside the image folder; said in a warning, and in the error
    when nothing else is left). Symlinked folders are followed; one that leads back to a folder already being
    walked (a loop), or to one already listed, is skipped with a warning."""
    root = Path(root)
    if not root.is_dir():
        raise MissingFileError(f"image folder not found: {printable_path(root)}")
    exts = tuple(e.lower() for e in extensions)
    skip = Path(exclude).resolve() if exclude is not None else None
    files, excluded = [], 0
    for path in _walk_files(root):
        if path.suffix.lower() not in exts or not path.is_file():
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            excluded += 1
            continue
        files.append(path)
    files.sort()
    inside = (f"; {excluded} image file(s) there lie inside the index folder {printable_path(exclude)}, which "
              "is never indexed: give --index a folder outside --images") if excluded else ""
    if not files:
        raise MissingFileError(f"no images ({', '.join(exts)}) found under {printable_path(root)}{inside}")
    if excluded:
        logger.warning("left out %d image file(s) inside the index folder %s (an index is never indexed)",
                       excluded, printable_path(exclude))
    return files


def _walk_files(root: Path) -> Iterator[Path]:
    """Every file under ``root``, following symlinked folders once each: a folder already visited (by device
    and inode: a symlink loop, or two links to one folder) is skipped with a warning."""
    seen: set[tuple[int, int]] = set()
    for top, dirs, names in os.walk(root, followlinks=True):
        stat = os.stat(top)
        if (stat.st_dev, stat.st_ino) in seen:
            logger.warning("skipping %s: it leads to a folder already listed (a symlink loop, or a second link "
                           "to one folder)", printable_path(top))
            dirs[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        dirs.sort()
        for name in names:
            yield Path(top) / name


class StoredImages(Dataset):
    """The database's images by id, for :class:`ReducedMapStore`: item ``id`` is ``[(3, H, W)]``, the image read
    back from the path stored in the entry's metadata, prepared as at indexing time (scale 1.0).

    :meth:`load_paths` reads the paths of many ids in one metadata request (a remote database answers it once)
    and names an id that has none; an id not loaded that way is looked up on its own.
    """

    def __init__(self, database: AbstractVectorDB, *, convention: Any, max_side: int | None,
                 min_side: int | None, max_pixels: int | None = None) -> None:
        self.database, self.convention = database, convention
        self.max_side, self.min_side, self.max_pixels = max_side, min_side, max_pixels
        self._paths: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self.database)

    @property
    def names(self) -> Mapping[int, str]:
        """id -> image file, for the ids read so far (what errors call the images)."""
        return self._paths

    def load_paths(self, ids: Iterable[int]) -> None:
        """Read the stored paths of ``ids`` (replacing those read before, which may be stale by now)."""
        ids = list(dict.fromkeys(int(i) for i in ids))
        self._paths = {}
        if ids:
            self._add_paths(ids)

    def _add_paths(self, ids: list[int]) -> None:
        for i, entry in zip(ids, self.database.get_metadata(ids)):
            path = None if entry is None else entry.get(PATH_KEY)
            if not path:
                raise InvalidValueError(
                    f"database id {i} has no stored image path (it was indexed from an array): CVNet "
                    "re-ranking recomputes database feature maps from the image files. Index paths instead, "
                    "or re-rank with SuperGlobalRerank, which needs only the stored descriptors.")
            self._paths[i] = path

    def __getitem__(self, i: int) -> list[Tensor]:
        i = int(i)
        if i not in self._paths:
            self._add_paths([i])
        img = prepare_image(read_image(self._paths[i], max_pixels=self.max_pixels), max_side=self.max_side,
                            min_side=self.min_side)
        return [to_tensor(img, self.convention)]
