"""Result grids: the query crop, then its top results framed by their ground-truth label.

Frames (Medium protocol): green for a positive (easy or hard), red for a negative, grey for junk; the query gets
a blue frame. Thumbnails share one height; the row is written as a PNG with OpenCV.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

#: Frame colours, BGR (OpenCV's order).
FRAME_COLORS: dict[str, tuple[int, int, int]] = {
    "query": (255, 128, 0),
    "positive": (0, 200, 0),
    "negative": (0, 0, 230),
    "junk": (160, 160, 160),
}
BACKGROUND = (255, 255, 255)


def _cv2():
    import cv2

    return cv2


def result_labels(ranking: np.ndarray, gnd_entry: Mapping[str, Any], *, top: int = 10) -> list[str]:
    """Labels of the first ``top`` items of one query's ranking (n_db,) under the Medium protocol:
    'positive' (easy or hard), 'junk', or 'negative'."""
    easy = np.asarray(gnd_entry.get("easy", []), dtype=np.int64).reshape(-1)
    hard = np.asarray(gnd_entry.get("hard", []), dtype=np.int64).reshape(-1)
    junk = np.asarray(gnd_entry.get("junk", []), dtype=np.int64).reshape(-1)
    head = np.asarray(ranking)[:top]
    positive = np.isin(head, np.concatenate([easy, hard]))
    is_junk = np.isin(head, junk)
    return ["positive" if p else "junk" if j else "negative" for p, j in zip(positive, is_junk)]


def thumbnail(img: np.ndarray, *, height: int, label: str, border: int = 6) -> np.ndarray:
    """(H, W, 3) uint8 BGR -> (height, round(W * inner / H) + 2 * border, 3): resized to ``height - 2 * border``
    pixels high (aspect kept) inside a frame of ``border`` pixels in the label's colour."""
    if label not in FRAME_COLORS:
        raise ValueError(f"unknown label {label!r}; expected one of {sorted(FRAME_COLORS)}")
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got {img.dtype} {img.shape}")
    inner = height - 2 * border
    if inner < 1:
        raise ValueError(f"height {height} leaves no room inside a {border}-pixel frame")
    cv2 = _cv2()
    h, w = img.shape[:2]
    width = max(1, round(w * inner / h))
    interpolation = cv2.INTER_AREA if inner < h else cv2.INTER_LINEAR
    small = cv2.resize(img, (width, inner), interpolation=interpolation)
    return cv2.copyMakeBorder(small, border, border, border, border, cv2.BORDER_CONSTANT,
                              value=FRAME_COLORS[label])


def result_grid(*, query: np.ndarray, results: Sequence[np.ndarray], labels: Sequence[str], height: int = 160,
                border: int = 6, gap: int = 8) -> np.ndarray:
    """One row: the query crop, then ``results`` in rank order, framed by ``labels`` -> (height, W, 3) uint8."""
    if len(results) != len(labels):
        raise ValueError(f"{len(results)} result images for {len(labels)} labels")
    tiles = [thumbnail(query, height=height, label="query", border=border)]
    tiles += [thumbnail(img, height=height, label=lab, border=border) for img, lab in zip(results, labels)]
    spacer = np.full((height, gap, 3), BACKGROUND, dtype=np.uint8)
    row: list[np.ndarray] = []
    for k, tile in enumerate(tiles):
        if k:
            # a wider gap after the query sets it apart from its results
            row.append(np.concatenate([spacer, spacer], axis=1) if k == 1 else spacer)
        row.append(tile)
    return np.concatenate(row, axis=1)


def save_result_grid(path: str | os.PathLike, *, query: np.ndarray, results: Sequence[np.ndarray],
                     labels: Sequence[str], height: int = 160, border: int = 6, gap: int = 8) -> Path:
    """Draw :func:`result_grid` and write it as a PNG at ``path`` (folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = result_grid(query=query, results=results, labels=labels, height=height, border=border, gap=gap)
    if not _cv2().imwrite(os.fspath(path), grid):
        raise OSError(f"could not write result grid {path}")
    return path


def save_query_grids(out_dir: str | os.PathLike, *, prefix: str, query_dataset: Any, db_dataset: Any,
                     ranks: np.ndarray, gnd: Sequence[Mapping[str, Any]], queries: Sequence[int], top: int = 10,
                     height: int = 160) -> list[Path]:
    """PNG grids ``<out_dir>/<prefix>_q<i>.png`` for the given queries of a Medium ranking (n_db, nq).

    ``query_dataset.read(i)`` / ``db_dataset.read(j)`` give uint8 BGR images (the query already cropped).
    """
    written = []
    for i in queries:
        col = np.asarray(ranks)[:, i]
        labels = result_labels(col, gnd[i], top=top)
        results = [db_dataset.read(int(j)) for j in col[: len(labels)]]
        written.append(save_result_grid(Path(out_dir) / f"{prefix}_q{i:03d}.png", query=query_dataset.read(i),
                                        results=results, labels=labels, height=height))
    logger.info("wrote %d result grids to %s", len(written), out_dir)
    return written
