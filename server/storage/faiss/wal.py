"""An append-only, checksummed write-ahead log: what the server acknowledged survives a crash.

Each record is ``<length u32><crc32 u32><payload>``. :meth:`WriteAheadLog.append`
writes a group of records and fsyncs once before returning, so the caller may
acknowledge the request only after it returns. A crash can leave at most the last
group half-written; :func:`read_records` detects that torn tail (short header, short
payload or bad checksum), drops it and truncates the file so new records follow the
last good one. Nothing in the torn tail was ever acknowledged.

Other processes may follow the log (``--workers``: one writer, readers that apply what
it writes, server/storage/faiss/follower.py): :class:`LogFollower` reads the records
appended since its last read. For it, an emptied log is a *new file* renamed over the
old one, never the old file truncated in place: a reader still holding the old file
finishes reading it, then moves to the new one, and never reads new bytes at an offset
that belonged to old records.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterable
from pathlib import Path

from contracts.files import fsync_dir

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<II")
MAX_RECORD = 256 << 20  # a length beyond this is garbage, not a record


def _encode(payload: bytes) -> bytes:
    if len(payload) > MAX_RECORD:
        raise ValueError(f"WAL record of {len(payload)} bytes exceeds {MAX_RECORD}")
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _intact(data: bytes) -> tuple[list[bytes], int, bool]:
    """The whole records at the start of ``data``, the offset where they end, and whether
    what follows is damaged (a bad length or checksum) rather than merely cut short."""
    records, offset = [], 0
    while offset + _HEADER.size <= len(data):
        length, crc = _HEADER.unpack_from(data, offset)
        start, end = offset + _HEADER.size, offset + _HEADER.size + length
        if length > MAX_RECORD:
            return records, offset, True
        if end > len(data):
            break
        if zlib.crc32(data[start:end]) != crc:
            return records, offset, True
        records.append(data[start:end])
        offset = end
    return records, offset, False


def read_records(path: Path, repair: bool = True) -> list[bytes]:
    """Every intact record of ``path`` in order; a torn tail is dropped (and cut off)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, offset, _ = _intact(data)
    if offset < len(data):
        log.warning(
            "%s: dropped a torn tail of %d bytes after %d intact records (never acknowledged)",
            path,
            len(data) - offset,
            len(records),
        )
        if repair:
            with path.open("r+b") as handle:
                handle.truncate(offset)
                handle.flush()
                os.fsync(handle.fileno())
    return records


class WriteAheadLog:
    """Appends records durably; one fsync per :meth:`append` call (group commit)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        created = not path.exists()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if created:
            fsync_dir(path.parent)

    def append(self, payloads: Iterable[bytes]) -> None:
        """Write ``payloads`` and fsync; when this returns they survive a crash.

        When a write or the fsync fails (disk full, I/O error) the group is cut off
        again before the error is raised: a partly written record left at the end
        would otherwise end replay there and hide every record appended after it once
        space returns. Nothing of a failed group was acknowledged.
        """
        blob = b"".join(_encode(p) for p in payloads)
        start = os.lseek(self._fd, 0, os.SEEK_END)  # O_APPEND: this group starts here
        view = memoryview(blob)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, start)
                os.fsync(self._fd)
            except OSError:  # then replay drops the torn group: still nothing acknowledged
                log.exception("%s: could not cut off a failed append", self.path)
            raise

    def reset(self) -> None:
        """Empty the log once a snapshot holds everything it said: an empty file renamed
        over this one (a :class:`LogFollower` tells the two apart by inode)."""
        fresh = self.path.with_name(self.path.name + ".new")
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        try:
            os.fsync(fd)
            fresh.replace(self.path)
            fsync_dir(self.path.parent)
        except OSError:
            os.close(fd)
            raise
        os.close(self._fd)
        self._fd = fd

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class LogFollower:
    """The records another process appends to a log, read as they come (read-only).

    Holds the log file open and its read position. :meth:`read` returns the whole
    records appended since the last call; a record still being written is left for the
    next call. When the writer empties the log (a new file renamed over it), the old
    file is read to its end first, then the new one from its start, so no record is
    missed unless the log was emptied twice between two reads; the caller finds that
    out from the records' sequence numbers and starts over from the segments.

    ``rewritten`` is set when the open file no longer holds what was read from it:
    shorter than the read position, another header where the last record read began,
    or damage at the position. That happens when the writer cut off a group whose fsync
    failed after this reader had read it (never acknowledged) and wrote other records in
    its place; the caller must then start over too.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = -1
        self._ino = -1
        self._pos = 0
        self.switched = False  # the last read moved to a new file
        self.rewritten = False  # the open file changed behind the read position
        self._last: tuple[int, bytes] | None = None  # (offset, header) of the last record
        self._open()

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            self._fd, self._ino, self._pos, self._last = -1, -1, 0, None
            return
        self._fd, self._ino, self._pos = fd, os.fstat(fd).st_ino, 0
        self._last = None

    def read(self) -> list[bytes]:
        """Whole records appended since the last read, in order."""
        try:
            current = self.path.stat().st_ino
        except FileNotFoundError:
            current = -1
        records = self._read_open()  # after the stat: a renamed-away file is complete
        self.switched = current != self._ino
        if self.switched:
            self.close()
            self._open()
            records += self._read_open()
        return records

    def _read_open(self) -> list[bytes]:
        if self._fd < 0:
            return []
        size = os.fstat(self._fd).st_size
        if size < self._pos or (
            self._last is not None
            and os.pread(self._fd, _HEADER.size, self._last[0]) != self._last[1]
        ):
            self.rewritten = True
        if size <= self._pos:
            return []
        data = os.pread(self._fd, size - self._pos, self._pos)
        records, used, damaged = _intact(data)
        if records:
            start = used - _HEADER.size - len(records[-1])
            self._last = (self._pos + start, data[start : start + _HEADER.size])
        self._pos += used
        self.rewritten |= damaged
        return records

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
