"""Write-ahead log: records come back in order, a torn tail is dropped and cut off."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.storage.faiss.wal import WriteAheadLog, read_records


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


_FULL_DISK = r"""
import resource, signal, sys
from pathlib import Path
from server.storage.faiss.wal import WriteAheadLog, read_records

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
path = Path(sys.argv[1])
wal = WriteAheadLog(path)
wal.append([b"acknowledged-before"])
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 20, hard))
try:
    wal.append([b"x" * 100])  # 20 bytes fit: the record is cut mid-write
    print("no error")
except OSError as err:
    print("refused", err.errno)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))  # space is back
wal.append([b"acknowledged-after"])
wal.close()
print(read_records(path))
"""


def test_a_failed_append_leaves_no_torn_record_behind(tmp_path: Path) -> None:
    """A disk that fills mid-record (simulated with RLIMIT_FSIZE, so no root is needed):
    the partial record is cut off, so the records appended once space returns replay."""
    import errno
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run(
        [sys.executable, "-c", _FULL_DISK, str(tmp_path / "wal.log")],
        capture_output=True, text=True, cwd=root, timeout=60, check=True,
    )  # fmt: skip
    lines = out.stdout.splitlines()
    assert lines[0] == f"refused {errno.EFBIG}"
    assert lines[1] == "[b'acknowledged-before', b'acknowledged-after']"
