"""Where the shipped default embedder and its calibration live."""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEFAULT_MODEL = ASSETS / "glyphnet.onnx"
DEFAULT_CALIBRATION = ASSETS / "glyphnet.calibration.json"

MAKE_DEFAULT = "python -m train --config train/configs/default.toml --export-default"


def require_default_model() -> Path:
    """The default model path, or an error that names the command that makes it."""
    if not DEFAULT_MODEL.exists():
        raise FileNotFoundError(
            f"the default embedder {DEFAULT_MODEL} is missing; build it with `{MAKE_DEFAULT}` "
            "or pass --model PATH.onnx"
        )
    return DEFAULT_MODEL
