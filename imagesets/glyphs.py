"""The embedded ``glyphs`` dataset: Unicode characters rendered in many fonts.

An open-world retrieval set in the spirit of Omniglot that needs no download: each
class is one character, its samples are that character in every font that covers it
plus seeded augmentations. Train and test classes are disjoint; test classes are
grouped into tenants by Unicode block (latin, greek, ...), so per-tenant threshold
drift can be measured. See docs/DATASET.md for the split and statistics.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import defaultdict
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from imagesets.base import ImageSet
from imagesets.fonts import Font, discover_fonts, fingerprint
from imagesets.scripts import TENANTS, is_drawable, tenant_of

CACHE_VERSION = 1
SPLITS = ("train", "test")
_SUPERSAMPLE = 2  # render at 2x, then box-downsample: cheap anti-aliasing


@dataclass(frozen=True)
class GlyphConfig:
    """Everything that determines the rendered dataset (and so its cache key)."""

    size: int = 32
    min_fonts: int = 6
    augment: int = 2  # augmented copies per (character, font), besides the clean render
    seed: int = 0
    test_fraction: float = 0.5
    limit: int | None = None  # at most this many classes per (split, tenant): tiny sets
    system_fonts: bool = False


@dataclass(frozen=True)
class Augment:
    """Strength of the random distortions; ``HEAVY`` makes a drifted query stream."""

    rotate_deg: float = 8.0
    scale: tuple[float, float] = (0.9, 1.1)
    shift_px: float = 2.0  # at output resolution
    blur: float = 0.8
    weight: tuple[float, float] = (0.8, 1.4)  # ink gain after blur: thinner/bolder strokes
    noise: float = 6.0  # std of additive pixel noise (0..255 scale)


LIGHT = Augment()
HEAVY = Augment(rotate_deg=20.0, scale=(0.75, 1.2), shift_px=4.0, blur=1.6, noise=20.0)


@dataclass
class GlyphData:
    """The full rendered set: images with their class, font and split metadata."""

    images: np.ndarray  # (N, size, size) uint8, dark ink on white
    sample_class: np.ndarray  # (N,) index into codepoints
    sample_font: np.ndarray  # (N,) index into font_names
    augmented: np.ndarray  # (N,) bool
    codepoints: np.ndarray  # (C,)
    class_split: np.ndarray  # (C,) 0 train, 1 test
    class_tenant: np.ndarray  # (C,) index into TENANTS
    font_names: tuple[str, ...]
    info: dict

    def split(self, split: str) -> ImageSet:
        """Train or test classes as an :class:`ImageSet` labelled by character."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        rows = np.flatnonzero(self.class_split[self.sample_class] == SPLITS.index(split))
        classes = np.unique(self.sample_class[rows])
        remap = np.full(len(self.codepoints), -1, dtype=np.int64)
        remap[classes] = np.arange(len(classes))
        return ImageSet(
            name=f"glyphs-{split}",
            labels=remap[self.sample_class[rows]],
            class_names=tuple(class_name(int(self.codepoints[c])) for c in classes),
            tenants=self.class_tenant[self.sample_class[rows]].astype(np.int64),
            tenant_names=TENANTS,
            pixels=self.images[rows],
            extra={"font": self.sample_font[rows], "augmented": self.augmented[rows]},
        )


def class_name(codepoint: int) -> str:
    return f"U+{codepoint:04X} {chr(codepoint)}"


# ----------------------------------------------------------------------------- rendering


@lru_cache(maxsize=64)
def _font(path: str, px: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, px)


def render_ink(char: str, font_path: str, size: int) -> np.ndarray:
    """Clean ink coverage (0..255, background 0) at ``size * _SUPERSAMPLE`` resolution.

    The glyph keeps its natural size and baseline so that '.', 'o' and 'O' stay
    distinguishable; it is only shrunk when it would not fit, and centred vertically
    when its baseline position would push it off the canvas.
    """
    canvas = size * _SUPERSAMPLE
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


def augment_ink(ink: np.ndarray, rng: np.random.Generator, aug: Augment) -> np.ndarray:
    """Rotate, scale, shift, blur and re-weight strokes, at render resolution."""
    canvas = ink.shape[0]
    angle = np.deg2rad(rng.uniform(-aug.rotate_deg, aug.rotate_deg))
    scale = rng.uniform(*aug.scale)
    shift = rng.uniform(-aug.shift_px, aug.shift_px, size=2) * _SUPERSAMPLE
    cos, sin = np.cos(angle) / scale, np.sin(angle) / scale
    c = (canvas - 1) / 2
    # PIL wants the inverse map: output (x, y) -> input (a x + b y + c, d x + e y + f).
    tx, ty = c + shift[0], c + shift[1]
    coeffs = (cos, sin, c - cos * tx - sin * ty, -sin, cos, c + sin * tx - cos * ty)
    img = Image.fromarray(ink).transform(ink.shape[::-1], Image.AFFINE, coeffs, Image.BILINEAR)
    radius = rng.uniform(0.0, aug.blur) * _SUPERSAMPLE
    if radius > 0.05:
        img = img.filter(ImageFilter.GaussianBlur(radius))
    gain = rng.uniform(*aug.weight)
    return np.clip(np.asarray(img, np.float32) * gain, 0, 255).astype(np.uint8)


def finish(ink: np.ndarray, rng: np.random.Generator | None, noise: float) -> np.ndarray:
    """Downsample to output size, add noise, turn into dark ink on white paper."""
    small = Image.fromarray(ink).reduce(_SUPERSAMPLE)
    pixels = 255.0 - np.asarray(small, np.float32)
    if rng is not None and noise > 0:
        pixels += rng.normal(0.0, rng.uniform(0.0, noise), pixels.shape)
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def render_sample(
    codepoint: int, font_path: str, size: int, rng: np.random.Generator | None, aug: Augment = LIGHT
) -> np.ndarray:
    """One image: clean when ``rng`` is None, else augmented with strength ``aug``."""
    ink = render_ink(chr(codepoint), font_path, size)
    if rng is None:
        return finish(ink, None, 0.0)
    return finish(augment_ink(ink, rng, aug), rng, aug.noise)


def sample_rng(seed: int, codepoint: int, font_index: int, copy: int) -> np.random.Generator:
    """Per-sample generator: the dataset does not depend on render order or workers."""
    return np.random.default_rng([seed, codepoint, font_index, copy])


# ----------------------------------------------------------------------------- building


def _stable_unit(seed: int, codepoint: int) -> float:
    digest = hashlib.blake2b(f"{seed}:{codepoint}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def _candidates(fonts: list[Font], cfg: GlyphConfig) -> dict[int, list[int]]:
    """Drawable codepoints covered by at least ``min_fonts`` fonts, with those fonts."""
    cover: dict[int, list[int]] = defaultdict(list)
    for i, font in enumerate(fonts):
        for cp in font.codepoints:
            cover[cp].append(i)
    keep = {
        cp: fs for cp, fs in sorted(cover.items()) if len(fs) >= cfg.min_fonts and is_drawable(cp)
    }
    if cfg.limit is None:
        return keep
    taken: dict[tuple[int, str], int] = defaultdict(int)
    limited = {}
    for cp, fs in keep.items():
        group = (_split_of(cp, cfg), tenant_of(cp))
        if taken[group] < cfg.limit:
            taken[group] += 1
            limited[cp] = fs
    return limited


def _split_of(codepoint: int, cfg: GlyphConfig) -> int:
    return int(_stable_unit(cfg.seed, codepoint) < cfg.test_fraction)


def _render_clean(job: tuple[int, list[str], int]) -> tuple[int, list[np.ndarray]]:
    cp, paths, size = job
    return cp, [render_sample(cp, p, size, None) for p in paths]


def _render_augmented(job: tuple[int, list[tuple[int, str]], GlyphConfig]) -> list[np.ndarray]:
    cp, fonts, cfg = job
    return [
        render_sample(cp, path, cfg.size, sample_rng(cfg.seed, cp, fi, copy))
        for fi, path in fonts
        for copy in range(1, cfg.augment + 1)
    ]


def _is_blank(image: np.ndarray) -> bool:
    return int((image < 200).sum()) < 3


def _map(fn, jobs: list, workers: int, desc: str) -> list:
    from tqdm import tqdm

    chunks = max(1, len(jobs) // (workers * 16))
    if workers <= 1:
        return [fn(j) for j in tqdm(jobs, desc=desc, unit="class", leave=False)]
    with ProcessPoolExecutor(workers) as pool:
        return list(
            tqdm(
                pool.map(fn, jobs, chunksize=chunks),
                total=len(jobs),
                desc=desc,
                unit="class",
                leave=False,
            )
        )


def build(cfg: GlyphConfig, workers: int | None = None) -> GlyphData:
    """Render the dataset from scratch (see :func:`load` for the cached entry point)."""
    started = time.perf_counter()
    workers = workers or min(4, os.cpu_count() or 1)
    fonts = discover_fonts(cfg.system_fonts)
    if not fonts:
        raise RuntimeError("no usable fonts found: is matplotlib installed?")
    cands = _candidates(fonts, cfg)
    clean = dict(
        _map(
            _render_clean,
            [(cp, [fonts[i].path for i in fs], cfg.size) for cp, fs in cands.items()],
            workers,
            "glyphs: clean renders",
        )
    )

    # Keep a (class, font) only if it draws ink; keep a class only if enough fonts draw it
    # and none of its renders is pixel-identical to an already kept class in that font
    # (Latin A, Greek Alpha and Cyrillic A are one picture, not three classes).
    seen: dict[tuple[int, bytes], int] = {}
    kept: dict[int, list[int]] = {}
    dropped = {"blank": 0, "few_fonts": 0, "duplicate": 0}
    for cp, fs in cands.items():
        drawn = [(fi, img) for fi, img in zip(fs, clean[cp], strict=True) if not _is_blank(img)]
        if len(drawn) < cfg.min_fonts:
            dropped["blank" if len(drawn) < len(fs) else "few_fonts"] += 1
            continue
        keys = [(fi, img.tobytes()) for fi, img in drawn]
        if any(k in seen for k in keys):
            dropped["duplicate"] += 1
            continue
        seen.update(dict.fromkeys(keys, cp))
        kept[cp] = [fi for fi, _ in drawn]

    codepoints = np.array(sorted(kept), dtype=np.int64)
    aug_jobs = [(int(cp), [(fi, fonts[fi].path) for fi in kept[cp]], cfg) for cp in codepoints]
    augmented = (
        _map(_render_augmented, aug_jobs, workers, "glyphs: augmentations")
        if cfg.augment
        else [[] for _ in aug_jobs]
    )

    images, sample_class, sample_font, is_aug = [], [], [], []
    for ci, cp in enumerate(codepoints):
        fs = kept[int(cp)]
        cleans = dict(zip(cands[int(cp)], clean[int(cp)], strict=True))
        for fi in fs:
            images.append(cleans[fi])
            sample_class.append(ci)
            sample_font.append(fi)
            is_aug.append(False)
        for j, img in enumerate(augmented[ci]):
            images.append(img)
            sample_class.append(ci)
            sample_font.append(fs[j // cfg.augment])
            is_aug.append(True)

    data = GlyphData(
        images=np.stack(images) if images else np.zeros((0, cfg.size, cfg.size), np.uint8),
        sample_class=np.array(sample_class, np.int64),
        sample_font=np.array(sample_font, np.int64),
        augmented=np.array(is_aug, bool),
        codepoints=codepoints,
        class_split=np.array([_split_of(int(cp), cfg) for cp in codepoints], np.int64),
        class_tenant=np.array([TENANTS.index(tenant_of(int(cp))) for cp in codepoints], np.int64),
        font_names=tuple(f.name for f in fonts),
        info={
            "config": asdict(cfg),
            "fonts": len(fonts),
            "font_set": fingerprint(fonts),
            "candidates": len(cands),
            "dropped": dropped,
            "build_seconds": round(time.perf_counter() - started, 2),
        },
    )
    return data


# ----------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """``$TCM_CACHE_DIR``, else ``$XDG_CACHE_HOME/tcm-retrieval``, else ``~/.cache/...``."""
    if env := os.environ.get("TCM_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tcm-retrieval"


def cache_path(cfg: GlyphConfig) -> Path:
    fonts = discover_fonts(cfg.system_fonts)
    key = json.dumps([CACHE_VERSION, asdict(cfg), fingerprint(fonts)], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"glyphs-{cfg.size}px-{digest}.npz"


def load(cfg: GlyphConfig | None = None, rebuild: bool = False, verbose: bool = True) -> GlyphData:
    """The dataset for ``cfg``, rendered once and then read from the cache."""
    from contracts.files import atomic_write_bytes

    cfg = cfg or GlyphConfig()
    path = cache_path(cfg)
    if path.exists() and not rebuild:
        return _read(path)
    if verbose:
        print(f"glyphs: rendering dataset (once) into {path}", flush=True)
    data = build(cfg)
    import io

    buffer = io.BytesIO()
    np.savez_compressed(
        buffer,
        images=data.images,
        sample_class=data.sample_class,
        sample_font=data.sample_font,
        augmented=data.augmented,
        codepoints=data.codepoints,
        class_split=data.class_split,
        class_tenant=data.class_tenant,
        font_names=np.array(data.font_names),
        info=np.array(json.dumps(data.info)),
    )
    atomic_write_bytes(path, buffer.getvalue())
    if verbose:
        size_mb = path.stat().st_size / 2**20
        print(
            f"glyphs: {len(data.codepoints)} classes, {len(data.images)} images in "
            f"{data.info['build_seconds']} s; cache {size_mb:.1f} MiB",
            flush=True,
        )
    return data


def _read(path: Path) -> GlyphData:
    with np.load(path, allow_pickle=False) as z:
        return GlyphData(
            images=z["images"],
            sample_class=z["sample_class"],
            sample_font=z["sample_font"],
            augmented=z["augmented"],
            codepoints=z["codepoints"],
            class_split=z["class_split"],
            class_tenant=z["class_tenant"],
            font_names=tuple(str(s) for s in z["font_names"]),
            info=json.loads(str(z["info"])),
        )


def statistics(data: GlyphData) -> dict:
    """Classes and images per split and per tenant (what docs/DATASET.md reports)."""
    stats: dict = {"splits": {}, "info": data.info}
    for si, split in enumerate(SPLITS):
        cls_mask = data.class_split == si
        rows = cls_mask[data.sample_class]
        per_tenant = {}
        for ti, tenant in enumerate(TENANTS):
            c = int((cls_mask & (data.class_tenant == ti)).sum())
            n = int((rows & (data.class_tenant[data.sample_class] == ti)).sum())
            if c:
                per_tenant[tenant] = {"classes": c, "images": n}
        stats["splits"][split] = {
            "classes": int(cls_mask.sum()),
            "images": int(rows.sum()),
            "tenants": per_tenant,
        }
    return stats
