"""The out-of-domain ``novel`` set: outside glyphs, never the reserved scripts, glyph-like."""

from __future__ import annotations

import itertools
from dataclasses import replace

import numpy as np
import pytest

from imagesets import load_images, novel
from imagesets.rendering import LIGHT, augment_ink, render_ink

needs_fonts = pytest.mark.skipif(
    not novel.fonts_available(), reason="the novel set's fonts: run scripts/install_fonts.sh"
)


@pytest.fixture(scope="module")
def tiny():
    return load_images("novel-tiny", "test")


@pytest.fixture(scope="module")
def full_candidates() -> dict[int, list[int]]:
    """Every codepoint the full set could hold (a superset of its classes), unrendered."""
    cfg = novel.NovelConfig()
    return novel.candidates(novel.discover(cfg), cfg)[0]


def test_tenant_blocks_avoid_reserved_scripts_and_each_other():
    blocks = [b for bs in novel.TENANT_BLOCKS.values() for b in bs]
    for block in blocks:
        for reserved in novel.RESERVED_BLOCKS:
            assert block.last < reserved.first or block.first > reserved.last, (block, reserved)
    spans = sorted((b.first, b.last) for b in blocks)
    assert all(a[1] < b[0] for a, b in itertools.pairwise(spans))
    assert len(novel.TENANTS) >= 8


def test_no_tenant_block_holds_a_glyph_class():
    """Glyph candidates are a superset of the glyph train and test classes."""
    in_blocks = [cp for cp in novel.glyph_codepoints() if novel.tenant_of(cp) is not None]
    assert in_blocks == []


@needs_fonts
def test_no_class_lies_in_a_reserved_block(full_candidates, tiny):
    assert full_candidates and not any(novel.reserved(cp) for cp in full_candidates)
    codepoints = [int(name.split()[0][2:], 16) for name in tiny.class_names]
    assert not any(novel.reserved(cp) for cp in codepoints)
    # the check itself can fail: a reserved letter is caught
    assert novel.reserved(ord("ש")) and novel.reserved(ord("ก")) and novel.reserved(0x2D30)


@needs_fonts
def test_fonts_are_neither_glyphs_fonts_nor_reserved_scripts():
    names = [p.name for p in novel.font_paths(novel.NovelConfig())]
    assert "unifont.otf" in names and "FreeSerif.ttf" in names
    assert not [n for n in names if n.startswith(("DejaVu", "STIX", "unifont_jp"))]
    assert not [n for n in names for w in novel.RESERVED_FONT_WORDS if w in n]


@needs_fonts
def test_large_tenants_can_hold_the_small_tenant_protocol(full_candidates):
    """80 gallery + 80 impostor identities + oracle classes: most tenants have >= 150."""
    per_tenant = np.bincount(
        [novel.TENANTS.index(novel.tenant_of(cp)) for cp in full_candidates],
        minlength=len(novel.TENANTS),
    )
    assert per_tenant.min() >= 150, dict(zip(novel.TENANTS, per_tenant, strict=True))


@needs_fonts
def test_tiny_set_looks_like_glyphs(tiny):
    assert tiny.name == "novel-test" and tiny.tenant_names == novel.TENANTS
    assert set(np.unique(tiny.tenants)) == set(range(len(novel.TENANTS)))
    assert tiny.pixels.dtype == np.uint8 and tiny.pixels.shape[1:] == (32, 32)
    for label in np.unique(tiny.labels):
        rows = np.flatnonzero(tiny.labels == label)
        assert len(np.unique(tiny.tenants[rows])) == 1
        distinct = {tiny.image(i).tobytes() for i in rows}
        assert len(distinct) >= 3  # different fonts, styles or augmentations
        clean = rows[~tiny.extra["augmented"][rows]]
        assert len(np.unique(tiny.extra["font"][clean])) >= 2
    img = tiny.image(0)
    assert img.min() < 100 and np.median(img) > 200  # dark ink on white paper
    assert all(name.startswith("U+") for name in tiny.class_names)


@needs_fonts
def test_train_split_is_refused():
    with pytest.raises(ValueError, match="evaluation-only"):
        load_images("novel-tiny", "train")


@needs_fonts
def test_build_is_deterministic_and_worker_independent():
    cfg = novel.NovelConfig(limit=1, seed=3)
    a, b = novel.build(cfg, workers=1), novel.build(cfg, workers=2)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.codepoints, b.codepoints)
    c = novel.build(replace(cfg, seed=4), workers=1)
    assert np.array_equal(a.images[~a.augmented], c.images[~c.augmented])
    assert not np.array_equal(a.images[a.augmented], c.images[c.augmented])


@needs_fonts
def test_no_two_classes_share_a_render_and_blanks_are_gone():
    data = novel.build(novel.NovelConfig(limit=6), workers=2)
    plain = ~data.augmented & (data.sample_style == 0)
    owner: dict[tuple[int, bytes], int] = {}
    for img, cls, font in zip(
        data.images[plain], data.sample_class[plain], data.sample_font[plain], strict=True
    ):
        assert owner.setdefault((int(font), img.tobytes()), int(cls)) == cls
    assert ((data.images < 200).sum(axis=(1, 2)) >= 3).all()  # augmented copies too


@needs_fonts
def test_heavy_style_draws_more_ink(tiny):
    clean = ~tiny.extra["augmented"]
    ink = (255 - tiny.pixels.astype(np.int64)).sum(axis=(1, 2))
    plain, heavy = clean & (tiny.extra["style"] == 0), clean & (tiny.extra["style"] == 1)
    assert plain.sum() == heavy.sum() > 0
    assert (ink[heavy] > ink[plain]).all()  # rows pair up: same (class, font) order


@needs_fonts
def test_cache_key_follows_the_font_set(monkeypatch):
    cfg = novel.NovelConfig(limit=2)
    before = novel.cache_path(cfg)
    monkeypatch.setattr(novel, "fingerprint_paths", lambda paths: "another-font-set")
    assert novel.cache_path(cfg) != before


def test_shear_is_drawn_only_when_asked_for():
    """glyphs' augmentation has no shear: it must draw exactly the numbers it always drew
    (angle, scale, 2 shifts, blur, gain), or every glyph render would change."""
    from imagesets.fonts import discover_fonts

    ink = render_ink("A", discover_fonts()[0].path, 32)
    used = np.random.default_rng(5)
    plain = augment_ink(ink, used, LIGHT)
    reference = np.random.default_rng(5)
    reference.uniform(size=6)
    assert used.random() == reference.random()
    sheared = augment_ink(ink, np.random.default_rng(5), replace(LIGHT, shear=0.3))
    assert not np.array_equal(plain, sheared)
