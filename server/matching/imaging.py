"""Untrusted image bytes -> model input, under limits, with a clear error for each refusal.

Decoding is where hostile input bites: decompression bombs (a tiny file that inflates
to gigapixels), truncated files, exotic modes. We check the byte size, then read only
the header and check the pixel count *before* decoding pixels, accept a fixed set of
formats, and convert every supported mode to the model's channels (alpha is
composited onto the background the model was trained on, from its metadata:
contracts.embedder, ``EmbedderMeta.alpha_background``).
Whatever a decoder raises on a hostile file becomes an :class:`ImageError`, so a bad
image is refused on its own (INVALID_ARGUMENT in its slot) and never fails a call;
tests/test_fuzz_images.py holds this against a corpus of malformed files.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from contracts.embedder import EmbedderMeta
from embedding.preprocess import preprocess
from imagesets.base import BLACK, flatten_alpha, has_alpha

FORMATS = ("PNG", "JPEG", "BMP", "GIF", "TIFF", "WEBP")
_COLOUR = {"RGB", "CMYK", "YCbCr", "LAB", "HSV", "P"}


class ImageError(ValueError):
    """The image is refused; the message says why and what to send instead."""


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 8 << 20
    max_pixels: int = 16_000_000


def decode(
    data: bytes,
    channels: int,
    limits: ImageLimits,
    background: tuple[int, int, int] = BLACK,
) -> np.ndarray:
    """Encoded image -> uint8 (H, W) for channels=1 or (H, W, 3) for channels=3;
    transparent pixels composited onto ``background``."""
    if not data:
        raise ImageError("empty image: send the encoded bytes of a PNG/JPEG/... file")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image has {len(data)} bytes, the limit is {limits.max_bytes}")
    try:
        with warnings.catch_warnings():
            # Pillow warns about every oddity of a hostile file (corrupt EXIF, tags past
            # the end, bomb-sized headers): under attack that floods the log, and the
            # refusal message already tells the caller what is wrong.
            warnings.simplefilter("ignore")
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width < 1 or height < 1 or width * height > limits.max_pixels:
                raise ImageError(
                    f"image is {width}x{height} pixels, the limit is {limits.max_pixels} pixels"
                )
            image.load()
            return _to_channels(image, channels, background)
    except ImageError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageError(f"image refused as a decompression bomb ({_short(err)})") from err
    except UnidentifiedImageError as err:
        raise ImageError(f"not an image in a supported format ({', '.join(FORMATS)})") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:  # truncated / corrupt streams
        raise ImageError(f"corrupt or truncated image ({_short(err)})") from err
    except Exception as err:
        # Pillow's parsers raise whatever a malformed header provokes (TypeError for a TIFF
        # tag of the wrong type, struct.error, IndexError, ZeroDivisionError, ...). All of
        # it is this image's fault: refuse the image, never fail the call.
        raise ImageError(f"malformed image ({type(err).__name__}: {_short(err)})") from err


def _short(err: BaseException, limit: int = 200) -> str:
    text = str(err)
    return text if len(text) <= limit else text[:limit] + "..."


def _to_channels(image: Image.Image, channels: int, background: tuple[int, int, int]) -> np.ndarray:
    mode = image.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey: keep the top 8 bits (the full 0..65535 range maps to 0..255).
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        image = Image.fromarray((wide >> 8).astype(np.uint8), "L")
    elif mode in ("1", "L"):
        image = image.convert("L")
    elif has_alpha(image):
        image = flatten_alpha(image, background)
    elif mode in _COLOUR:
        image = image.convert("RGB")
    else:
        raise ImageError(f"unsupported image mode {mode}: send 8-bit grey, RGB or RGBA")
    if channels == 1 and image.mode != "L":
        image = image.convert("L")
    elif channels == 3 and image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.uint8)


def header_pixels(data: bytes) -> int:
    """Pixel count from the image header alone (no decoding); unknown/garbage -> a huge
    number, so the caller treats the image as expensive."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(data), formats=FORMATS).size
        return width * height
    except Exception:  # the real decode reports what is wrong
        return 1 << 62


def to_model_input(data: bytes, meta: EmbedderMeta, limits: ImageLimits) -> np.ndarray:
    """Encoded image -> (C, H, W) float32, preprocessed exactly as the model expects."""
    pixels = decode(data, meta.input_channels, limits, meta.alpha_background)
    return preprocess([pixels], meta)[0]
