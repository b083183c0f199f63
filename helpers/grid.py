"""The retrieval CLI's result grid: the query (its box drawn) and its hits as thumbnails with captions, one PNG.

(The evaluation's grids are :mod:`helpers.visualize`.)
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from helpers.retrieval import Hit, load_bgr

logger = logging.getLogger(__name__)

_TILE = 160
_CAPTION = 22
_PAD = 4


def fit_thumbnail(img: np.ndarray, size: int = _TILE) -> np.ndarray:
    """uint8 (H, W, 3) -> (size, size, 3): resized to fit (aspect kept; INTER_AREA shrinking, INTER_LINEAR
    enlarging), centred on black."""
    import cv2

    h, w = img.shape[:2]
    scale = size / max(h, w)
    new_w, new_h = max(1, round(w * scale)), max(1, round(h * scale))
    interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
    thumb = cv2.resize(img, dsize=(new_w, new_h), interpolation=interp)
    out = np.zeros((size, size, 3), dtype=np.uint8)
    y, x = (size - new_h) // 2, (size - new_w) // 2
    out[y : y + new_h, x : x + new_w] = thumb
    return out


def tile_origin(index: int, *, cols: int, tile: int = _TILE) -> tuple[int, int]:
    """Top-left (y, x) of tile ``index``'s thumbnail in a grid made by :func:`make_grid`."""
    row, col = divmod(index, cols)
    return _PAD + row * (tile + _CAPTION + _PAD), _PAD + col * (tile + _PAD)


def make_grid(
    images: Sequence[np.ndarray | None], captions: Sequence[str], *, cols: int = 6, tile: int = _TILE
) -> np.ndarray:
    """A uint8 BGR grid of thumbnails (``None`` -> a grey tile), each with its caption below, row-major."""
    import cv2

    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images for {len(captions)} captions")
    cols = max(1, min(cols, len(images)))
    rows = math.ceil(len(images) / cols)
    grid = np.full((_PAD + rows * (tile + _CAPTION + _PAD), _PAD + cols * (tile + _PAD), 3), 32, dtype=np.uint8)
    for i, (img, caption) in enumerate(zip(images, captions)):
        y, x = tile_origin(i, cols=cols, tile=tile)
        grid[y : y + tile, x : x + tile] = fit_thumbnail(img, tile) if img is not None else 96
        cv2.putText(grid, caption[:24], (x + 2, y + tile + _CAPTION - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return grid


def write_grid(
    path: str | os.PathLike,
    query: str | os.PathLike,
    hits: Sequence[Hit],
    *,
    bbox: Sequence[float] | None = None,
    cols: int = 6,
) -> Path:
    """Write a PNG of the query (its box drawn in green) followed by its hits' images."""
    import cv2

    query_img = load_bgr(query).copy()
    if bbox is not None:
        x1, y1, x2, y2 = (int(v) for v in bbox)
        cv2.rectangle(query_img, (x1, y1), (x2, y2), (0, 255, 0), max(2, max(query_img.shape[:2]) // 200))
    images: list[np.ndarray | None] = [query_img]
    for hit in hits:
        try:
            images.append(load_bgr(hit.path) if hit.path else None)
        except (OSError, ValueError) as exc:
            logger.warning("grid: cannot show id %d: %s", hit.id, exc)
            images.append(None)
    captions = ["query"] + [f"#{r} {h.score:.3f}" for r, h in enumerate(hits, start=1)]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(str(path), make_grid(images, captions, cols=cols)):
        raise OSError(f"could not write the grid image {path} (use a .png or .jpg name)")
    return path
