"""Shared fixtures: a private glyph cache and tiny models, so tests never touch ~/.cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.onnx_models import make_linear_embedder


@pytest.fixture(scope="session", autouse=True)
def _glyph_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keep the rendered glyphs of the test session out of the user's cache.

    Set TCM_TEST_CACHE_DIR to share renders across runs (the test script does).
    """
    shared = os.environ.get("TCM_TEST_CACHE_DIR")
    path = Path(shared) if shared else tmp_path_factory.mktemp("glyph-cache")
    os.environ["TCM_CACHE_DIR"] = str(path)
    return path


@pytest.fixture(scope="session")
def linear_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_linear_embedder(tmp_path_factory.mktemp("models") / "linear.onnx")


@pytest.fixture(scope="session")
def tiny_glyphs():
    from imagesets import load_images

    return load_images("glyphs-tiny", "test")
