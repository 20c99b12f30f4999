"""An onnxruntime session that turns images into L2-normalised embeddings."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from contracts.embedder import EmbedderMeta
from contracts.files import sha256_file
from embedding.preprocess import preprocess
from imagesets.base import ImageSet

log = logging.getLogger(__name__)

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


def select_providers(device: str = "auto") -> list[str]:
    """Execution providers for ``device`` in {'auto', 'cpu', 'cuda'}.

    'auto' takes CUDA when the installed onnxruntime has it (onnxruntime-gpu), else CPU;
    'cuda' without a CUDA build is an error rather than a silent CPU fallback.
    """
    import onnxruntime as ort

    available = ort.get_available_providers()
    if device == "cpu":
        return [CPU]
    if device == "cuda":
        if CUDA not in available:
            raise RuntimeError(
                f"--device cuda asked for, but this onnxruntime has only {available}; "
                "install the gpu extra (onnxruntime-gpu) instead of onnxruntime"
            )
        return [CUDA, CPU]
    if device != "auto":
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return [CUDA, CPU] if CUDA in available else [CPU]


class OnnxEmbedder:
    """Embeds uint8 images with an exported model; preprocessing comes from its metadata."""

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        device: str = "auto",
        threads: int = 0,
        spin: bool = True,
    ) -> None:
        """``threads``: intra-op threads (0 = one per core). ``spin``: idle pool threads
        busy-wait for the next call (onnxruntime's default: lowest latency for back-to-back
        calls); off, they sleep, which a server between micro-batches wants (docs/SERVER.md,
        "Per-call cost": the spinning thread cost 1.5-3.2 ms of CPU per image)."""
        import onnxruntime as ort

        self.path = Path(model_path)
        if not self.path.is_file():
            raise FileNotFoundError(f"model file not found: {self.path}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        if not spin:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=select_providers(device)
            )
        except Exception as err:  # InvalidGraph, InvalidProtobuf, ... all mean "not our model"
            if isinstance(err, RuntimeError) and "--device" in str(err):
                raise
            raise ValueError(f"{self.path}: onnxruntime cannot load this model ({err})") from err
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta = EmbedderMeta.from_props(props)
        self.providers = self.session.get_providers()
        self.sha256 = sha256_file(self.path)
        log.info("embedder %s on %s", self.path.name, self.providers[0])
        _log_background(self.path, self.meta)

    @property
    def device(self) -> str:
        return "cuda" if self.providers[0] == CUDA else "cpu"

    @property
    def dim(self) -> int:
        return self.meta.embedding_dim

    def run(self, batch: np.ndarray) -> np.ndarray:
        """Model output for a preprocessed NCHW batch, L2-normalised row by row."""
        out = self.session.run([self.meta.output_name], {self.meta.input_name: batch})[0]
        out = np.asarray(out, dtype=np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        # A zero vector stays zero (it has no direction); calibrate refuses such rows.
        return out / np.where(norms > 0, norms, 1.0)

    def embed(
        self,
        images: Sequence[np.ndarray] | np.ndarray,
        batch_size: int = 256,
        progress: str | None = None,
    ) -> np.ndarray:
        """uint8 images -> (N, D) float32 unit vectors, in batches of ``batch_size``."""
        n = len(images)
        out = np.empty((n, self.dim), np.float32)
        starts = range(0, n, batch_size)
        if progress:
            from contracts.progress import bar

            total = (n + batch_size - 1) // batch_size
            starts = bar(starts, desc=progress, unit="batch", total=total)
        for s in starts:
            out[s : s + batch_size] = self.run(preprocess(images[s : s + batch_size], self.meta))
        return out

    def embed_set(
        self, images: ImageSet, batch_size: int = 256, progress: str | None = None
    ) -> np.ndarray:
        """Embed an image set, reading file-backed images one batch at a time."""
        source = (
            images.pixels
            if images.pixels is not None
            else _LazyImages(images, self.meta.alpha_background)
        )
        return self.embed(source, batch_size=batch_size, progress=progress)


def _log_background(path: Path, meta: EmbedderMeta) -> None:
    """Say once per load where the alpha background comes from when the file does not
    declare it: a wrong background silently ruins every transparent image."""
    source, rgb = meta.background_source, meta.alpha_background
    if source == "legacy":
        log.info(
            "%s declares no background (format version %d); its recipe's training data "
            "%r was drawn on %s, so transparent pixels are composited onto that",
            path.name,
            meta.format_version,
            meta.recipe.get("dataset"),
            rgb,
        )
    elif source == "undeclared":
        log.warning(
            "%s declares no background (metadata key embedder.background, format version "
            "2): transparent pixels are composited onto black %s as before; re-export the "
            "model (python -m train) so it says what its training images were drawn on",
            path.name,
            rgb,
        )


class _LazyImages:
    """Slices of a file-backed image set, decoded on demand."""

    def __init__(self, images: ImageSet, background: tuple[int, int, int]) -> None:
        self.images = images
        self.background = background  # what transparent pixels become: the model's

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, window: slice) -> list[np.ndarray]:
        return [
            self.images.image(i, self.background) for i in range(*window.indices(len(self.images)))
        ]
