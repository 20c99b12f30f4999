"""A tenant's tail statistics (server/storage/tail_stats.py) and their life inside a Gallery."""

from __future__ import annotations

import numpy as np
import pytest

from scorenorm import gallery_histogram
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
    tail = TenantTail(16, capacity=40, online_weight=0)
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


def test_online_samples_leave_out_the_matched_identity_and_are_capped():
    rng = np.random.default_rng(1)
    tail = TenantTail(16, capacity=64, online_weight=0.25)
    members = entries(rng, 64)
    twin = members[0]
    for e in members:
        if e.code == twin.code:
            e.vector[:] = twin.vector  # the matched identity: score 1 against the query
    tail.add(members)
    query = twin.vector[None, :].copy()
    top = np.searchsorted(np.linspace(-1, 1, 4097), 0.999) - 1  # bins holding s >= 0.999
    tail.observe(query, [twin.code])
    assert tail.online().total > 0
    assert tail.online().counts[top:].sum() == 0  # no pair of the matched identity
    tail.observe(query, [None])  # unmatched: its pairs with that identity count too
    assert tail.online().counts[top:].sum() > 0
    for _ in range(2000):  # online pairs now far outnumber the gallery's
        tail.observe(query, [None])
    g, o = tail.gallery, tail.online()
    assert o.total > g.total
    mixed = tail.histogram()
    want = 0.75 * g.counts / g.total + 0.25 * o.counts / o.total  # the weight is capped
    np.testing.assert_allclose(mixed.counts / mixed.total, want, rtol=2e-3, atol=2 / mixed.total)


def test_online_window_round_trips_through_its_state():
    rng = np.random.default_rng(2)
    tail = TenantTail(16, capacity=32)
    tail.add(entries(rng, 32))
    tail.observe(unit(rng, 5), [None] * 5)
    again = TenantTail(16, capacity=32)
    again.restore_online(tail.online_state())
    assert np.array_equal(again.online().counts, tail.online().counts)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="capacity"):
        TenantTail(16, capacity=1)
    with pytest.raises(ValueError, match="online_weight"):
        TenantTail(16, online_weight=1.5)


def test_gallery_keeps_the_sample_through_enrol_remove_and_reopen(tmp_path):
    rng = np.random.default_rng(3)
    x, labels = unit(rng, 150), rng.integers(0, 20, 150)
    items = [Item(f"i{n}", str(labels[n]), b"") for n in range(150)]
    gallery = Gallery.open(tmp_path, 16, SHA, tail=TailOptions(capacity=30, online_weight=0))
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
    reopened = Gallery.open(tmp_path, 16, SHA, tail=TailOptions(capacity=30, online_weight=0))
    assert np.array_equal(reopened.tail.gallery.counts, before.counts)
    reopened.close()
