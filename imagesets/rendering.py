"""Pixels of a rendered character: one clean render, seeded distortions, ink on paper.

Shared by every rendered set (``glyphs``, ``novel``) so that a difference between two
sets is a difference of fonts, characters or stated distortions, never of a subtly
different renderer. Everything works at ``SUPERSAMPLE`` times the output size and is
box-downsampled at the end: cheap anti-aliasing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SUPERSAMPLE = 2  # render at 2x, then box-downsample: cheap anti-aliasing


@dataclass(frozen=True)
class Augment:
    """Strength of the random distortions; ``HEAVY`` makes a drifted query stream.

    ``shear`` (a horizontal slant, as a fraction of height) is drawn only when it is
    non-zero, so sets that do not use it keep the exact random stream they always had.
    """

    rotate_deg: float = 8.0
    scale: tuple[float, float] = (0.9, 1.1)
    shift_px: float = 2.0  # at output resolution
    blur: float = 0.8
    weight: tuple[float, float] = (0.8, 1.4)  # ink gain after blur: thinner/bolder strokes
    noise: float = 6.0  # std of additive pixel noise (0..255 scale)
    shear: float = 0.0  # |slant| drawn uniformly in [-shear, shear]


LIGHT = Augment()
HEAVY = Augment(rotate_deg=20.0, scale=(0.75, 1.2), shift_px=4.0, blur=1.6, noise=20.0)


@lru_cache(maxsize=64)
def _font(path: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, px)


def render_ink(char: str, font_path: str, size: int) -> np.ndarray:
    """Clean ink coverage (0..255, background 0) at ``size * SUPERSAMPLE`` resolution.

    The glyph keeps its natural size and baseline so that '.', 'o' and 'O' stay
    distinguishable; it is only shrunk when it would not fit, and centred vertically
    when its baseline position would push it off the canvas.
    """
    canvas = size * SUPERSAMPLE
    px = round(canvas * 0.62)
    scratch = Image.new("L", (canvas * 3, canvas * 3), 0)
    baseline = canvas + round(canvas * 0.74)
    ImageDraw.Draw(scratch).text(
        (canvas, baseline), char, fill=255, font=_font(font_path, px), anchor="ls"
    )
    ink = np.asarray(scratch)
    ys, xs = np.nonzero(ink > 8)
    if len(ys) == 0:
        return np.zeros((canvas, canvas), np.uint8)
    top, bottom, left, right = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    height, width = bottom - top, right - left
    margin = round(canvas * 0.06)
    room = canvas - 2 * margin
    if height > room or width > room:  # too big: shrink the ink box into the canvas
        box = scratch.crop((left, top, right, bottom))
        factor = room / max(height, width)
        box = box.resize(
            (max(1, round(width * factor)), max(1, round(height * factor))), Image.LANCZOS
        )
        out = Image.new("L", (canvas, canvas), 0)
        out.paste(box, ((canvas - box.width) // 2, (canvas - box.height) // 2))
        return np.asarray(out)
    x0 = left - (canvas - width) // 2
    y0 = canvas  # natural placement: canvas row 0 is scratch row `canvas`
    if top - y0 < margin or bottom - y0 > canvas - margin:
        y0 = top - (canvas - height) // 2
    return np.asarray(scratch.crop((x0, y0, x0 + canvas, y0 + canvas)))


def thicken(ink: np.ndarray, px: int) -> np.ndarray:
    """Heavier strokes: grow the ink by ``px`` pixels (at render resolution) on every side.

    A morphological dilation, not a gain: it changes stroke width and closes small
    counters the way a bolder cut or ink bleed does, which no ``Augment`` produces.
    """
    if px <= 0:
        return ink
    return np.asarray(Image.fromarray(ink).filter(ImageFilter.MaxFilter(2 * px + 1)))


def augment_ink(ink: np.ndarray, rng: np.random.Generator, aug: Augment) -> np.ndarray:
    """Rotate, shear, scale, shift, blur and re-weight strokes, at render resolution."""
    canvas = ink.shape[0]
    angle = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    scale = rng.uniform(*aug.scale)
    shift = rng.uniform(-aug.shift_px, aug.shift_px, size=2) * SUPERSAMPLE
    slant = rng.uniform(-aug.shear, aug.shear) if aug.shear > 0 else 0.0
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    c = (canvas - 1) / 2
    # PIL wants the inverse map: output (x, y) -> input (a x + b y + c, d x + e y + f);
    # a slant adds `slant` times the row offset to the input column.
    a, b, d, e = cos - slant * sin, sin + slant * cos, -sin, cos
    tx, ty = c + shift[0], c + shift[1]
    coeffs = (a, b, c - a * tx - b * ty, d, e, c - d * tx - e * ty)
    img = Image.fromarray(ink).transform(ink.shape[::-1], Image.AFFINE, coeffs, Image.BILINEAR)
    radius = rng.uniform(0.0, aug.blur) * SUPERSAMPLE
    if radius > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    gain = rng.uniform(*aug.weight)
    return np.clip(np.asarray(img, np.float32) * gain, 0, 255).astype(np.uint8)


def finish(ink: np.ndarray, rng: np.random.Generator | None, noise: float) -> np.ndarray:
    """Downsample to output size, add noise, turn into dark ink on white paper."""
    small = Image.fromarray(ink).reduce(SUPERSAMPLE)
    pixels = 255.0 - np.asarray(small, np.float32)
    if rng is not None and noise > 0:
        pixels += rng.normal(0.0, rng.uniform(0.0, noise), pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def render_sample(
    codepoint: int,
    font_path: str,
    size: int,
    rng: np.random.Generator | None,
    aug: Augment = LIGHT,
    stroke_px: int = 0,
) -> np.ndarray:
    """One image: clean when ``rng`` is None, else augmented with strength ``aug``.

    ``stroke_px`` > 0 renders the heavier-stroke style (see :func:`thicken`) before
    any augmentation.
    """
    ink = thicken(render_ink(chr(codepoint), font_path, size), stroke_px)
    if rng is None:
        return finish(ink, None, 0.0)
    return finish(augment_ink(ink, rng, aug), rng, aug.noise)


def sample_rng(seed: int, codepoint: int, font_index: int, copy: int) -> np.random.Generator:
    """Per-sample generator: a dataset does not depend on render order or workers."""
    return np.random.default_rng([seed, codepoint, font_index, copy])


def is_blank(image: np.ndarray) -> bool:
    """Fewer than 3 inked output pixels: the font drew nothing usable."""
    return int((image < 200).sum()) < 3
