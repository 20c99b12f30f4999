"""Run an exported embedder with onnxruntime: no torch on the serving side.

The model file is the whole interface: its metadata (contracts.embedder) says how to
preprocess pixels, so calibrate and server need nothing from training.
"""

from embedding.defaults import DEFAULT_CALIBRATION, DEFAULT_MODEL, require_default_model
from embedding.onnx_embedder import OnnxEmbedder, select_providers
from embedding.preprocess import preprocess

__all__ = [
    "DEFAULT_CALIBRATION",
    "DEFAULT_MODEL",
    "OnnxEmbedder",
    "preprocess",
    "require_default_model",
    "select_providers",
]
