"""Training-time image augmentation, Hide-and-Seek, and the dataset wrappers that apply them reproducibly.

Every random choice is drawn from a ``numpy.random.Generator`` handed in by the caller; the wrappers build that
generator from ``(seed, epoch, index)``, so an item is a pure function of those three numbers whatever the
DataLoader's workers or a resumed run do. Images stay uint8 BGR (H, W, 3) until :func:`datasets.transforms.to_tensor`
normalises them with the input convention of the weights being trained.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from common.convention import InputConvention
from common.errors import InvalidValueError
from datasets.transforms import read_image, to_tensor

#: salts that keep the streams of one (seed, epoch, index) apart
_SALT_QUERY, _SALT_POSITIVE, _SALT_NEGATIVE, _SALT_HIDE = 11, 12, 13, 14


def _cv2():
    import cv2

    return cv2


def item_rng(seed: int, epoch: int, index: int, salt: int = 0) -> np.random.Generator:
    """The generator of one item's random choices: a pure function of its arguments."""
    return np.random.default_rng([int(seed), int(epoch), int(index), int(salt)])


# --------------------------------------------------------------------------------------------------------------
# Image operations (uint8 BGR (H, W, 3) in, same out)
# --------------------------------------------------------------------------------------------------------------


def random_resized_crop(
    img: np.ndarray,
    rng: np.random.Generator,
    *,
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.35, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """A crop covering ``scale`` of the area with log-uniform aspect ``ratio``, resized to ``size`` (h, w).

    Falls back to the largest centred crop of the target aspect when ten draws do not fit in the image.
    """
    out_h, out_w = (size, size) if isinstance(size, int) else size
    h, w = img.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        cw = int(round(math.sqrt(target * aspect)))
        ch = int(round(math.sqrt(target / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            break
    else:
        want = out_w / out_h
        cw, ch = (w, max(1, round(w / want))) if w / h < want else (max(1, round(h * want)), h)
        cw, ch = min(cw, w), min(ch, h)
        top, left = (h - ch) // 2, (w - cw) // 2
    crop = img[top : top + ch, left : left + cw]
    cv2 = _cv2()
    interp = cv2.INTER_AREA if ch * cw > out_h * out_w else cv2.INTER_LINEAR
    return cv2.resize(np.ascontiguousarray(crop), (out_w, out_h), interpolation=interp)


def resize_to(img: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resize to exactly ``size`` (h, w) (aspect not kept), INTER_AREA when shrinking, INTER_LINEAR otherwise."""
    out_h, out_w = (size, size) if isinstance(size, int) else size
    cv2 = _cv2()
    shrink = img.shape[0] * img.shape[1] > out_h * out_w
    return cv2.resize(img, (out_w, out_h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


#: BGR luma weights (ITU-R BT.601), float32
_LUMA_BGR = (np.float32(0.114), np.float32(0.587), np.float32(0.299))


def luma(x: np.ndarray) -> np.ndarray:
    """(H, W) float32 luma of a float32 (H, W, 3) BGR image: three multiplies and two adds, in this order.

    Not ``x @ weights``: numpy hands that product to its BLAS, and the kernel OpenBLAS picks depends on the CPU
    (its AVX-512 kernel fuses each multiply-add, its AVX2 kernel rounds the products first), so one image got
    different greys, and after rounding different pixels, on different machines. Element-wise float32 operations
    round every step the same way on any CPU.
    """
    b, g, r = _LUMA_BGR
    return x[..., 0] * b + x[..., 1] * g + x[..., 2] * r


def exact_mean(x: np.ndarray) -> np.float32:
    """The mean of a float32 array, correctly rounded (``math.fsum``), as float32.

    Not ``x.mean()``: numpy's float32 summation order changed between releases (2.0 and 2.4 give different last
    bits), and the colour jitter then drew different pixels with another numpy.
    """
    return np.float32(math.fsum(x.ravel().tolist()) / max(x.size, 1))


def color_jitter(
    img: np.ndarray,
    rng: np.random.Generator,
    *,
    brightness: float = 0.0,
    contrast: float = 0.0,
    saturation: float = 0.0,
) -> np.ndarray:
    """Multiply brightness, contrast (around the mean grey) and saturation by factors in [1 - a, 1 + a]."""
    if not (brightness or contrast or saturation):
        return img
    x = img.astype(np.float32)
    if brightness:
        x *= rng.uniform(1 - brightness, 1 + brightness)
    grey = luma(x)
    if contrast:
        c = rng.uniform(1 - contrast, 1 + contrast)
        m = exact_mean(grey)
        x = (x - m) * c + m
        grey = luma(x)
    if saturation:
        s = rng.uniform(1 - saturation, 1 + saturation)
        x = grey[..., None] + (x - grey[..., None]) * s
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def hide_and_seek_mask(h: int, w: int, rng: np.random.Generator, *, grid: int, prob: float) -> np.ndarray:
    """(h, w) bool, True where hidden: the image cut in ``grid`` x ``grid`` patches, each hidden with ``prob``.

    Hide-and-Seek (Singh & Lee, ICCV 2017); CVNet (Sec. 3.4) uses it so the re-ranker learns from partial views.
    """
    if grid < 1:
        raise InvalidValueError(f"grid must be >= 1, got {grid}")
    if not 0.0 <= prob <= 1.0:
        raise InvalidValueError(f"prob must be in [0, 1], got {prob}")
    hidden = rng.random((grid, grid)) < prob
    rows = np.minimum(np.arange(h) * grid // max(h, 1), grid - 1)
    cols = np.minimum(np.arange(w) * grid // max(w, 1), grid - 1)
    return hidden[rows[:, None], cols[None, :]]


def hide_and_seek(x: Tensor, rng: np.random.Generator, *, grid: int, prob: float, fill: float = 0.0) -> Tensor:
    """Hide patches of a normalised image (C, H, W): hidden pixels get ``fill``.

    The default 0 is the training mean after normalisation, the "mean pixel" the Hide-and-Seek paper fills with.
    """
    if prob <= 0:
        return x
    mask = torch.from_numpy(hide_and_seek_mask(x.shape[-2], x.shape[-1], rng, grid=grid, prob=prob))
    return x.masked_fill(mask, fill)


@dataclass(frozen=True)
class TrainAugment:
    """Random resized crop to ``size`` (an int for a square, or (h, w)), horizontal flip, colour jitter:
    uint8 BGR in and out."""

    size: int | tuple[int, int] = 512
    scale: tuple[float, float] = (0.35, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2

    @classmethod
    def from_config(cls, cfg: dict[str, Any], size: int | Sequence[int]) -> TrainAugment:
        size = int(size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return cls(size=size, scale=tuple(cfg.get("scale", (0.35, 1.0))),
                   ratio=tuple(cfg.get("ratio", (3 / 4, 4 / 3))), flip=float(cfg.get("flip", 0.5)),
                   brightness=float(cfg.get("brightness", 0.2)), contrast=float(cfg.get("contrast", 0.2)),
                   saturation=float(cfg.get("saturation", 0.2)))

    def __call__(self, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        out = random_resized_crop(img, rng, size=self.size, scale=self.scale, ratio=self.ratio)
        if self.flip and rng.random() < self.flip:
            out = np.ascontiguousarray(out[:, ::-1])
        return color_jitter(out, rng, brightness=self.brightness, contrast=self.contrast,
                            saturation=self.saturation)


# --------------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------------


class LabelledImageList(Dataset):
    """Image files with integer labels -> ``(uint8 BGR (H, W, 3), label)``; ``targets`` lists the labels.

    For split files such as the built-in synthetic ``train.csv``. An undecodable file raises
    :class:`datasets.folder.CorruptImageError`.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], labels: Sequence[int]) -> None:
        if len(paths) != len(labels):
            raise InvalidValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = [os.fspath(p) for p in paths]
        self.targets = [int(v) for v in labels]

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        return read_image(self.paths[index]), self.targets[index]


class _AugmentedItems(Dataset):
    """What the augmented training sets share: the items they augment (``source``, whose ``set_epoch`` is
    forwarded), the augmentation, the input convention, the seed and the current epoch."""

    def __init__(self, source: Dataset, *, augment: TrainAugment, convention: InputConvention,
                 seed: int = 0) -> None:
        self.source = source
        self.augment = augment
        self.convention = convention
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.source, "set_epoch"):
            self.source.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def _view(self, image: np.ndarray, key: int, salt: int) -> Tensor:
        return to_tensor(self.augment(image, item_rng(self.seed, self.epoch, key, salt)), self.convention)


class AugmentedPairs(_AugmentedItems):
    """``(image, positive, label)`` from a :class:`datasets.paired.PairedDataset` -> two augmented, normalised
    (3, size, size) tensors and the label; both views drawn from ``item_rng(seed, epoch, index)``.
    """

    def __init__(self, paired: Dataset, *, augment: TrainAugment, convention: InputConvention,
                 seed: int = 0) -> None:
        super().__init__(paired, augment=augment, convention=convention, seed=seed)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        image, positive, label = self.source[index]
        return self._view(image, index, _SALT_QUERY), self._view(positive, index, _SALT_POSITIVE), int(label)


class AugmentedImages(_AugmentedItems):
    """``(image, label)`` items -> ``(augmented, normalised (3, size, size) tensor, label)``, one view per item,
    drawn from ``item_rng(seed, epoch, key)``.

    A key ``i + d * len(dataset)`` is the d-th draw of item i in an epoch (what
    :class:`helpers.training.data.PKSampler` yields): another view of the same image. Plain indices are the
    draws d = 0.
    """

    def __getitem__(self, key: int) -> tuple[Tensor, int]:
        image, label = self.source[int(key) % len(self.source)]
        return self._view(image, int(key), _SALT_QUERY), int(label)


class ResizedImages(Dataset):
    """``(image, label)`` items -> ``(normalised (3, size, size) tensor, label)``, no randomness (for mining)."""

    def __init__(self, dataset: Dataset, *, size: int, convention: InputConvention) -> None:
        self.dataset = dataset
        self.size = int(size)
        self.convention = convention

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        image, label = self.dataset[index]
        return to_tensor(resize_to(image, self.size), self.convention), int(label)


__all__ = [
    "AugmentedImages",
    "AugmentedPairs",
    "LabelledImageList",
    "ResizedImages",
    "TrainAugment",
    "color_jitter",
    "exact_mean",
    "hide_and_seek",
    "hide_and_seek_mask",
    "item_rng",
    "luma",
    "random_resized_crop",
    "resize_to",
]
