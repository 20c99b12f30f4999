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


# ------------------------------------------------- found in review (each failed before)
def test_a_checkpoint_with_nothing_to_write_leaves_no_hole(tmp_path: Path, x) -> None:
    writer = Gallery.open(tmp_path, DIM, SHA, snapshot_every=1000)
    enrol(writer, x, 0, 2)
    reader = FollowingGallery.follow(tmp_path, DIM, SHA)
    writer.snapshot()
    enrol(writer, x, 2, 3)
    writer.remove(["i2"])  # an add removed again: the checkpoint writes no segment
    writer.snapshot()
    enrol(writer, x, 3, 4)
    same_state(FollowingGallery.follow(tmp_path, DIM, SHA), writer)  # a reader opens
    reader.reopen(SHA, DIM, None)  # and one reads the files again
    same_state(reader, writer)


def test_a_failed_append_is_neither_a_hole_nor_a_ghost(tmp_path: Path, x, monkeypatch) -> None:
    from server.storage.faiss import wal

    writer = Gallery.open(tmp_path, DIM, SHA, snapshot_every=1000)
    enrol(writer, x, 0, 1)
    reader = FollowingGallery.follow(tmp_path, DIM, SHA)
    fsync = wal.os.fsync
    calls = []

    def fsync_fails_once(fd: int) -> None:  # written, then EIO: never acknowledged
        calls.append(fd)
        if len(calls) == 1:
            reader.catch_up()  # a reader reads the group in that moment
            raise OSError(5, "Input/output error")
        fsync(fd)

    monkeypatch.setattr(wal.os, "fsync", fsync_fails_once)
    with pytest.raises(OSError):
        writer.add([Item("ghost", "", b"g")], x[5:6], SHA)
    monkeypatch.setattr(wal.os, "fsync", fsync)
    enrol(writer, x, 1, 2)  # takes the number the failed group had
    (hit,) = reader.search(x[1:2], 1, SHA, writer.write_token)
    assert hit.top1.item_id == "i1"
    assert reader._gen.table.find("ghost") is None
    same_state(reader, writer)


def test_a_tenant_created_again_is_not_followed_by_the_old_reader(tmp_path: Path, x) -> None:
    import shutil

    from server.storage import open_store

    writer = open_store("faiss", tmp_path, DIM, SHA, role="writer")
    reader = open_store("faiss", tmp_path, DIM, SHA, role="reader")
    writer.load_all()
    reader.load_all()
    writer.create("t", None).gallery.add([Item("old", "", b"o")], x[:1], SHA)
    old = reader.follow("t")
    assert old.gallery.size == 0 or old.gallery.catch_up() >= 0
    writer.delete("t")
    fresh = writer.create("t", None).gallery
    fresh.add([Item(f"new{i}", "", b"n") for i in range(3)], x[10:13], SHA)
    old.gallery.catch_up()  # must not read the new tenant's log into the old instance
    assert old.gallery._gen.table.find("new1") is None
    assert old.gallery.newer_instance(fresh.write_token)  # the token names a newer one
    assert fresh.write_token > old.gallery.write_token  # so a client's maximum is the newer
    again = reader.follow("t")
    assert again is not None and again.incarnation != old.incarnation
    (hit,) = again.gallery.search(x[11:12], 1, SHA, fresh.write_token)
    assert hit.top1.item_id == "new1"
    shutil.rmtree(tmp_path / "trash", ignore_errors=True)


def test_a_reader_builds_its_hnsw_graph_from_the_rows_it_read(tmp_path: Path, x) -> None:
    writer = Gallery.open(tmp_path, DIM, SHA, snapshot_every=1000, index="hnsw")
    enrol(writer, x, 0, 30)
    writer.close()  # saves the graph with all 30
    writer = Gallery.open(tmp_path, DIM, SHA, snapshot_every=1000, index="hnsw")
    writer.remove(["i10"])
    writer.snapshot()
    reader = FollowingGallery.follow(tmp_path, DIM, SHA, index="hnsw")
    (res,) = reader.search(x[10:11], 5, SHA)
    assert "i10" not in [h.item_id for h in res.neighbors]
    for i in (3, 17, 29):
        (hit,) = reader.search(x[i : i + 1], 1, SHA)
        assert hit.top1.item_id == f"i{i}"


# ------------------------------------------- found in the second review (each failed before)
def _pair(tmp_path: Path):
    """A writer's and a reader's tenant registries on one data dir."""
    from server.storage import open_store

    writer = open_store("faiss", tmp_path, DIM, SHA, role="writer")
    reader = open_store("faiss", tmp_path, DIM, SHA, role="reader")
    writer.load_all()
    reader.load_all()
    return writer, reader


def test_a_failed_group_of_several_records_then_a_shorter_write(
    tmp_path: Path, x, monkeypatch
) -> None:
    from server.storage.faiss import wal

    writer = Gallery.open(tmp_path, DIM, SHA, snapshot_every=1000)
    enrol(writer, x, 0, 1)
    reader = FollowingGallery.follow(tmp_path, DIM, SHA)
    fsync = wal.os.fsync
    calls = []

    def fsync_fails_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            reader.catch_up()  # the reader applies the three records, numbers 2-4
            raise OSError(28, "No space left on device")
        fsync(fd)

    monkeypatch.setattr(wal.os, "fsync", fsync_fails_once)
    with pytest.raises(OSError):
        writer.add([Item(f"ghost{i}", "", b"g" * 100) for i in range(3)], x[5:8], SHA)
    monkeypatch.setattr(wal.os, "fsync", fsync)
    enrol(writer, x, 1, 2)  # acknowledged under number 2, below what the reader applied
    (hit,) = reader.search(x[1:2], 1, SHA, writer.write_token)
    assert hit.top1.item_id == "i1"
    assert all(reader._gen.table.find(f"ghost{i}") is None for i in range(3))
    same_state(reader, writer)


def test_tokens_of_a_tenant_created_again_are_greater_whatever_its_incarnation(
    tmp_path: Path, x, monkeypatch
) -> None:
    from server.storage.faiss import tenants

    incarnations = iter(["ffffff0000000000", "0000010000000000", "8000000000000000"])
    monkeypatch.setattr(tenants, "new_incarnation", lambda: next(incarnations))
    writer, reader = _pair(tmp_path)
    g = writer.create("t", None).gallery
    for i in range(50):  # the old instance's log numbers run far ahead of the new one's
        g.add([Item(f"old{i}", "", b"o")], x[i : i + 1], SHA)
    client = g.write_token
    reader.refresh()
    writer.delete("t")
    g = writer.create("t", None).gallery
    reader.refresh()
    g.add([Item("new", "", b"n")], x[60:61], SHA)
    client = max(client, g.write_token)  # what client/retrieval.py keeps per tenant
    assert client == g.write_token
    (hit,) = reader.get("t").gallery.search(x[60:61], 1, SHA, client)
    assert hit.top1 is not None and hit.top1.item_id == "new"
    # the tag lives in the data dir: a writer started again goes on counting
    writer.close()
    from server.storage import open_store

    again = open_store("faiss", tmp_path, DIM, SHA, role="writer")
    again.load_all()
    assert again.create("u", None).gallery.write_token > client


def test_a_tenant_opened_while_a_reader_reloads_gets_the_new_model(tmp_path: Path, x) -> None:
    from server.storage.base import StaleModelError

    writer, reader = _pair(tmp_path)
    writer.create("a", None).gallery.add([Item("a0", "", b"a")], x[:1], SHA)
    reader.refresh()

    def embed(images: list[bytes]) -> np.ndarray:
        return np.tile(x[0], (len(images), 1))

    switch = reader.reopen(OTHER, DIM, embed)  # the slow part of a reload is done
    writer.create("b", None).gallery.add([Item("b0", "", b"b")], x[1:2], SHA)
    reader.refresh()  # the refresh, before the reload switches: b on the old model
    switch()
    reader.get("a").gallery.search(x[:1], 1, OTHER)
    with pytest.raises(StaleModelError):
        reader.get("b").gallery.search(x[:1], 1, OTHER)
    reader.refresh()  # the next refresh reads b again on the new model
    (hit,) = reader.get("b").gallery.search(x[:1], 1, OTHER)
    assert hit.top1.item_id == "b0"


def test_a_load_that_fails_and_is_retried_leaves_no_file_open(
    tmp_path: Path, x, monkeypatch
) -> None:
    from server.storage.faiss import segments
    from server.storage.faiss.segments import SegmentError

    writer = Gallery.open(tmp_path, DIM, SHA, snapshot_every=1000)
    enrol(writer, x, 0, 3)
    writer.snapshot()
    load = segments.SegmentStore.load
    failures = []

    def compacted_meanwhile(self, *args, **kwargs):
        if len(failures) < 3:
            failures.append(1)
            raise SegmentError("segment gone")
        return load(self, *args, **kwargs)

    monkeypatch.setattr(segments.SegmentStore, "load", compacted_meanwhile)
    before = len(list(Path("/proc/self/fd").iterdir()))
    FollowingGallery.follow(tmp_path, DIM, SHA).close()
    assert len(failures) == 3
    assert len(list(Path("/proc/self/fd").iterdir())) == before


def test_an_old_instance_ignores_the_new_log_even_in_a_folder_with_its_inode(
    tmp_path: Path, x, monkeypatch
) -> None:
    from server.storage.faiss import follower

    # a file system that gives the deleted folder's inode to the new one (ext4 often does)
    monkeypatch.setattr(follower, "_identity", lambda d: (1, 1) if d.exists() else None)
    writer, reader = _pair(tmp_path)
    writer.create("t", None).gallery.add([Item("old", "", b"o")], x[:1], SHA)
    old = reader.follow("t")
    old.gallery.catch_up()
    writer.delete("t")
    fresh = writer.create("t", None).gallery
    fresh.add([Item(f"new{i}", "", b"n") for i in range(3)], x[10:13], SHA)
    old.gallery.catch_up()
    assert old.gallery._gen.table.find("new1") is None
    reader.refresh()
    (hit,) = reader.get("t").gallery.search(x[11:12], 1, SHA, fresh.write_token)
    assert hit.top1.item_id == "new1"


def test_a_record_that_fails_to_apply_is_read_again(tmp_path: Path, x) -> None:
    writer = Gallery.open(tmp_path, DIM, SHA, snapshot_every=1000)
    enrol(writer, x, 0, 2)
    refuse = [False]

    def embed(images: list[bytes]) -> np.ndarray:
        if refuse[0]:
            raise RuntimeError("the embedder failed")
        return np.tile(x[40], (len(images), 1))

    reader = FollowingGallery.follow(tmp_path, DIM, OTHER, embed)  # re-embeds: another model
    writer.add([Item("late", "", b"l")], x[3:4], SHA)
    refuse[0] = True
    with pytest.raises(RuntimeError):
        reader.catch_up()
    refuse[0] = False
    reader.catch_up()
    assert reader._gen.table.find("late") is not None
    assert reader.write_token == writer.write_token


def test_the_refresh_goes_on_past_a_tenant_it_cannot_read(tmp_path: Path, x, monkeypatch) -> None:
    writer, reader = _pair(tmp_path)
    writer.create("a", None)
    writer.create("b", None)
    reader.refresh()
    writer.get("b").gallery.add([Item("b0", "", b"b")], x[:1], SHA)

    def broken() -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(reader.get("a").gallery, "catch_up", broken)
    writer.create("c", None)
    reader.refresh()
    assert reader.get("b").gallery.size == 1 and "c" in reader.names()


def test_a_reader_knows_only_what_it_has_followed(tmp_path: Path) -> None:
    """get() never reads the disk (it runs on the event loop); follow() does."""
    import threading

    from server.storage.base import TenantError

    writer, reader = _pair(tmp_path)
    writer.create("new", None)
    answers: list[object] = []

    def get() -> None:
        try:
            answers.append(reader.get("new"))
        except TenantError as err:
            answers.append(err)

    with reader._following:  # a refresh (or a reload) holds it: get() must not wait
        asking = threading.Thread(target=get, daemon=True)
        asking.start()
        asking.join(timeout=5)
    assert len(answers) == 1 and isinstance(answers[0], TenantError)
    assert reader.follow("new") is not None and reader.get("new").name == "new"


# -------------------------------------------- found in the third review (each failed before)
def test_a_tenant_from_before_token_tags_created_again_is_looked_up(tmp_path: Path, x) -> None:
    import json

    writer, reader = _pair(tmp_path)
    writer.create("t", None).gallery.add([Item("old", "", b"o")], x[:1], SHA)
    record = tmp_path / "tenants" / "t" / "tenant.json"
    raw = json.loads(record.read_text())
    del raw["token_tag"]  # as written before tags: tag 0
    record.write_text(json.dumps(raw))
    old = reader.follow("t")
    assert old.gallery.token_tag == 0
    writer.delete("t")
    fresh = writer.create("t", None).gallery
    fresh.add([Item("new", "", b"n")], x[10:11], SHA)
    assert old.gallery.newer_instance(fresh.write_token)  # so the service looks again
    assert not old.gallery.newer_instance(old.gallery.write_token)


def test_a_refresh_while_the_reload_switches_keeps_the_new_model(
    tmp_path: Path, x, monkeypatch
) -> None:
    writer, reader = _pair(tmp_path)
    writer.create("a", None).gallery.add([Item("a0", "", b"a")], x[:1], SHA)
    writer.create("b", None).gallery.add([Item("b0", "", b"b")], x[1:2], SHA)
    reader.refresh()

    def embed(images: list[bytes]) -> np.ndarray:
        return np.tile(x[0], (len(images), 1))

    switch = reader.reopen(OTHER, DIM, embed)
    switch_model = type(reader).switch_model

    def refresh_first(self, *args) -> None:  # every gallery adopted, the model not yet
        self.refresh()
        switch_model(self, *args)

    monkeypatch.setattr(type(reader), "switch_model", refresh_first)
    switch()
    monkeypatch.undo()
    assert {reader.get(n).gallery.model_sha256 for n in ("a", "b")} == {OTHER}
    reader.refresh()
    assert {reader.get(n).gallery.model_sha256 for n in ("a", "b")} == {OTHER}


def test_token_tags_survive_a_lost_or_damaged_counter_and_wrap_below_2_24(tmp_path: Path) -> None:
    from server.storage import open_store
    from server.storage.faiss.gallery import TOKEN_SHIFT, TOKEN_TAGS
    from server.storage.faiss.tenants import TAGS_FILE

    writer, _ = _pair(tmp_path)
    tags = [writer.create(n, None).gallery.token_tag for n in ("a", "b", "c")]
    assert tags == sorted(tags) and len(set(tags)) == 3
    writer.close()
    for damage in ("", "not a number\n"):
        counter = tmp_path / TAGS_FILE
        if damage:
            counter.write_text(damage)
        else:
            counter.unlink()
        again = open_store("faiss", tmp_path, DIM, SHA, role="writer")
        again.load_all()
        tag = again.create(f"d{len(damage)}", None).gallery.token_tag
        assert tag > max(tags)
        tags.append(tag)
        again.close()
    again._last_tag = TOKEN_TAGS - 1
    assert again._next_token_tag() == 1  # wraps to 1, never 2**24 (a token fits 64 bits)
    assert (TOKEN_TAGS - 1) << TOKEN_SHIFT | ((1 << TOKEN_SHIFT) - 1) < 1 << 64


def test_each_replaced_tenant_is_told_once(tmp_path: Path) -> None:
    writer, reader = _pair(tmp_path)
    writer.create("t", None)
    writer.create("u", None)
    reader.refresh()
    assert reader.gone() == []
    writer.delete("t")
    writer.create("t", None)
    writer.delete("u")
    reader.follow("t")  # the miss path replaces t ...
    reader.refresh()  # ... and the refresh drops u
    assert sorted(reader.gone()) == ["t", "u"] and reader.gone() == []
