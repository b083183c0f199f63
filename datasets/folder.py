"""Small labelled image collections for training and quick experiments: a class-per-folder tree and CIFAR-10.

Items are ``(image, label)`` with the image a uint8 (H, W, 3) BGR array (the releases' OpenCV convention, see
:mod:`datasets.transforms`) unless a ``transform`` turns it into something else.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from common.errors import MissingFileError
from datasets.transforms import CorruptImageError, read_image

logger = logging.getLogger(__name__)

__all__ = ["CorruptImageError", "ImageFolderDataset", "cifar10", "read_bgr_image", "read_image"]

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
