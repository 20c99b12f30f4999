"""Transparent images are composited onto the background the model was trained on.

The glyph models were trained on dark ink over white paper; a transparent PNG of the
same glyph composited onto black is a blank square to them (1/30 correct top-1 against
26/30 opaque, measured before this fix). The background is part of the embedder's
metadata contract (``embedder.background``, format version 2); files of version 1 fall
back to the training data their recipe names, or to black as before.
"""

from __future__ import annotations

import io
import logging

import numpy as np
import pytest
from PIL import Image

from contracts import EmbedderMeta, MetadataError
from contracts.embedder import PREFIX, parse_background
from imagesets.base import BLACK
from server.matching.imaging import ImageLimits, decode, to_model_input

WHITE = (255, 255, 255)


def meta(**over) -> EmbedderMeta:
    base = dict(
        input_height=32,
        input_width=32,
        input_channels=1,
        pixel_mean=(0.5,),
        pixel_std=(0.5,),
        embedding_dim=16,
    )
    return EmbedderMeta(**(base | over))


def transparent_twin(grey: np.ndarray) -> bytes:
    """Black ink whose opacity is the darkness of ``grey`` (dark ink on white): composited
    onto white it gives back ``grey`` exactly, onto black a blank square."""
    rgba = np.zeros((*grey.shape, 4), np.uint8)
    rgba[..., 3] = 255 - grey
    out = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(out, format="PNG")
    return out.getvalue()


def opaque(grey: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(grey, "L").save(out, format="PNG")
    return out.getvalue()


# ------------------------------------------------------------------- the contract
@pytest.mark.parametrize(
    ("text", "rgb"),
    [("white", WHITE), ("Black", BLACK), ("#FF8000", (255, 128, 0)), ("#ff8000", (255, 128, 0))],
)
def test_background_values(text: str, rgb: tuple[int, int, int]) -> None:
    assert parse_background(text) == rgb


@pytest.mark.parametrize("text", ["grey", "#fff", "#-12345", "#12345g", "255,255,255", ""])
def test_a_bad_background_names_the_field(text: str) -> None:
    assert parse_background(text) is None
    props = meta().to_props() | {PREFIX + "background": text}
    with pytest.raises(MetadataError, match=r"embedder\.background"):
        EmbedderMeta.from_props(props)


def test_declared_background_round_trips_and_wins_over_the_recipe() -> None:
    m = meta(background="black", recipe={"dataset": "glyphs"})
    assert m.format_version == 2
    back = EmbedderMeta.from_props(m.to_props())
    assert back == m and back.alpha_background == BLACK and back.background_source == "declared"


def test_version_1_files_fall_back_to_the_recipe_or_to_black() -> None:
    """The shipped glyphnet is such a file: its bytes (and the SHA-256 its calibration is
    bound to) stay, and it is served on white because it was trained on glyphs."""
    glyph = meta(format_version=1, recipe={"dataset": "glyphs", "backbone": "glyphnet"})
    props = glyph.to_props()
    assert PREFIX + "background" not in props  # undeclared = absent, as in a version 1 file
    glyph = EmbedderMeta.from_props(props)
    assert (glyph.alpha_background, glyph.background_source) == (WHITE, "legacy")
    other = meta(format_version=1, recipe={"dataset": "cub:/data/cub"})
    assert (other.alpha_background, other.background_source) == (BLACK, "undeclared")
    assert meta(recipe={"dataset": ["not", "a", "name"]}).alpha_background == BLACK


def test_an_unknown_format_version_is_refused() -> None:
    props = meta().to_props() | {PREFIX + "format_version": "3"}
    with pytest.raises(MetadataError, match="reads versions 1, 2"):
        EmbedderMeta.from_props(props)


def test_the_shipped_model_is_served_on_white_without_changing_its_file() -> None:
    from contracts import load_calibration, read_embedder_meta
    from embedding.defaults import DEFAULT_CALIBRATION, DEFAULT_MODEL

    shipped = read_embedder_meta(DEFAULT_MODEL)
    assert shipped.alpha_background == WHITE
    load_calibration(DEFAULT_CALIBRATION).check_model(DEFAULT_MODEL)  # same bytes


def test_legacy_backgrounds_agree_with_what_imagesets_renders() -> None:
    """Two places know that the glyph sets are drawn on white; they must not part ways."""
    from contracts.embedder import LEGACY_BACKGROUNDS
    from imagesets import training_background

    for dataset, name in LEGACY_BACKGROUNDS.items():
        assert training_background(dataset) == name
    assert training_background("novel") == "white"
    assert training_background("/some/folder") == "black"


# -------------------------------------------------------------------- decoding
def test_a_transparent_glyph_decodes_to_its_opaque_twin_on_white(tiny_glyphs) -> None:
    grey = tiny_glyphs.image(0)
    twin = transparent_twin(grey)
    assert np.array_equal(decode(twin, 1, ImageLimits(), WHITE), grey)
    assert decode(twin, 1, ImageLimits(), BLACK).max() == 0  # what black made of it: nothing
    white_model = meta(background="white")
    assert np.array_equal(
        to_model_input(twin, white_model, ImageLimits()),
        to_model_input(opaque(grey), white_model, ImageLimits()),
    )


def test_image_folders_composite_like_the_server(tiny_glyphs, tmp_path, linear_model) -> None:
    """calibrate --check reads folders: a transparent file embeds as its opaque twin."""
    from embedding import OnnxEmbedder
    from imagesets import load_images

    for name, encode in (("opaque", opaque), ("clear", transparent_twin)):
        for i in range(4):
            folder = tmp_path / name / f"class{i % 2}"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}.png").write_bytes(encode(tiny_glyphs.image(i)))
    embedder = OnnxEmbedder(linear_model, device="cpu")
    object.__setattr__(embedder, "meta", meta(background="white"))
    a = embedder.embed_set(load_images(str(tmp_path / "opaque")))
    b = embedder.embed_set(load_images(str(tmp_path / "clear")))
    assert np.array_equal(a, b)


def test_an_undeclared_background_is_one_warning(linear_model, caplog) -> None:
    from embedding import OnnxEmbedder

    with caplog.at_level(logging.INFO, logger="embedding.onnx_embedder"):
        OnnxEmbedder(linear_model, device="cpu")
    warned = [r for r in caplog.records if "declares no background" in r.getMessage()]
    assert len(warned) == 1 and warned[0].levelno == logging.WARNING


@pytest.mark.torch
def test_export_declares_the_training_background() -> None:
    pytest.importorskip(
        "torch",
        reason="the optional train extra; ./test.sh installs it and fails on any skip",
    )
    from train.export import embedder_meta
    from train.models import build_model

    model = build_model("glyphnet", 16, width=8)
    assert embedder_meta(model, {"dataset": "glyphs-tiny"}).background == "white"
    assert embedder_meta(model, {"dataset": "/data/photos"}).background == "black"
