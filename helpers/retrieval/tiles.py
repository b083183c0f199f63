"""The retrieval CLI's result grid: the query (its box drawn) and its hits, drawn by the one ranking renderer,
:func:`helpers.visualize.save_ranking_grid` (rank, score at enough digits to tell tiles apart, file name, legend).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.io import printable_path
from helpers.retrieval.images import load_bgr
from helpers.retrieval.retriever import Hit
from helpers.visualize import FRAME_COLORS, Tile, save_ranking_grid

logger = logging.getLogger(__name__)

#: Tiles a row of the CLI's grid (the query and 5 hits).
COLUMNS = 6


def query_tiles(query: str | os.PathLike, hits: Sequence[Hit], *, bbox: Sequence[float] | None = None,
                max_pixels: int | None = None) -> tuple[np.ndarray, list[Tile]]:
    """The query image (BGR, its box drawn in the query's frame colour) and one :class:`Tile` per hit (rank,
    score, file name; an unreadable or path-less entry is a placeholder). Images over ``max_pixels`` (None: the
    reader's default) are refused as at indexing time."""
    import cv2

    query_img = load_bgr(query, max_pixels=max_pixels).copy()
    if bbox is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in bbox)
        cv2.rectangle(query_img, (x1, y1), (x2, y2), FRAME_COLORS["query"], max(2, max(query_img.shape[:2]) // 150))
    tiles = []
    for rank, hit in enumerate(hits, start=1):
        image = None
        if hit.path:
            try:
                image = load_bgr(hit.path, max_pixels=max_pixels)
            except (OSError, ValueError) as exc:
                logger.warning("grid: cannot show id %d: %s", hit.id, exc)
        tiles.append(Tile(image, label="result", rank=rank, score=hit.score,
                          name=printable_path(Path(hit.path).name) if hit.path else f"id {hit.id}"))
    return query_img, tiles


def write_grid(path: str | os.PathLike, query: str | os.PathLike, hits: Sequence[Hit], *,
               bbox: Sequence[float] | None = None, cols: int = COLUMNS, title: str = "", overwrite: bool = True,
               max_pixels: int | None = None) -> Path:
    """Write a PNG (or JPEG, by suffix) of the query followed by its hits (see :func:`query_tiles`); an existing
    file is replaced only with ``overwrite`` (check the path before the query with
    :func:`helpers.visualize.check_grid_path`)."""
    query_img, tiles = query_tiles(query, hits, bbox=bbox, max_pixels=max_pixels)
    return save_ranking_grid(path, query=query_img, hits=tiles, query_name=printable_path(Path(query).name),
                             cols=cols, title=title, overwrite=overwrite)
