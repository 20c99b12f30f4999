"""The ``novel`` set: a new customer's glyph-like images, outside training and calibration.

The product promises that one similarity threshold gives every tenant its target
false-accept rate; that promise has to hold for customers the embedder never saw
(docs/DESIGN: "A new customer"). The ``glyphs`` set trains and calibrates the shipped
embedder, so this set differs from it on every axis we control:

- **characters**: only Unicode blocks in which ``glyphs`` has no class at all (checked
  against the glyph candidates at build time and by a test), grouped into script
  families that become tenants;
- **fonts**: Debian's Noto, GNU FreeFont and GNU Unifont (a pixel font), never the
  DejaVu/STIX fonts that ``glyphs`` renders with (``scripts/install_fonts.sh``);
- **styles**: every (character, font) is drawn plain and with heavier strokes
  (a dilation, which ``glyphs`` never applies), and augmented with shear and stronger
  distortions than ``glyphs`` uses (``NOVEL_AUGMENT``).

It is an evaluation set only: it has no train split, so nothing can train on it.
Rendering, cleaning (blank renders, pictures identical to another class) and caching
are the ``glyphs`` code (``imagesets.rendering``, ``imagesets.pipeline``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import sys
import time
import zlib
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from imagesets.base import ImageSet
from imagesets.fonts import Font, fingerprint_paths, load_fonts
from imagesets.pipeline import cache_dir, class_imageset, keep_distinct, parallel_map, write_npz
from imagesets.rendering import Augment, is_blank, render_sample
from imagesets.scripts import is_drawable

CACHE_VERSION = 1
TINY_LIMIT = 4  # classes per tenant in novel-tiny


@dataclass(frozen=True)
class Block:
    """A codepoint range: a Unicode block, or the part of one that a tenant takes."""

    first: int
    last: int
    name: str

    def __contains__(self, codepoint: object) -> bool:
        return isinstance(codepoint, int) and self.first <= codepoint <= self.last


# RESERVED, never used: these scripts are an independent out-of-domain check kept by
# someone else, so no class, tenant or font of this set may come from them. Ranges are
# the Unicode 14 blocks of each script (with their supplements and extensions).
RESERVED_BLOCKS: tuple[Block, ...] = (
    Block(0x0530, 0x058F, "Armenian"),
    Block(0xFB13, 0xFB17, "Armenian ligatures (Alphabetic Presentation Forms)"),
    Block(0x10A0, 0x10FF, "Georgian"),
    Block(0x1C90, 0x1CBF, "Georgian Extended"),
    Block(0x2D00, 0x2D2F, "Georgian Supplement"),
    Block(0x0590, 0x05FF, "Hebrew"),
    Block(0xFB1D, 0xFB4F, "Hebrew presentation forms (Alphabetic Presentation Forms)"),
    Block(0x0E00, 0x0E7F, "Thai"),
    Block(0x1200, 0x137F, "Ethiopic"),
    Block(0x1380, 0x139F, "Ethiopic Supplement"),
    Block(0x2D80, 0x2DDF, "Ethiopic Extended"),
    Block(0xAB00, 0xAB2F, "Ethiopic Extended-A"),
    Block(0x1E7E0, 0x1E7FF, "Ethiopic Extended-B"),
    Block(0x0980, 0x09FF, "Bengali"),
    Block(0x0900, 0x097F, "Devanagari"),
    Block(0xA8E0, 0xA8FF, "Devanagari Extended"),
    Block(0x11B00, 0x11B5F, "Devanagari Extended-A"),
    Block(0x2D30, 0x2D7F, "Tifinagh"),
)
# Fonts made for a reserved script are not even loaded (Noto ships one per script).
RESERVED_FONT_WORDS = (
    "Armenian",
    "Georgian",
    "Hebrew",
    "Thai",
    "Ethiopic",
    "Bengali",
    "Devanagari",
    "Tifinagh",
)

# Tenants: script families, each a customer with its own confusions. Blocks are Unicode
# 14 ranges; the two largest scripts give two tenants each, split at a codepoint
# (Canadian syllabics at U+1540, Yi syllables at U+A250), and Arabic gives its letters
# and its presentation forms. Marks, controls and unassigned codepoints inside a range
# are skipped by `is_drawable`.
TENANT_BLOCKS: dict[str, tuple[Block, ...]] = {
    "arabic": (
        Block(0x0600, 0x06FF, "Arabic"),
        Block(0x0750, 0x077F, "Arabic Supplement"),
        Block(0x0870, 0x089F, "Arabic Extended-B"),
        Block(0x08A0, 0x08FF, "Arabic Extended-A"),
    ),
    "arabic-forms": (
        Block(0xFB50, 0xFDFF, "Arabic Presentation Forms-A"),
        Block(0xFE70, 0xFEFF, "Arabic Presentation Forms-B"),
    ),
    "rtl-scripts": (
        Block(0x0700, 0x074F, "Syriac"),
        Block(0x0780, 0x07BF, "Thaana"),
        Block(0x0800, 0x083F, "Samaritan"),
        Block(0x0840, 0x085F, "Mandaic"),
        Block(0x0860, 0x086F, "Syriac Supplement"),
        Block(0x10D00, 0x10D3F, "Hanifi Rohingya"),
    ),
    "indic-north": (
        Block(0x0A00, 0x0A7F, "Gurmukhi"),
        Block(0x0A80, 0x0AFF, "Gujarati"),
        Block(0x0B00, 0x0B7F, "Oriya"),
    ),
    "indic-south": (
        Block(0x0B80, 0x0BFF, "Tamil"),
        Block(0x0C00, 0x0C7F, "Telugu"),
        Block(0x0C80, 0x0CFF, "Kannada"),
        Block(0x0D00, 0x0D7F, "Malayalam"),
        Block(0x0D80, 0x0DFF, "Sinhala"),
    ),
    "tibetan-mongolian": (
        Block(0x0F00, 0x0FFF, "Tibetan"),
        Block(0x1800, 0x18AF, "Mongolian"),
        Block(0xA840, 0xA87F, "Phags-pa"),
    ),
    "sea-mainland": (
        Block(0x1000, 0x109F, "Myanmar"),
        Block(0xA9E0, 0xA9FF, "Myanmar Extended-B"),
        Block(0xAA60, 0xAA7F, "Myanmar Extended-A"),
        Block(0x1780, 0x17FF, "Khmer"),
        Block(0x19E0, 0x19FF, "Khmer Symbols"),
        Block(0x1950, 0x197F, "Tai Le"),
        Block(0x1980, 0x19DF, "New Tai Lue"),
        Block(0x1A20, 0x1AAF, "Tai Tham"),
        Block(0xAA80, 0xAADF, "Tai Viet"),
        Block(0xAA00, 0xAA5F, "Cham"),
    ),
    "sea-insular": (
        Block(0x1B00, 0x1B7F, "Balinese"),
        Block(0xA980, 0xA9DF, "Javanese"),
        Block(0x1B80, 0x1BBF, "Sundanese"),
        Block(0x1CC0, 0x1CCF, "Sundanese Supplement"),
        Block(0x1A00, 0x1A1F, "Buginese"),
        Block(0x1BC0, 0x1BFF, "Batak"),
        Block(0xA930, 0xA95F, "Rejang"),
    ),
    "cherokee": (
        Block(0x13A0, 0x13FF, "Cherokee"),
        Block(0xAB70, 0xABBF, "Cherokee Supplement"),
    ),
    "syllabics-1": (Block(0x1400, 0x153F, "Unified Canadian Aboriginal Syllabics (first part)"),),
    "syllabics-2": (
        Block(0x1540, 0x167F, "Unified Canadian Aboriginal Syllabics (second part)"),
        Block(0x18B0, 0x18FF, "Unified Canadian Aboriginal Syllabics Extended"),
    ),
    "old-european": (
        Block(0x16A0, 0x16FF, "Runic"),
        Block(0x1680, 0x169F, "Ogham"),
        Block(0x10300, 0x1032F, "Old Italic"),
        Block(0x10330, 0x1034F, "Gothic"),
        Block(0x10350, 0x1037F, "Old Permic"),
    ),
    "coptic-glagolitic": (
        Block(0x2C80, 0x2CFF, "Coptic"),
        Block(0x2C00, 0x2C5F, "Glagolitic"),
    ),
    "yi-1": (Block(0xA000, 0xA24F, "Yi Syllables (first part)"),),
    "yi-2": (
        Block(0xA250, 0xA48F, "Yi Syllables (second part)"),
        Block(0xA490, 0xA4CF, "Yi Radicals"),
    ),
    "vai": (Block(0xA500, 0xA63F, "Vai"),),
    "african": (
        Block(0x07C0, 0x07FF, "NKo"),
        Block(0xA6A0, 0xA6FF, "Bamum"),
        Block(0x1E900, 0x1E95F, "Adlam"),
        Block(0x16E40, 0x16E9F, "Medefaidrin"),
        Block(0x10480, 0x104AF, "Osmanya"),
    ),
    "nushu": (Block(0x1B170, 0x1B2FF, "Nushu"),),
    "music": (
        Block(0x1D000, 0x1D0FF, "Byzantine Musical Symbols"),
        Block(0x1D100, 0x1D1FF, "Musical Symbols"),
    ),
}
TENANTS: tuple[str, ...] = tuple(TENANT_BLOCKS)

# Where Debian's fonts-noto-core, fonts-freefont-ttf and fonts-unifont put their files.
FONT_DIRS: tuple[str, ...] = (
    "/usr/share/fonts/truetype/noto",
    "/usr/share/fonts/truetype/freefont",
    "/usr/share/fonts/opentype/unifont",
)
# unifont_jp and unifont_sample repeat unifont's glyphs (one font, not three);
# unifont_csur holds only private-use characters. DejaVu and STIX are what glyphs uses.
_SKIP_FONT_PREFIXES = ("unifont_jp", "unifont_sample", "unifont_csur", "DejaVu", "STIX")

# Stronger than glyphs' LIGHT augmentation, and with a shear glyphs never applies.
NOVEL_AUGMENT = Augment(
    rotate_deg=12.0,
    scale=(0.8, 1.1),
    shift_px=2.5,
    blur=1.0,
    weight=(0.7, 1.6),
    noise=10.0,
    shear=0.3,
)


@dataclass(frozen=True)
class NovelConfig:
    """Everything that determines the rendered set (and so, with the fonts, its cache key)."""

    size: int = 32
    min_fonts: int = 2  # distinct fonts that must draw a class
    # Stroke growth per style, in render pixels (2x output): plain and heavier strokes.
    strokes: tuple[int, ...] = (0, 2)
    augment: int = 1  # augmented copies per (class, font, style), besides the clean one
    augmentation: Augment = NOVEL_AUGMENT
    seed: int = 0
    limit: int | None = None  # at most this many classes per tenant: tiny sets
    font_dirs: tuple[str, ...] = FONT_DIRS


@dataclass
class NovelData:
    """The rendered set: images with class, font, style and tenant metadata."""

    images: np.ndarray  # (N, size, size) uint8, dark ink on white
    sample_class: np.ndarray  # (N,) index into codepoints
    sample_font: np.ndarray  # (N,) index into font_names
    sample_style: np.ndarray  # (N,) index into config strokes
    augmented: np.ndarray  # (N,) bool
    codepoints: np.ndarray  # (C,)
    class_tenant: np.ndarray  # (C,) index into TENANTS
    font_names: tuple[str, ...]
    info: dict

    def split(self, split: str) -> ImageSet:
        """The whole set as split ``test``; there is no train split, by design."""
        check_split(split)
        from imagesets.glyphs import class_name

        return class_imageset(
            "novel-test",
            np.arange(len(self.images)),
            self.sample_class,
            [class_name(int(cp)) for cp in self.codepoints],
            self.class_tenant,
            TENANTS,
            self.images,
            {"font": self.sample_font, "style": self.sample_style, "augmented": self.augmented},
        )


def check_split(split: str) -> None:
    """Refuse any split but ``test``: nothing may train on a new customer's data."""
    if split != "test":
        raise ValueError(
            f"novel is an evaluation-only set: split 'test' holds all of it, "
            f"there is no {split!r} split (nothing may train on a new customer's data)"
        )


# ----------------------------------------------------------------------------- characters


def reserved(codepoint: int) -> bool:
    """True for a codepoint of a script kept back as an independent check."""
    return any(codepoint in block for block in RESERVED_BLOCKS)


# (first, last, tenant) sorted by first codepoint, for a bisect instead of a scan.
_RANGES = sorted((b.first, b.last, t) for t, bs in TENANT_BLOCKS.items() for b in bs)
_FIRSTS = [first for first, _, _ in _RANGES]


def tenant_of(codepoint: int) -> str | None:
    """The tenant whose blocks hold ``codepoint``, or None when no tenant does."""
    i = bisect.bisect_right(_FIRSTS, codepoint) - 1
    if i >= 0 and codepoint <= _RANGES[i][1]:
        return _RANGES[i][2]
    return None


def glyph_codepoints() -> frozenset[int]:
    """Every codepoint that could be a ``glyphs`` class (its candidates, before cleaning).

    A superset of the classes of the default glyph configuration, the one the shipped
    embedder trained and was calibrated on, computed from font coverage alone (no
    rendering), so a build can keep out of the glyph set cheaply.
    """
    from imagesets.fonts import discover_fonts
    from imagesets.glyphs import GlyphConfig, _candidates

    return frozenset(_candidates(discover_fonts(), GlyphConfig()))


# ----------------------------------------------------------------------------- fonts


def font_paths(cfg: NovelConfig) -> list[Path]:
    """Font files of the novel set, sorted; fonts of reserved scripts are left out."""
    found: list[Path] = []
    for directory in cfg.font_dirs:
        root = Path(directory)
        if root.is_dir():
            found += [p for p in root.rglob("*") if p.suffix.lower() in (".ttf", ".otf")]
    return sorted(
        (
            p
            for p in found
            if not p.name.startswith(_SKIP_FONT_PREFIXES)
            and not any(word in p.stem for word in RESERVED_FONT_WORDS)
        ),
        key=lambda p: p.name,
    )


def discover(cfg: NovelConfig) -> list[Font]:
    """The novel fonts with their character maps (parses every file: about a second)."""
    return load_fonts(font_paths(cfg))


def fonts_available(cfg: NovelConfig | None = None) -> bool:
    """Whether the fonts this set needs are installed (``scripts/install_fonts.sh``)."""
    names = {p.name for p in font_paths(cfg or NovelConfig())}
    return {"unifont.otf", "FreeSerif.ttf", "NotoSansCherokee-Regular.ttf"} <= names


# ----------------------------------------------------------------------------- building


def candidates(fonts: list[Font], cfg: NovelConfig) -> tuple[dict[int, list[int]], dict[str, int]]:
    """Tenant codepoints drawn by at least ``min_fonts`` fonts, with those fonts.

    Also returns how many tenant codepoints were left out because they are glyph
    candidates or reserved (both zero for the shipped tables; counted, not assumed).
    """
    in_glyphs = glyph_codepoints()
    skipped = {"in_glyphs": 0, "reserved": 0}
    keep: dict[int, list[int]] = {}
    taken: dict[str, int] = defaultdict(int)
    for first, last, tenant in _RANGES:
        for cp in range(first, last + 1):
            cover = [i for i, font in enumerate(fonts) if cp in font.codepoints]
            if len(cover) < cfg.min_fonts or not is_drawable(cp):
                continue
            if cp in in_glyphs or reserved(cp):
                skipped["in_glyphs" if cp in in_glyphs else "reserved"] += 1
                continue
            if cfg.limit is not None and taken[tenant] >= cfg.limit:
                continue
            taken[tenant] += 1
            keep[cp] = cover
    keep = dict(sorted(keep.items()))  # codepoint order: the first of two duplicates wins
    return keep, skipped


def style_rng(cfg: NovelConfig, codepoint: int, font: str, style: int, copy: int):
    """Per-sample generator keyed by the font's name, not its position in the font list,
    so installing another font does not change the other samples."""
    return np.random.default_rng([cfg.seed, codepoint, zlib.crc32(font.encode()), style, copy])


def _render_plain(job: tuple[int, list[str], int]) -> tuple[int, list[np.ndarray]]:
    cp, paths, size = job
    return cp, [render_sample(cp, p, size, None) for p in paths]


Sample = tuple[int, int, bool, np.ndarray]  # font index, style, augmented, image


StyleJob = tuple[int, list[tuple[int, str, str, np.ndarray]], NovelConfig]


def _render_styled(job: StyleJob) -> list[Sample]:
    """Every (font, style) of one class: the clean render, then its augmented copies.

    The plain clean render comes with the job (it was drawn for cleaning already). An
    augmented copy that lost its ink (a small dot faded and blurred away) is left out:
    a blank picture is no sample of any class.
    """
    cp, fonts, cfg = job
    out: list[Sample] = []
    for fi, path, name, plain in fonts:
        for si, stroke in enumerate(cfg.strokes):
            clean = (
                plain if stroke == 0 else render_sample(cp, path, cfg.size, None, stroke_px=stroke)
            )
            out.append((fi, si, False, clean))
            for copy in range(1, cfg.augment + 1):
                rng = style_rng(cfg, cp, name, si, copy)
                img = render_sample(cp, path, cfg.size, rng, cfg.augmentation, stroke)
                if not is_blank(img):
                    out.append((fi, si, True, img))
    return out


def _styled_fonts(
    cp: int,
    kept: dict[int, list[int]],
    cands: dict[int, list[int]],
    plain: dict[int, list[np.ndarray]],
    fonts: list[Font],
) -> list[tuple[int, str, str, np.ndarray]]:
    """(font index, path, name, plain clean render) of each font that draws ``cp``."""
    renders = dict(zip(cands[cp], plain[cp], strict=True))
    return [(fi, fonts[fi].path, fonts[fi].name, renders[fi]) for fi in kept[cp]]


def build(cfg: NovelConfig, workers: int | None = None) -> NovelData:
    """Render the set from scratch (see :func:`load` for the cached entry point)."""
    started = time.perf_counter()
    workers = workers or min(4, os.cpu_count() or 1)
    fonts = discover(cfg)
    if not fonts_available(cfg):  # an OSError, so CLIs report it like a missing dataset
        raise FileNotFoundError(
            "the novel set needs Debian's fonts-noto-core, fonts-freefont-ttf and "
            f"fonts-unifont under {', '.join(cfg.font_dirs)}: run scripts/install_fonts.sh"
        )
    cands, skipped = candidates(fonts, cfg)
    jobs = [(cp, [fonts[i].path for i in fs], cfg.size) for cp, fs in cands.items()]
    plain = dict(parallel_map(_render_plain, jobs, workers, "novel: clean renders"))
    # Blank renders and pictures identical to another class's (an Arabic isolated
    # presentation form is its base letter) are dropped, as in glyphs.
    distinct = keep_distinct(cands, plain, cfg.min_fonts)
    codepoints = np.array(sorted(distinct.kept), dtype=np.int64)
    jobs = [
        (int(cp), _styled_fonts(int(cp), distinct.kept, cands, plain, fonts), cfg)
        for cp in codepoints
    ]
    rendered = parallel_map(_render_styled, jobs, workers, "novel: styles and augmentations")
    data = _assemble(rendered, codepoints, fonts, cfg.size)
    expected = sum(len(distinct.kept[int(cp)]) for cp in codepoints) * len(cfg.strokes)
    data.info = {
        "config": asdict(cfg),
        "fonts": len(fonts),
        "font_set": fingerprint_paths(font_paths(cfg)),
        "candidates": len(cands),
        "skipped": skipped,
        "dropped": distinct.dropped,
        "blank_augmentations_dropped": expected * cfg.augment - int(data.augmented.sum()),
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    return data


def _assemble(
    rendered: list[list[Sample]], codepoints: np.ndarray, fonts: list[Font], size: int
) -> NovelData:
    """Per-class sample lists, in class order, as the arrays of a :class:`NovelData`."""
    rows = [(ci, s) for ci, per_class in enumerate(rendered) for s in per_class]
    return NovelData(
        images=np.stack([s[3] for _, s in rows]) if rows else np.zeros((0, size, size), np.uint8),
        sample_class=np.array([ci for ci, _ in rows], np.int64),
        sample_font=np.array([s[0] for _, s in rows], np.int64),
        sample_style=np.array([s[1] for _, s in rows], np.int64),
        augmented=np.array([s[2] for _, s in rows], bool),
        codepoints=codepoints,
        class_tenant=np.array([TENANTS.index(tenant_of(int(cp))) for cp in codepoints], np.int64),
        font_names=tuple(f.name for f in fonts),
        info={},
    )


# ----------------------------------------------------------------------------- cache


def cache_path(cfg: NovelConfig) -> Path:
    """Cache file named by the configuration and the installed font set's fingerprint."""
    fonts = fingerprint_paths(font_paths(cfg))  # parsing ~250 fonts would cost seconds
    key = json.dumps([CACHE_VERSION, asdict(cfg), fonts], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return cache_dir() / f"novel-{cfg.size}px-{digest}.npz"


_ARRAYS = (
    "images",
    "sample_class",
    "sample_font",
    "sample_style",
    "augmented",
    "codepoints",
    "class_tenant",
)


def load(cfg: NovelConfig | None = None, rebuild: bool = False, verbose: bool = True) -> NovelData:
    """The set for ``cfg``, rendered once and then read from the cache."""
    cfg = cfg or NovelConfig()
    path = cache_path(cfg)
    if path.exists() and not rebuild:
        return _read(path)
    if verbose:
        print(f"novel: rendering dataset (once) into {path}", file=sys.stderr, flush=True)
    data = build(cfg)
    arrays = {name: getattr(data, name) for name in _ARRAYS}
    write_npz(path, {**arrays, "font_names": np.array(data.font_names)}, data.info)
    if verbose:
        print(
            f"novel: {len(data.codepoints)} classes, {len(data.images)} images in "
            f"{data.info['build_seconds']} s; cache {path.stat().st_size / 2**20:.1f} MiB",
            file=sys.stderr,  # a note, not the command's result: stdout stays the result
            flush=True,
        )
    return data


def _read(path: Path) -> NovelData:
    with np.load(path, allow_pickle=False) as z:
        return NovelData(
            **{name: z[name] for name in _ARRAYS},
            font_names=tuple(str(s) for s in z["font_names"]),
            info=json.loads(str(z["info"])),
        )


def statistics(data: NovelData) -> dict:
    """Per tenant: classes, images, the blocks it draws from and the fonts that draw it."""
    tenants = {}
    for ti, tenant in enumerate(TENANTS):
        classes = np.flatnonzero(data.class_tenant == ti)
        rows = np.isin(data.sample_class, classes)
        if not len(classes):
            continue
        cps = {int(cp) for cp in data.codepoints[classes]}
        tenants[tenant] = {
            "classes": len(classes),
            "images": int(rows.sum()),
            "blocks": [b.name for b in TENANT_BLOCKS[tenant] if any(cp in b for cp in cps)],
            "fonts": sorted({data.font_names[f] for f in np.unique(data.sample_font[rows])}),
        }
    per_class = np.bincount(data.sample_class, minlength=len(data.codepoints))
    return {
        "classes": len(data.codepoints),
        "images": len(data.images),
        "images_per_class": {"min": int(per_class.min()), "max": int(per_class.max())}
        if len(per_class)
        else {},
        "fonts_used": len(np.unique(data.sample_font)),
        "tenants": tenants,
        "info": data.info,
    }
