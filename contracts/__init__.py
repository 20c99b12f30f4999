"""The artifact contracts between train, calibrate and server (see docs/DESIGN.md).

Torch-free on purpose: the serving side reads these artifacts without the training
stack installed.
"""

from contracts.calibration import (
    SCHEMA_NAME,
    SCHEMA_VERSION,
    CalibrationDoc,
    CalibrationError,
    load_calibration,
    save_calibration,
)
from contracts.embedder import EmbedderMeta, MetadataError, read_embedder_meta
from contracts.files import atomic_write_bytes, atomic_write_text, sha256_file

__all__ = [
    "SCHEMA_NAME",
    "SCHEMA_VERSION",
    "CalibrationDoc",
    "CalibrationError",
    "EmbedderMeta",
    "MetadataError",
    "atomic_write_bytes",
    "atomic_write_text",
    "load_calibration",
    "read_embedder_meta",
    "save_calibration",
    "sha256_file",
]
