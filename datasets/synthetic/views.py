"""Views of a scene: their parameters and geometry (a homography from the canvas), how much of the landmark they
see, the easy / hard / junk label that follows, occluders, and the rendering of the photograph."""
from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from common.errors import InvalidValueError
from datasets.synthetic.config import SyntheticConfig
from datasets.synthetic.draw import bgr, smooth_noise


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
        raise InvalidValueError("the landmark mask is empty")
    return float(np.count_nonzero((landmark_mask > 0) & (back > 0)) / total)


def label_view(view: ViewParams, visible: float, *, config: SyntheticConfig) -> str:
    """'easy', 'hard' or 'junk' for a database view, from what was drawn (the rules: docs/evaluation.md, "How the
    built-in benchmark is drawn")."""
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
    raise InvalidValueError(f"unknown view kind {kind!r}; expected 'easy', 'hard', 'junk' or 'query'")


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
        color = bgr(rng.random(), rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9))
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
        shade = 1.0 + 0.15 * smooth_noise(rng, h, w, 3.0)
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
