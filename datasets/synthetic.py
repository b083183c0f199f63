"""The built-in landmark-retrieval benchmark: procedurally drawn landmarks, written in the revisitop layout.

Nothing is downloaded. From one seed this module draws a small landmark-retrieval dataset and writes it exactly
as revisited Oxford/Paris are laid out, so that evaluation reads it through the same code path as roxford5k::

    <root>/<name>/jpg/<image>.jpg          database images and queries (BGR JPEGs, as OpenCV reads them)
    <root>/<name>/gnd_<name>.pkl           {'imlist', 'qimlist', 'gnd': [{'bbx', 'easy', 'hard', 'junk'}, ...]}
    <root>/<name>/views.csv                the view parameters every test image was drawn with, and its label
    <root>/<name>/meta.json                generator, format version and the full SyntheticConfig
    <root>/<name>_train/jpg/<image>.jpg    training views of *other* landmarks
    <root>/<name>_train/train.csv          columns ``image,label``
    <root>/<name>_train/meta.json

How it is drawn. Each landmark is a scene on a canvas larger than the images (sky, hills, ground, trees and one
building-like structure: textured facade, window grid, towers, arches, rose windows, a clock, a panel holding a
random binary code). Every image is a view of a scene through a homography (scale, shift, in-plane rotation and
keystone "tilt"), then occluders, lighting/contrast/colour changes, blur and noise. Distractors are views of
unrelated scenes (other buildings, landscapes, abstract textures).

Labels. They are decided from what was drawn, never by hand. ``visible`` is the fraction of the landmark's
pixels (on the canvas) that end up inside the view and not behind an occluder. A database view is

* **junk** when ``visible < junk_max_visible`` (default 0.25): the landmark is barely in the picture;
* **easy** when ``visible >= easy_min_visible`` (0.7) *and* the viewpoint change is small: ``|tilt| <=
  easy_max_tilt`` (0.12, the keystone of either axis), ``|rotation| <= easy_max_rotation`` (8 degrees) and
  ``max(scale, 1/scale) <= easy_max_zoom`` (1.4, scale 1 being the canonical framing in which the landmark
  spans 75% of the frame);
* **hard** otherwise (strong tilt, rotation, zoom in or out, heavy occlusion, low overlap).

Labels are per image (as in revisitop), so every query of a landmark gets the same easy/hard/junk lists, and
every image of another landmark or distractor is a negative. The first database view of every landmark is drawn
until it is easy and the second until it is hard, so every query has positives of both kinds.
Queries are gentle, unoccluded views showing the whole landmark; their ``bbx`` is the box of the landmark's
outline in the query image (float pixels, ``[x1, y1, x2, y2]``).
The database order is shuffled (seeded), so an index carries no hint of its landmark.

Every random draw comes from a ``numpy.random.Generator`` seeded by ``SeedSequence(seed, spawn_key=...)`` with a
key naming the image, so the same seed gives the same bytes and the images of one landmark do not depend on
how many distractors were asked for.
"""
from __future__ import annotations

import argparse
import colorsys
import csv
import dataclasses
import json
import logging
import math
import os
import pickle
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

#: Bumped whenever the drawing or the layout changes, so that an older build on disk is not taken as current.
FORMAT_VERSION = 1
_GENERATOR = "datasets.synthetic"
#: pickle protocol of the gnd file: 4 stores numpy arrays through ``numpy._core.multiarray._reconstruct``,
#: ``numpy.ndarray`` and ``numpy.dtype`` only (protocol 5 would reference ``numpy._core.numeric._frombuffer``).
_PICKLE_PROTOCOL = 4

# Stream ids of the SeedSequence spawn keys: one per kind of draw.
_S_TEST_SCENE, _S_TEST_VIEW, _S_QUERY, _S_DISTRACTOR, _S_TRAIN_SCENE, _S_TRAIN_VIEW, _S_ORDER = range(7)


@dataclass(frozen=True)
class SyntheticConfig:
    """Everything that decides the generated dataset; stored in ``meta.json`` and compared on rebuild.

    ``image_size`` is (long side, short side) in pixels; a view is landscape or, with probability
    ``portrait_fraction``, portrait. Scenes are drawn on a landscape canvas ``canvas_scale`` times the image.
    ``easy_fraction`` / ``junk_fraction`` set the mix of view kinds *drawn* for database views 3.. (the rest
    are drawn hard); the stored label is then decided by the thresholds below (see the module docstring).
    """

    seed: int = 0
    n_landmarks: int = 12
    views_per_landmark: int = 8
    queries_per_landmark: int = 1
    n_distractors: int = 40
    image_size: tuple[int, int] = (256, 192)
    canvas_scale: float = 2.5
    portrait_fraction: float = 0.25
    train_landmarks: int = 24
    train_views_per_landmark: int = 10
    jpeg_quality: int = 90
    easy_fraction: float = 0.45
    junk_fraction: float = 0.15
    junk_max_visible: float = 0.25
    easy_min_visible: float = 0.7
    easy_max_tilt: float = 0.12
    easy_max_rotation: float = 8.0
    easy_max_zoom: float = 1.4

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if len(self.image_size) != 2 or self.image_size[1] < 32 or self.image_size[0] < self.image_size[1]:
            raise ValueError(f"image_size must be (long, short) with long >= short >= 32, got {self.image_size}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        for field in ("n_landmarks", "views_per_landmark", "queries_per_landmark", "train_landmarks",
                      "train_views_per_landmark"):
            if getattr(self, field) < 1:
                raise ValueError(f"{field} must be >= 1, got {getattr(self, field)}")
        if self.n_distractors < 0:
            raise ValueError(f"n_distractors must be >= 0, got {self.n_distractors}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in [1, 100], got {self.jpeg_quality}")
        if self.canvas_scale < 1.5:
            raise ValueError(f"canvas_scale must be >= 1.5 (views must fit in the scene), got {self.canvas_scale}")
        for field in ("portrait_fraction", "easy_fraction", "junk_fraction"):
            if not 0.0 <= getattr(self, field) <= 1.0:
                raise ValueError(f"{field} must be in [0, 1], got {getattr(self, field)}")
        if self.easy_fraction + self.junk_fraction > 1.0:
            raise ValueError("easy_fraction + junk_fraction must be <= 1")
        if not 0.0 < self.junk_max_visible < self.easy_min_visible <= 1.0:
            raise ValueError("need 0 < junk_max_visible < easy_min_visible <= 1")

    def to_dict(self) -> dict:
        """The config as JSON-ready builtins (tuples as lists), the form stored in ``meta.json``."""
        return json.loads(json.dumps(dataclasses.asdict(self)))


@dataclass(frozen=True)
class ViewParams:
    """The geometry of one view of a scene, and how much it is occluded.

    ``scale`` is relative to the canonical framing (the landmark box spans 75% of the frame); ``offset_*`` shift
    the view centre in landmark widths/heights; ``rotation`` is in-plane, in degrees; ``tilt_*`` is the keystone
    of a camera turned about the vertical (x) or horizontal (y) axis (0 = frontal, 0.3 = strong).
    ``occluders`` shapes of about ``occluder_area`` of the frame each are drawn in front; ``strength`` in [0, 1]
    scales the photometric change.
    """

    scale: float = 1.0
    offset_x: float = 0.0
    offset_y: float = 0.0
    rotation: float = 0.0
    tilt_x: float = 0.0
    tilt_y: float = 0.0
    portrait: bool = False
    occluders: int = 0
    occluder_area: float = 0.0
    strength: float = 0.3


# ----------------------------------------------------------------------------------------------------------------
# Colours and textures
# ----------------------------------------------------------------------------------------------------------------

def _bgr(h: float, s: float, v: float) -> tuple[int, int, int]:
    """An HSV colour (all in [0, 1], hue wrapping) as an OpenCV BGR triple."""
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (int(round(b * 255)), int(round(g * 255)), int(round(r * 255)))


def _smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """(h, w) float32 noise of unit-ish amplitude, smooth over ``cell`` pixels (upsampled white noise)."""
    gh, gw = max(2, int(h / cell) + 2), max(2, int(w / cell) + 2)
    small = rng.standard_normal((gh, gw), dtype=np.float32)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _texture(rng: np.random.Generator, kind: str, h: int, w: int, color: tuple[int, int, int]) -> np.ndarray:
    """(h, w, 3) uint8 surface texture around ``color``: bricks, blocks, tiles, courses, grating or noise."""
    base = np.asarray(color, dtype=np.float32)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind in ("bricks", "blocks", "tiles"):
        bh = {"bricks": rng.uniform(4, 8), "blocks": rng.uniform(10, 18), "tiles": rng.uniform(3, 6)}[kind]
        bw = bh * rng.uniform(1.6, 3.0)
        row = (yy // bh).astype(np.int64)
        shifted = xx + (row % 2) * (bw / 2)
        col = (shifted // bw).astype(np.int64)
        # one brightness per brick: what makes a wall recognisable at a glance
        jitter = rng.normal(0.0, 0.08, (64, 64)).astype(np.float32)
        shade = 1.0 + jitter[row % 64, col % 64]
        joint = ((yy % bh) < 1.0) | ((shifted % bw) < 1.0)
        shade = np.where(joint, rng.uniform(0.55, 0.75) if rng.random() < 0.7 else 1.3, shade)
    elif kind == "courses":
        period = rng.uniform(5, 14)
        shade = 1.0 + rng.uniform(0.08, 0.18) * np.sign(np.sin(2 * np.pi * yy / period))
    elif kind == "grating":
        theta, period = rng.uniform(0, np.pi), rng.uniform(3, 9)
        shade = 1.0 + rng.uniform(0.1, 0.2) * np.sin(2 * np.pi * (xx * np.cos(theta) + yy * np.sin(theta)) / period)
    elif kind == "noise":
        shade = 1.0 + 0.12 * _smooth_noise(rng, h, w, rng.uniform(2, 6))
    else:
        raise ValueError(f"unknown texture kind {kind!r}")
    weathering = 1.0 - 0.12 * yy / max(h, 1) * rng.uniform(-1, 1)
    return np.clip(base * (shade * weathering)[..., None], 0, 255).astype(np.uint8)


def _paint(canvas: np.ndarray, mask: np.ndarray | None, box: tuple[int, int, int, int],
           draw: Callable[[np.ndarray, int, int], None], tex: np.ndarray | tuple[int, int, int]) -> None:
    """Fill the shape that ``draw(patch, ox, oy)`` traces (255 on a local patch whose origin is (ox, oy)).

    The patch covers ``box`` = (x1, y1, x2, y2) clipped to the canvas; ``tex`` is a colour or an image of the
    box's size. Painted pixels join the landmark ``mask`` when one is given.
    """
    x1, y1, x2, y2 = box
    cx1, cy1 = max(x1, 0), max(y1, 0)
    cx2, cy2 = min(x2, canvas.shape[1]), min(y2, canvas.shape[0])
    if cx2 <= cx1 or cy2 <= cy1:
        return
    patch = np.zeros((y2 - y1, x2 - x1), np.uint8)
    draw(patch, x1, y1)
    sel = patch[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1] > 0
    region = canvas[cy1:cy2, cx1:cx2]
    if isinstance(tex, np.ndarray):
        region[sel] = tex[cy1 - y1:cy2 - y1, cx1 - x1:cx2 - x1][sel]
    else:
        region[sel] = tex
    if mask is not None:
        mask[cy1:cy2, cx1:cx2][sel] = 255


def _rect_draw(x1: int, y1: int, x2: int, y2: int) -> Callable[[np.ndarray, int, int], None]:
    def draw(patch: np.ndarray, ox: int, oy: int) -> None:
        patch[max(y1 - oy, 0):y2 - oy, max(x1 - ox, 0):x2 - ox] = 255
    return draw


def _poly_draw(pts: np.ndarray) -> Callable[[np.ndarray, int, int], None]:
    def draw(patch: np.ndarray, ox: int, oy: int) -> None:
        cv2.fillPoly(patch, [np.round(pts - (ox, oy)).astype(np.int32)], 255)
    return draw


def _ellipse_draw(cx: float, cy: float, ax: float, ay: float, start: float = 0, end: float = 360
                  ) -> Callable[[np.ndarray, int, int], None]:
    def draw(patch: np.ndarray, ox: int, oy: int) -> None:
        cv2.ellipse(patch, (int(round(cx - ox)), int(round(cy - oy))), (max(int(ax), 1), max(int(ay), 1)),
                    0, start, end, 255, -1)
    return draw


# ----------------------------------------------------------------------------------------------------------------
# Scenes
# ----------------------------------------------------------------------------------------------------------------

def _draw_tree(canvas: np.ndarray, rng: np.random.Generator, x: float, base: float, size: float) -> None:
    trunk = _bgr(rng.uniform(0.05, 0.1), rng.uniform(0.4, 0.7), rng.uniform(0.2, 0.4))
    cv2.rectangle(canvas, (int(x - size * 0.08), int(base - size * 0.6)), (int(x + size * 0.08), int(base)),
                  trunk, -1)
    for _ in range(int(rng.integers(2, 5))):
        leaf = _bgr(rng.uniform(0.22, 0.4), rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.55))
        cx, cy = x + rng.uniform(-0.3, 0.3) * size, base - size * rng.uniform(0.6, 1.0)
        cv2.circle(canvas, (int(cx), int(cy)), int(size * rng.uniform(0.25, 0.45)), leaf, -1, cv2.LINE_AA)


def _border_fade(h: int, w: int, margin: float) -> np.ndarray:
    """(h, w) float32 weight rising from 0 at the canvas border to 1 at ``margin`` pixels inside."""
    ry = np.clip(np.minimum(np.arange(h), np.arange(h)[::-1]) / margin, 0, 1).astype(np.float32)
    rx = np.clip(np.minimum(np.arange(w), np.arange(w)[::-1]) / margin, 0, 1).astype(np.float32)
    return np.minimum(ry[:, None], rx[None, :])


def _draw_background(rng: np.random.Generator, width: int, height: int) -> tuple[np.ndarray, int]:
    """(H, W, 3) uint8 sky, clouds, hills and ground; returns the canvas and the horizon row.

    Nothing with texture touches the canvas border: views reaching past the canvas replicate its edge, and a
    flat edge continues as a plausible sky or foreground instead of streaks.
    """
    horizon = int(height * rng.uniform(0.62, 0.74))
    top = np.asarray(_bgr(rng.uniform(0.52, 0.68), rng.uniform(0.25, 0.75), rng.uniform(0.55, 1.0)), np.float32)
    low = np.asarray(_bgr(rng.uniform(-0.1, 0.6), rng.uniform(0.0, 0.35), rng.uniform(0.75, 1.0)), np.float32)
    t = np.linspace(0.0, 1.0, horizon, dtype=np.float32)[:, None, None]
    sky = np.broadcast_to(top * (1 - t) + low * t, (horizon, width, 3))
    n_clouds = int(rng.integers(0, 5))
    if n_clouds:  # drawn at quarter resolution: they are blurred anyway
        small = np.zeros((max(horizon // 4, 1), max(width // 4, 1)), np.float32)
        for _ in range(n_clouds):
            ax, ay = rng.uniform(5, 20), rng.uniform(1.5, 5)
            cx = rng.uniform(ax + 8, small.shape[1] - ax - 8)
            cy = rng.uniform(ay + 8, max(small.shape[0] * 0.6, ay + 9))
            cv2.ellipse(small, (int(cx), int(cy)), (int(ax), int(ay)), 0, 0, 360, 1.0, -1)
        clouds = cv2.resize(cv2.GaussianBlur(small, (0, 0), 1.5), (width, horizon), interpolation=cv2.INTER_LINEAR)
        clouds = (clouds * rng.uniform(0.4, 0.9))[..., None]
        sky = sky * (1 - clouds) + 245.0 * clouds
    g_far = np.asarray(_bgr(rng.uniform(0.08, 0.38), rng.uniform(0.25, 0.7), rng.uniform(0.3, 0.6)), np.float32)
    g_near = np.asarray(_bgr(rng.uniform(0.05, 0.38), rng.uniform(0.2, 0.7), rng.uniform(0.2, 0.5)), np.float32)
    gh = height - horizon
    t = np.linspace(0.0, 1.0, gh, dtype=np.float32)[:, None, None]
    grain = _smooth_noise(rng, gh, width, 4.0) * _border_fade(gh, width, 40.0)
    ground = (g_far * (1 - t) + g_near * t) * (1.0 + 0.1 * grain)[..., None]
    canvas = np.clip(np.concatenate([sky, ground], 0), 0, 255).astype(np.uint8)
    # distant hills: low-detail context, so views beside the landmark are not blank
    xs = np.linspace(0, width, 12)
    ys = horizon - np.abs(rng.normal(0, 1, 12)) * height * 0.06 - height * 0.02
    hill = np.concatenate([np.stack([xs, ys], 1), [[width, horizon], [0, horizon]]]).astype(np.int32)
    cv2.fillPoly(canvas, [hill], _bgr(rng.uniform(0.2, 0.65), rng.uniform(0.1, 0.4), rng.uniform(0.4, 0.7)),
                 cv2.LINE_AA)
    return canvas, horizon


def _draw_frieze(canvas: np.ndarray, rng: np.random.Generator, x1: int, x2: int, y: int, h: int,
                 color: tuple[int, int, int], back: tuple[int, int, int]) -> None:
    """A decorative band between floors: checker, zigzag or dots, a high-frequency mark of the landmark."""
    cv2.rectangle(canvas, (x1, y), (x2, y + h), back, -1)
    kind = rng.integers(3)
    step = max(h, 3)
    for i, x in enumerate(range(x1, x2 - step + 1, step)):
        if kind == 0 and i % 2 == 0:
            cv2.rectangle(canvas, (x, y), (x + step // 2, y + h), color, -1)
        elif kind == 1:
            cv2.line(canvas, (x, y + h), (x + step // 2, y), color, 1)
            cv2.line(canvas, (x + step // 2, y), (x + step, y + h), color, 1)
        elif kind == 2:
            cv2.circle(canvas, (x + step // 2, y + h // 2), max(h // 3, 1), color, -1)


def _draw_window(canvas: np.ndarray, x: int, y: int, w: int, h: int, style: int, glass: tuple[int, int, int],
                 frame: tuple[int, int, int], mullion: bool) -> None:
    if style == 2:  # round
        r = max(min(w, h) // 2, 2)
        cv2.circle(canvas, (x + w // 2, y + h // 2), r, frame, -1, cv2.LINE_AA)
        cv2.circle(canvas, (x + w // 2, y + h // 2), max(r - 2, 1), glass, -1, cv2.LINE_AA)
        return
    cv2.rectangle(canvas, (x - 1, y - 1), (x + w + 1, y + h + 1), frame, -1)
    cv2.rectangle(canvas, (x, y), (x + w, y + h), glass, -1)
    if style == 1:  # arched: a half disc on top
        cv2.ellipse(canvas, (x + w // 2, y), (w // 2 + 1, w // 2 + 1), 0, 180, 360, frame, -1, cv2.LINE_AA)
        cv2.ellipse(canvas, (x + w // 2, y), (max(w // 2, 1), max(w // 2, 1)), 0, 180, 360, glass, -1)
    if mullion:
        cv2.line(canvas, (x + w // 2, y), (x + w // 2, y + h), frame, 1)
        cv2.line(canvas, (x, y + h // 2), (x + w, y + h // 2), frame, 1)


def _draw_rose(canvas: np.ndarray, rng: np.random.Generator, cx: int, cy: int, r: int,
               colors: list[tuple[int, int, int]]) -> None:
    """A rose window: concentric rings and a random number of spokes."""
    cv2.circle(canvas, (cx, cy), r, colors[0], -1, cv2.LINE_AA)
    cv2.circle(canvas, (cx, cy), int(r * 0.8), colors[1], -1, cv2.LINE_AA)
    spokes = int(rng.integers(6, 17))
    for k in range(spokes):
        a = 2 * np.pi * k / spokes
        cv2.line(canvas, (cx, cy), (int(cx + r * 0.8 * np.cos(a)), int(cy + r * 0.8 * np.sin(a))), colors[0], 1,
                 cv2.LINE_AA)
    cv2.circle(canvas, (cx, cy), max(int(r * 0.25), 1), colors[2], -1, cv2.LINE_AA)


def _draw_code_panel(canvas: np.ndarray, rng: np.random.Generator, x: int, y: int, cell: int, n: int,
                     colors: tuple[tuple[int, int, int], tuple[int, int, int]]) -> None:
    """A panel of n x n random binary cells: a landmark-specific code a matcher can latch onto."""
    bits = rng.random((n, n)) < 0.5
    cv2.rectangle(canvas, (x - 2, y - 2), (x + n * cell + 1, y + n * cell + 1), colors[0], -1)
    for i in range(n):
        for j in range(n):
            cv2.rectangle(canvas, (x + j * cell, y + i * cell), (x + (j + 1) * cell - 1, y + (i + 1) * cell - 1),
                          colors[int(bits[i, j])], -1)


def _draw_clock(canvas: np.ndarray, rng: np.random.Generator, cx: int, cy: int, r: int,
                face: tuple[int, int, int], ink: tuple[int, int, int]) -> None:
    cv2.circle(canvas, (cx, cy), r, ink, -1, cv2.LINE_AA)
    cv2.circle(canvas, (cx, cy), max(r - 2, 1), face, -1, cv2.LINE_AA)
    for k in range(12):
        a = 2 * np.pi * k / 12
        cv2.line(canvas, (int(cx + 0.7 * r * np.cos(a)), int(cy + 0.7 * r * np.sin(a))),
                 (int(cx + 0.9 * r * np.cos(a)), int(cy + 0.9 * r * np.sin(a))), ink, 1)
    for length in (0.5, 0.8):
        a = rng.uniform(0, 2 * np.pi)
        cv2.line(canvas, (cx, cy), (int(cx + length * r * np.cos(a)), int(cy + length * r * np.sin(a))), ink, 1,
                 cv2.LINE_AA)


def _cap_draw(style: int, x1: int, x2: int, base: int, height: int) -> Callable[[np.ndarray, int, int], None]:
    """A roof or tower cap over [x1, x2] standing on row ``base``: 0 gable/spire, 1 dome."""
    if style == 0:
        return _poly_draw(np.array([[x1, base], [(x1 + x2) / 2, base - height], [x2, base]], np.float64))
    return _ellipse_draw((x1 + x2) / 2, base, (x2 - x1) / 2, height, 180, 360)


def _draw_crenels(canvas: np.ndarray, mask: np.ndarray, x1: int, x2: int, top: int, size: int,
                  color: tuple[int, int, int]) -> None:
    for x in range(x1, x2 - size + 1, 2 * size):
        _paint(canvas, mask, (x, top - size, x + size, top), _rect_draw(x, top - size, x + size, top), color)


def _draw_building(canvas: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                   box: tuple[int, int, int, int]) -> None:
    """One landmark in ``box`` = (x1, y1, x2, y2): body, roof, towers and facade details; fills ``mask``."""
    x1, y1, x2, y2 = box
    lw, lh = x2 - x1, y2 - y1
    hue = rng.random()
    facade = _bgr(hue, rng.uniform(0.1, 0.55), rng.uniform(0.55, 0.92))
    accent = _bgr(hue + rng.uniform(0.25, 0.75), rng.uniform(0.4, 0.9), rng.uniform(0.35, 0.9))
    roof = _bgr(hue + rng.uniform(-0.15, 0.15) + 0.5 * (rng.random() < 0.4), rng.uniform(0.3, 0.8),
                rng.uniform(0.2, 0.55))
    glass = _bgr(rng.uniform(0.5, 0.7), rng.uniform(0.1, 0.5), rng.uniform(0.05, 0.3))
    frame = _bgr(hue + rng.uniform(-0.1, 0.1), rng.uniform(0.0, 0.3), rng.uniform(0.75, 1.0))
    wall_kinds = ("bricks", "blocks", "courses", "noise", "grating")
    n_towers = int(rng.choice(3, p=[0.3, 0.35, 0.35]))
    roof_style = int(rng.integers(4))  # 0 gable, 1 dome, 2 crenellated, 3 flat with cornice
    tower_w = int(lw * rng.uniform(0.13, 0.2))
    if n_towers:
        body_top = y1 + int(lh * rng.uniform(0.35, 0.5))
        roof_h = int((body_top - y1) * rng.uniform(0.4, 0.7)) if roof_style < 2 else 0
    else:
        roof_h = int(lh * rng.uniform(0.18, 0.3)) if roof_style < 2 else 0
        body_top = y1 + roof_h + (int(lh * 0.05) if roof_style == 2 else 0)
    bx1, bx2 = (x1 + tower_w // 2, x2 - tower_w // 2) if n_towers == 2 else (x1, x2)

    def tower(tx1: int, tx2: int) -> None:
        cap = int(rng.integers(3))  # 0 spire, 1 dome, 2 crenellated
        cap_h = int(lh * rng.uniform(0.1, 0.2)) if cap < 2 else 0
        top = y1 + cap_h + (int(lh * 0.04) if cap == 2 else 0)
        tex = _texture(rng, str(rng.choice(wall_kinds)), y2 - top, tx2 - tx1, accent if rng.random() < 0.4 else facade)
        _paint(canvas, mask, (tx1, top, tx2, y2), _rect_draw(tx1, top, tx2, y2), tex)
        if cap < 2:
            _paint(canvas, mask, (tx1 - 2, top - cap_h - 1, tx2 + 2, top + 1),
                   _cap_draw(cap, tx1 - 2, tx2 + 2, top, cap_h), roof)
        else:
            _draw_crenels(canvas, mask, tx1, tx2, top, max(tower_w // 5, 2), facade)
        slit_w, slit_h = max(tower_w // 5, 2), max(int(lh * 0.06), 4)
        for y in range(top + slit_h, body_top - slit_h, int(slit_h * 2.2)):
            _draw_window(canvas, (tx1 + tx2) // 2 - slit_w // 2, y, slit_w, slit_h, 1, glass, frame, False)
        if rng.random() < 0.5:
            r = max(int(tower_w * 0.32), 3)
            _draw_clock(canvas, rng, (tx1 + tx2) // 2, top + r + 3, r, frame, glass)

    if n_towers == 1:  # a central tower stands behind the body
        cx = (x1 + x2) // 2
        tower(cx - tower_w // 2, cx + tower_w // 2)
    tex = _texture(rng, str(rng.choice(wall_kinds)), y2 - body_top, bx2 - bx1, facade)
    _paint(canvas, mask, (bx1, body_top, bx2, y2), _rect_draw(bx1, body_top, bx2, y2), tex)
    if roof_style < 2:
        tex = _texture(rng, "tiles", roof_h + 2, bx2 - bx1 + 6, roof)
        _paint(canvas, mask, (bx1 - 3, body_top - roof_h - 1, bx2 + 3, body_top + 1),
               _cap_draw(roof_style, bx1 - 3, bx2 + 3, body_top, roof_h), tex)
    elif roof_style == 2:
        _draw_crenels(canvas, mask, bx1, bx2, body_top, max(int(lw * 0.03), 3), facade)
    else:
        cv2.rectangle(canvas, (bx1, body_top), (bx2, body_top + max(int(lh * 0.03), 3)), accent, -1)
    if n_towers == 2:
        tower(x1, x1 + tower_w)
        tower(x2 - tower_w, x2)

    # facade: door, window grid, friezes, pilasters, rose window, code panel
    fx1, fx2 = (x1 + tower_w, x2 - tower_w) if n_towers == 2 else (bx1, bx2)
    fw, floor_h = fx2 - fx1, y2 - body_top
    door_w, door_h = int(fw * rng.uniform(0.1, 0.2)), int(floor_h * rng.uniform(0.25, 0.4))
    dcx = (fx1 + fx2) // 2
    for k, col in enumerate((frame, accent, glass)):  # archivolts around a dark arched door
        g = 3 * (2 - k)
        cv2.rectangle(canvas, (dcx - door_w // 2 - g, y2 - door_h + door_w // 2 - g), (dcx + door_w // 2 + g, y2),
                      col, -1)
        cv2.ellipse(canvas, (dcx, y2 - door_h + door_w // 2), (door_w // 2 + g, door_w // 2 + g), 0, 180, 360,
                    col, -1, cv2.LINE_AA)
    top_margin = int(floor_h * 0.08) + (3 if roof_style == 3 else 0)
    win_y1, win_y2 = body_top + top_margin, y2 - door_h - int(floor_h * 0.06)
    rows = int(np.clip((win_y2 - win_y1) / rng.uniform(24, 40), 1, 5))
    cols = int(np.clip(fw / rng.uniform(18, 32), 2, 9))
    cell_w, cell_h = fw / cols, max(win_y2 - win_y1, 8) / rows
    ww, wh = max(int(cell_w * rng.uniform(0.35, 0.6)), 3), max(int(cell_h * rng.uniform(0.4, 0.65)), 4)
    style, mullion = int(rng.integers(3)), bool(rng.random() < 0.5)
    if rng.random() < 0.4:
        light = tuple(min(int(c * 1.15) + 10, 255) for c in facade)
        for c in range(cols + 1):
            px = int(fx1 + c * cell_w) - 2
            cv2.rectangle(canvas, (px, body_top + 2), (px + 3, y2), light, -1)
    frieze = rng.random() < 0.6
    frieze_h = int(rng.integers(3, 7))
    for r in range(rows):
        ry = int(win_y1 + r * cell_h)
        for c in range(cols):
            wx = int(fx1 + c * cell_w + (cell_w - ww) / 2)
            wy = ry + int((cell_h - wh) * 0.6)
            if abs(wx + ww / 2 - dcx) < door_w and wy + wh > y2 - door_h - 4:
                continue
            _draw_window(canvas, wx, wy, ww, wh, style, glass, frame, mullion)
        if frieze and r > 0:
            _draw_frieze(canvas, rng, fx1, fx2, ry - frieze_h // 2, frieze_h, accent, frame)
    if (n_towers or roof_style < 2) and rng.random() < 0.7:
        r = int(min(fw * 0.09, max(roof_h, 10) * 0.45, 18))
        if r >= 4:
            cy = body_top - roof_h // 2 if roof_h > 2.5 * r else win_y1 + r
            _draw_rose(canvas, rng, dcx, cy, r, [frame, glass, accent])
    if rng.random() < 0.8:
        n, cell = int(rng.integers(5, 8)), int(rng.integers(2, 4))
        ink = (20, 20, 20) if rng.random() < 0.5 else glass
        _draw_code_panel(canvas, rng, dcx - n * cell // 2, y2 - door_h - n * cell - 6, cell, n, (frame, ink))


def _landmark_box(rng: np.random.Generator, width: int, height: int, horizon: int) -> tuple[int, int, int, int]:
    lw, lh = int(width * rng.uniform(0.34, 0.46)), int(height * rng.uniform(0.45, 0.6))
    cx = width / 2 + rng.uniform(-0.04, 0.04) * width
    bottom = min(horizon + int(height * rng.uniform(0.02, 0.06)), height - 1)
    x1 = int(cx - lw / 2)
    return x1, bottom - lh, x1 + lw, bottom


def draw_landmark_scene(rng: np.random.Generator, *, width: int, height: int
                        ) -> tuple[np.ndarray, np.ndarray, tuple[int, int, int, int]]:
    """A landmark scene: (H, W, 3) uint8 BGR canvas, (H, W) uint8 landmark mask (255 on the structure), and
    the landmark box (x1, y1, x2, y2) on the canvas."""
    canvas, horizon = _draw_background(rng, width, height)
    box = _landmark_box(rng, width, height, horizon)
    for _ in range(int(rng.integers(2, 6))):  # trees beside, never on, the landmark
        size = height * rng.uniform(0.08, 0.16)
        side = rng.random() < 0.5
        x = rng.uniform(size, box[0] - size * 0.5) if side else rng.uniform(box[2] + size * 0.5, width - size)
        _draw_tree(canvas, rng, x, horizon + rng.uniform(0, 0.05) * height, size)
    mask = np.zeros((height, width), np.uint8)
    _draw_building(canvas, mask, rng, box)
    return canvas, mask, box


def draw_unrelated_scene(rng: np.random.Generator, *, width: int, height: int
                         ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """A distractor scene (another building, a landscape or abstract textures): (H, W, 3) uint8 canvas and the
    box a view is framed on."""
    kind = rng.choice(3, p=[0.45, 0.3, 0.25])
    if kind == 0:
        canvas, _, box = draw_landmark_scene(rng, width=width, height=height)
        return canvas, box
    canvas, horizon = _draw_background(rng, width, height)
    box = (int(width * 0.3), int(height * 0.25), int(width * 0.7), int(height * 0.75))
    if kind == 1:  # landscape: a lake and trees
        if rng.random() < 0.6:
            cv2.ellipse(canvas, (int(width * rng.uniform(0.3, 0.7)), int(horizon + (height - horizon) * 0.5)),
                        (int(width * rng.uniform(0.15, 0.3)), int((height - horizon) * 0.3)), 0, 0, 360,
                        _bgr(rng.uniform(0.5, 0.62), rng.uniform(0.3, 0.7), rng.uniform(0.4, 0.8)), -1, cv2.LINE_AA)
        for _ in range(int(rng.integers(4, 12))):
            size = height * rng.uniform(0.08, 0.25)
            _draw_tree(canvas, rng, rng.uniform(size, width - size), horizon + rng.uniform(0, 0.2) * height, size)
        return canvas, box
    for _ in range(int(rng.integers(5, 12))):  # abstract: textured blobs
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        ax, ay = rng.uniform(20, width * 0.2), rng.uniform(20, height * 0.2)
        x1, y1, x2, y2 = int(cx - ax), int(cy - ay), int(cx + ax) + 1, int(cy + ay) + 1
        kind_tex = str(rng.choice(["bricks", "blocks", "courses", "grating", "noise"]))
        tex = _texture(rng, kind_tex, y2 - y1, x2 - x1, _bgr(rng.random(), rng.uniform(0.2, 0.9),
                                                             rng.uniform(0.3, 0.95)))
        draw = _ellipse_draw(cx, cy, ax, ay) if rng.random() < 0.5 else _rect_draw(x1, y1, x2, y2)
        _paint(canvas, None, (x1, y1, x2, y2), draw, tex)
    return canvas, box


# ----------------------------------------------------------------------------------------------------------------
# Views: geometry, visibility, labels, rendering
# ----------------------------------------------------------------------------------------------------------------

def view_size(view: ViewParams, *, image_size: tuple[int, int]) -> tuple[int, int]:
    """(width, height) of a view's image: landscape (long, short) or portrait (short, long)."""
    long, short = image_size
    return (short, long) if view.portrait else (long, short)


def view_homography(view: ViewParams, *, box: tuple[float, float, float, float],
                    out_size: tuple[int, int]) -> np.ndarray:
    """(3, 3) float64 homography from canvas pixels to view pixels.

    The view sees a quadrilateral of the canvas: a rectangle around the (shifted) landmark-box centre, sized so
    that at ``scale`` 1 the box spans 75% of the frame, keystoned by the tilts and rotated in plane.
    """
    x1, y1, x2, y2 = box
    w, h = out_size
    lw, lh = x2 - x1, y2 - y1
    cx, cy = (x1 + x2) / 2 + view.offset_x * lw, (y1 + y2) / 2 + view.offset_y * lh
    zoom = min(0.75 * w / lw, 0.75 * h / lh) * view.scale  # view pixels per canvas pixel
    hw, hh = w / (2 * zoom), h / (2 * zoom)
    tx, ty = view.tilt_x, view.tilt_y
    # a camera turned about the vertical axis sees a taller slice of the scene on one side than on the other
    corners = np.array([[-hw * (1 + ty), -hh * (1 + tx)], [hw * (1 + ty), -hh * (1 - tx)],
                        [hw * (1 - ty), hh * (1 - tx)], [-hw * (1 - ty), hh * (1 + tx)]])
    a = math.radians(view.rotation)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    src = corners @ rot.T + (cx, cy)
    dst = np.array([[0, 0], [w, 0], [w, h], [0, h]], np.float64)
    return cv2.getPerspectiveTransform(src.astype(np.float32), dst.astype(np.float32))


def visible_fraction(landmark_mask: np.ndarray, homography: np.ndarray, *, out_size: tuple[int, int],
                     occluded: np.ndarray | None = None) -> float:
    """Fraction of the landmark's canvas pixels seen by a view: inside the frame and not occluded.

    landmark_mask: (H, W) canvas mask; homography: canvas -> view; occluded: (h, w) view mask (nonzero = hidden).
    """
    w, h = out_size
    seen = np.full((h, w), 255, np.uint8) if occluded is None else np.where(occluded > 0, 0, 255).astype(np.uint8)
    # pull the view's "seen" mask back onto the canvas: dst(p) = src(H p)
    back = cv2.warpPerspective(seen, homography, (landmark_mask.shape[1], landmark_mask.shape[0]),
                               flags=cv2.INTER_NEAREST | cv2.WARP_INVERSE_MAP, borderMode=cv2.BORDER_CONSTANT,
                               borderValue=0)
    total = np.count_nonzero(landmark_mask)
    if total == 0:
        raise ValueError("the landmark mask is empty")
    return float(np.count_nonzero((landmark_mask > 0) & (back > 0)) / total)


def label_view(view: ViewParams, visible: float, *, config: SyntheticConfig) -> str:
    """'easy', 'hard' or 'junk' for a database view, from what was drawn (thresholds: module docstring)."""
    if visible < config.junk_max_visible:
        return "junk"
    small_change = (max(abs(view.tilt_x), abs(view.tilt_y)) <= config.easy_max_tilt
                    and abs(view.rotation) <= config.easy_max_rotation
                    and max(view.scale, 1.0 / view.scale) <= config.easy_max_zoom)
    return "easy" if visible >= config.easy_min_visible and small_change else "hard"


def sample_view(rng: np.random.Generator, *, kind: str, portrait_fraction: float = 0.25) -> ViewParams:
    """Draw view parameters of a kind: 'easy', 'hard', 'junk' (barely overlapping) or 'query' (gentle, whole)."""
    portrait = bool(rng.random() < portrait_fraction)
    if kind == "query":
        return ViewParams(scale=float(rng.uniform(0.8, 0.95)), offset_x=float(rng.uniform(-0.04, 0.04)),
                          offset_y=float(rng.uniform(-0.04, 0.04)), rotation=float(rng.uniform(-3, 3)),
                          tilt_x=float(rng.uniform(-0.06, 0.06)), tilt_y=float(rng.uniform(-0.04, 0.04)),
                          portrait=portrait, strength=float(rng.uniform(0.0, 0.3)))
    easy = dict(scale=float(np.exp(rng.uniform(-np.log(1.3), np.log(1.3)))),
                offset_x=float(rng.uniform(-0.08, 0.08)), offset_y=float(rng.uniform(-0.08, 0.08)),
                rotation=float(rng.uniform(-5, 5)), tilt_x=float(rng.uniform(-0.09, 0.09)),
                tilt_y=float(rng.uniform(-0.06, 0.06)), portrait=portrait,
                occluders=int(rng.integers(0, 2)), occluder_area=float(rng.uniform(0.01, 0.04)),
                strength=float(rng.uniform(0.0, 0.5)))
    if kind == "easy":
        return ViewParams(**easy)
    if kind == "hard":
        p = dict(easy, strength=float(rng.uniform(0.3, 1.0)))
        factors = rng.choice(5, size=int(rng.integers(1, 3)), replace=False)
        for f in factors:
            if f == 0:  # zoom out: the landmark small in a wide view
                p["scale"] = float(rng.uniform(0.45, 0.62))
            elif f == 1:  # zoom in on a part
                p.update(scale=float(rng.uniform(1.6, 2.2)), offset_x=float(rng.uniform(-0.2, 0.2)),
                         offset_y=float(rng.uniform(-0.2, 0.2)))
            elif f == 2:  # strong perspective
                p["tilt_x"] = float(rng.choice([-1, 1]) * rng.uniform(0.18, 0.35))
                p["tilt_y"] = float(rng.uniform(-0.12, 0.12))
            elif f == 3:
                p["rotation"] = float(rng.choice([-1, 1]) * rng.uniform(10, 22))
            else:  # heavy occlusion
                p.update(occluders=int(rng.integers(2, 5)), occluder_area=float(rng.uniform(0.06, 0.14)))
        return ViewParams(**p)
    if kind == "junk":  # look beside or above the landmark, zoomed in, so only a sliver of it shows
        if rng.random() < 0.75:
            off_x, off_y = float(rng.choice([-1, 1]) * rng.uniform(0.7, 1.0)), float(rng.uniform(-0.3, 0.2))
        else:
            off_x, off_y = float(rng.uniform(-0.3, 0.3)), float(-rng.uniform(0.75, 1.0))
        return ViewParams(**dict(easy, scale=float(rng.uniform(1.3, 2.0)), offset_x=off_x, offset_y=off_y,
                                 strength=float(rng.uniform(0.2, 0.8))))
    raise ValueError(f"unknown view kind {kind!r}; expected 'easy', 'hard', 'junk' or 'query'")


def draw_occluders(rng: np.random.Generator, *, out_size: tuple[int, int], count: int, area: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """``count`` random occluders (poles, signs, trees, vehicles as rectangles, ellipses, polygons) of about
    ``area`` of the frame each, biased to the centre where the landmark is: ((h, w, 3) uint8 layer,
    (h, w) uint8 mask)."""
    w, h = out_size
    layer = np.zeros((h, w, 3), np.uint8)
    mask = np.zeros((h, w), np.uint8)
    for _ in range(count):
        a = area * w * h * rng.uniform(0.6, 1.3)
        aspect = float(np.exp(rng.uniform(-1.3, 1.3)))
        sw, sh = math.sqrt(a * aspect), math.sqrt(a / aspect)
        cx = float(np.clip(rng.normal(w / 2, w * 0.25), 0, w))
        cy = float(np.clip(rng.normal(h / 2, h * 0.25), 0, h))
        color = _bgr(rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9))
        shape = np.zeros((h, w), np.uint8)
        kind = rng.integers(3)
        if kind == 0:
            pts = cv2.boxPoints(((cx, cy), (sw, sh), float(rng.uniform(-30, 30))))
            cv2.fillPoly(shape, [np.round(pts).astype(np.int32)], 255)
        elif kind == 1:
            cv2.ellipse(shape, (int(cx), int(cy)), (max(int(sw / 2), 1), max(int(sh / 2), 1)),
                        float(rng.uniform(0, 180)), 0, 360, 255, -1)
        else:
            n = int(rng.integers(5, 9))
            angles = np.sort(rng.uniform(0, 2 * np.pi, n))
            radii = rng.uniform(0.6, 1.2, n)
            pts = np.stack([cx + radii * np.cos(angles) * sw / 1.6, cy + radii * np.sin(angles) * sh / 1.6], 1)
            cv2.fillPoly(shape, [np.round(pts).astype(np.int32)], 255)
        layer[shape > 0] = color
        mask |= shape
    if count:
        shade = 1.0 + 0.15 * _smooth_noise(rng, h, w, 3.0)
        layer = np.clip(layer * shade[..., None], 0, 255).astype(np.uint8)
    return layer, mask


def _local_zoom(homography: np.ndarray, out_size: tuple[int, int]) -> float:
    """View pixels per canvas pixel at the view centre (square root of the Jacobian's determinant)."""
    w, h = out_size
    inv = np.linalg.inv(homography)
    pts = np.array([[[w / 2, h / 2], [w / 2 + 1, h / 2], [w / 2, h / 2 + 1]]], np.float64)
    p = cv2.perspectiveTransform(pts, inv)[0]
    (ax, ay), (bx, by) = p[1] - p[0], p[2] - p[0]
    area = abs(ax * by - ay * bx)
    return float(1.0 / math.sqrt(max(area, 1e-12)))


def _photometric(img: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Lighting, contrast, colour cast, shading gradient, blur and sensor noise: (h, w, 3) uint8 -> uint8."""
    h, w = img.shape[:2]
    k = 0.5 + strength
    gamma = math.exp(rng.uniform(-1, 1) * 0.25 * k)
    gains = 1.0 + rng.uniform(-1, 1, 3) * 0.08 * k
    contrast, bright = 1.0 + rng.uniform(-1, 1) * 0.2 * k, rng.uniform(-1, 1) * 0.08 * k
    # gamma, contrast, brightness and colour cast are per-channel curves: one (256, 3) lookup, in 0..255 units
    levels = np.linspace(0.0, 1.0, 256)[:, None] ** gamma
    table = (((levels - 0.5) * contrast + 0.5 + bright) * gains * 255.0).astype(np.float32)
    x = table[img, np.arange(3)]
    gx, gy = rng.uniform(-1, 1, 2) * 0.25 * strength
    shade = (1.0 + gx * (np.arange(w, dtype=np.float32) / w - 0.5)[None, :]
             + gy * (np.arange(h, dtype=np.float32) / h - 0.5)[:, None])
    x *= shade[..., None]
    sigma = rng.uniform(0.0, 0.5 + 1.0 * strength)
    if sigma > 0.3:
        x = cv2.GaussianBlur(x, (0, 0), sigma)
    x += rng.standard_normal(x.shape, dtype=np.float32) * np.float32(255.0 * rng.uniform(0.0, 0.01 + 0.025 * strength))
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def render_view(scene: np.ndarray, homography: np.ndarray, *, out_size: tuple[int, int],
                rng: np.random.Generator, strength: float,
                occluders: tuple[np.ndarray, np.ndarray] | None = None,
                border: int = cv2.BORDER_REPLICATE) -> np.ndarray:
    """One photograph of a scene: warp (anti-aliased when shrinking), occluders, photometric change.

    scene: (H, W, 3) uint8 canvas; homography: canvas -> view; ``border``: how the scene continues past the
    canvas (an OpenCV border mode). Returns (h, w, 3) uint8 BGR.
    """
    zoom = _local_zoom(homography, out_size)
    if zoom < 0.95:  # blur before shrinking, as a lens would, so thin patterns do not alias into moire
        sigma = 0.5 * math.sqrt(1.0 / zoom**2 - 1.0)
        # only the part of the canvas the view sees (plus the blur's reach) needs blurring
        w, h = out_size
        quad = cv2.perspectiveTransform(np.array([[[0, 0], [w, 0], [w, h], [0, h]]], np.float64),
                                        np.linalg.inv(homography))[0]
        pad = int(3 * sigma) + 2
        x0, y0 = (max(int(np.floor(v)) - pad, 0) for v in quad.min(0))
        x1 = min(int(np.ceil(quad[:, 0].max())) + pad, scene.shape[1])
        y1 = min(int(np.ceil(quad[:, 1].max())) + pad, scene.shape[0])
        if x1 - x0 > 2 and y1 - y0 > 2:
            scene = cv2.GaussianBlur(scene[y0:y1, x0:x1], (0, 0), sigma, borderType=border)
            homography = homography @ np.array([[1, 0, x0], [0, 1, y0], [0, 0, 1]], np.float64)
    img = cv2.warpPerspective(scene, homography, out_size, flags=cv2.INTER_LINEAR, borderMode=border)
    if occluders is not None:
        layer, mask = occluders
        img[mask > 0] = layer[mask > 0]
    return _photometric(img, rng, strength)


def landmark_bbox(landmark_mask: np.ndarray, homography: np.ndarray, *, out_size: tuple[int, int]
                  ) -> list[float]:
    """[x1, y1, x2, y2] float box of the landmark's outline in a view, clipped to the frame.

    A homography maps the convex hull of the landmark onto the hull of its image, so the box is exact.
    """
    hull = cv2.convexHull(cv2.findNonZero(landmark_mask)).astype(np.float64)
    pts = cv2.perspectiveTransform(hull.reshape(-1, 1, 2), homography).reshape(-1, 2)
    w, h = out_size
    x1, y1 = np.clip(pts.min(0), 0, [w, h])
    x2, y2 = np.clip(pts.max(0) + 1.0, 0, [w, h])
    return [round(float(x1), 2), round(float(y1), 2), round(float(x2), 2), round(float(y2), 2)]


# ----------------------------------------------------------------------------------------------------------------
# Dataset generation
# ----------------------------------------------------------------------------------------------------------------

def _rng(seed: int, *key: int) -> np.random.Generator:
    """An independent stream for one named draw (scene, view, ...), so items do not depend on each other."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=tuple(int(k) for k in key)))


def _canvas_size(config: SyntheticConfig) -> tuple[int, int]:
    long, short = config.image_size
    return int(round(long * config.canvas_scale)), int(round(short * config.canvas_scale))


def _write_jpeg(path: Path, img: np.ndarray, quality: int) -> None:
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode {path}")
    path.write_bytes(buf.tobytes())


def _make_db_view(scene_mask: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator, *,
                  kind: str, config: SyntheticConfig, require: set[str] | None, max_tries: int = 200
                  ) -> tuple[ViewParams, np.ndarray, tuple[np.ndarray, np.ndarray], float, str]:
    """Draw view parameters (redrawing until the measured label is in ``require``, when given)."""
    for _ in range(max_tries):
        view = sample_view(rng, kind=kind, portrait_fraction=config.portrait_fraction)
        size = view_size(view, image_size=config.image_size)
        hom = view_homography(view, box=box, out_size=size)
        occ = draw_occluders(rng, out_size=size, count=view.occluders, area=view.occluder_area)
        visible = visible_fraction(scene_mask, hom, out_size=size, occluded=occ[1])
        label = label_view(view, visible, config=config)
        if require is None or label in require:
            return view, hom, occ, visible, label
    raise RuntimeError(f"could not draw a {sorted(require or [])} view in {max_tries} tries; "
                       "the labelling thresholds in SyntheticConfig are probably inconsistent")


def _view_row(image: str, role: str, landmark: int, view: ViewParams, visible: float, label: str) -> list:
    return [image, role, landmark, label, f"{visible:.4f}", f"{view.scale:.4f}", f"{view.offset_x:.4f}",
            f"{view.offset_y:.4f}", f"{view.rotation:.3f}", f"{view.tilt_x:.4f}", f"{view.tilt_y:.4f}",
            int(view.portrait), view.occluders]


_VIEW_COLUMNS = ["image", "role", "landmark", "label", "visible", "scale", "offset_x", "offset_y", "rotation",
                 "tilt_x", "tilt_y", "portrait", "occluders"]


def _build_test_split(out: Path, name: str, config: SyntheticConfig, progress: bool) -> dict:
    """Write ``jpg/``, ``gnd_<name>.pkl`` and ``views.csv`` under ``out``; returns counts for meta.json."""
    jpg = out / "jpg"
    jpg.mkdir(parents=True)
    width, height = _canvas_size(config)
    db_names: list[str] = []
    db_landmark: list[int] = []
    db_label: list[str] = []
    queries: list[tuple[str, int, list[float]]] = []
    rows: list[list] = []
    drawn_kinds = ["easy", "hard", "junk"]
    kind_p = [config.easy_fraction, 1.0 - config.easy_fraction - config.junk_fraction, config.junk_fraction]
    for lm in tqdm(range(config.n_landmarks), desc=f"{name}: landmarks", disable=not progress):
        scene, lm_mask, box = draw_landmark_scene(_rng(config.seed, _S_TEST_SCENE, lm), width=width, height=height)
        for v in range(config.views_per_landmark):
            rng = _rng(config.seed, _S_TEST_VIEW, lm, v)
            if v < 2:  # guarantee an easy and a hard positive for every query of this landmark
                kind = ("easy", "hard")[v]
                require = {kind}
            else:
                kind, require = drawn_kinds[int(rng.choice(3, p=kind_p))], None
            view, hom, occ, visible, label = _make_db_view(lm_mask, box, rng, kind=kind, config=config,
                                                           require=require)
            size = view_size(view, image_size=config.image_size)
            img = render_view(scene, hom, out_size=size, rng=rng, strength=view.strength, occluders=occ)
            image = f"lm{lm:03d}_v{v:03d}"
            _write_jpeg(jpg / f"{image}.jpg", img, config.jpeg_quality)
            db_names.append(image)
            db_landmark.append(lm)
            db_label.append(label)
            rows.append(_view_row(image, "database", lm, view, visible, label))
        for q in range(config.queries_per_landmark):
            rng = _rng(config.seed, _S_QUERY, lm, q)
            for _ in range(200):  # the whole landmark must be in the frame so that its bbx is not clipped
                view = sample_view(rng, kind="query", portrait_fraction=config.portrait_fraction)
                size = view_size(view, image_size=config.image_size)
                hom = view_homography(view, box=box, out_size=size)
                visible = visible_fraction(lm_mask, hom, out_size=size)
                if visible >= 0.999:
                    break
            else:
                raise RuntimeError(f"could not frame the whole landmark {lm} in a query view")
            img = render_view(scene, hom, out_size=size, rng=rng, strength=view.strength)
            image = f"lm{lm:03d}_q{q}"
            _write_jpeg(jpg / f"{image}.jpg", img, config.jpeg_quality)
            queries.append((image, lm, landmark_bbox(lm_mask, hom, out_size=size)))
            rows.append(_view_row(image, "query", lm, view, visible, "query"))
    for d in tqdm(range(config.n_distractors), desc=f"{name}: distractors", disable=not progress):
        rng = _rng(config.seed, _S_DISTRACTOR, d)
        scene, box = draw_unrelated_scene(rng, width=width, height=height)
        view = sample_view(rng, kind="easy", portrait_fraction=config.portrait_fraction)
        size = view_size(view, image_size=config.image_size)
        hom = view_homography(view, box=box, out_size=size)
        occ = draw_occluders(rng, out_size=size, count=view.occluders, area=view.occluder_area)
        # distractors carry no labels, so their scenes may continue as mirror images past the canvas
        img = render_view(scene, hom, out_size=size, rng=rng, strength=view.strength, occluders=occ,
                          border=cv2.BORDER_REFLECT_101)
        image = f"dis{d:04d}"
        _write_jpeg(jpg / f"{image}.jpg", img, config.jpeg_quality)
        db_names.append(image)
        db_landmark.append(-1)
        db_label.append("negative")
        rows.append(_view_row(image, "distractor", -1, view, float("nan"), "negative"))

    # shuffle the database so that an index says nothing about its landmark
    order = _rng(config.seed, _S_ORDER).permutation(len(db_names))
    imlist = [db_names[i] for i in order]
    lm_arr = np.asarray(db_landmark, np.int64)[order]
    label_arr = np.asarray(db_label)[order]
    gnd = []
    for _, lm, bbx in queries:
        same = lm_arr == lm
        gnd.append({"bbx": bbx,
                    "easy": np.flatnonzero(same & (label_arr == "easy")).astype(np.int64),
                    "hard": np.flatnonzero(same & (label_arr == "hard")).astype(np.int64),
                    "junk": np.flatnonzero(same & (label_arr == "junk")).astype(np.int64)})
    payload = {"imlist": imlist, "qimlist": [q[0] for q in queries], "gnd": gnd}
    (out / f"gnd_{name}.pkl").write_bytes(pickle.dumps(payload, protocol=_PICKLE_PROTOCOL))
    with open(out / "views.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(_VIEW_COLUMNS)
        writer.writerows(rows)
    return {"database": len(imlist), "queries": len(queries), "distractors": config.n_distractors,
            "easy": int(np.sum(label_arr == "easy")), "hard": int(np.sum(label_arr == "hard")),
            "junk": int(np.sum(label_arr == "junk"))}


def _build_train_split(out: Path, name: str, config: SyntheticConfig, progress: bool) -> dict:
    """Write ``jpg/`` and ``train.csv`` (image,label) for landmarks drawn from streams the test split never uses."""
    jpg = out / "jpg"
    jpg.mkdir(parents=True)
    width, height = _canvas_size(config)
    rows = []
    for lm in tqdm(range(config.train_landmarks), desc=f"{name}_train: landmarks", disable=not progress):
        scene, lm_mask, box = draw_landmark_scene(_rng(config.seed, _S_TRAIN_SCENE, lm), width=width, height=height)
        for v in range(config.train_views_per_landmark):
            rng = _rng(config.seed, _S_TRAIN_VIEW, lm, v)
            kind = "easy" if rng.random() < 0.6 else "hard"
            view, hom, occ, _, _ = _make_db_view(lm_mask, box, rng, kind=kind, config=config,
                                                 require={"easy", "hard"})
            size = view_size(view, image_size=config.image_size)
            img = render_view(scene, hom, out_size=size, rng=rng, strength=view.strength, occluders=occ)
            image = f"lm{lm:03d}_{v:03d}"
            _write_jpeg(jpg / f"{image}.jpg", img, config.jpeg_quality)
            rows.append((image, lm))
    with open(out / "train.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "label"])
        writer.writerows(rows)
    return {"images": len(rows), "classes": config.train_landmarks}


def _meta(name: str, split: str, config: SyntheticConfig, counts: dict) -> dict:
    return {"generator": _GENERATOR, "format_version": FORMAT_VERSION, "name": name, "split": split,
            "seed": config.seed, "config": config.to_dict(), "counts": counts,
            "labels": {"junk": f"visible < {config.junk_max_visible}",
                       "easy": (f"visible >= {config.easy_min_visible} and |tilt| <= {config.easy_max_tilt} and "
                                f"|rotation| <= {config.easy_max_rotation} deg and max(scale, 1/scale) <= "
                                f"{config.easy_max_zoom}"),
                       "hard": "any other view of the landmark"}}


def _read_meta(folder: Path) -> dict | None:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and meta.get("generator") == _GENERATOR else None


def _matches(meta: dict | None, config: SyntheticConfig) -> bool:
    return (meta is not None and meta.get("format_version") == FORMAT_VERSION
            and meta.get("config") == config.to_dict())


def _replace_dir(src: Path, dst: Path, trash: Path) -> None:
    """Move ``src`` to ``dst``, first moving an existing ``dst`` aside into ``trash`` (same file system)."""
    if dst.exists():
        os.replace(dst, trash / f"old-{dst.name}")
    os.replace(src, dst)


def build_synthetic(root: str | os.PathLike, name: str = "synth", config: SyntheticConfig | None = None,
                    overwrite: bool = False, *, progress: bool = True) -> Path:
    """Build the synthetic benchmark under ``root`` and return ``<root>/<name>`` (the test split).

    Idempotent: when ``<root>/<name>`` and ``<root>/<name>_train`` already hold a complete build with the same
    config (their meta.json), nothing is redrawn. A folder holding something else (another config, or not a
    synthetic build) raises FileExistsError unless ``overwrite``. Both splits are drawn in a temporary folder
    under ``root`` and renamed into place (train first, test last), so a crash never leaves a half dataset
    that looks complete.
    """
    config = config or SyntheticConfig()
    if not name or name != Path(name).name or name.startswith("."):
        raise ValueError(f"name must be a plain folder name, got {name!r}")
    root = Path(root)
    test_dir, train_dir = root / name, root / f"{name}_train"
    metas = {d: _read_meta(d) for d in (test_dir, train_dir)}
    if all(_matches(m, config) for m in metas.values()):
        log.info("synthetic dataset %s already built with this config; nothing to do", test_dir)
        return test_dir
    if not overwrite:
        for d, m in metas.items():
            if not d.exists() or _matches(m, config):
                continue  # absent, or ours with this config but its sibling missing (build interrupted)
            if m is None:
                raise FileExistsError(f"{d} exists and is not a synthetic dataset built by {_GENERATOR}; "
                                      "move it away or pass overwrite=True to replace it")
            differs = sorted(k for k, v in config.to_dict().items() if m.get("config", {}).get(k) != v)
            raise FileExistsError(f"{d} was built with a different config (differs in {differs or ['format']});"
                                  " pass overwrite=True (CLI: --overwrite) to rebuild it")
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.building-", dir=root))
    try:
        counts_test = _build_test_split(tmp / name, name, config, progress)
        counts_train = _build_train_split(tmp / f"{name}_train", name, config, progress)
        # meta.json last: a folder without it is never mistaken for a finished build
        for folder, split, counts in ((tmp / name, "test", counts_test),
                                      (tmp / f"{name}_train", "train", counts_train)):
            (folder / "meta.json").write_text(json.dumps(_meta(name, split, config, counts), indent=2) + "\n")
        _replace_dir(tmp / f"{name}_train", train_dir, tmp)
        _replace_dir(tmp / name, test_dir, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built synthetic dataset %s: %d database images (%d easy, %d hard, %d junk, %d distractors), "
             "%d queries; train split %s: %d images of %d landmarks", test_dir, counts_test["database"],
             counts_test["easy"], counts_test["hard"], counts_test["junk"], counts_test["distractors"],
             counts_test["queries"], train_dir, counts_train["images"], counts_train["classes"])
    return test_dir


def load_train_split(root: str | os.PathLike, name: str = "synth") -> tuple[list[Path], list[int]]:
    """Image paths and integer landmark labels of ``<root>/<name>_train`` (from its train.csv)."""
    folder = Path(root) / f"{name}_train"
    csv_path = folder / "train.csv"
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path} not found: build it with build_synthetic(root={str(root)!r}, "
                                f"name={name!r}) or `python -m datasets.synthetic --root {root} --name {name}`")
    with open(csv_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header != ["image", "label"]:
            raise ValueError(f"{csv_path}: expected the header 'image,label', got {header}")
        rows = [(r[0], int(r[1])) for r in reader if r]
    paths = [folder / "jpg" / f"{image}.jpg" for image, _ in rows]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} training images listed in {csv_path} are missing, e.g. "
                                f"{missing[0]}; rebuild with build_synthetic(..., overwrite=True)")
    return paths, [label for _, label in rows]


# ----------------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------------

def get_args_parser() -> argparse.ArgumentParser:
    d = SyntheticConfig()
    p = argparse.ArgumentParser(description="Build the built-in synthetic landmark-retrieval benchmark "
                                            "(revisitop layout, no download).")
    p.add_argument("--root", default="data", help="folder that will hold <name>/ and <name>_train/")
    p.add_argument("--name", default="synth")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--n-landmarks", type=int, default=d.n_landmarks)
    p.add_argument("--views-per-landmark", type=int, default=d.views_per_landmark)
    p.add_argument("--queries-per-landmark", type=int, default=d.queries_per_landmark)
    p.add_argument("--n-distractors", type=int, default=d.n_distractors)
    p.add_argument("--image-size", type=int, nargs=2, default=list(d.image_size), metavar=("LONG", "SHORT"))
    p.add_argument("--train-landmarks", type=int, default=d.train_landmarks)
    p.add_argument("--train-views-per-landmark", type=int, default=d.train_views_per_landmark)
    p.add_argument("--jpeg-quality", type=int, default=d.jpeg_quality)
    p.add_argument("--overwrite", action="store_true", help="replace an existing build with another config")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = SyntheticConfig(seed=args.seed, n_landmarks=args.n_landmarks,
                             views_per_landmark=args.views_per_landmark,
                             queries_per_landmark=args.queries_per_landmark, n_distractors=args.n_distractors,
                             image_size=tuple(args.image_size), train_landmarks=args.train_landmarks,
                             train_views_per_landmark=args.train_views_per_landmark,
                             jpeg_quality=args.jpeg_quality)
    try:
        out = build_synthetic(args.root, name=args.name, config=config, overwrite=args.overwrite,
                              progress=not args.no_progress)
    except (FileExistsError, ValueError) as e:
        log.error("%s", e)
        return 1
    meta = json.loads((out / "meta.json").read_text())
    c = meta["counts"]
    log.info("test split  %s: %d queries, %d database images (%d easy, %d hard, %d junk, %d distractors); "
             "ground truth %s", out, c["queries"], c["database"], c["easy"], c["hard"], c["junk"],
             c["distractors"], out / f"gnd_{args.name}.pkl")
    train = json.loads((out.parent / f"{args.name}_train" / "meta.json").read_text())["counts"]
    log.info("train split %s: %d images of %d landmarks", out.parent / f"{args.name}_train", train["images"],
             train["classes"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
