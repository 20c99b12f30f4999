"""Labelled image and embedding sets: the one shape every loader returns.

Images stay where they are (an in-memory array for the rendered glyphs, files for
folders and benchmarks) and are read by index, so a million-image folder costs only
its paths until something embeds it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image

BLACK = (0, 0, 0)
_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})


def has_alpha(image: Image.Image) -> bool:
    """Whether some pixels of ``image`` may be (partly) transparent."""
    return image.mode in _ALPHA_MODES or (image.mode == "P" and "transparency" in image.info)


def flatten_alpha(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """``image`` composited onto an opaque ``background``, as RGB.

    The one place where transparency becomes pixels, for the server (untrusted uploads)
    and for files read into image sets (calibration, training), so a transparent PNG
    embeds the same whichever route it takes.
    """
    rgba = image.convert("RGBA")
    base = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(base, rgba).convert("RGB")


@dataclass(frozen=True)
class LabelledSet:
    """Labels and tenants shared by image and embedding sets.

    ``labels[i]`` indexes ``class_names``; ``tenants[i]`` indexes ``tenant_names``.
    A tenant (dataset) groups classes for per-dataset calibration and serving.
    """

    name: str
    labels: np.ndarray
    class_names: tuple[str, ...]
    tenants: np.ndarray
    tenant_names: tuple[str, ...]

    def __post_init__(self) -> None:
        n = len(self.labels)
        if len(self.tenants) != n:
            raise ValueError(f"{self.name}: {n} labels but {len(self.tenants)} tenant entries")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.class_names)):
            raise ValueError(f"{self.name}: labels must index class_names")
        if n and (self.tenants.min() < 0 or self.tenants.max() >= len(self.tenant_names)):
            raise ValueError(f"{self.name}: tenants must index tenant_names")

    def __len__(self) -> int:
        return len(self.labels)

    def tenant_indices(self, tenant: str) -> np.ndarray:
        """Row indices of one tenant; raises with the known names if it does not exist."""
        if tenant not in self.tenant_names:
            raise KeyError(f"{self.name}: no tenant {tenant!r}; have {list(self.tenant_names)}")
        return np.flatnonzero(self.tenants == self.tenant_names.index(tenant))


@dataclass(frozen=True)
class ImageSet(LabelledSet):
    """Images read by index: ``pixels`` (N,H,W) or (N,H,W,3) uint8, or ``paths``."""

    pixels: np.ndarray | None = None
    paths: tuple[str, ...] | None = None
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.pixels is None) == (self.paths is None):
            raise ValueError(f"{self.name}: give exactly one of pixels or paths")
        stored = self.pixels if self.pixels is not None else self.paths
        if len(stored) != len(self.labels):
            raise ValueError(f"{self.name}: {len(stored)} images but {len(self.labels)} labels")

    def image(self, i: int, background: tuple[int, int, int] = BLACK) -> np.ndarray:
        """One image as uint8, (H,W) grayscale or (H,W,3) RGB; transparent pixels of a
        file are composited onto ``background`` (an embedder passes the colour its
        training images were drawn on, as the server does)."""
        if self.pixels is not None:
            return self.pixels[i]
        with Image.open(self.paths[i]) as img:
            if has_alpha(img):
                return np.asarray(flatten_alpha(img, background))
            return np.asarray(img if img.mode in ("L", "RGB") else img.convert("RGB"))

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> ImageSet:
        """A view on some rows; class and tenant names are kept so labels stay comparable."""
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            name=name or self.name,
            labels=self.labels[idx],
            tenants=self.tenants[idx],
            pixels=None if self.pixels is None else self.pixels[idx],
            paths=None if self.paths is None else tuple(self.paths[i] for i in idx),
            extra={k: v[idx] for k, v in self.extra.items()},
        )


@dataclass(frozen=True)
class EmbeddingSet(LabelledSet):
    """Precomputed embeddings, (N, D) float32, one row per sample."""

    embeddings: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.embeddings.ndim != 2 or len(self.embeddings) != len(self.labels):
            raise ValueError(
                f"{self.name}: embeddings must be (N, D) with N = {len(self.labels)} labels, "
                f"got shape {self.embeddings.shape}"
            )

    def subset(self, indices: Sequence[int] | np.ndarray, name: str | None = None) -> EmbeddingSet:
        idx = np.asarray(indices, dtype=np.int64)
        return replace(
            self,
            name=name or self.name,
            labels=self.labels[idx],
            tenants=self.tenants[idx],
            embeddings=self.embeddings[idx],
        )


def encode(values: Sequence[str]) -> tuple[np.ndarray, tuple[str, ...]]:
    """Map strings to dense int64 codes; names are sorted so codes do not depend on order."""
    names, codes = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
    return codes.astype(np.int64), tuple(str(n) for n in names)


def single_tenant(n: int, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    return np.zeros(n, dtype=np.int64), (name,)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_file(path: str | os.PathLike[str]) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES
