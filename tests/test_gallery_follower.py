"""A reader following a writer's gallery (server/storage/faiss/follower.py, wal.LogFollower).

Two objects on one directory stand for the two processes of ``--workers``: the writer
is a :class:`Gallery`, the reader a :class:`FollowingGallery`. The end-to-end version
with real processes is tests/test_workers_faiss.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from server.storage.base import Item
from server.storage.faiss.follower import FollowingGallery, ReadOnlyGalleryError
from server.storage.faiss.gallery import WAL, Gallery
from server.storage.faiss.wal import LogFollower, WriteAheadLog

DIM = 8
SHA = "f" * 64
OTHER = "e" * 64


def unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def enrol(g: Gallery, x: np.ndarray, start: int, stop: int) -> None:
    for i in range(start, stop):  # one write (one log record) each
        g.add([Item(f"i{i}", f"L{i % 3}", f"img{i}".encode())], x[i : i + 1], SHA)


def same_state(reader: FollowingGallery, writer: Gallery) -> None:
    """Same live items, same vectors per item, same tail sample."""

    def state(g: Gallery) -> dict[str, bytes]:
        t = g._gen.table
        return {t.item_id(int(r)): t.vectors[r].tobytes() for r in t.live_rows()}

    assert state(reader) == state(writer)
    assert sorted(reader.tail.member_fids()) == sorted(writer.tail.member_fids())
    assert reader.write_token == writer.write_token


def files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.iterdir()}


@pytest.fixture
def x() -> np.ndarray:
    return unit(64)


def test_a_search_with_a_write_token_sees_that_write_at_once(tmp_path: Path, x) -> None:
    writer = Gallery.open(tmp_path, DIM, SHA, snapshot_every=1000)
    enrol(writer, x, 0, 3)
    reader = FollowingGallery.follow(tmp_path, DIM, SHA)
    enrol(writer, x, 3, 10)
    (stale,) = reader.search(x[9:10], 1, SHA)  # no token: what it has applied so far
    assert stale.top1.item_id != "i9"
    (fresh,) = reader.search(x[9:10], 1, SHA, writer.write_token)
    assert fresh.top1.item_id == "i9"
    writer.remove(["i9", "i0"])
    (gone,) = reader.search(x[9:10], 1, SHA, writer.write_token)
    assert gone.top1.item_id != "i9"
    same_state(reader, writer)


def test_the_reader_follows_across_checkpoints_and_replacements(tmp_path: Path, x) -> None:
    writer = Gallery.open(tmp_path, DIM, SHA, snapshot_every=4)
    reader = FollowingGallery.follow(tmp_path, DIM, SHA)
    for start in range(0, 40, 3):  # a checkpoint (new log file) every 4 writes
        enrol(writer, x, start, start + 3)
        reader.catch_up()  # reads at least once per checkpoint: never a hole
        same_state(reader, writer)
    writer.add([Item("i5", "new", b"v2")], x[50:51], SHA, replace=True)
    writer.remove([f"i{i}" for i in range(0, 39, 2)])
    reader.catch_up()
    same_state(reader, writer)


def test_a_reader_that_missed_a_whole_log_file_reads_the_segments_again(tmp_path: Path, x) -> None:
    writer = Gallery.open(tmp_path, DIM, SHA, snapshot_every=4)
    enrol(writer, x, 0, 2)
    reader = FollowingGallery.follow(tmp_path, DIM, SHA)
    enrol(writer, x, 2, 13)  # three checkpoints between two reads
    assert reader.catch_up() == 0  # a hole in the sequence: rebuilt from the files
    same_state(reader, writer)
    enrol(writer, x, 13, 16)  # the log is emptied right now, and the reader saw none
    writer.snapshot()
    enrol(writer, x, 16, 17)
    writer.snapshot()
    reader.catch_up()
    same_state(reader, writer)


def test_a_reader_writes_nothing_and_refuses_mutations(tmp_path: Path, x) -> None:
    writer = Gallery.open(tmp_path, DIM, SHA, snapshot_every=4)
    enrol(writer, x, 0, 6)
    before = files(tmp_path)
    reader = FollowingGallery.follow(tmp_path, DIM, SHA)
    reader.catch_up()
    reader.snapshot()
    with pytest.raises(ReadOnlyGalleryError):
        reader.add([Item("r", "", b"")], x[:1], SHA)
    with pytest.raises(ReadOnlyGalleryError):
        reader.remove(["i1"])
    reader.close()
    assert files(tmp_path) == before


def test_a_segment_being_written_is_not_collected_by_a_reader(tmp_path: Path, x) -> None:
    writer = Gallery.open(tmp_path, DIM, SHA, snapshot_every=1000)
    enrol(writer, x, 0, 5)
    stray = tmp_path / "seg-00000099.npz"  # to a reader, a segment not yet committed
    stray.write_bytes(b"being written")
    FollowingGallery.follow(tmp_path, DIM, SHA)
    assert stray.exists()


def test_items_of_another_model_are_reembedded_in_the_reader(tmp_path: Path, x) -> None:
    writer = Gallery.open(tmp_path, DIM, SHA, snapshot_every=1000)
    enrol(writer, x, 0, 4)
    writer.snapshot()
    calls = []

    def embed(images: list[bytes]) -> np.ndarray:
        calls.append(len(images))
        return np.tile(x[60], (len(images), 1))

    reader = FollowingGallery.follow(tmp_path, DIM, OTHER, embed)
    assert reader.reembedded == 4 and calls == [4]
    (hit,) = reader.search(x[60:61], 1, OTHER)
    assert hit.top1.similarity == pytest.approx(1.0, abs=1e-5)
    assert files(tmp_path)  # and the writer's files stay as they were: it owns them


def test_the_log_follower_leaves_a_record_being_written_for_the_next_read(
    tmp_path: Path,
) -> None:
    path = tmp_path / WAL
    log = WriteAheadLog(path)
    follower = LogFollower(path)
    log.append([b"one", b"two"])
    assert follower.read() == [b"one", b"two"]
    with path.open("ab") as handle:  # half a record: the writer is still writing it
        handle.write(b"\x05\x00\x00\x00")
    assert follower.read() == []
    log.reset()  # the writer's next checkpoint: a new file
    log.append([b"three"])
    assert follower.read() == [b"three"] and follower.switched
    assert follower.read() == [] and not follower.switched
