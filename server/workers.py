"""``python -m server --workers N``: N server processes on one port (SO_REUSEPORT).

One asyncio process picks gRPC calls up one at a time and spends most of a
single-image Match in Python (docs/RELIABILITY.md); N processes on N cores serve N
times the calls. They share their galleries in one of two ways:

- **Milvus** (``--gallery milvus://...``): every process reads and writes the store;
- **faiss** (the default): worker 0 is the *writer*, the only process that writes the
  data dir, as a lone server does; workers 1..N-1 are *readers*. A reader follows the
  writer's galleries (segments and write-ahead log, server/storage/faiss/follower.py),
  its tenants and keys, and serves Match from them; the calls that write or read the
  writer's state (Enroll, Remove, GetTenant, Admin) it forwards to the writer over a
  private Unix socket (server/api/forward.py). A Match carrying the write token of an
  Enroll sees that write on every worker.

The parent starts the workers with the same flags (each ``--port P --reuse-port`` and
its own metrics port, ``--metrics-port`` + i, so Prometheus scrapes each one: counters
then add up across them), the writer first, waits until every worker is serving, prints
one ready line, forwards SIGTERM/SIGINT/SIGHUP to every worker and exits when they have:
if one worker dies the others are stopped too, so a supervisor (systemd, Kubernetes)
restarts the whole set instead of serving with fewer processes unnoticed.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

READY = "serving retrieval.v1 on "
FAISS_REFRESH_SECONDS = "1"  # readers look for new tenants and keys this often


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, 0))
        return s.getsockname()[1]


def shared_milvus(gallery: str) -> bool:
    return str(gallery).startswith("milvus://")


def worker_flags(args, argv: list[str], i: int, port: int, sockets: Path | None) -> list[str]:
    """The command line of worker ``i`` (later flags win in argparse: these override)."""
    metrics_port = args.metrics_port + i if args.metrics_port else 0
    flags = [*argv, "--workers", "1", "--reuse-port", "--port", str(port)]
    flags += ["--metrics-port", str(metrics_port)]
    if sockets is not None:  # the faiss store: one writer, readers
        flags += ["--role", "writer" if i == 0 else "reader", "--replica", f"worker{i}"]
        flags += ["--writer-socket", str(sockets / "writer.sock")]
        if "--store-refresh-seconds" not in argv:
            flags += ["--store-refresh-seconds", FAISS_REFRESH_SECONDS]
    return [sys.executable, "-m", "server", *flags]


def run_workers(args, argv: list[str]) -> int:
    """Start ``args.workers`` copies of this server; returns the exit status."""
    if str(args.gallery).startswith("milvus-lite:"):
        print(
            "error: --workers needs galleries every process can share: the faiss store "
            "(the default) or --gallery milvus://HOST:PORT; milvus-lite lives in one process",
            file=sys.stderr,
        )
        return 2
    port = args.port or free_port(args.host)
    # a short path: a Unix socket's must fit in 108 bytes, a data dir's need not
    sockets = None if shared_milvus(args.gallery) else Path(tempfile.mkdtemp(prefix="tcm-"))
    children: list[subprocess.Popen] = []
    metrics = []
    try:
        for i in range(args.workers):
            command = worker_flags(args, argv, i, port, sockets)
            children.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
            if i == 0 and sockets is not None and not _started(children[0], metrics):
                return 2  # the readers open what the writer made: it starts alone first
        for child in children[len(metrics) :]:
            if not _started(child, metrics):
                return 2
        print(
            f"{READY}{args.host}:{port}, metrics on {' '.join(metrics)} ({args.workers} workers)",
            flush=True,
        )
        return _supervise(children)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=max(10.0, args.grace + 5))
            if child.poll() is None:
                child.kill()
        if sockets is not None:
            shutil.rmtree(sockets, ignore_errors=True)


def _started(child: subprocess.Popen, metrics: list[str]) -> bool:
    """Wait for ``child``'s ready line; its metrics address joins ``metrics``."""
    line = _ready_line(child, timeout=300)
    if line is None:
        print("error: a worker did not start; see its log above", file=sys.stderr)
        return False
    metrics.append(line.rsplit(" on ", 1)[1])
    return True


def _ready_line(child: subprocess.Popen, timeout: float) -> str | None:
    deadline = time.monotonic() + timeout
    assert child.stdout is not None
    while time.monotonic() < deadline:
        line = child.stdout.readline()
        if line.startswith(READY):
            return line.strip()
        if not line and child.poll() is not None:
            return None
    return None


def _supervise(children: list[subprocess.Popen]) -> int:
    """Forward signals; when any worker exits, stop the rest and report its status."""
    stopping = False

    def forward(signum, _frame) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    while True:
        for child in children:
            code = child.poll()
            if code is not None:
                if not stopping:
                    print(f"error: worker {child.pid} exited with {code}", file=sys.stderr)
                    forward(signal.SIGTERM, None)
                statuses = [c.wait() for c in children]
                return max(statuses, key=abs) if not stopping else max(statuses)
        time.sleep(0.2)
