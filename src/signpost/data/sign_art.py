"""Draw synthetic traffic signs (plates with class glyphs, backgrounds) and a track's frames as a camera sees them,
for ``signpost.data.synthetic`` to write in the GTSRB layout; its docstring says what the images hold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from signpost.config import SyntheticConfig
from signpost.data import classes

# Signs are drawn on a square canvas this big, then warped and resized: large enough that thin rings survive
# the warp, small enough that drawing costs well under a millisecond.
_CANVAS = 160
_PAD = 16  # px of canvas left free so rotation and perspective never clip the sign
_R = (_CANVAS - 2 * _PAD) / 2  # sign radius on the canvas, px
_BG_SIDE = 96  # side of the per-track background texture, px

_Color = tuple[int, int, int]
_RED: _Color = (200, 28, 36)
_WHITE: _Color = (238, 238, 232)
_BLUE: _Color = (22, 78, 168)
_YELLOW: _Color = (246, 188, 22)
_DARK: _Color = (28, 28, 30)
_GREY: _Color = (128, 128, 128)


# --- glyphs -------------------------------------------------------------------------------------------------

# A glyph is a set of primitives on a 3x3 grid with points at -1, 0, 1: segments between neighbouring grid
# points, dots on grid points, and quarter arcs of the unit circle, each named by its index in these tables.
_Segment = tuple[float, float, float, float]
_SEGMENTS: tuple[_Segment, ...] = (
    *((x, y, x + 1, y) for x in (-1, 0) for y in (-1, 0, 1)),
    *((x, y, x, y + 1) for x in (-1, 0, 1) for y in (-1, 0)),
    *((x, y, x + 1, y + 1) for x in (-1, 0) for y in (-1, 0)),
    *((x + 1, y, x, y + 1) for x in (-1, 0) for y in (-1, 0)),
)
_DOTS: tuple[tuple[float, float], ...] = tuple((x, y) for y in (-1, 0, 1) for x in (-1, 0, 1))
# Start angles of 90-degree arcs, in Pillow's degrees (clockwise from 3 o'clock).
_ARCS: tuple[float, ...] = (0.0, 90.0, 180.0, 270.0)


@dataclass(frozen=True)
class _Glyph:
    segments: tuple[int, ...]
    dots: tuple[int, ...]
    arcs: tuple[int, ...]

    def ids(self) -> frozenset[str]:
        return frozenset([f"s{i}" for i in self.segments] + [f"d{i}" for i in self.dots] + [f"a{i}" for i in self.arcs])


@lru_cache(maxsize=1)
def _glyphs() -> tuple[_Glyph, ...]:
    """One glyph per GTSRB class, drawn from a fixed seed so a class looks the same whatever ``cfg.seed`` is.

    Drawn one class after another, each redrawn until it differs from every earlier glyph in at least three
    primitives, so no two classes of a family look alike.
    """
    rng = np.random.default_rng(20110)  # fixed: a glyph belongs to a class, not to a dataset's seed
    glyphs: list[_Glyph] = []
    while len(glyphs) < classes.NUM_GTSRB_CLASSES:
        glyph = _Glyph(
            segments=tuple(sorted(rng.choice(len(_SEGMENTS), size=int(rng.integers(2, 4)), replace=False).tolist())),
            dots=tuple(rng.choice(len(_DOTS), size=int(rng.integers(0, 2)), replace=False).tolist()),
            arcs=tuple(rng.choice(len(_ARCS), size=int(rng.integers(0, 2)), replace=False).tolist()),
        )
        if all(len(glyph.ids() ^ other.ids()) >= 3 for other in glyphs):
            glyphs.append(glyph)
    return tuple(glyphs)


@dataclass(frozen=True)
class _GlyphSpot:
    """Where a family's plate leaves room for the glyph: centre and grid step in sign units, and the ink."""

    cx: float
    cy: float
    step: float
    color: _Color


def _draw_glyph(draw: ImageDraw.ImageDraw, glyph: _Glyph, spot: _GlyphSpot, rng: np.random.Generator) -> None:
    step = spot.step * _R
    width = max(2, round(step * 0.42 * rng.uniform(0.9, 1.1)))
    # Per-instance jitter of a few percent of a grid step: the same glyph, drawn by a slightly different hand.
    jitter = rng.normal(0.0, 0.04, size=(len(_DOTS), 2))

    def point(x: float, y: float) -> tuple[float, float]:
        jx, jy = jitter[_DOTS.index((x, y))]
        return _px(spot.cx + (x + jx) * spot.step, spot.cy + (y + jy) * spot.step)

    def disc(x: float, y: float, radius: float) -> None:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=spot.color)

    for i in glyph.segments:
        x0, y0, x1, y1 = _SEGMENTS[i]
        a, b = point(x0, y0), point(x1, y1)
        draw.line([a, b], fill=spot.color, width=width)
        for p in (a, b):  # round caps: Pillow's line ends are square and look ragged once rotated
            disc(*p, width / 2)
    for i in glyph.dots:
        disc(*point(*_DOTS[i]), width * 0.85)
    for i in glyph.arcs:
        cx, cy = _px(spot.cx, spot.cy)
        r = step + width / 2  # Pillow draws the width inwards from the box: centre the stroke on `step`
        draw.arc([cx - r, cy - r, cx + r, cy + r], _ARCS[i], _ARCS[i] + 90, fill=spot.color, width=width)


# --- sign plates, one function per family -------------------------------------------------------------------


def _px(x: float, y: float) -> tuple[float, float]:
    """Sign units (the sign spans -1..1 both ways) to canvas pixels."""
    return (_CANVAS / 2 + x * _R, _CANVAS / 2 + y * _R)


def _disc(draw: ImageDraw.ImageDraw, radius: float, fill: _Color) -> None:
    (x0, y0), (x1, y1) = _px(-radius, -radius), _px(radius, radius)
    draw.ellipse([x0, y0, x1, y1], fill=fill)


def _polygon(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], fill: _Color) -> None:
    draw.polygon([_px(x, y) for x, y in points], fill=fill)


def _inset(points: list[tuple[float, float]], border: float) -> list[tuple[float, float]]:
    """The polygon moved inwards by `border` (sign units) on every side.

    Scales about the incentre, whose distance to every side is the inradius: exact for triangles and regular
    polygons, the only ones drawn here.
    """
    n = len(points)
    sides = [math.dist(points[(i + 1) % n], points[(i + 2) % n]) for i in range(n)]  # side opposite vertex i
    perimeter = sum(sides)
    cx = (
        sum(s * p[0] for s, p in zip(sides, points, strict=True)) / perimeter
        if n == 3
        else sum(p[0] for p in points) / n
    )
    cy = (
        sum(s * p[1] for s, p in zip(sides, points, strict=True)) / perimeter
        if n == 3
        else sum(p[1] for p in points) / n
    )
    area = abs(sum(points[i][0] * points[(i + 1) % n][1] - points[(i + 1) % n][0] * points[i][1] for i in range(n)))
    inradius = area / perimeter  # area / semi-perimeter, with `area` above being twice the area
    k = (inradius - border) / inradius
    return [(cx + (x - cx) * k, cy + (y - cy) * k) for x, y in points]


_H = math.sqrt(3) / 2  # half the height of an equilateral triangle of side 2
_TRIANGLE_UP = [(0.0, -_H), (1.0, _H), (-1.0, _H)]
_TRIANGLE_DOWN = [(-1.0, -_H), (1.0, -_H), (0.0, _H)]
_DIAMOND = [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)]
_OCTAGON = [
    (math.cos(a) / math.cos(math.pi / 8), math.sin(a) / math.cos(math.pi / 8))
    for a in (math.pi / 8 + k * math.pi / 4 for k in range(8))
]


@dataclass(frozen=True)
class _Palette:
    red: _Color
    white: _Color
    blue: _Color
    yellow: _Color
    dark: _Color
    grey: _Color


def _plate_prohibitory(draw: ImageDraw.ImageDraw, pal: _Palette) -> _GlyphSpot | None:
    _disc(draw, 1.0, pal.red)
    _disc(draw, 0.78, pal.white)
    return _GlyphSpot(0.0, 0.0, 0.4, pal.dark)


def _plate_danger(draw: ImageDraw.ImageDraw, pal: _Palette) -> _GlyphSpot | None:
    _polygon(draw, _TRIANGLE_UP, pal.red)
    _polygon(draw, _inset(_TRIANGLE_UP, 0.17), pal.white)
    return _GlyphSpot(0.0, 0.26, 0.27, pal.dark)


def _plate_mandatory(draw: ImageDraw.ImageDraw, pal: _Palette) -> _GlyphSpot | None:
    _disc(draw, 1.0, pal.white)
    _disc(draw, 0.94, pal.blue)
    return _GlyphSpot(0.0, 0.0, 0.45, pal.white)


def _plate_end(draw: ImageDraw.ImageDraw, pal: _Palette) -> _GlyphSpot | None:
    _disc(draw, 1.0, pal.grey)
    _disc(draw, 0.93, pal.white)
    return _GlyphSpot(0.0, 0.0, 0.42, pal.grey)


def _end_bars(draw: ImageDraw.ImageDraw, pal: _Palette) -> None:
    # The "end of" band: parallel dark bars from top right to bottom left, drawn over the grey glyph.
    width = round(0.07 * _R)
    for offset in (-0.2, 0.0, 0.2):
        d = offset / math.sqrt(2)
        a, b = _px(0.62 + d, -0.62 + d), _px(-0.62 + d, 0.62 + d)
        draw.line([a, b], fill=pal.dark, width=width)


def _plate_priority(draw: ImageDraw.ImageDraw, pal: _Palette) -> _GlyphSpot | None:
    _polygon(draw, _DIAMOND, pal.white)
    _polygon(draw, _inset(_DIAMOND, 0.22), pal.yellow)
    return None


def _plate_yield(draw: ImageDraw.ImageDraw, pal: _Palette) -> _GlyphSpot | None:
    _polygon(draw, _TRIANGLE_DOWN, pal.red)
    _polygon(draw, _inset(_TRIANGLE_DOWN, 0.2), pal.white)
    return None


def _plate_stop(draw: ImageDraw.ImageDraw, pal: _Palette) -> _GlyphSpot | None:
    _polygon(draw, _OCTAGON, pal.white)
    _polygon(draw, _inset(_OCTAGON, 0.06), pal.red)
    return _GlyphSpot(0.0, 0.0, 0.42, pal.white)


def _plate_no_entry(draw: ImageDraw.ImageDraw, pal: _Palette) -> _GlyphSpot | None:
    _disc(draw, 1.0, pal.red)
    _polygon(draw, [(-0.68, -0.18), (0.68, -0.18), (0.68, 0.18), (-0.68, 0.18)], pal.white)
    return None


_PLATES: dict[str, Callable[[ImageDraw.ImageDraw, _Palette], _GlyphSpot | None]] = {
    classes.PROHIBITORY: _plate_prohibitory,
    classes.DANGER: _plate_danger,
    classes.MANDATORY: _plate_mandatory,
    classes.END: _plate_end,
    classes.PRIORITY: _plate_priority,
    classes.YIELD: _plate_yield,
    classes.STOP: _plate_stop,
    classes.NO_ENTRY: _plate_no_entry,
}


def _palette(rng: np.random.Generator) -> _Palette:
    """The sign's paint: faded towards grey-white by sun and age, by a different amount per physical sign."""
    fade = rng.uniform(0.0, 0.3)
    toward = np.array([205.0, 200.0, 195.0])

    def paint(color: _Color) -> _Color:
        mixed = np.asarray(color, dtype=float) * (1 - fade) + toward * fade + rng.normal(0.0, 6.0, size=3)
        r, g, b = np.clip(np.rint(mixed), 0, 255).astype(int).tolist()
        return (r, g, b)

    return _Palette(paint(_RED), paint(_WHITE), paint(_BLUE), paint(_YELLOW), _DARK, paint(_GREY))


def _draw_sign(class_id: int, rng: np.random.Generator) -> Image.Image:
    """One physical sign of `class_id` on a transparent RGBA canvas of side `_CANVAS`."""
    sign = Image.new("RGBA", (_CANVAS, _CANVAS), (0, 0, 0, 0))
    draw = ImageDraw.Draw(sign)
    category = classes.CLASS_CATEGORY[class_id]
    pal = _palette(rng)
    spot = _PLATES[category](draw, pal)
    if spot is not None:
        _draw_glyph(draw, _glyphs()[class_id], spot, rng)
    if category == classes.END:
        _end_bars(draw, pal)
    return sign


# --- backgrounds --------------------------------------------------------------------------------------------

# Colour families of what stands behind a sign: (mean RGB, spread of the blotches).
_BACKDROPS: tuple[tuple[_Color, float], ...] = (
    ((135, 170, 205), 18.0),  # sky
    ((190, 195, 200), 14.0),  # overcast sky
    ((70, 105, 55), 30.0),  # foliage
    ((45, 70, 40), 25.0),  # dark foliage
    ((140, 125, 110), 28.0),  # buildings
    ((95, 95, 100), 22.0),  # concrete, road
    ((160, 140, 105), 26.0),  # sandstone, fields
)


def _noise_layer(rng: np.random.Generator, cells: int, spread: float) -> np.ndarray:
    """Smooth blotches: a `cells`-square grid of random shades upsampled to the texture (float, ±spread).

    Mostly lightness with a little hue, as in real scenes; independent channels would give rainbow confetti.
    """
    shade = rng.normal(0.0, 40.0, size=(cells, cells, 1)) + rng.normal(0.0, 12.0, size=(cells, cells, 3))
    small = np.clip(128 + shade, 0, 255).astype(np.uint8)
    big = Image.fromarray(small).resize((_BG_SIDE, _BG_SIDE), Image.Resampling.BICUBIC)
    return (np.asarray(big, dtype=np.float32) - 128.0) * (spread / 40.0)


def _background(rng: np.random.Generator) -> Image.Image:
    """A track's backdrop texture: one or two colour families with blotches at two scales."""
    base = np.empty((_BG_SIDE, _BG_SIDE, 3), dtype=np.float32)
    first, second = rng.choice(len(_BACKDROPS), size=2)
    # Half the tracks see two families one above the other, such as sky over trees.
    split = int(rng.integers(_BG_SIDE // 4, _BG_SIDE)) if rng.random() < 0.5 else _BG_SIDE
    base[:split] = _BACKDROPS[int(first)][0]
    base[split:] = _BACKDROPS[int(second)][0]
    spread = _BACKDROPS[int(first)][1]
    texture = base + _noise_layer(rng, 4, spread) + _noise_layer(rng, 16, spread * 0.6)
    if rng.random() < 0.4:  # facades: a few darker rectangles (windows, other signs)
        for _ in range(int(rng.integers(2, 6))):
            x, y = rng.integers(0, _BG_SIDE - 8, size=2)
            w, h = rng.integers(6, 24, size=2)
            texture[y : y + h, x : x + w] *= rng.uniform(0.5, 0.8)
    return Image.fromarray(np.clip(texture, 0, 255).astype(np.uint8))


# --- tracks -------------------------------------------------------------------------------------------------

# Canvas sides the sign is warped at, px. A frame warps the smallest one that holds its sign at about 1.6x the
# final size: warping the full canvas for a 30 px sign costs four times more for nothing visible.
_LEVELS = (40, 56, 80, 112, _CANVAS)


def _margin(side: int) -> int:
    """Context around the sign, px, for an image `side` px wide.

    About 10% of the sign's size (the image is then 1.2 signs wide), at least 5 px from 30 px up, as in GTSRB.
    """
    return max(round(side / 12), min(5, side // 6))


def _track_sides(rng: np.random.Generator, cfg: SyntheticConfig) -> list[int]:
    """Image side per frame: growing geometrically as the car approaches, skewed to small sizes like GTSRB."""
    end = math.exp(rng.normal(math.log(55.0), 0.45))
    begin = end * rng.uniform(0.45, 0.75)
    t = np.linspace(0.0, 1.0, cfg.frames_per_track) if cfg.frames_per_track > 1 else np.ones(1)
    sides = begin * (end / begin) ** t
    return np.clip(np.rint(sides), cfg.min_size, cfg.max_size).astype(int).tolist()


def _warp(levels: dict[int, Image.Image], sign_side: int, angle_deg: float, shear: float) -> Image.Image:
    """The sign rotated and sheared (a cheap stand-in for perspective), cropped to its true bounding box.

    `levels` caches the sign at the sides in `_LEVELS`, keyed by side; it must hold the `_CANVAS` original.
    """
    need = 1.6 * sign_side * _CANVAS / (2 * _R)
    side = next((s for s in _LEVELS if s >= need), _CANVAS)
    if side not in levels:
        levels[side] = levels[_CANVAS].resize((side, side), Image.Resampling.LANCZOS)
    a = math.radians(angle_deg)
    rotation = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    forward = rotation @ np.array([[1.0, shear], [0.0, 1.0]])
    inverse = np.linalg.inv(forward)  # Pillow's affine maps output pixels to input pixels
    centre = np.array([side / 2, side / 2])
    shift = centre - inverse @ centre
    data = (*inverse[0], shift[0], *inverse[1], shift[1])
    warped = levels[side].transform(
        (side, side), Image.Transform.AFFINE, [float(v) for v in data], resample=Image.Resampling.BILINEAR
    )
    # Bounding box of where the sign is more than an eighth opaque: bilinear sampling leaves faint fringes.
    opaque = np.asarray(warped.getchannel("A")) > 32
    cols, rows = np.flatnonzero(opaque.any(axis=0)), np.flatnonzero(opaque.any(axis=1))
    return warped.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))


@dataclass(frozen=True)
class _Look:
    """What stays fixed over a track: the camera's exposure, the viewing angle, the background framing."""

    brightness: float
    contrast: float
    cast: np.ndarray  # per-channel gain: white balance of this camera at this time of day
    aspect: float  # sign width / height: seen from the side a sign looks narrower
    angle_deg: float
    shear: float
    pan: tuple[float, float]
    pole: bool


def _look(rng: np.random.Generator) -> _Look:
    # GTSRB has many dark, underexposed tracks and some washed-out ones.
    exposure = int(rng.choice(3, p=[0.3, 0.6, 0.1]))
    brightness = (rng.uniform(0.25, 0.5), rng.uniform(0.65, 1.1), rng.uniform(1.1, 1.4))[exposure]
    return _Look(
        brightness=float(brightness),
        contrast=float(rng.uniform(0.6, 1.1)),
        cast=1.0 + rng.normal(0.0, 0.05, size=3),
        aspect=float(rng.uniform(0.94, 1.03)),
        angle_deg=float(rng.normal(0.0, 3.0)),
        shear=float(rng.normal(0.0, 0.04)),
        pan=(float(rng.uniform()), float(rng.uniform())),
        pole=bool(rng.random() < 0.5),
    )


def render_track(
    rng: np.random.Generator, class_id: int, cfg: SyntheticConfig, frames: range
) -> Iterator[tuple[int, Image.Image, tuple[int, int, int, int]]]:
    """The chosen frames of one track: (frame number, image, inclusive ROI x1, y1, x2, y2)."""
    levels = {_CANVAS: _draw_sign(class_id, rng)}
    backdrop = _background(rng)
    look = _look(rng)
    sides = _track_sides(rng, cfg)
    clip = cfg.min_size, cfg.max_size
    for i in frames:
        w = int(np.clip(round(sides[i] * look.aspect) + rng.integers(-1, 2), *clip))
        h = int(np.clip(sides[i] + rng.integers(-1, 2), *clip))
        mx, my = _margin(w), _margin(h)
        sw, sh = w - 2 * mx, h - 2 * my
        # The sign drifts in the frame by up to a third of the margin.
        x0 = mx + int(rng.integers(-(mx // 3), mx // 3 + 1))
        y0 = my + int(rng.integers(-(my // 3), my // 3 + 1))

        # Zoom into the backdrop as the car approaches, with a little camera shake.
        crop = (0.9 - 0.35 * i / max(1, cfg.frames_per_track - 1)) * _BG_SIDE
        left, top = (float(np.clip(p * (_BG_SIDE - crop) + rng.normal(0.0, 1.0), 0, _BG_SIDE - crop)) for p in look.pan)
        image = backdrop.resize((w, h), Image.Resampling.BILINEAR, box=(left, top, left + crop, top + crop))
        if look.pole:
            pw = max(1, round(0.08 * sw))
            px = x0 + sw // 2 - pw // 2
            ImageDraw.Draw(image).rectangle([px, y0 + sh // 2, px + pw - 1, h - 1], fill=(120, 122, 125))

        angle = look.angle_deg + rng.normal(0.0, 1.5)
        plate = _warp(levels, max(sw, sh), angle, look.shear).resize((sw, sh), Image.Resampling.LANCZOS)
        image.paste(plate, (x0, y0), plate)
        if rng.random() < 0.3:  # motion and focus blur on some frames
            image = image.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.4, 1.1) * max(1.0, h / 45))))
        yield i, _expose(image, rng, look), (x0, y0, x0 + sw - 1, y0 + sh - 1)


def _expose(image: Image.Image, rng: np.random.Generator, look: _Look) -> Image.Image:
    """Per-frame lighting (contrast, brightness, colour cast) and sensor noise, as whole-array ops."""
    pixels = np.asarray(image, dtype=np.float32)
    mean = pixels.mean()
    contrast = look.contrast * rng.uniform(0.93, 1.07)
    gain = look.brightness * rng.uniform(0.9, 1.1)
    pixels = ((pixels - mean) * contrast + mean) * (gain * look.cast).astype(np.float32)
    pixels += rng.standard_normal(pixels.shape, dtype=np.float32) * np.float32(rng.uniform(2.0, 8.0))
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
