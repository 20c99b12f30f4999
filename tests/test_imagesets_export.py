"""``python -m imagesets export``: folders that enroll and load back to the same set."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imagesets import load_images
from imagesets.__main__ import main
from imagesets.export import safe_name, unescape


def _by_file(images) -> dict[tuple[str, str], list[np.ndarray]]:
    """(tenant, label folder) -> images in file order, for a folder-loaded set."""
    out: dict[tuple[str, str], list[np.ndarray]] = {}
    for i in range(len(images)):
        tenant = images.tenant_names[images.tenants[i]]
        label = images.class_names[images.labels[i]].removeprefix(f"{tenant}/")
        out.setdefault((tenant, label), []).append(images.image(i))
    return out


def test_glyphs_tiny_round_trips_through_folders(tmp_path, tiny_glyphs):
    out = tmp_path / "export"
    assert main(["export", "glyphs-tiny", "test", str(out), "--no-progress"]) == 0
    back = load_images(str(out))
    assert len(back) == len(tiny_glyphs)
    assert set(back.tenant_names) == {
        tiny_glyphs.tenant_names[t] for t in np.unique(tiny_glyphs.tenants)
    }
    files = _by_file(back)
    for label, name in enumerate(tiny_glyphs.class_names):
        rows = np.flatnonzero(tiny_glyphs.labels == label)
        tenant = tiny_glyphs.tenant_names[tiny_glyphs.tenants[rows[0]]]
        read = files.pop((tenant, safe_name(name)))  # labels and tenants survive
        assert unescape(safe_name(name)) == name
        assert len(read) == len(rows)
        for i, img in zip(rows, read, strict=True):  # pixels survive, in dataset order
            assert img.dtype == np.uint8 and np.array_equal(img, tiny_glyphs.image(i))
    assert not files


def test_limit_and_tenant_pick_a_seeded_sample(tmp_path, tiny_glyphs, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    args = ["--tenant", "greek", "--tenant", "math", "--limit", "2", "--no-progress"]
    assert main(["export", "glyphs-tiny", "test", str(a), *args]) == 0
    assert main(["export", "glyphs-tiny", "test", str(b), *args]) == 0
    assert sorted(p.name for p in a.iterdir()) == ["greek", "math"]
    for tenant in ("greek", "math"):
        assert len(list((a / tenant).iterdir())) == 2
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.png"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.png"))  # deterministic
    assert capsys.readouterr().err == ""  # no progress bar when stderr is not a terminal


def test_non_empty_dir_is_refused_unless_forced(tmp_path, tiny_glyphs, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", "glyphs-tiny", "test", str(out), "--limit", "1"]) == 3
    assert "--force" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert main(["export", "glyphs-tiny", "test", str(out), "--limit", "1", "--force"]) == 0
    assert (out / "keep.txt").read_text() == "mine"
    assert len(list(out.iterdir())) > 1


def test_bad_requests_exit_with_their_codes(tmp_path, tiny_glyphs, capsys):
    assert main(["export", "glyphs-tiny", "test", str(tmp_path / "a"), "--tenant", "nope"]) == 2
    assert "latin" in capsys.readouterr().err  # names the tenants it has
    assert main(["export", "glyphs-tiny", "test", str(tmp_path / "b"), "--limit", "0"]) == 2
    assert main(["export", str(tmp_path / "missing"), "test", str(tmp_path / "c")]) == 1
    with pytest.raises(SystemExit) as usage:
        main(["export", "glyphs-tiny", "validation", str(tmp_path / "d")])
    assert usage.value.code == 2


def test_folder_sets_re_export_to_the_same_names(tmp_path, tiny_glyphs):
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(["export", "glyphs-tiny", "test", str(first), "--limit", "2"]) == 0
    assert main(["export", str(first), "test", str(second), "--no-progress"]) == 0
    assert sorted(p.relative_to(first) for p in first.rglob("*.png")) == sorted(
        p.relative_to(second) for p in second.rglob("*.png")
    )


def test_safe_name_escapes_what_a_file_system_cannot_hold():
    assert safe_name("U+0386 Ά") == "U+0386 Ά"  # readable: spaces and letters stay
    assert safe_name("U+002F /") == "U+002F %2F"
    assert safe_name("U+0025 %") == "U+0025 %25"
    assert safe_name("..") == "%2E%2E" and safe_name("a.") == "a%2E"
    assert safe_name("bidi\u200fmark") == "bidi%E2%80%8Fmark"
    with pytest.raises(ValueError, match="empty"):
        safe_name("")


@given(st.text(min_size=1, max_size=40))
def test_safe_name_is_reversible_and_a_single_path_part(name):
    folder = safe_name(name)
    assert unescape(folder) == name
    assert folder not in (".", "..") and "/" not in folder and "\\" not in folder
    assert all(c == " " or c.isprintable() for c in folder)
    assert not folder.endswith((" ", "."))


def test_per_class_and_skip_split_a_class_into_gallery_and_queries(tmp_path, tiny_glyphs):
    """--per-class K for a gallery and --skip K for queries: no shared image or name, and
    the numbering stays the class's own, so the two folders tell which image is which."""
    gallery, queries = tmp_path / "gallery", tmp_path / "queries"
    base = ["glyphs-tiny", "test", "--tenant", "latin", "--no-progress"]
    assert main(["export", *base[:2], str(gallery), *base[2:], "--per-class", "2"]) == 0
    assert (
        main(["export", *base[:2], str(queries), *base[2:], "--skip", "2", "--per-class", "1"]) == 0
    )
    labels = np.asarray(tiny_glyphs.labels)
    latin = tiny_glyphs.tenant_names.index("latin")
    classes = np.unique(labels[np.asarray(tiny_glyphs.tenants) == latin])
    for label in classes:
        rows = np.flatnonzero(labels == label)
        folder = safe_name(tiny_glyphs.class_names[label].removeprefix("latin/"))
        kept = sorted(p.name for p in (gallery / "latin" / folder).iterdir())
        asked = sorted(p.name for p in (queries / "latin" / folder).iterdir())
        width = len(kept[0]) - len(".png")
        assert kept == [f"{n:0{width}d}.png" for n in range(min(2, len(rows)))]
        assert asked == ([f"{2:0{width}d}.png"] if len(rows) > 2 else [])
        if len(rows) > 2:
            from PIL import Image

            got = np.asarray(Image.open(queries / "latin" / folder / asked[0]))
            assert np.array_equal(got, tiny_glyphs.image(int(rows[2])))
    assert main(["export", *base[:2], str(tmp_path / "x"), "--per-class", "0"]) == 2
    assert main(["export", *base[:2], str(tmp_path / "y"), "--skip", "-1"]) == 2
