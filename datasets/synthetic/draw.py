"""Drawing the scenes: colours and textures, then landmark scenes (background, trees, one building) and
unrelated distractor scenes, on a canvas larger than the views."""
from __future__ import annotations

import colorsys
from collections.abc import Callable

import cv2
import numpy as np

from common.errors import InvalidValueError

# ----------------------------------------------------------------------------------------------------------------
# Colours and textures
# ----------------------------------------------------------------------------------------------------------------

def bgr(h: float, s: float, v: float) -> tuple[int, int, int]:
    """An HSV colour (all in [0, 1], hue wrapping) as an OpenCV BGR triple."""
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))
    return (int(round(b * 255)), int(round(g * 255)), int(round(r * 255)))


def smooth_noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
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
        shade = 1.0 + 0.12 * smooth_noise(rng, h, w, rng.uniform(2, 6))
    else:
        raise InvalidValueError(f"unknown texture kind {kind!r}")
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
    trunk = bgr(rng.uniform(0.05, 0.1), rng.uniform(0.4, 0.7), rng.uniform(0.2, 0.4))
    cv2.rectangle(canvas, (int(x - size * 0.08), int(base - size * 0.6)), (int(x + size * 0.08), int(base)),
                  trunk, -1)
    for _ in range(int(rng.integers(2, 5))):
        leaf = bgr(rng.uniform(0.22, 0.4), rng.uniform(0.4, 0.8), rng.uniform(0.2, 0.55))
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
    top = np.asarray(bgr(rng.uniform(0.52, 0.68), rng.uniform(0.25, 0.75), rng.uniform(0.55, 1.0)), np.float32)
    low = np.asarray(bgr(rng.uniform(-0.1, 0.6), rng.uniform(0.0, 0.35), rng.uniform(0.75, 1.0)), np.float32)
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
    g_far = np.asarray(bgr(rng.uniform(0.08, 0.38), rng.uniform(0.25, 0.7), rng.uniform(0.3, 0.6)), np.float32)
    g_near = np.asarray(bgr(rng.uniform(0.05, 0.38), rng.uniform(0.2, 0.7), rng.uniform(0.2, 0.5)), np.float32)
    gh = height - horizon
    t = np.linspace(0.0, 1.0, gh, dtype=np.float32)[:, None, None]
    grain = smooth_noise(rng, gh, width, 4.0) * _border_fade(gh, width, 40.0)
    ground = (g_far * (1 - t) + g_near * t) * (1.0 + 0.1 * grain)[..., None]
    canvas = np.clip(np.concatenate([sky, ground], 0), 0, 255).astype(np.uint8)
    # distant hills: low-detail context, so views beside the landmark are not blank
    xs = np.linspace(0, width, 12)
    ys = horizon - np.abs(rng.normal(0, 1, 12)) * height * 0.06 - height * 0.02
    hill = np.concatenate([np.stack([xs, ys], 1), [[width, horizon], [0, horizon]]]).astype(np.int32)
    cv2.fillPoly(canvas, [hill], bgr(rng.uniform(0.2, 0.65), rng.uniform(0.1, 0.4), rng.uniform(0.4, 0.7)),
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
    facade = bgr(hue, rng.uniform(0.1, 0.55), rng.uniform(0.55, 0.92))
    accent = bgr(hue + rng.uniform(0.25, 0.75), rng.uniform(0.4, 0.9), rng.uniform(0.35, 0.9))
    roof = bgr(hue + rng.uniform(-0.15, 0.15) + 0.5 * (rng.random() < 0.4), rng.uniform(0.3, 0.8),
                rng.uniform(0.2, 0.55))
    glass = bgr(rng.uniform(0.5, 0.7), rng.uniform(0.1, 0.5), rng.uniform(0.05, 0.3))
    frame = bgr(hue + rng.uniform(-0.1, 0.1), rng.uniform(0.0, 0.3), rng.uniform(0.75, 1.0))
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
                        bgr(rng.uniform(0.5, 0.62), rng.uniform(0.3, 0.7), rng.uniform(0.4, 0.8)), -1, cv2.LINE_AA)
        for _ in range(int(rng.integers(4, 12))):
            size = height * rng.uniform(0.08, 0.25)
            _draw_tree(canvas, rng, rng.uniform(size, width - size), horizon + rng.uniform(0, 0.2) * height, size)
        return canvas, box
    for _ in range(int(rng.integers(5, 12))):  # abstract: textured blobs
        cx, cy = rng.uniform(0, width), rng.uniform(0, height)
        ax, ay = rng.uniform(20, width * 0.2), rng.uniform(20, height * 0.2)
        x1, y1, x2, y2 = int(cx - ax), int(cy - ay), int(cx + ax) + 1, int(cy + ay) + 1
        kind_tex = str(rng.choice(["bricks", "blocks", "courses", "grating", "noise"]))
        tex = _texture(rng, kind_tex, y2 - y1, x2 - x1, bgr(rng.random(), rng.uniform(0.2, 0.9),
                                                             rng.uniform(0.3, 0.95)))
        draw = _ellipse_draw(cx, cy, ax, ay) if rng.random() < 0.5 else _rect_draw(x1, y1, x2, y2)
        _paint(canvas, None, (x1, y1, x2, y2), draw, tex)
    return canvas, box
