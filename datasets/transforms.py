"""Image reading, query cropping, multi-scale resizing and normalisation, as the official releases do them.

The releases read images with OpenCV (uint8, BGR), resize the uint8 image with ``cv2.resize`` (INTER_AREA
when shrinking, INTER_LINEAR when enlarging), then transpose to CHW, divide by 255 and normalise each channel
with the mean/std of the weights' input convention. Everything here works on the uint8 BGR image until
``to_tensor``.
"""
from __future__ import annotations

import math
import os
from collections.abc import Sequence

import numpy as np
import torch

from common.convention import InputConvention


def _cv2():
    import cv2

    return cv2


def read_image(path: str | os.PathLike, *, dataset: str | None = None) -> np.ndarray:
    """Read an image as uint8 (H, W, 3) in BGR order (``cv2.imread``, IMREAD_COLOR, as the releases do)."""
    cv2 = _cv2()
    where = f" (dataset {dataset})" if dataset else ""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}{where}")
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"could not decode image file {path}{where}: unreadable or not an image")
    return img


def _check_image(img: np.ndarray) -> None:
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3:
        shape = getattr(img, "shape", None)
        raise ValueError(f"expected an (H, W, 3) image array, got shape {shape}")
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {img.dtype}")


def crop_query(img: np.ndarray, bbx: Sequence[float]) -> np.ndarray:
    """The official query crop ``img[int(y1):int(y2), int(x1):int(x2)]`` for ``bbx = (x1, y1, x2, y2)``.

    Coordinates are truncated with ``int()`` like the release (so 10.9 -> 10). A stop beyond the image is
    clipped by slicing, as in the release; a negative start or an empty crop is an error rather than a silent
    wrap-around.
    """
    coords = [float(v) for v in np.asarray(bbx, dtype=np.float64).reshape(-1)]
    if len(coords) != 4 or not all(math.isfinite(v) for v in coords):
        raise ValueError(f"bbx must be 4 finite numbers (x1, y1, x2, y2), got {bbx!r}")
    x1, y1, x2, y2 = (int(v) for v in coords)
    if x1 < 0 or y1 < 0:
        raise ValueError(f"bbx {tuple(coords)} has a negative start ({x1}, {y1})")
    crop = img[y1:y2, x1:x2]
    if crop.shape[0] == 0 or crop.shape[1] == 0:
        raise ValueError(
            f"bbx {tuple(coords)} gives an empty crop of an image of size "
            f"(H={img.shape[0]}, W={img.shape[1]})"
        )
    return crop


def resize_scale(img: np.ndarray, scale: float) -> np.ndarray:
    """The release's multi-scale step on the uint8 image: ``cv2.resize(fx=fy=scale)``.

    scale == 1 returns the image unchanged; below 1 uses INTER_AREA, above 1 INTER_LINEAR.
    """
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive number, got {scale}")
    if scale == 1.0:
        return img
    h, w = img.shape[:2]
    if min(h, w) * scale < 0.5:
        raise ValueError(f"scale {scale} shrinks an image of size (H={h}, W={w}) to nothing")
    cv2 = _cv2()
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(img, dsize=(0, 0), fx=scale, fy=scale, interpolation=interpolation)


def min_size_guard(img: np.ndarray, min_side: int | None) -> np.ndarray:
    """Enlarge (INTER_LINEAR, aspect kept) an image whose short side is below ``min_side``; otherwise no-op.

    Some GLDv2 images are only a few pixels wide and would vanish at stride 32 or at scale 0.7071.
    """
    if min_side is None:
        return img
    if min_side < 1:
        raise ValueError(f"min_side must be >= 1, got {min_side}")
    h, w = img.shape[:2]
    short = min(h, w)
    if short >= min_side:
        return img
    if short == 0:
        raise ValueError(f"cannot enlarge an empty image of size (H={h}, W={w})")
    if h <= w:
        new_h, new_w = min_side, max(min_side, round(w * min_side / h))
    else:
        new_h, new_w = max(min_side, round(h * min_side / w)), min_side
    cv2 = _cv2()
    return cv2.resize(img, dsize=(new_w, new_h), interpolation=cv2.INTER_LINEAR)


def to_tensor(img_bgr_uint8: np.ndarray, convention: InputConvention) -> torch.Tensor:
    """uint8 BGR (H, W, 3) -> float32 (3, H, W): /255, channels in ``convention.channel_order``, (x-mean)/std.

    ``convention.mean``/``std`` are listed in its channel order; an RGB convention reverses the channel axis
    first, so the official BGR convention and its ``as_rgb()`` give the same tensor up to the channel flip.
    """
    _check_image(img_bgr_uint8)
    img = img_bgr_uint8 if convention.channel_order == "BGR" else img_bgr_uint8[:, :, ::-1]
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1))).to(torch.float32) / 255.0
    mean = torch.tensor(convention.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(convention.std, dtype=torch.float32).view(3, 1, 1)
    return (x - mean) / std


def multiscale_tensors(
    img: np.ndarray, scales: Sequence[float], convention: InputConvention
) -> list[torch.Tensor]:
    """One normalised (3, H_s, W_s) tensor per scale of the uint8 BGR image (resize first, then normalise)."""
    _check_image(img)
    return [to_tensor(resize_scale(img, s), convention) for s in scales]
