"""Export a trained embedder to ONNX with its contract metadata and a parity check.

Uses the torch.export-based exporter (``dynamo=True``; the TorchScript one is
deprecated), a dynamic batch axis, and refuses to write a model whose onnxruntime
output differs from torch's by more than :data:`PARITY_TOL`, because calibrated
thresholds are only valid for the exact function that was calibrated.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from contracts import EmbedderMeta, atomic_write_bytes
from contracts.embedder import write_embedder_meta
from imagesets import training_background
from train.models import Embedder

PARITY_TOL = 1e-4
OPSET = 18
# torch's ONNX exporter logs one warning per torchvision op it could translate
# (nms, roi_align, roi_pool, deform_conv2d) when torchvision is not installed; our
# embedders use none of them, so the four lines only alarm users.
_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"
_NO_TORCHVISION = "torchvision is not installed. Skipping %s"


class _DropTorchvisionNotice(logging.Filter):
    """Drops exactly the exporter's "torchvision is not installed. Skipping ..." records."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        notice = (
            record.msg == _NO_TORCHVISION
            and len(args) == 1
            and str(args[0]).startswith("torchvision::")
        )
        return not notice


@contextlib.contextmanager
def _quiet_torchvision_notices() -> Iterator[None]:
    """Drop only those notices, only during an export: every other exporter log still shows.

    They are ``logging`` records (torch's logger), not ``warnings``, so a warnings
    filter does not reach them; a filter on that one logger does.
    """
    logger = logging.getLogger(_REGISTRATION_LOGGER)
    drop = _DropTorchvisionNotice()
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


class ParityError(RuntimeError):
    """onnxruntime and torch disagree beyond tolerance: the export is not trustworthy."""


def embedder_meta(model: Embedder, recipe: dict[str, Any]) -> EmbedderMeta:
    spec = model.spec
    return EmbedderMeta(
        input_height=spec.height,
        input_width=spec.width,
        input_channels=spec.channels,
        pixel_mean=spec.mean,
        pixel_std=spec.std,
        embedding_dim=model.dim,
        l2_normalized=True,
        recipe=recipe,
        background=training_background(str(recipe.get("dataset", ""))),
    )


def to_onnx(model: Embedder, recipe: dict[str, Any]) -> onnx.ModelProto:
    """The model as an in-memory ONNX graph with a dynamic batch axis and metadata."""
    model = model.eval().to("cpu")
    spec = model.spec
    example = torch.randn(2, spec.channels, spec.height, spec.width)
    batch = torch.export.Dim("batch", min=1, max=65536)
    with warnings.catch_warnings(), _quiet_torchvision_notices():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes={"images": {0: batch}},
            opset_version=OPSET,
            verbose=False,
            optimize=True,
        )
    proto = program.model_proto
    write_embedder_meta(proto, embedder_meta(model, recipe))
    return proto


def parity(model: Embedder, proto: onnx.ModelProto, seed: int = 0) -> float:
    """Max |onnxruntime - torch| over a batch of random inputs (batch 3, not the traced 2)."""
    import onnxruntime as ort

    spec = model.spec
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, spec.channels, spec.height, spec.width, generator=g)
    with torch.no_grad():
        want = model.eval().to("cpu")(x).numpy()
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(["embeddings"], {"images": x.numpy()})[0]
    return float(np.abs(got - want).max())


def export_model(model: Embedder, out: str | Path, recipe: dict[str, Any]) -> float:
    """Write ``out`` (.onnx) atomically after the parity check; returns the max difference."""
    proto = to_onnx(model, recipe)
    diff = parity(model, proto)
    print(f"export parity: max |onnx - torch| = {diff:.2e} (limit {PARITY_TOL:.0e})")
    if not diff <= PARITY_TOL:
        raise ParityError(
            f"ONNX output differs from torch by {diff:.2e} > {PARITY_TOL:.0e}; not writing {out}"
        )
    buf = io.BytesIO()
    onnx.save_model(proto, buf)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, buf.getvalue())
    return diff
