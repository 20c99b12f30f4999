"""Checkpoints as segments, compaction, images on disk, the legacy format, the saved graph."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from server.storage.faiss.gallery import Gallery, Item
from server.storage.faiss.segments import FAN, Manifest, SegmentStore

SHA = "e" * 64
DIM = 8


def unit(rng, n, dim=DIM):
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(start: int, n: int) -> list[Item]:
    return [Item(f"k{i}", f"L{i % 9}", f"image-{i}".encode() * 3) for i in range(start, start + n)]


def manifest(path: Path) -> Manifest:
    return Manifest.from_json((path / "manifest.json").read_text())


def test_a_checkpoint_writes_only_what_changed(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    g = Gallery.open(tmp_path, DIM, SHA, snapshot_every=10)
    g.add(items(0, 10), unit(rng, 10), SHA)  # checkpoint 1: 10 rows
    g.add(items(10, 10), unit(rng, 10), SHA)  # checkpoint 2: the next 10 only
    rows = [s.rows for s in manifest(tmp_path).segments]
    assert rows == [10, 10]
    g.remove(["k3"])
    g.add(items(20, 9), unit(rng, 9), SHA)  # 10 records: 9 rows + 1 tombstone
    segs = manifest(tmp_path).segments
    assert [s.rows for s in segs] == [10, 10, 9]
    assert segs[0].live == 9  # the removal is counted against the segment holding it
    g.close()


def test_compaction_keeps_segments_few_and_rewrites_each_item_a_bounded_number_of_times(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(1)
    g = Gallery.open(tmp_path, DIM, SHA, snapshot_every=4)
    g._store.max_rows = 64  # small, so the top tier is reached
    written = 0
    original = g._store.write_segment

    def counting(rows, images, tombstones, live=None):
        nonlocal written
        written += len(rows)
        return original(rows, images, tombstones, live)

    g._store.write_segment = counting
    n = 600
    for s in range(0, n, 4):
        g.add(items(s, 4), unit(rng, 4), SHA)
    segs = manifest(tmp_path).segments
    # every segment but the newest few is at the top tier; the count grows with N / max_rows
    assert len(segs) <= n // 64 + 3 * FAN
    # each item: one checkpoint plus one rewrite per tier below the top (3 tiers here)
    assert written <= n * (1 + 3)
    g.close()
    again = Gallery.open(tmp_path, DIM, SHA)
    assert again.size == n
    assert again.get("k599").image == b"image-599" * 3


def test_removed_rows_are_dropped_by_compaction_and_stay_removed(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    g = Gallery.open(tmp_path, DIM, SHA, snapshot_every=8)
    x = unit(rng, 200)
    for s in range(0, 200, 8):
        g.add(items(s, 8), x[s : s + 8], SHA)
    gone = [f"k{i}" for i in range(0, 200, 2)]
    for s in range(0, len(gone), 8):
        g.remove(gone[s : s + 8])
    g.close()
    store = SegmentStore(tmp_path)
    rows, _ = store.load()
    assert len(rows) < 200 + 8  # mostly-removed segments were rewritten without them
    again = Gallery.open(tmp_path, DIM, SHA)
    assert again.size == 100
    assert {i.item_id for i in again.items()} == {f"k{i}" for i in range(1, 200, 2)}
    (res,) = again.search(x[3:4], 1, SHA)
    assert res.top1.item_id == "k3"
    (res,) = again.search(x[4:5], 1, SHA)
    assert res.top1.item_id != "k4"


def test_images_stay_on_disk_until_asked_for(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    g = Gallery.open(tmp_path, DIM, SHA, snapshot_every=5)
    empty = g.memory_bytes()
    big = [Item(f"b{i}", "", bytes([i]) * 10_000) for i in range(5)]
    g.add(big[:4], unit(rng, 4), SHA)  # not yet checkpointed: held until then
    assert g.memory_bytes() - empty >= 4 * 10_000
    g.add(big[4:], unit(rng, 1), SHA)  # checkpointed: the images left RAM
    assert g.memory_bytes() - empty < 1_000
    assert g.get("b3").image == bytes([3]) * 10_000
    assert [i.image[:1] for i in g.items()] == [bytes([i]) for i in range(5)]
    g.close()


def test_a_crash_between_segment_and_manifest_leaves_nothing_behind(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    g = Gallery.open(tmp_path, DIM, SHA, snapshot_every=1000)
    g.add(items(0, 6), unit(rng, 6), SHA)
    g.close()
    (tmp_path / "seg-00009999.npz").write_bytes(b"half a segment")  # never in the manifest
    again = Gallery.open(tmp_path, DIM, SHA)
    assert again.size == 6
    assert not (tmp_path / "seg-00009999.npz").exists()


def test_a_legacy_whole_snapshot_is_converted(tmp_path: Path) -> None:
    """The format before segments (snapshot.npz + log): read once, then a segment."""
    rng = np.random.default_rng(5)
    x = unit(rng, 3)
    images = [b"one", b"two!", b"three"]
    meta = {
        "lsn": 3,
        "next_id": 3,
        "dim": DIM,
        "model": SHA,
        "items": [["a", "L"], ["b", ""], ["c", "L"]],
    }
    buffer = io.BytesIO()
    np.savez(
        buffer,
        ids=np.arange(3, dtype=np.int64),
        vectors=x,
        offsets=np.cumsum([0] + [len(i) for i in images]).astype(np.int64),
        blob=np.frombuffer(b"".join(images), np.uint8),
        meta=np.frombuffer(json.dumps(meta).encode(), np.uint8),
    )
    (tmp_path / "snapshot.npz").write_bytes(buffer.getvalue())
    g = Gallery.open(tmp_path, DIM, SHA)
    assert not (tmp_path / "snapshot.npz").exists() and (tmp_path / "manifest.json").exists()
    assert g.get("b") == Item("b", "", b"two!")
    (res,) = g.search(x[2:3], 1, SHA)
    assert (res.top1.item_id, res.top1.label) == ("c", "L")
    g.close()
    assert Gallery.open(tmp_path, DIM, SHA).get("c").image == b"three"


def test_the_hnsw_graph_is_read_back_not_rebuilt(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    x = unit(rng, 300, 16)
    g = Gallery.open(tmp_path, 16, SHA, index="hnsw")
    g.add([Item(f"h{i}", "", b"") for i in range(300)], x, SHA)
    g.remove(["h5"])
    g.close()
    saved = (tmp_path / "hnsw.faiss").stat().st_mtime_ns
    again = Gallery.open(tmp_path, 16, SHA, index="hnsw")
    index = again._gen.index
    assert index._saved == 300 and index.dead == 1  # the file's graph, h5 cleared in the bitmap
    again.add([Item("late", "", b"")], x[:1], SHA)  # joins the loaded graph
    (res,) = again.search(x[5:6], 1, SHA)
    assert res.top1.item_id != "h5"
    (res,) = again.search(x[7:8], 1, SHA)
    assert res.top1.item_id == "h7"
    assert (tmp_path / "hnsw.faiss").stat().st_mtime_ns == saved  # not rewritten by a reopen
    again.close()
