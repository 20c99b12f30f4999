"""An append-only, checksummed write-ahead log: what the server acknowledged survives a crash.

Each record is ``<length u32><crc32 u32><payload>``. :meth:`WriteAheadLog.append`
writes a group of records and fsyncs once before returning, so the caller may
acknowledge the request only after it returns. A crash can leave at most the last
group half-written; :func:`read_records` detects that torn tail (short header, short
payload or bad checksum), drops it and truncates the file so new records follow the
last good one. Nothing in the torn tail was ever acknowledged.
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


def read_records(path: Path, repair: bool = True) -> list[bytes]:
    """Every intact record of ``path`` in order; a torn tail is dropped (and cut off)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    records, offset = [], 0
    while offset < len(data):
        if offset + _HEADER.size > len(data):
            break
        length, crc = _HEADER.unpack_from(data, offset)
        start, end = offset + _HEADER.size, offset + _HEADER.size + length
        if length > MAX_RECORD or end > len(data) or zlib.crc32(data[start:end]) != crc:
            break
        records.append(data[start:end])
        offset = end
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
        """Empty the log once a snapshot holds everything it said."""
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)

    def size(self) -> int:
        return os.fstat(self._fd).st_size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
