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
import sys
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imagesets.base import ImageSet
from imagesets.fonts import Font, discover_fonts, fingerprint
from imagesets.pipeline import (
    cache_dir,
    class_imageset,
    keep_distinct,
    parallel_map,
    write_npz,
)
from imagesets.rendering import (  # re-exported: glyphs is where callers look for them
    HEAVY,
    LIGHT,
    Augment,
    augment_ink,
    finish,
    render_ink,
    render_sample,
    sample_rng,
)
from imagesets.scripts import TENANTS, is_drawable, tenant_of

CACHE_VERSION = 1
SPLITS = ("train", "test")

__all__ = [
    "HEAVY",
    "LIGHT",
    "Augment",
    "GlyphConfig",
    "GlyphData",
    "augment_ink",
    "build",
    "cache_dir",
    "cache_path",
    "class_name",
    "finish",
    "load",
    "render_ink",
    "render_sample",
    "sample_rng",
    "statistics",
]


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
        return class_imageset(
            f"glyphs-{split}",
            rows,
            self.sample_class,
            [class_name(int(cp)) for cp in self.codepoints],
            self.class_tenant,
            TENANTS,
            self.images,
            {"font": self.sample_font, "augmented": self.augmented},
        )


def class_name(codepoint: int) -> str:
    return f"U+{codepoint:04X} {chr(codepoint)}"


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


def build(cfg: GlyphConfig, workers: int | None = None) -> GlyphData:
    """Render the dataset from scratch (see :func:`load` for the cached entry point)."""
    started = time.perf_counter()
    workers = workers or min(4, os.cpu_count() or 1)
    fonts = discover_fonts(cfg.system_fonts)
    if not fonts:
        raise RuntimeError("no usable fonts found: is matplotlib installed?")
    cands = _candidates(fonts, cfg)
    clean = dict(
        parallel_map(
            _render_clean,
            [(cp, [fonts[i].path for i in fs], cfg.size) for cp, fs in cands.items()],
            workers,
            "glyphs: clean renders",
        )
    )

    # Blank renders, too few fonts and pictures identical to another class are dropped
    # (Latin A, Greek Alpha and Cyrillic A are one picture, not three classes).
    distinct = keep_distinct(cands, clean, cfg.min_fonts)
    kept = distinct.kept
    codepoints = np.array(sorted(kept), dtype=np.int64)
    aug_jobs = [(int(cp), [(fi, fonts[fi].path) for fi in kept[cp]], cfg) for cp in codepoints]
    augmented = (
        parallel_map(_render_augmented, aug_jobs, workers, "glyphs: augmentations")
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
            "dropped": distinct.dropped,
            "build_seconds": round(time.perf_counter() - started, 2),
        },
    )
    return data


# ----------------------------------------------------------------------------- cache


def cache_path(cfg: GlyphConfig) -> Path:
    fonts = discover_fonts(cfg.system_fonts)
    key = json.dumps([CACHE_VERSION, asdict(cfg), fingerprint(fonts)], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"glyphs-{cfg.size}px-{digest}.npz"


def load(cfg: GlyphConfig | None = None, rebuild: bool = False, verbose: bool = True) -> GlyphData:
    """The dataset for ``cfg``, rendered once and then read from the cache."""
    cfg = cfg or GlyphConfig()
    path = cache_path(cfg)
    if path.exists() and not rebuild:
        return _read(path)
    if verbose:
        print(f"glyphs: rendering dataset (once) into {path}", file=sys.stderr, flush=True)
    data = build(cfg)
    write_npz(
        path,
        {
            "images": data.images,
            "sample_class": data.sample_class,
            "sample_font": data.sample_font,
            "augmented": data.augmented,
            "codepoints": data.codepoints,
            "class_split": data.class_split,
            "class_tenant": data.class_tenant,
            "font_names": np.array(data.font_names),
        },
        data.info,
    )
    if verbose:
        size_mb = path.stat().st_size / 2**20
        print(
            f"glyphs: {len(data.codepoints)} classes, {len(data.images)} images in "
            f"{data.info['build_seconds']} s; cache {size_mb:.1f} MiB",
            file=sys.stderr,  # a note, not the command's result: stdout stays the result
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
