"""The model the server serves: an onnxruntime embedder bound to its calibration.

Loading refuses a calibration measured on another model (naming both SHA-256s) and a
default target FAR the calibration does not hold, so a server never starts with a
threshold that means nothing for its model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from contracts import CalibrationDoc, load_calibration, sha256_file
from contracts.calibration import Target
from embedding import OnnxEmbedder
from server.matching.imaging import ImageLimits, to_model_input
from server.matching.normalization import ServedNormalization

log = logging.getLogger(__name__)


def _require_regular_file(path: Path) -> None:
    """Not a directory, device or FIFO (/dev/zero would be read forever) and a name the
    OS takes: Reload gets these paths from an admin call."""
    try:
        regular = path.is_file()
    except (OSError, ValueError) as err:  # name too long, NUL byte, ...
        why = getattr(err, "strerror", None) or str(err)[:100]
        raise FileNotFoundError(f"{str(path)[:200]!r}: not a usable path ({why})") from err
    if not regular:
        raise FileNotFoundError(f"{str(path)[:200]}: no such regular file")


@dataclass
class ServingModel:
    embedder: OnnxEmbedder
    calibration: CalibrationDoc
    model_path: Path
    calibration_path: Path
    calibration_sha256: str
    default_far: float
    threads: int = 0
    normalization: ServedNormalization = field(default_factory=lambda: ServedNormalization("none"))

    @classmethod
    def load(
        cls,
        model_path: Path,
        calibration_path: Path,
        device: str,
        default_far: float,
        threads: int = 0,
        normalize: str | None = None,
    ) -> ServingModel:
        """Load and cross-check; raises ValueError/CalibrationError with what to do.
        ``threads``: onnxruntime intra-op threads (0 = its default, one per core).
        ``normalize``: score normalisation (None = what the calibration was made for)."""
        for path in (model_path, calibration_path):
            _require_regular_file(Path(path))
        calibration = load_calibration(calibration_path)
        normalization = ServedNormalization.resolve(calibration, normalize)
        # no spinning: between micro-batches the pool threads would busy-wait a core away
        embedder = OnnxEmbedder(model_path, device=device, threads=threads, spin=False)
        calibration.check_model(model_path, sha256=embedder.sha256)
        calibration.target(default_far)  # raises naming the calibrated targets
        log.info(
            "model %s (sha256 %s) on %s, calibration %s, normalisation %s",
            model_path,
            embedder.sha256[:12],
            embedder.providers[0],
            calibration_path,
            normalization.method,
        )
        return cls(
            embedder,
            calibration,
            Path(model_path),
            Path(calibration_path),
            sha256_file(calibration_path),
            default_far,
            threads,
            normalization,
        )

    @property
    def sha256(self) -> str:
        return self.embedder.sha256

    @property
    def provider(self) -> str:
        return self.embedder.providers[0]

    @property
    def reference_top1(self) -> dict | None:
        """The calibration's top-1 similarity histogram: the live drift reference."""
        return (self.calibration.raw.get("reference") or {}).get("top1_similarity")

    def target(self, far: float) -> Target:
        """The calibrated target for ``far`` (0 = the default); CalibrationError if absent."""
        return self.calibration.target(far or self.default_far)

    def thresholds(self) -> dict[float, float]:
        return {t.target_far: t.threshold for t in self.calibration.targets()}

    def embed_images(self, images: list[bytes], limits: ImageLimits) -> np.ndarray:
        """Re-embed stored gallery images (reload, restart with a new model)."""
        if not images:
            return np.empty((0, self.embedder.dim), np.float32)
        parts = []
        for start in range(0, len(images), 256):  # bounded memory for large galleries
            chunk = images[start : start + 256]
            batch = np.stack([to_model_input(i, self.embedder.meta, limits) for i in chunk])
            parts.append(self.embedder.run(batch))
        return np.concatenate(parts)
