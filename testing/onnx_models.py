"""Tiny valid embedders built with onnx.helper, so tests need neither torch nor training.

A seeded random projection of the pixels is a poor embedder but a real ONNX model
with the contract's metadata: exactly what calibrate and server consume.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from contracts.embedder import EmbedderMeta, write_embedder_meta


def make_linear_embedder(
    path: Path,
    dim: int = 16,
    size: int = 32,
    channels: int = 1,
    seed: int = 0,
    meta: EmbedderMeta | None = None,
) -> Path:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(channels * size * size, dim)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["images"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["embeddings"]),
        ],
        "linear_embedder",
        [
            helper.make_tensor_value_info(
                "images", TensorProto.FLOAT, ["batch", channels, size, size]
            )
        ],
        [helper.make_tensor_value_info("embeddings", TensorProto.FLOAT, ["batch", dim])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    write_embedder_meta(
        model,
        meta
        or EmbedderMeta(
            input_height=size,
            input_width=size,
            input_channels=channels,
            pixel_mean=(0.5,) * channels,
            pixel_std=(0.5,) * channels,
            embedding_dim=dim,
            l2_normalized=False,
            recipe={"kind": "test fixture", "seed": seed},
        ),
    )
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path
