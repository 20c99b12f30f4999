"""``python -m server --workers N``: N server processes on one port (SO_REUSEPORT).

One asyncio process picks gRPC calls up one at a time and spends most of a
single-image Match in Python (docs/RELIABILITY.md); N processes on N cores serve N
times the calls. They must share their galleries, so ``--workers`` needs a store
every process can use (``--gallery milvus://...``); with the in-process faiss store
each process would own a different gallery, and the server refuses to start.

The parent starts the workers with the same flags (each ``--port P --reuse-port`` and
its own metrics port, ``--metrics-port`` + i, so Prometheus scrapes each one: counters
then add up across them), waits until every worker is serving, prints one ready line,
forwards SIGTERM/SIGINT/SIGHUP to every worker and exits when they have: if one worker
dies the others are stopped too, so a supervisor (systemd, Kubernetes) restarts the
whole set instead of serving with fewer processes unnoticed.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import time

READY = "serving retrieval.v1 on "


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, 0))
        return s.getsockname()[1]


def run_workers(args, argv: list[str]) -> int:
    """Start ``args.workers`` copies of this server; returns the exit status."""
    if not str(args.gallery).startswith("milvus://"):
        print(
            "error: --workers needs galleries every process can share: pass --gallery "
            "milvus://HOST:PORT (the faiss store and milvus-lite live in one process)",
            file=sys.stderr,
        )
        return 2
    port = args.port or free_port(args.host)
    children: list[subprocess.Popen] = []
    metrics = []
    try:
        for i in range(args.workers):
            metrics_port = args.metrics_port + i if args.metrics_port else 0
            command = [
                sys.executable,
                "-m",
                "server",
                *argv,
                "--workers",
                "1",
                "--reuse-port",
                "--port",
                str(port),
                "--metrics-port",
                str(metrics_port),
            ]  # later flags win in argparse: these override the parent's
            children.append(subprocess.Popen(command, stdout=subprocess.PIPE, text=True))
        for child in children:
            line = _ready_line(child, timeout=300)
            if line is None:
                print("error: a worker did not start; see its log above", file=sys.stderr)
                return 2
            metrics.append(line.rsplit(" on ", 1)[1])
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
