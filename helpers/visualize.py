"""The one ranking grid: a query and its ranked results as framed thumbnails with rank, score and file name, and
a legend, written as one PNG. The evaluation's result grids use it, and so can any command that shows a ranking.

    hits = [Tile(image, label="positive", rank=1, score=0.8123, name="img_0042.jpg"), ...]
    save_ranking_grid("q3.png", query=query_crop, hits=hits, title="synth  CVNet-Global R50  query 3")

Frames: the query blue, a positive green, a negative red, junk grey (labels from the ground truth, Medium
protocol: :func:`result_labels`); ``result`` (no ground truth, e.g. a search over your own photos) dark grey.
Scores are printed with :func:`score_decimals` digits: 4, or more where neighbouring scores would read the same.
"""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.errors import InvalidValueError, ProjectIOError
from common.io import atomic_write, check_output_file, printable_path

logger = logging.getLogger(__name__)

#: Frame colours, BGR (OpenCV's order).
FRAME_COLORS: dict[str, tuple[int, int, int]] = {
    "query": (212, 119, 31),
    "positive": (58, 156, 26),
    "negative": (40, 39, 214),
    "junk": (160, 160, 160),
    "result": (90, 90, 90),
}
#: What the legend calls each frame.
LEGEND_TEXT = {"query": "query", "positive": "positive", "negative": "negative", "junk": "junk",
               "result": "result"}
BACKGROUND = (255, 255, 255)
TEXT = (40, 40, 40)
PLACEHOLDER = (225, 225, 225)
ASPECT = 4 / 3  # thumbnail boxes are landscape, as most photos of landmarks are


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


# --------------------------------------------------------------------------------------------------------------
# Scores as text
# --------------------------------------------------------------------------------------------------------------


def score_decimals(scores: Sequence[float | None], *, minimum: int = 4, maximum: int = 8) -> int:
    """Digits after the point that tell neighbouring scores apart: ``minimum``, or more (up to ``maximum``) while
    two different neighbours (in the given order, None / NaN skipped) would print the same."""
    values = [float(s) for s in scores if s is not None and not math.isnan(float(s))]
    for digits in range(minimum, maximum + 1):
        if all(a == b or f"{a:.{digits}f}" != f"{b:.{digits}f}" for a, b in zip(values, values[1:])):
            return digits
    return maximum


def format_scores(scores: Sequence[float | None], **kw: int) -> list[str]:
    """``scores`` as text with :func:`score_decimals` digits; None / NaN -> "" (no score)."""
    digits = score_decimals(scores, **kw)
    return ["" if s is None or math.isnan(float(s)) else f"{float(s):.{digits}f}" for s in scores]


# --------------------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tile:
    """One thumbnail of a grid: a uint8 BGR (H, W, 3) image (None: a grey placeholder, e.g. an unreadable file),
    its frame's label (a key of :data:`FRAME_COLORS`), and its caption: rank, score (None: none shown), name."""

    image: np.ndarray | None
    label: str = "result"
    rank: int | None = None
    score: float | None = None
    name: str = ""


@dataclass(frozen=True)
class _Layout:
    box_w: int
    box_h: int
    border: int
    font: float
    line: int  # caption line height, px
    pad: int

    @property
    def tile_w(self) -> int:
        return self.box_w + 2 * self.border

    @property
    def tile_h(self) -> int:
        return self.box_h + 2 * self.border + 2 * self.line + self.pad


def _layout(tile: int) -> _Layout:
    border = max(2, round(tile / 32))
    box_w = max(round(tile * ASPECT), 64)  # room for "#10  0.1234" even on small tiles
    font = min(0.5, max(0.32, box_w / 340))
    return _Layout(box_w=box_w, box_h=tile, border=border, font=font, line=round(30 * font) + 4, pad=4)


def _text_width(text: str, font: float) -> int:
    return _cv2().getTextSize(text, _cv2().FONT_HERSHEY_SIMPLEX, font, 1)[0][0]


def fit_text(text: str, width: int, font: float) -> str:
    """``text``, shortened in the middle with ``..`` until it is at most ``width`` pixels wide at ``font``."""
    if _text_width(text, font) <= width:
        return text
    keep = len(text)
    while keep > 1:
        keep -= 1
        head = (keep + 1) // 2
        short = f"{text[:head]}..{text[len(text) - (keep - head):] if keep - head else ''}"
        if _text_width(short, font) <= width:
            return short
    return ".."


def _put(canvas: np.ndarray, text: str, x: int, y: int, font: float, color=TEXT, bold: bool = False) -> None:
    _cv2().putText(canvas, text, (x, y), _cv2().FONT_HERSHEY_SIMPLEX, font, color, 2 if bold else 1,
                   _cv2().LINE_AA)


def _framed_box(image: np.ndarray | None, lay: _Layout, label: str) -> np.ndarray:
    """The image fitted (aspect kept, centred) into the box, inside a frame of the label's colour."""
    cv2 = _cv2()
    box = np.full((lay.box_h, lay.box_w, 3), PLACEHOLDER, dtype=np.uint8)
    if image is None:
        _put(box, "no image", 4, lay.box_h // 2, lay.font, (120, 120, 120))
    else:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise InvalidValueError(f"expected a uint8 (H, W, 3) image, got {image.dtype} {image.shape}")
        h, w = image.shape[:2]
        scale = min(lay.box_w / w, lay.box_h / h)
        nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
        small = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        y, x = (lay.box_h - nh) // 2, (lay.box_w - nw) // 2
        box[y : y + nh, x : x + nw] = small
    b = lay.border
    return cv2.copyMakeBorder(box, b, b, b, b, cv2.BORDER_CONSTANT, value=FRAME_COLORS[label])


def _draw_tile(canvas: np.ndarray, y: int, x: int, tile: Tile, score_text: str, lay: _Layout) -> None:
    if tile.label not in FRAME_COLORS:
        raise InvalidValueError(f"unknown label {tile.label!r}; expected one of {sorted(FRAME_COLORS)}")
    framed = _framed_box(tile.image, lay, tile.label)
    canvas[y : y + framed.shape[0], x : x + framed.shape[1]] = framed
    base = y + framed.shape[0] + lay.line - 4
    head = "query" if tile.label == "query" else (f"#{tile.rank}" if tile.rank is not None else "")
    _put(canvas, head, x, base, lay.font, FRAME_COLORS[tile.label] if tile.label == "query" else TEXT, bold=True)
    if score_text:
        _put(canvas, score_text, x + lay.tile_w - _text_width(score_text, lay.font), base, lay.font)
    if tile.name:
        _put(canvas, fit_text(tile.name, lay.tile_w, lay.font), x, base + lay.line, lay.font)


def _legend(labels: Sequence[str], width: int, lay: _Layout, title: str) -> np.ndarray:
    """A strip at least ``width`` wide (wider when the swatches need it): the title on the left, a swatch and the
    name of each label on the right."""
    h = lay.line + 8
    sw = lay.line - 6
    items = [(lab, LEGEND_TEXT[lab]) for lab in labels]
    widths = [sw + 4 + _text_width(text, lay.font) + 12 for _, text in items]
    strip = np.full((h, max(width, sum(widths) + 4), 3), BACKGROUND, dtype=np.uint8)
    x = strip.shape[1] - sum(widths)
    if title:
        _put(strip, fit_text(title, max(x - 16, 0), lay.font), 4, h - 8, lay.font, bold=True)
    for (lab, text), w in zip(items, widths):
        _cv2().rectangle(strip, (x, 4), (x + sw, 4 + sw), FRAME_COLORS[lab], -1)
        _put(strip, text, x + sw + 4, h - 8, lay.font)
        x += w
    return strip


GROUND_TRUTH_LEGEND = ("query", "positive", "negative", "junk")


def ranking_grid(*, query: np.ndarray | None, hits: Sequence[Tile], tile: int = 128, cols: int | None = None,
                 query_name: str = "", title: str = "", legend: bool | Sequence[str] = True) -> np.ndarray:
    """The query (blue frame, caption ``query`` and ``query_name``) then ``hits`` in the order given, each a
    ``tile``-pixel-high framed thumbnail with its rank, score and name below, ``cols`` tiles a row (None: one row),
    under a legend (with ``title`` on its left) of the labels shown, or of the labels listed in ``legend``
    (e.g. :data:`GROUND_TRUTH_LEGEND`), or none (False). Returns the (H, W, 3) uint8 BGR image."""
    lay = _layout(tile)
    tiles = [Tile(query, label="query", name=query_name), *hits]
    scores = format_scores([h.score for h in hits])
    texts = ["", *scores]
    cols = len(tiles) if cols is None else max(1, min(cols, len(tiles)))
    rows = math.ceil(len(tiles) / cols)
    gap = max(6, lay.border * 2)
    width = gap + cols * (lay.tile_w + gap)
    body = np.full((rows * (lay.tile_h + gap), width, 3), BACKGROUND, dtype=np.uint8)
    for k, (t, text) in enumerate(zip(tiles, texts)):
        r, c = divmod(k, cols)
        _draw_tile(body, r * (lay.tile_h + gap), gap + c * (lay.tile_w + gap), t, text, lay)
    if legend is False:
        return body
    if legend is True:
        shown = [lab for lab in FRAME_COLORS if any(t.label == lab for t in tiles)]
    else:
        shown = list(legend)
    head = _legend(shown, width, lay, title)
    if head.shape[1] > width:  # a legend wider than a short ranking: widen the grid to it
        body = np.pad(body, ((0, 0), (0, head.shape[1] - width), (0, 0)), constant_values=BACKGROUND[0])
    return np.concatenate([head, body], axis=0)


#: The file name endings a grid can be written as (OpenCV's encoders by suffix; PNG keeps the text sharp).
GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def check_grid_path(path: str | os.PathLike, *, overwrite: bool = True, flag: str = "--overwrite") -> Path:
    """Check, before the work that draws it, that a grid can be written at ``path``: a file name ending in one
    of :data:`GRID_SUFFIXES` (not a folder, not a name without one), in a folder that can be written, and not an
    existing file unless ``overwrite`` (:func:`common.io.check_output_file`)."""
    return check_output_file(path, overwrite=overwrite, what="grid image", suffixes=GRID_SUFFIXES, flag=flag)


def save_ranking_grid(path: str | os.PathLike, *, query: np.ndarray | None, hits: Sequence[Tile],
                      overwrite: bool = True, **kw: Any) -> Path:
    """Draw :func:`ranking_grid` (same keywords) and write it at ``path`` (PNG or JPEG, ... by suffix: see
    :func:`check_grid_path`, also what ``overwrite=False`` refuses; folders made). Encoded in memory and
    written atomically (:func:`common.io.atomic_write`), so a path of any bytes works and a failed write leaves
    no partial file."""
    path = check_grid_path(path, overwrite=overwrite)
    ok, encoded = _cv2().imencode(path.suffix.lower(), ranking_grid(query=query, hits=hits, **kw))
    if not ok:
        raise ProjectIOError(f"could not encode the grid image {printable_path(path)} as {path.suffix}")
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(encoded.tobytes()))
    return path
