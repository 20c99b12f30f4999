"""A tenant's tail statistics (server/storage/tail_stats.py) and their life inside a Gallery."""

from __future__ import annotations

import numpy as np
import pytest

from scorenorm import gallery_histogram
from scorenorm.traffic import rank1_null
from server.storage.faiss.gallery import Gallery, Item, TailOptions
from server.storage.tail_stats import Entry, TenantTail, item_hash

SHA = "m" * 64


def unit(rng, n, d=16):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def entries(rng, n, start=0, d=16):
    x = unit(rng, n, d)
    return [
        Entry(start + i, item_hash(f"i{start + i}"), x[i], int(rng.integers(0, 12)))
        for i in range(n)
    ]


def bottom_k_histogram(alive: list[Entry], k: int):
    chosen = sorted(alive, key=lambda e: e.hash)[:k]
    x = np.stack([e.vector for e in chosen])
    return gallery_histogram(x, np.array([e.code for e in chosen])), {e.fid for e in chosen}


def test_incremental_sample_equals_the_bottom_k_rebuilt_from_scratch():
    rng = np.random.default_rng(0)
    tail = TenantTail(16, capacity=40)
    alive: dict[int, Entry] = {}
    next_fid = 0
    for _ in range(30):
        batch = entries(rng, int(rng.integers(1, 9)), next_fid)
        next_fid += len(batch)
        tail.add(batch)
        alive |= {e.fid: e for e in batch}
        gone = [f for f in list(alive) if rng.random() < 0.15]
        left = tail.remove(gone)
        for f in gone:
            del alive[f]
        outside = sorted(
            (e for e in alive.values() if not tail.is_member(e.fid)), key=lambda e: e.hash
        )
        tail.refill(outside[:left])  # what the gallery does after removing members
        want, members = bottom_k_histogram(list(alive.values()), 40)
        assert set(tail.sample()[0].tolist()) == members
        assert np.array_equal(tail.gallery.counts, want.counts)
        assert tail.gallery.total == want.total


def test_the_same_picture_twice_is_set_aside_not_counted_as_an_impostor_pair():
    rng = np.random.default_rng(1)
    members = entries(rng, 60)
    tail = TenantTail(16, capacity=200)
    tail.add(members)
    before = tail.gallery
    # every item enrolled again under another id and another label: one picture twice
    twins = [
        Entry(1000 + e.fid, item_hash(f"twin{e.fid}"), e.vector.copy(), 100 + e.code)
        for e in members
    ]
    tail.add(twins)
    assert tail.duplicates == 60
    top = np.searchsorted(np.linspace(-1, 1, 4097), 0.999) - 1
    assert tail.gallery.counts[top:].sum() == before.counts[top:].sum()  # no new top pair
    # the twins' other pairs repeat the originals' (4x the pairs, the same shape)
    np.testing.assert_allclose(
        tail.gallery.counts[:top] / tail.gallery.total,
        before.counts[:top] / before.total,
        atol=0.02,
    )
    tail.remove([t.fid for t in twins])
    assert tail.duplicates == 0
    assert np.array_equal(tail.gallery.counts, before.counts)


def test_the_null_is_each_members_best_impostor_score():
    rng = np.random.default_rng(2)
    tail = TenantTail(16, capacity=64)
    members = entries(rng, 40)
    tail.add(members)
    null = tail.null()
    assert len(null) == 40
    x = np.stack([e.vector for e in members])
    codes = np.array([e.code for e in members])
    s = (x @ x.T).astype(np.float64)
    s[codes[:, None] == codes[None, :]] = -np.inf  # its own identity is no impostor
    want = rank1_null(s)
    np.testing.assert_allclose(np.sort(null.tops), np.sort(want.tops), atol=1e-6)
    np.testing.assert_allclose(np.sort(null.locations), np.sort(want.locations), atol=1e-6)
    assert tail.null() is null  # cached until the members change
    tail.add(entries(rng, 1, 500))
    assert tail.null() is not null


def test_settings_are_checked():
    with pytest.raises(ValueError, match="capacity"):
        TenantTail(16, capacity=1)


def test_gallery_keeps_the_sample_through_enrol_remove_and_reopen(tmp_path):
    rng = np.random.default_rng(3)
    x, labels = unit(rng, 150), rng.integers(0, 20, 150)
    items = [Item(f"i{n}", str(labels[n]), b"") for n in range(150)]
    gallery = Gallery.open(tmp_path, 16, SHA, tail=TailOptions(capacity=30))
    gallery.add(items, x, SHA)
    members_before = set(gallery.tail.sample()[0].tolist())
    removed = [items[f].item_id for f in sorted(members_before)[:5]]  # members: forces refills
    gallery.remove(removed)
    alive = [n for n in range(150) if items[n].item_id not in removed]
    want = sorted(alive, key=lambda n: item_hash(items[n].item_id))[:30]
    assert set(gallery.tail.sample()[0].tolist()) == set(want)
    expected = gallery_histogram(x[want], np.array([labels[n] for n in want]))
    assert np.array_equal(gallery.tail.gallery.counts, expected.counts)
    before = gallery.tail.gallery
    gallery.close()
    reopened = Gallery.open(tmp_path, 16, SHA, tail=TailOptions(capacity=30))
    assert np.array_equal(reopened.tail.gallery.counts, before.counts)
    reopened.close()
