"""Tenant statistics above the store (server/matching/statistics.py): traffic counted per
micro-batch, published and read back through a real store, and replicas that agree.

Two TenantStatistics over one faiss data dir stand for two processes of one store: what
one publishes, the other reads (the same files), exactly as two replicas on Milvus do
through its traffic collection (tests/test_replicas.py runs that end to end).
"""

from __future__ import annotations

import numpy as np
import pytest

from scorenorm import ScoreHistogram, TailSettings
from server.matching.statistics import StatisticsSettings, TenantStatistics
from server.storage import open_store
from server.storage.base import Item

DIM = 16
SHA = "s" * 64


def unit(rng, n):
    x = rng.normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def world(tmp_path):
    """A store with two small tenants, a global tail, and two 'replicas' of the statistics."""
    rng = np.random.default_rng(0)
    store = open_store("faiss", tmp_path, DIM, SHA)
    store.load_all()
    galleries = {}
    for name in ("small", "other"):
        x = unit(rng, 25)
        store.create(name, None).gallery.add(
            [Item(f"{name}{i}", f"L{i}", b"") for i in range(25)], x, SHA
        )
        galleries[name] = x
    global_tail = ScoreHistogram.of((unit(rng, 3000) @ unit(rng, 300).T).ravel().astype(np.float32))

    def replica(name: str) -> TenantStatistics:
        def snapshots():
            return {t.name: t.gallery.tail_snapshot() for t in store.all()}

        return TenantStatistics(
            store, name, snapshots, global_tail, TailSettings(), StatisticsSettings()
        )

    yield store, galleries, replica, rng
    store.close()


def _traffic(rng, gallery: np.ndarray, n: int) -> np.ndarray:
    """Half genuine queries (a noisy copy of an item), half impostors."""
    genuine = gallery[rng.integers(0, len(gallery), n // 2)] + rng.normal(0, 0.3, (n // 2, DIM))
    queries = np.vstack([genuine, rng.normal(size=(n - n // 2, DIM))]).astype(np.float32)
    return queries / np.linalg.norm(queries, axis=1, keepdims=True)


def test_a_replicas_own_traffic_reaches_its_decisions_only_through_the_store(world):
    store, galleries, replica, rng = world
    a = replica("a")
    snap = store.get("small").gallery.tail_snapshot()
    before = a.mapping("small", snap)
    evidence = a.observe("small", snap, _traffic(rng, galleries["small"], 400), 0.5)
    assert len(evidence) == 400 and all(e.pairs > 0 for e in evidence)
    assert a.mapping("small", snap) is before  # pending traffic does not decide yet
    a.sync()
    after = a.mapping("small", snap)
    assert after is not before and after.pairs > before.pairs  # now it does
    assert a.info("small", snap)["traffic_queries"] == 400


def test_two_replicas_decide_alike_once_both_have_synced(world):
    store, galleries, replica, rng = world
    a, b = replica("a"), replica("b")
    snap = {n: store.get(n).gallery.tail_snapshot() for n in galleries}
    a.observe("small", snap["small"], _traffic(rng, galleries["small"], 300), 0.5)
    b.observe("small", snap["small"], _traffic(rng, galleries["small"], 200), 0.5)
    b.observe("other", snap["other"], _traffic(rng, galleries["other"], 300), 0.5)
    a.sync(), b.sync(), a.sync()  # a reads b's rows only at its next sync
    for name in galleries:
        ma, mb = a.mapping(name, snap[name]), b.mapping(name, snap[name])
        np.testing.assert_array_equal(ma.raw, mb.raw)  # bit-identical maps
        np.testing.assert_array_equal(ma.norm, mb.norm)
    assert a.info("small", snap["small"])["traffic_queries"] == 500
    assert b.info("small", snap["small"])["prior_tenants"] == 2


def test_a_restarted_replica_continues_its_own_evidence(world):
    store, galleries, replica, rng = world
    first = replica("local")
    snap = store.get("small").gallery.tail_snapshot()
    first.observe("small", snap, _traffic(rng, galleries["small"], 100), 0.5)
    first.sync()
    again = replica("local")  # the same process name after a restart
    again.load()
    again.observe("small", snap, _traffic(rng, galleries["small"], 50), 0.5)
    again.sync()
    assert again.info("small", snap)["traffic_queries"] == 150  # not overwritten with 50


def test_a_deleted_tenant_leaves_no_evidence(world):
    store, galleries, replica, rng = world
    a = replica("a")
    snap = store.get("small").gallery.tail_snapshot()
    a.observe("small", snap, _traffic(rng, galleries["small"], 100), 0.5)
    a.sync()
    store.delete("small")
    a.forget("small")
    store.create("small", None)
    fresh = store.get("small").gallery.tail_snapshot()
    a.sync()
    assert a.info("small", fresh)["traffic_queries"] == 0


def test_settings_are_checked():
    with pytest.raises(ValueError, match="sync_seconds"):
        StatisticsSettings(sync_seconds=0)


def test_an_unreadable_row_is_skipped_and_the_others_still_merge(world):
    store, galleries, replica, rng = world
    a, b = replica("a"), replica("b")
    snap = store.get("small").gallery.tail_snapshot()
    b.observe("small", snap, _traffic(rng, galleries["small"], 120), 0.5)
    b.sync()
    store.publish_traffic("other", "broken", b"PK\x03\x04 truncated")  # another format, cut
    a.sync()
    assert a.info("small", snap)["traffic_queries"] == 120
    assert a.info("other", store.get("other").gallery.tail_snapshot())["traffic_queries"] == 0


def test_evidence_counted_after_a_delete_is_dropped_not_published(world):
    """A Match in flight when its tenant was deleted may still count its batch: the next
    sync forgets it instead of publishing it (and a tenant created again under the name
    would otherwise inherit it)."""
    store, galleries, replica, rng = world
    a = replica("a")
    snap = store.get("small").gallery.tail_snapshot()
    store.delete("small")
    a.forget("small")
    a.observe("small", snap, _traffic(rng, galleries["small"], 80), 0.5)  # in flight
    a.sync()
    assert "small" not in a._tenants
    store.create("small", None)
    a.sync()
    assert a.info("small", store.get("small").gallery.tail_snapshot())["traffic_queries"] == 0
