"""onnxruntime embedding with preprocessing from the model's metadata."""

from __future__ import annotations

import numpy as np
import pytest

from embedding import OnnxEmbedder, preprocess, select_providers
from testing.onnx_models import make_linear_embedder


def test_embeddings_are_unit_vectors(linear_model, tiny_glyphs):
    model = OnnxEmbedder(linear_model, device="cpu")
    emb = model.embed_set(tiny_glyphs, batch_size=64)
    assert emb.shape == (len(tiny_glyphs), 16)
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert model.device == "cpu" and len(model.sha256) == 64


def test_batching_does_not_change_results(linear_model, tiny_glyphs):
    model = OnnxEmbedder(linear_model, device="cpu")
    a = model.embed(tiny_glyphs.pixels[:50], batch_size=7)
    b = model.embed(tiny_glyphs.pixels[:50], batch_size=50)
    assert np.allclose(a, b, atol=1e-6)


def test_preprocess_matches_metadata(linear_model):
    model = OnnxEmbedder(linear_model, device="cpu")
    x = preprocess(np.full((2, 32, 32), 255, np.uint8), model.meta)
    assert x.shape == (2, 1, 32, 32) and np.allclose(x, 1.0)  # (1 - 0.5) / 0.5


def test_rgb_and_other_sizes_are_converted(linear_model):
    model = OnnxEmbedder(linear_model, device="cpu")
    rgb = np.zeros((40, 50, 3), np.uint8)
    rgb[..., 1] = 255
    x = preprocess([rgb], model.meta)
    assert x.shape == (1, 1, 32, 32)
    assert np.allclose(x, (round(0.587 * 255) / 255 - 0.5) / 0.5, atol=1e-6)


def test_three_channel_model_takes_gray(tmp_path):
    model = OnnxEmbedder(make_linear_embedder(tmp_path / "rgb.onnx", channels=3), device="cpu")
    assert model.embed(np.zeros((3, 32, 32), np.uint8)).shape == (3, 16)


def test_missing_and_broken_models_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        OnnxEmbedder(tmp_path / "nope.onnx")
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="cannot load this model"):
        OnnxEmbedder(junk)


def test_cuda_request_without_cuda_build_is_an_error():
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        assert select_providers("cuda")[0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(RuntimeError, match="onnxruntime-gpu"):
            select_providers("cuda")
        assert select_providers("auto") == ["CPUExecutionProvider"]
