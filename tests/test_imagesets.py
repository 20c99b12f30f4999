"""Loaders: glyphs, image folders, npz embeddings and the benchmark layouts."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from imagesets import load_embeddings, load_images
from imagesets.base import ImageSet
from imagesets.glyphs import HEAVY, GlyphConfig, build, render_sample, sample_rng
from imagesets.scripts import tenant_of


def test_tiny_glyphs_are_open_world_and_tenanted():
    train, test = load_images("glyphs-tiny", "train"), load_images("glyphs-tiny", "test")
    assert set(train.class_names).isdisjoint(test.class_names)
    assert len(test.tenant_names) == 8
    assert {test.tenant_names[t] for t in np.unique(test.tenants)} >= {
        "latin",
        "greek",
        "math",
        "arrows",
    }
    for label in np.unique(test.labels):  # a class lives in one tenant and has >= 6 samples
        rows = test.labels == label
        assert len(np.unique(test.tenants[rows])) == 1
        assert rows.sum() >= 6
    img = test.image(0)
    assert img.dtype == np.uint8 and img.shape == (32, 32)
    assert img.min() < 100 and img.max() > 200  # ink on paper


def test_glyph_build_is_deterministic():
    cfg = GlyphConfig(limit=2, seed=3)
    a, b = build(cfg, workers=1), build(cfg, workers=2)
    assert np.array_equal(a.images, b.images)
    assert np.array_equal(a.codepoints, b.codepoints)


def test_glyph_seed_changes_augmentation_not_clean_renders():
    a = build(GlyphConfig(limit=2, seed=0), workers=1)
    b = build(GlyphConfig(limit=2, seed=1), workers=1)
    common = np.intersect1d(a.codepoints, b.codepoints)
    assert len(common) > 0
    cp = int(common[0])
    ia, ib = np.flatnonzero(a.codepoints == cp)[0], np.flatnonzero(b.codepoints == cp)[0]
    clean_a = a.images[(a.sample_class == ia) & ~a.augmented]
    clean_b = b.images[(b.sample_class == ib) & ~b.augmented]
    assert np.array_equal(clean_a, clean_b)
    assert not np.array_equal(
        a.images[(a.sample_class == ia) & a.augmented],
        b.images[(b.sample_class == ib) & b.augmented],
    )


def test_no_two_classes_share_an_identical_render():
    data = build(GlyphConfig(limit=8), workers=2)
    clean = ~data.augmented
    keys = {}
    for img, cls, font in zip(
        data.images[clean], data.sample_class[clean], data.sample_font[clean], strict=True
    ):
        key = (int(font), img.tobytes())
        assert keys.setdefault(key, cls) == cls


def test_heavy_augmentation_differs_more_than_light():
    from imagesets.fonts import discover_fonts

    font = discover_fonts()[0].path
    clean = render_sample(ord("A"), font, 32, None).astype(float)
    light = [
        np.abs(render_sample(ord("A"), font, 32, sample_rng(0, 65, 0, c)) - clean).mean()
        for c in range(20)
    ]
    heavy = [
        np.abs(render_sample(ord("A"), font, 32, sample_rng(0, 65, 0, c), HEAVY) - clean).mean()
        for c in range(20)
    ]
    assert np.mean(heavy) > 1.5 * np.mean(light)


def test_tenant_blocks():
    assert [tenant_of(ord(c)) for c in "aΩЖʃ∑→■€"] == [
        "latin",
        "greek",
        "cyrillic",
        "ipa",
        "math",
        "arrows",
        "shapes",
        "symbols",
    ]


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_image_folder_two_levels(tmp_path):
    for label in ("cat", "dog"):
        for i in range(3):
            _png(tmp_path / label / f"{i}.png", i)
    images = load_images(str(tmp_path))
    assert len(images) == 6 and images.class_names == ("cat", "dog")
    assert images.image(0).shape == (8, 8)


def test_image_folder_with_tenants_keeps_same_label_apart(tmp_path):
    for tenant in ("acme", "globex"):
        for i in range(2):
            _png(tmp_path / tenant / "shoe" / f"{i}.png", 10 * i)
    images = load_images(str(tmp_path))
    assert images.tenant_names == ("acme", "globex")
    assert images.class_names == ("acme/shoe", "globex/shoe")


def test_image_folder_mixed_depths_refused(tmp_path):
    _png(tmp_path / "a" / "1.png", 0)
    _png(tmp_path / "t" / "b" / "2.png", 0)
    with pytest.raises(ValueError, match="depths"):
        load_images(str(tmp_path))


def test_unknown_spec_lists_the_choices(tmp_path):
    with pytest.raises(ValueError, match="cub:PATH"):
        load_images(str(tmp_path / "nope"))


def test_npz_embeddings(tmp_path):
    path = tmp_path / "e.npz"
    np.savez(
        path,
        embeddings=np.eye(4, dtype=np.float32),
        labels=np.array(["a", "a", "b", "b"]),
        tenants=np.array(["x", "x", "y", "y"]),
    )
    emb = load_embeddings(path)
    assert emb.embeddings.shape == (4, 4) and emb.tenant_names == ("x", "y")
    assert list(emb.labels) == [0, 0, 1, 1]


def test_npz_length_mismatch_is_refused(tmp_path):
    path = tmp_path / "e.npz"
    np.savez(path, embeddings=np.ones((3, 2)), labels=np.array([1, 2]))
    with pytest.raises(ValueError, match="3 embeddings but 2 labels"):
        load_embeddings(path)


def test_cub_layout(tmp_path):
    for c in range(1, 201, 33):  # a sparse fake: 7 classes
        _png(tmp_path / "images" / f"{c:03d}.bird{c}" / "a.jpg", c)
    train, test = load_images(f"cub:{tmp_path}", "train"), load_images(f"cub:{tmp_path}", "test")
    assert len(train) + len(test) == 7
    assert set(train.class_names).isdisjoint(test.class_names)


def test_cars_layout(tmp_path):
    scipy_io = pytest.importorskip("scipy.io", reason="Cars-196 annotations are a MATLAB file")
    rows = [(f"car_ims/{i:06d}.jpg", c) for i, c in enumerate([1, 98, 99, 196], 1)]
    for rel, c in rows:
        _png(tmp_path / rel, c)
    annos = np.array(
        [tuple([np.array([rel]), np.array([[c]], dtype=np.uint8)]) for rel, c in rows],
        dtype=[("relative_im_path", object), ("class", object)],
    )
    scipy_io.savemat(tmp_path / "cars_annos.mat", {"annotations": annos[None, :]})
    train, test = load_images(f"cars:{tmp_path}", "train"), load_images(f"cars:{tmp_path}", "test")
    assert train.class_names == ("001", "098") and test.class_names == ("099", "196")


def test_sop_layout(tmp_path):
    lines = ["image_id class_id super_class_id path"]
    for i, (cls, sup) in enumerate([(1, "bicycle"), (1, "bicycle"), (2, "chair")], 1):
        rel = f"{sup}_final/{cls}_{i}.JPG"
        _png(tmp_path / rel, i)
        lines.append(f"{i} {cls} 1 {rel}")
    (tmp_path / "Ebay_test.txt").write_text("\n".join(lines) + "\n")
    test = load_images(f"sop:{tmp_path}", "test")
    assert test.tenant_names == ("bicycle", "chair") and len(test) == 3


def test_inshop_layout(tmp_path):
    rows = [
        ("img/WOMEN/Dresses/id_1/a.jpg", "id_1", "train"),
        ("img/MEN/Denim/id_2/a.jpg", "id_2", "query"),
        ("img/MEN/Denim/id_2/b.jpg", "id_2", "gallery"),
    ]
    for rel, *_ in rows:
        _png(tmp_path / rel, 1)
    text = "3\nimage_name item_id evaluation_status\n" + "\n".join(" ".join(r) for r in rows)
    (tmp_path / "list_eval_partition.txt").write_text(text)
    test = load_images(f"inshop:{tmp_path}", "test")
    assert len(test) == 2 and test.tenant_names == ("MEN/Denim",)
    assert list(test.extra["is_query"]) == [True, False]


def test_subset_keeps_names():
    images = ImageSet(
        "s",
        np.array([0, 1, 1]),
        ("a", "b"),
        np.zeros(3, np.int64),
        ("t",),
        pixels=np.zeros((3, 4, 4), np.uint8),
    )
    sub = images.subset([1, 2])
    assert len(sub) == 2 and sub.class_names == ("a", "b") and list(sub.labels) == [1, 1]
