"""Write-ahead log: records come back in order, a torn tail is dropped and cut off."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.wal import WriteAheadLog, read_records


def test_roundtrip_and_reset(tmp_path: Path) -> None:
    wal = WriteAheadLog(tmp_path / "wal.log")
    wal.append([b"one", b"two"])
    wal.append([b""])
    assert read_records(tmp_path / "wal.log") == [b"one", b"two", b""]
    wal.reset()
    wal.append([b"three"])
    wal.close()
    assert read_records(tmp_path / "wal.log") == [b"three"]


@pytest.mark.parametrize("cut", [1, 5, 9, 12])
def test_torn_tail_is_dropped_and_truncated(tmp_path: Path, cut: int) -> None:
    path = tmp_path / "wal.log"
    wal = WriteAheadLog(path)
    wal.append([b"kept"])
    good = path.stat().st_size
    wal.append([b"torn-record"])
    wal.close()
    data = path.read_bytes()
    path.write_bytes(data[: good + cut])  # the crash happened mid-write
    assert read_records(path) == [b"kept"]
    assert path.stat().st_size == good
    wal = WriteAheadLog(path)
    wal.append([b"after"])
    wal.close()
    assert read_records(path) == [b"kept", b"after"]


def test_corrupt_checksum_stops_replay(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    wal = WriteAheadLog(path)
    wal.append([b"first", b"second"])
    wal.close()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert read_records(path) == [b"first"]


def test_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_records(tmp_path / "absent.log") == []
