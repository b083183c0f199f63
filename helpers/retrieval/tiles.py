"""The retrieval CLI's result grid: the query (its box drawn) and its hits, drawn by the one ranking renderer,
:func:`helpers.visualize.save_ranking_grid` (rank, score at enough digits to tell tiles apart, file name, legend).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from helpers.retrieval.images import load_bgr
from helpers.retrieval.retriever import Hit
from helpers.visualize import FRAME_COLORS, Tile, save_ranking_grid

logger = logging.getLogger(__name__)

#: Tiles a row of the CLI's grid (the query and 5 hits).
COLUMNS = 6


def query_tiles(query: str | os.PathLike, hits: Sequence[Hit], *, bbox: Sequence[float] | None = None
                ) -> tuple[np.ndarray, list[Tile]]:
    """The query image (BGR, its box drawn in the query's frame colour) and one :class:`Tile` per hit (rank,
    score, file name; an unreadable or path-less entry is a placeholder)."""
    import cv2

    query_img = load_bgr(query).copy()
    if bbox is not None:
        x1, y1, x2, y2 = (int(round(v)) for v in bbox)
        cv2.rectangle(query_img, (x1, y1), (x2, y2), FRAME_COLORS["query"], max(2, max(query_img.shape[:2]) // 150))
    tiles = []
    for rank, hit in enumerate(hits, start=1):
        image = None
        if hit.path:
            try:
                image = load_bgr(hit.path)
            except (OSError, ValueError) as exc:
                logger.warning("grid: cannot show id %d: %s", hit.id, exc)
        tiles.append(Tile(image, label="result", rank=rank, score=hit.score,
                          name=Path(hit.path).name if hit.path else f"id {hit.id}"))
    return query_img, tiles


def write_grid(path: str | os.PathLike, query: str | os.PathLike, hits: Sequence[Hit], *,
               bbox: Sequence[float] | None = None, cols: int = COLUMNS, title: str = "") -> Path:
    """Write a PNG (or JPEG, by suffix) of the query followed by its hits (see :func:`query_tiles`)."""
    query_img, tiles = query_tiles(query, hits, bbox=bbox)
    return save_ranking_grid(path, query=query_img, hits=tiles, query_name=Path(query).name, cols=cols,
                             title=title)
