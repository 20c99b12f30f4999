"""A tenant's gallery as another process writes it: the readers of ``--workers N``.

With the faiss store one process (the writer) owns a data dir: it appends every
mutation to the tenant's write-ahead log, checkpoints into segments and compacts.
The other worker processes serve Match from a :class:`FollowingGallery` of the same
directory: it loads the segments, then applies the log as the writer appends to it
(:class:`~server.storage.faiss.wal.LogFollower`), and never writes, deletes or repairs
a file.

Reads after writes keep the store's write-token semantics (server/storage/base.py): a
write token is the log sequence number of the write, so a search carrying a token
newer than what this reader applied first reads the log; the write is there, because
the writer fsyncs it before it answers. Records are applied strictly in sequence; a
reader that finds a hole (the log emptied twice between two of its reads, a segment
compacted away while it loaded) builds its generation again from the segments and the
log, and swaps it in at once, the way a reload does.
"""

from __future__ import annotations

import logging
import time
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

    def __init__(self, directory: Path, dim: int, model_sha256: str, *args, **kwargs) -> None:
        super().__init__(directory, dim, model_sha256, *args, **kwargs)
        # the tenant's folder as it is now: a tenant deleted and created again under the
        # same name has another folder, which this object must never follow
        self._folder = _identity(directory)
        # opened before the segments are read: every record newer than them is in it
        self._log = LogFollower(directory / WAL)
        self._embed = None
        self._closed = False

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

    def foreign(self, token: int) -> bool:
        """Whether ``token`` is a write token of another instance of this tenant (deleted
        and created again since this reader opened it)."""
        tag = token >> TOKEN_SHIFT
        return tag not in (0, self.token_tag)

    # ----------------------------------------------------------------- following
    def catch_up(self) -> int:
        """Apply what the writer logged since the last call; returns the records applied."""
        with self._write:
            if self._closed or _identity(self.directory) != self._folder:
                return 0  # deleted (and maybe created again): the registry drops this one
            try:
                records = self._log.read()
                with self._lock:
                    applied = self._replay(records, self._embed, tail=True)
                if self._log.rewritten:
                    raise LogGapError(f"{self.directory}: the log changed behind the position")
                if self._log.switched and self._store_lsn() > self._lsn:
                    raise LogGapError(f"{self.directory}: the log was emptied twice")
            except LogGapError as err:
                log.info("%s: %s; reading the segments again", self.directory, err)
                self.reopen(self.model_sha256, self.dim, self._embed)
                return 0
            return applied

    def _store_lsn(self) -> int:
        """The sequence number the writer's last checkpoint holds."""
        try:
            self._store.load_manifest()
        except SegmentError:
            return 0  # being replaced right now: the next catch-up reads it
        return self._store.manifest.lsn

    def reopen(self, model_sha256: str, dim: int, embed) -> None:
        """Build this gallery again from the writer's files (with another model: its
        items re-embedded here) and switch searches to it at once."""
        with self._write:
            fresh = FollowingGallery.follow(
                self.directory, dim, model_sha256, embed, self.index, self._tail_options
            )
            if fresh._folder != self._folder:  # another instance of the tenant now
                fresh.close()
                return
            self.adopt(fresh)

    def adopt(self, fresh: FollowingGallery) -> None:
        """Take ``fresh``'s state (the same tenant, read again): searches switch at once."""
        with self._write:
            with self._lock:
                old_log = self._log
                self._gen, self._store, self._log = fresh._gen, fresh._store, fresh._log
                self._lsn, self._next_id, self.dim = fresh._lsn, fresh._next_id, fresh.dim
                self.reembedded, self._embed = fresh.reembedded, fresh._embed
            old_log.close()

    def search(
        self, queries: np.ndarray, k: int, model_sha256: str, read_after: int = 0
    ) -> list[SearchResult]:
        """As :meth:`Gallery.search`, after reading the log when ``read_after`` is newer
        than what this reader applied (the writer logged it before answering)."""
        # ">=": the record this reader holds under that number may be one the writer cut
        # off (its fsync failed) and replaced; catching up checks that (a few syscalls)
        if read_after % (1 << TOKEN_SHIFT) >= self._lsn and not self.foreign(read_after):
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
