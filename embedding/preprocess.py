"""Pixels -> model input, exactly as the model's metadata prescribes."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from contracts.embedder import EmbedderMeta

_RESAMPLE = {
    "bilinear": Image.BILINEAR,
    "bicubic": Image.BICUBIC,
    "nearest": Image.NEAREST,
    "lanczos": Image.LANCZOS,
}


def _to_channels(img: np.ndarray, channels: int) -> np.ndarray:
    """(H,W) or (H,W,3) uint8 -> (H,W,channels) uint8."""
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == channels:
        return img
    if channels == 3:
        return np.repeat(img[:, :, :1], 3, axis=2)
    # ITU-R 601 luma, the same weights as PIL's convert("L").
    luma = img[:, :, 0] * 0.299 + img[:, :, 1] * 0.587 + img[:, :, 2] * 0.114
    return np.rint(luma).astype(np.uint8)[:, :, None]


def _resize(img: np.ndarray, meta: EmbedderMeta) -> np.ndarray:
    size = (meta.input_width, meta.input_height)
    if img.shape[1] == size[0] and img.shape[0] == size[1]:
        return img
    return np.asarray(Image.fromarray(img).resize(size, _RESAMPLE[meta.resize]))


def preprocess(images: Sequence[np.ndarray] | np.ndarray, meta: EmbedderMeta) -> np.ndarray:
    """uint8 images, (H,W) or (H,W,3), any size -> float32 NCHW normalised batch."""
    c = meta.input_channels
    if (
        isinstance(images, np.ndarray)
        and images.ndim in (3, 4)
        and images.shape[1:3]
        == (
            meta.input_height,
            meta.input_width,
        )
    ):
        # Fast path for a stacked batch already at the model's size (the glyph arrays).
        batch = images[..., None] if images.ndim == 3 else images
        if batch.shape[3] != c:
            batch = np.stack([_to_channels(im, c) for im in batch])
    else:
        batch = np.stack([_to_channels(_resize(np.asarray(im), meta), c) for im in images])
    x = batch.astype(np.float32) * (1.0 / 255.0)
    x -= np.asarray(meta.pixel_mean, np.float32)
    x /= np.asarray(meta.pixel_std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))
