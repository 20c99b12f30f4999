"""Labelled image sets for training and calibration (torch-free).

One entry point, :func:`load_images`, reads any supported source from a spec:

- ``glyphs`` (the embedded default; ``glyphs-tiny`` for tests and smoke runs),
- ``novel`` (a new customer's scripts, fonts and styles, outside training and
  calibration; evaluation only, split ``test``; ``novel-tiny`` for tests),
- a folder ``root/<label>/<image>`` or ``root/<tenant>/<label>/<image>``,
- ``cub:PATH``, ``cars:PATH``, ``sop:PATH``, ``inshop:PATH`` (benchmark layouts),

and :func:`load_embeddings` reads precomputed ``.npz`` embeddings.
"""

from __future__ import annotations

from pathlib import Path

from imagesets.base import EmbeddingSet, ImageSet, LabelledSet
from imagesets.benchmarks import LOADERS
from imagesets.folders import load_folder
from imagesets.npz import load_npz

TINY_LIMIT = 6  # classes per (split, tenant) in glyphs-tiny
RENDERED = ("glyphs", "glyphs-tiny", "novel", "novel-tiny")  # the specs rendered from fonts


def training_background(spec: str) -> str:
    """The background a model trained on ``spec`` saw, for its metadata (contracts.embedder):
    the rendered sets draw dark ink on white paper; images read from files have their
    transparent pixels composited onto black (``ImageSet.image``'s default)."""
    return "white" if spec in RENDERED else "black"


def glyph_config(spec: str):
    """The glyph configuration a spec names: ``glyphs`` or ``glyphs-tiny``."""
    from imagesets.glyphs import GlyphConfig

    if spec == "glyphs":
        return GlyphConfig()
    if spec == "glyphs-tiny":
        return GlyphConfig(limit=TINY_LIMIT)
    raise ValueError(f"unknown glyph set {spec!r}: use 'glyphs' or 'glyphs-tiny'")


def novel_config(spec: str):
    """The novel-set configuration a spec names: ``novel`` or ``novel-tiny``."""
    from imagesets.novel import TINY_LIMIT as NOVEL_TINY_LIMIT
    from imagesets.novel import NovelConfig

    if spec == "novel":
        return NovelConfig()
    if spec == "novel-tiny":
        return NovelConfig(limit=NOVEL_TINY_LIMIT)
    raise ValueError(f"unknown novel set {spec!r}: use 'novel' or 'novel-tiny'")


def load_images(spec: str, split: str = "test") -> ImageSet:
    """Load an image set from a spec string (see module docstring)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if spec in ("glyphs", "glyphs-tiny"):
        from imagesets import glyphs

        return glyphs.load(glyph_config(spec)).split(split)
    if spec in ("novel", "novel-tiny"):
        from imagesets import novel

        novel.check_split(split)  # before rendering anything
        return novel.load(novel_config(spec)).split(split)
    kind, sep, path = spec.partition(":")
    if sep and kind in LOADERS:
        return LOADERS[kind](path, split)
    if Path(spec).is_dir():
        return load_folder(spec)
    # No "cannot read dataset {spec!r}" here: every caller says that, with the spec.
    raise ValueError(
        f"no such image folder, and not a dataset name: expected one of {', '.join(RENDERED)}, "
        f"an image folder, or one of {', '.join(k + ':PATH' for k in LOADERS)}"
    )


def load_embeddings(path: str | Path) -> EmbeddingSet:
    return load_npz(path)


__all__ = [
    "EmbeddingSet",
    "ImageSet",
    "LabelledSet",
    "load_embeddings",
    "load_images",
    "training_background",
]
