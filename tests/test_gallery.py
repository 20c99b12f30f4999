"""Gallery: search semantics, label-free counts, durability across restart and SIGKILL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from server.storage.faiss.gallery import Gallery, GalleryError, Item, StaleModelError

ROOT = Path(__file__).resolve().parents[1]
SHA = "a" * 64
DIM = 8


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def items(n: int, labels: list[str] | None = None) -> list[Item]:
    return [Item(f"id{i}", (labels or [""] * n)[i], f"img{i}".encode()) for i in range(n)]


def test_search_matches_brute_force(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    vectors = unit(rng, 50)
    labels = [f"L{i % 10}" for i in range(50)]
    gallery = Gallery.open(tmp_path, DIM, SHA)
    assert gallery.add(items(50, labels), vectors, SHA) == [None] * 50
    queries = unit(rng, 5)
    results = gallery.search(queries, 3, SHA)
    sims = queries @ vectors.T
    for q, result in enumerate(results):
        order = np.argsort(-sims[q])[:3]
        assert [h.item_id for h in result.neighbors] == [f"id{i}" for i in order]
        assert [h.label for h in result.neighbors] == [labels[i] for i in order]
    snapshot = gallery.tail_snapshot()  # what the statistics above the store read
    assert len(snapshot.codes) == 50 and len(set(snapshot.codes.tolist())) == 10
    assert snapshot.gallery.total == 50 * 49 // 2 - 10 * (5 * 4 // 2)  # cross-label pairs
    gallery.close()


def test_unlabelled_items_are_their_own_identity(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    gallery = Gallery.open(tmp_path, DIM, SHA)
    vectors = unit(rng, 4)
    gallery.add(items(4), vectors, SHA)
    (result,) = gallery.search(vectors[:1], 1, SHA)
    assert result.top1.item_id == "id0"
    snapshot = gallery.tail_snapshot()
    assert len(set(snapshot.codes.tolist())) == 4
    assert snapshot.gallery.total == 6  # every pair of the four is an impostor pair


def test_duplicates_replace_and_remove(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    gallery = Gallery.open(tmp_path, DIM, SHA)
    v = unit(rng, 3)
    assert gallery.add(items(2), v[:2], SHA) == [None, None]
    assert gallery.add([Item("id0", "x", b"new")], v[2:], SHA) == ["ALREADY_EXISTS"]
    dup = [Item("z", "", b""), Item("z", "", b"")]
    assert gallery.add(dup, v[:2], SHA) == [None, "INVALID_ARGUMENT"]
    assert gallery.add([Item("id0", "x", b"new")], v[2:], SHA, replace=True) == [None]
    assert gallery.get("id0").label == "x"
    assert gallery.size == 3
    (result,) = gallery.search(v[2:], 1, SHA)
    assert result.top1.item_id == "id0"
    assert gallery.remove(["id1", "nope"]) == (["id1"], ["nope"])
    assert gallery.size == 2
    gallery.close()
    reopened = Gallery.open(tmp_path, DIM, SHA)
    assert sorted(i.item_id for i in reopened.items()) == ["id0", "z"]
    assert reopened.get("id0").image == b"new"


def test_empty_gallery_and_stale_model(tmp_path: Path) -> None:
    gallery = Gallery.open(tmp_path, DIM, SHA)
    q = unit(np.random.default_rng(3), 2)
    assert [r.neighbors for r in gallery.search(q, 5, SHA)] == [[], []]
    with pytest.raises(StaleModelError):
        gallery.search(q, 1, "b" * 64)
    with pytest.raises(StaleModelError):
        gallery.add(items(2), q, "b" * 64)
    assert gallery.size == 0


def test_restart_replays_log_and_snapshots(tmp_path: Path) -> None:
    rng = np.random.default_rng(4)
    v = unit(rng, 30)
    gallery = Gallery.open(tmp_path, DIM, SHA, snapshot_every=10)
    for n in range(0, 30, 3):
        gallery.add(items(30)[n : n + 3], v[n : n + 3], SHA)
    gallery.remove(["id4"])
    # no close(): the last records live only in the log
    again = Gallery.open(tmp_path, DIM, SHA, snapshot_every=10)
    assert again.size == 29
    assert again.get("id4") is None
    (result,) = again.search(v[7:8], 1, SHA)
    assert result.top1.item_id == "id7"
    assert result.top1.similarity == pytest.approx(1.0, abs=1e-5)


def test_model_change_reembeds_or_refuses(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    gallery = Gallery.open(tmp_path, DIM, SHA)
    gallery.add(items(3), unit(rng, 3), SHA)
    gallery.close()
    with pytest.raises(GalleryError, match="another model"):
        Gallery.open(tmp_path, 4, "b" * 64)
    seen = []

    def embed(images: list[bytes]) -> np.ndarray:
        seen.extend(images)
        return unit(rng, len(images), 4)

    new = Gallery.open(tmp_path, 4, "b" * 64, embed=embed)
    assert sorted(seen) == [b"img0", b"img1", b"img2"]
    assert new.model_sha256 == "b" * 64
    assert new.size == 3
    new.close()
    assert Gallery.open(tmp_path, 4, "b" * 64).size == 3  # the re-embedding was persisted


WRITER = """
import sys, numpy as np
from pathlib import Path
from server.storage.faiss.gallery import Gallery, Item
g = Gallery.open(Path(sys.argv[1]), 8, "a" * 64, snapshot_every=7)
rng = np.random.default_rng(0)
for n in range(100000):
    v = rng.normal(size=(1, 8)).astype(np.float32)
    v /= np.linalg.norm(v)
    g.add([Item(f"k{n}", "", bytes(50))], v, "a" * 64)
    if n % 5 == 4:
        print(f"?k{n - 2}", flush=True)
        g.remove([f"k{n - 2}"])
        print(f"-k{n - 2}", flush=True)
    print(f"+k{n}", flush=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("delay", [0.05, 0.3])
def test_sigkill_loses_nothing_acknowledged(tmp_path: Path, delay: float) -> None:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'protos'}")
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, env=env, text=True
    )
    head = []
    deadline = time.monotonic() + 60
    while len(head) < 20 and time.monotonic() < deadline:  # wait until it is writing
        head.append(proc.stdout.readline())
    time.sleep(delay)  # then kill it at some instant mid-stream
    proc.send_signal(signal.SIGKILL)
    out = "".join(head) + proc.communicate()[0]
    acked: set[str] = set()
    removing: set[str] = set()  # a removal in flight may or may not have happened
    for line in out.split():
        kind, key = line[0], line[1:]
        if kind == "+":
            acked.add(key)
        elif kind == "?":
            removing.add(key)
        else:
            acked.discard(key)
            removing.discard(key)
    assert len(acked) > 10, "the writer did not get going; raise the delay"
    gallery = Gallery.open(tmp_path, DIM, SHA)
    present = {i.item_id for i in gallery.items()}
    # every acknowledged add is there; at most the one unacknowledged in-flight write extra
    assert acked - removing <= present
    assert len(present - acked) <= 2


def test_damaged_segment_is_a_clear_error(tmp_path: Path) -> None:
    gallery = Gallery.open(tmp_path, DIM, SHA)
    gallery.add(items(2), unit(np.random.default_rng(6), 2), SHA)
    gallery.close()
    (segment,) = tmp_path.glob("seg-*.npz")
    segment.write_bytes(segment.read_bytes()[:100])
    with pytest.raises(GalleryError, match="unreadable gallery segment"):
        Gallery.open(tmp_path, DIM, SHA)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(GalleryError, match="unreadable gallery manifest"):
        Gallery.open(tmp_path, DIM, SHA)


def test_hnsw_index_agrees_with_exact_search(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n = 2000
    vectors = unit(rng, n, 16)
    labels = [f"L{i % 50}" for i in range(n)]
    exact = Gallery.open(tmp_path / "flat", 16, SHA)
    approx = Gallery.open(tmp_path / "hnsw", 16, SHA, index="hnsw")
    for gallery in (exact, approx):
        gallery.add(items(n, labels), vectors, SHA)
        gallery.remove([f"id{i}" for i in range(0, 600, 2)])  # 300 tombstones -> a rebuild
    assert approx.size == exact.size == n - 300
    assert "HNSW" in approx.index_kind
    queries = unit(rng, 50, 16)
    want = exact.search(queries, 5, SHA)
    got = approx.search(queries, 5, SHA)
    same_top1 = np.mean([w.top1.item_id == g.top1.item_id for w, g in zip(want, got, strict=True)])
    assert same_top1 >= 0.95
    removed = {f"id{i}" for i in range(0, 600, 2)}
    assert not any(h.item_id in removed for g in got for h in g.neighbors)
    # the tail sample does not depend on the index: both sample the same items
    assert np.array_equal(
        exact.tail_snapshot().gallery.counts, approx.tail_snapshot().gallery.counts
    )
    approx.close()
    again = Gallery.open(tmp_path / "hnsw", 16, SHA, index="hnsw")
    assert again.size == n - 300
    (first,) = again.search(vectors[1:2], 1, SHA)
    assert first.top1.item_id == "id1"


def test_unknown_index_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="index must be one of"):
        Gallery.open(tmp_path, DIM, SHA, index="ivf")


def test_search_does_not_wait_for_a_slow_fsync(tmp_path: Path) -> None:
    import threading

    rng = np.random.default_rng(8)
    gallery = Gallery.open(tmp_path, DIM, SHA)
    gallery.add(items(3), unit(rng, 3), SHA)
    in_fsync, release = threading.Event(), threading.Event()
    real_append = gallery._wal.append

    def slow_append(records):
        in_fsync.set()
        release.wait(10)
        real_append(records)

    gallery._wal.append = slow_append
    writer = threading.Thread(target=gallery.add, args=([Item("late", "", b"")], unit(rng, 1), SHA))
    writer.start()
    assert in_fsync.wait(10)
    (result,) = gallery.search(unit(rng, 1), 3, SHA)  # would deadlock if it waited
    assert len(result.neighbors) == 3 and gallery.get("late") is None  # not yet applied
    release.set()
    writer.join(10)
    assert gallery.get("late") is not None


def test_a_failed_snapshot_does_not_fail_an_acknowledged_write(tmp_path: Path, monkeypatch):
    """Disk full while snapshotting: the log already holds the write, so it stands (and
    close() still closes the log); the next write tries the snapshot again."""
    import errno

    import server.storage.faiss.segments

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    rng = np.random.default_rng(5)
    v = unit(rng, 6)
    gallery = Gallery.open(tmp_path, DIM, SHA, snapshot_every=2)
    monkeypatch.setattr(server.storage.faiss.segments, "atomic_write_bytes", full)
    assert gallery.add(items(6)[:3], v[:3], SHA) == [None] * 3  # a snapshot is due: it fails
    gallery.close()
    monkeypatch.undo()
    again = Gallery.open(tmp_path, DIM, SHA, snapshot_every=2)
    assert again.size == 3  # replayed from the log
    again.add(items(6)[3:], v[3:], SHA)  # this time the snapshot is written
    assert (tmp_path / "manifest.json").exists()
    again.close()
    assert Gallery.open(tmp_path, DIM, SHA).size == 6


def test_hnsw_search_survives_faiss_torch_utils(tmp_path: Path) -> None:
    """pytorch-metric-learning imports faiss.contrib.torch_utils, which swaps Index.search
    for a wrapper without ``params``: a process that trains and serves (tests, notebooks)
    must still search HNSW with its removal filter."""
    pytest.importorskip("torch")
    import faiss.contrib.torch_utils  # noqa: F401  (the patch, as PML applies it)

    rng = np.random.default_rng(3)
    vectors = unit(rng, 300, 16)
    gallery = Gallery.open(tmp_path / "hnsw", 16, SHA, index="hnsw")
    gallery.add(items(300, [f"L{i}" for i in range(300)]), vectors, SHA)
    gallery.remove(["id1"])
    (own, removed) = gallery.search(vectors[[0, 1]], 1, SHA)
    assert own.top1.item_id == "id0"
    assert removed.top1 is None or removed.top1.item_id != "id1"
    gallery.close()
