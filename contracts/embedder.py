"""Embedder contract: what an ``.onnx`` file must say about itself in ``metadata_props``.

Calibrate and the server never import training code, so everything needed to feed
the model (input size, channels, normalisation) and to trust its output (dimension,
whether it is already L2-normalised, how it was trained) travels inside the model.
Values are strings in ONNX; lists and dicts are stored as JSON.

Format versions: 1 is the original key set. 2 adds ``background``, the colour the
training images were drawn on, onto which transparent pixels must be composited (a
glyph model trained on dark ink over white paper sees almost nothing in a transparent
PNG composited onto black). A reader of version 1 refuses version 2 files, so an old
server cannot silently feed a new model the wrong background; this build reads both.
Version 1 files carry no background: :attr:`EmbedderMeta.alpha_background` then
falls back to :data:`LEGACY_BACKGROUNDS` (the training data named in the recipe), and
otherwise to black, the behaviour before version 2.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
PREFIX = "embedder."

RGB = tuple[int, int, int]
NAMED_BACKGROUNDS: dict[str, RGB] = {"white": (255, 255, 255), "black": (0, 0, 0)}
# Models exported before format version 2 do not say what they were trained on. Those
# trained on the rendered glyph sets (recipe "dataset") saw dark ink on white paper,
# which is what imagesets.rendering draws; the shipped glyphnet is one of them, and its
# file (hence the SHA-256 its calibration is bound to) stays as it is.
LEGACY_BACKGROUNDS: dict[str, str] = {"glyphs": "white", "glyphs-tiny": "white"}
# What a file that declares nothing and names no known data gets: the pre-2 behaviour.
UNDECLARED_BACKGROUND = "black"


class MetadataError(ValueError):
    """The model's metadata is missing or malformed; the message names the field."""


@dataclass(frozen=True)
class EmbedderMeta:
    """Preprocessing and identity of an exported embedder.

    Pixels are scaled to [0, 1], then ``(x - pixel_mean) / pixel_std`` per channel,
    after resizing to ``input_height x input_width`` with ``resize`` interpolation.
    """

    input_height: int
    input_width: int
    input_channels: int
    pixel_mean: tuple[float, ...]
    pixel_std: tuple[float, ...]
    embedding_dim: int
    l2_normalized: bool = True
    input_name: str = "images"
    output_name: str = "embeddings"
    input_layout: str = "NCHW"
    resize: str = "bilinear"
    recipe: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    # "white", "black" or "#rrggbb": the training images' background; None = not declared
    background: str | None = None

    def __post_init__(self) -> None:
        _check(self.input_layout == "NCHW", "input_layout", "only NCHW is supported")
        for name in ("input_height", "input_width", "embedding_dim"):
            _check(int(getattr(self, name)) > 0, name, "must be a positive integer")
        _check(self.input_channels in (1, 3), "input_channels", "must be 1 or 3")
        for name in ("pixel_mean", "pixel_std"):
            values = getattr(self, name)
            _check(
                len(values) == self.input_channels,
                name,
                f"needs {self.input_channels} values (one per channel), got {len(values)}",
            )
        _check(all(s > 0 for s in self.pixel_std), "pixel_std", "values must be > 0")
        _check(self.resize in ("bilinear", "bicubic", "nearest", "lanczos"), "resize", "unknown")
        _check(
            self.format_version in READABLE_VERSIONS,
            "format_version",
            f"this build reads versions {', '.join(map(str, READABLE_VERSIONS))}, the model "
            f"has {self.format_version}",
        )
        if self.background is not None:
            _check(
                parse_background(self.background) is not None,
                "background",
                f"{self.background!r} is not white, black or #rrggbb",
            )

    @property
    def alpha_background(self) -> RGB:
        """The colour transparent pixels are composited onto (see :attr:`background_source`)."""
        name = self.background or LEGACY_BACKGROUNDS.get(self._recipe_dataset(), "")
        return parse_background(name or UNDECLARED_BACKGROUND)  # type: ignore[return-value]

    @property
    def background_source(self) -> str:
        """Where :attr:`alpha_background` comes from: "declared" (the file says it),
        "legacy" (a pre-2 file trained on data of :data:`LEGACY_BACKGROUNDS`) or
        "undeclared" (nothing says it: black, as before version 2; worth a warning)."""
        if self.background is not None:
            return "declared"
        return "legacy" if self._recipe_dataset() in LEGACY_BACKGROUNDS else "undeclared"

    def _recipe_dataset(self) -> str:
        dataset = self.recipe.get("dataset") if isinstance(self.recipe, dict) else None
        return dataset if isinstance(dataset, str) else ""

    def to_props(self) -> dict[str, str]:
        """Flatten to ONNX ``metadata_props`` (string -> string)."""
        props = {}
        for key, value in asdict(self).items():
            if key == "background" and value is None:
                continue  # undeclared: absent, as in a version 1 file
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            props[PREFIX + key] = text
        return props

    @classmethod
    def from_props(cls, props: dict[str, str]) -> EmbedderMeta:
        """Parse ``metadata_props``; raises :class:`MetadataError` naming the bad key."""
        values: dict[str, Any] = {}
        for name, kind in _FIELD_TYPES.items():
            key = PREFIX + name
            if key not in props:
                if name in _OPTIONAL:
                    continue
                raise MetadataError(
                    f"model metadata lacks '{key}': export the model with `python -m train "
                    "export` so it carries its preprocessing"
                )
            values[name] = _parse(key, props[key], kind)
        try:
            return cls(**values)
        except TypeError as err:  # wrong JSON shape slipped through
            raise MetadataError(f"model metadata is malformed: {err}") from err


_FIELD_TYPES: dict[str, type] = {
    "format_version": int,
    "input_name": str,
    "output_name": str,
    "input_layout": str,
    "input_height": int,
    "input_width": int,
    "input_channels": int,
    "pixel_mean": tuple,
    "pixel_std": tuple,
    "resize": str,
    "embedding_dim": int,
    "l2_normalized": bool,
    "recipe": dict,
    "background": str,
}
_OPTIONAL = {"input_name", "output_name", "input_layout", "resize", "recipe", "background"}


def parse_background(text: str) -> RGB | None:
    """ "white", "black" or "#rrggbb" -> (r, g, b); None when it is none of these."""
    named = NAMED_BACKGROUNDS.get(text.strip().lower())
    if named is not None:
        return named
    if re.fullmatch(r"#[0-9a-fA-F]{6}", text):
        value = int(text[1:], 16)
        return (value >> 16 & 255, value >> 8 & 255, value & 255)
    return None


def _check(ok: bool, name: str, why: str) -> None:
    if not ok:
        raise MetadataError(f"embedder metadata field '{PREFIX}{name}': {why}")


def _parse(key: str, text: str, kind: type) -> Any:
    if kind is str:
        return text
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise MetadataError(f"model metadata '{key}' is not valid JSON: {text!r}") from err
    if kind is tuple:
        ok = isinstance(value, list) and all(isinstance(v, int | float) for v in value)
        value = tuple(float(v) for v in value) if ok else value
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise MetadataError(f"model metadata '{key}' should be {kind.__name__}, got {text!r}")
    return value


def read_embedder_meta(model_path: str | os.PathLike[str]) -> EmbedderMeta:
    """Read the contract from an ``.onnx`` file without building an inference session."""
    import onnx

    try:
        model = onnx.load(os.fspath(model_path), load_external_data=False)
    except FileNotFoundError:
        raise
    except Exception as err:  # onnx raises DecodeError and friends for junk files
        raise MetadataError(f"{model_path}: not a readable ONNX model ({err})") from err
    return EmbedderMeta.from_props({p.key: p.value for p in model.metadata_props})


def write_embedder_meta(model: Any, meta: EmbedderMeta) -> None:
    """Replace the contract keys of an in-memory ``onnx.ModelProto``."""
    kept = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    for prop in kept:
        model.metadata_props.add(key=prop.key, value=prop.value)
    for key, value in meta.to_props().items():
        model.metadata_props.add(key=key, value=value)
