"""A real Milvus standalone (``pip install milvus==2.3.5``) for the tests, by PID.

Started once per test session on a free 127.0.0.1 port by scripts/milvus_standalone.py
and stopped (SIGTERM, then SIGKILL after 5 s: 2.3.5 ignores SIGTERM for a minute) when
the session ends, also when a test failed. About 10-15 s to start, ~250 MB of memory.
"""

from __future__ import annotations

import importlib.util
import socket
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _launcher():
    spec = importlib.util.spec_from_file_location(
        "milvus_standalone", ROOT / "scripts" / "milvus_standalone.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@dataclass
class MilvusServer:
    data: Path
    port: int
    pid: int

    @property
    def spec(self) -> str:
        return f"milvus://127.0.0.1:{self.port}"

    def stop(self) -> None:
        _launcher().stop(self.data)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_milvus(data: Path) -> MilvusServer:
    port = free_port()
    pid = _launcher().start(data, port)
    return MilvusServer(data, port, pid)
