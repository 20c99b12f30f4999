"""A tenant's gallery as another process writes it: the readers of ``--workers N``.

With the faiss store one process (the writer) owns a data dir: it appends every
mutation to the tenant's write-ahead log, checkpoints into segments and compacts.
The other worker processes serve Match from a :class:`FollowingGallery` of the same
directory: it loads the segments, then applies the log as the writer appends to it
(:class:`~server.storage.faiss.wal.LogFollower`), and never writes, deletes or repairs
a file.

Reads after writes keep the store's write-token semantics (server/storage/base.py): a
write token is the log sequence number of the write under the tenant instance's tag,
so a search carrying a token of this instance first reads the log; the write is there,
because the writer fsyncs it before it answers. Records are applied strictly in sequence; a
reader that finds a hole (the log emptied twice between two of its reads, a segment
compacted away while it loaded) builds its generation again from the segments and the
log, and swaps it in at once, the way a reload does.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from server.storage.base import GalleryError, Item, SearchResult, TailOptions
from server.storage.faiss.ann import make_index
from server.storage.faiss.gallery import TOKEN_SHIFT, WAL, Gallery
from server.storage.faiss.segments import SegmentError
from server.storage.faiss.wal import LogFollower

log = logging.getLogger(__name__)

OPEN_ATTEMPTS = 5  # a writer compacting while a reader loads makes a load fail; retried


class ReadOnlyGalleryError(RuntimeError):
    """A mutation reached a reader: only the writer process changes a gallery."""


class LogGapError(GalleryError):
    """The log skipped records this reader has not applied (they are in a segment now)."""


class FollowingGallery(Gallery):
    """A read-only :class:`Gallery` that follows the writer's log; open with :meth:`follow`."""

    writes = False
    stale_model = False  # opened on the model a reload left: the refresh reads it again

    def __init__(self, directory: Path, dim: int, model_sha256: str, *args, **kwargs) -> None:
        super().__init__(directory, dim, model_sha256, *args, **kwargs)
        # the tenant's folder as it is now: a tenant deleted and created again under the
        # same name has another folder, which this object must never follow
        self._folder = _identity(directory)
        # opened before the segments are read: every record newer than them is in it
        self._log = LogFollower(directory / WAL)
        self._embed = None
        self._closed = False
        self._broken = False  # a record failed to apply: read everything again
        # the tenant instance (its incarnation) and how to read the one on disk now: a
        # folder's inode can come back after a delete and create, an incarnation cannot
        self.pinned: tuple[str, Callable[[], str | None] | None] = ("", None)

    @classmethod
    def follow(
        cls,
        directory: Path,
        dim: int,
        model_sha256: str,
        embed=None,
        index: str = "flat",
        tail: TailOptions | None = None,
    ) -> FollowingGallery:
        """The writer's gallery in ``directory`` as it is now (items of another model are
        re-embedded in memory with ``embed``)."""
        for attempt in range(OPEN_ATTEMPTS):
            try:
                gallery = cls.open(directory, dim, model_sha256, embed, 1 << 62, index, tail)
                if _identity(directory) != gallery._folder:
                    gallery.close()
                    raise LogGapError(f"{directory}: the tenant was created again meanwhile")
            except (GalleryError, FileNotFoundError) as err:
                if attempt + 1 == OPEN_ATTEMPTS or not directory.exists():
                    raise
                log.info("%s: reading the writer's gallery again (%s)", directory, err)
                time.sleep(0.05 * (attempt + 1))
                continue
            gallery._embed = embed
            return gallery
        raise AssertionError("unreachable")

    def _log_records(self) -> list[bytes]:
        return self._log.read()

    def _check_sequence(self, lsn: int) -> None:
        if lsn != self._lsn + 1:
            raise LogGapError(f"{self.directory}: log record {lsn} follows {self._lsn}")

    def _index_from_files(self, index: str, dim: int) -> None:
        """Built from the rows read: a graph file of the writer's may be from a moment
        other than the segments and log this reader read (or of another model)."""
        gen = self._gen
        gen.index = make_index(index, dim)
        gen.index.added(gen.table.view, gen.table.live_rows())

    def _abandon(self) -> None:
        self._log.close()

    def pin(self, incarnation: str, on_disk: Callable[[], str | None] | None) -> None:
        """Follow only the tenant instance ``incarnation``; ``on_disk()`` names the one
        stored now (checked when the log file changes and before reading files again)."""
        self.pinned = (incarnation, on_disk)

    def same_instance(self) -> bool:
        """Whether the tenant on disk is still the one this gallery follows."""
        incarnation, on_disk = self.pinned
        if _identity(self.directory) != self._folder:
            return False
        return on_disk is None or on_disk() == incarnation

    def newer_instance(self, token: int) -> bool:
        """Whether ``token`` is a write token of a newer instance of this tenant (deleted
        and created again since this reader opened it). A token of an older instance
        asks for writes that were deleted with it: nothing to wait for."""
        return (token >> TOKEN_SHIFT) > self.token_tag

    # ----------------------------------------------------------------- following
    def catch_up(self) -> int:
        """Apply what the writer logged since the last call; returns the records applied."""
        try:
            return self._read_log()
        except LogGapError as err:  # read again outside the lock: searches go on meanwhile
            log.info("%s: %s; reading the segments again", self.directory, err)
            self.reopen(self.model_sha256, self.dim, self._embed)
            return 0

    def _read_log(self) -> int:
        with self._write:
            if self._closed or _identity(self.directory) != self._folder:
                return 0  # deleted (and maybe created again): the registry drops this one
            if self._broken:
                raise LogGapError(f"{self.directory}: a record could not be applied")
            records = self._log.read()
            if self._log.switched and not self.same_instance():
                self._closed = True  # a new log of a tenant created again: not ours
                return 0
            with self._lock:
                applied = self._apply(records)
            if self._log.rewritten:
                raise LogGapError(f"{self.directory}: the log changed behind the position")
            if self._log.switched and self._store_lsn() > self._lsn:
                raise LogGapError(f"{self.directory}: the log was emptied twice")
            return applied

    def _apply(self, records: list[bytes]) -> int:
        """Replay ``records``; the log has moved past them, so one that fails (an image
        the embedder refuses) has the next catch-up read everything again."""
        try:
            return self._replay(records, self._embed, tail=True)
        except LogGapError:
            raise
        except Exception:
            self._broken = True
            raise

    def _store_lsn(self) -> int:
        """The sequence number the writer's last checkpoint holds."""
        try:
            self._store.load_manifest()
        except SegmentError:
            return 0  # being replaced right now: the next catch-up reads it
        return self._store.manifest.lsn

    def reopen(self, model_sha256: str, dim: int, embed) -> None:
        """Build this gallery again from the writer's files (with another model: its
        items re-embedded here) and switch searches to it at once. The old state serves
        and follows while the new one is read: the new one reads the log on from where
        its files end, so nothing applied in between is lost."""
        fresh = FollowingGallery.follow(
            self.directory, dim, model_sha256, embed, self.index, self._tail_options
        )
        fresh.pin(*self.pinned)
        if fresh._folder != self._folder or not fresh.same_instance():
            fresh.close()  # another instance of the tenant now: the registry's to open
            self._closed = True
            return
        self.adopt(fresh)

    def adopt(self, fresh: FollowingGallery) -> None:
        """Take ``fresh``'s state (the same tenant, read again): searches switch at once."""
        with self._write:
            if self._closed:  # deleted meanwhile: nobody searches this one any more
                fresh.close()
                return
            with self._lock:
                old_log = self._log
                self._gen, self._store, self._log = fresh._gen, fresh._store, fresh._log
                self._lsn, self._next_id, self.dim = fresh._lsn, fresh._next_id, fresh.dim
                self.reembedded, self._embed = fresh.reembedded, fresh._embed
                self._broken = False
            old_log.close()

    def search(
        self, queries: np.ndarray, k: int, model_sha256: str, read_after: int = 0
    ) -> list[SearchResult]:
        """As :meth:`Gallery.search`, after reading the log when ``read_after`` is a token
        of this tenant instance (the writer logged the write before answering)."""
        # also when this reader has applied the token's number already: what it applied
        # under that number may be a group the writer cut off (its fsync failed) and gave
        # the numbers back; catching up finds that out (a few system calls)
        if read_after and (read_after >> TOKEN_SHIFT) in (0, self.token_tag):
            self.catch_up()
        return super().search(queries, k, model_sha256, read_after)

    # ------------------------------------------------------- the writer's part
    def add(self, items, embeddings, model_sha256, replace=False):
        raise ReadOnlyGalleryError(f"{self.directory}: a reader cannot enrol")

    def remove(self, item_ids):
        raise ReadOnlyGalleryError(f"{self.directory}: a reader cannot remove")

    def items(self) -> list[Item]:
        raise ReadOnlyGalleryError(f"{self.directory}: images are read from the writer")

    def rebuild(self, model_sha256, item_ids, embeddings) -> None:
        raise ReadOnlyGalleryError(f"{self.directory}: a reader re-reads, see reopen()")

    def snapshot(self) -> None:
        """Nothing: checkpoints are the writer's."""

    def close(self) -> None:
        with self._write:
            self._closed = True
            self._log.close()


def _identity(directory: Path) -> tuple[int, int] | None:
    """(device, inode) of a folder; None when it is gone."""
    try:
        st = directory.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino
