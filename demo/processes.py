"""Child processes the demo starts (server, Prometheus), always stopped on the way out.

Each child runs in its own session so that a Ctrl-C in the terminal reaches only the
demo, which then stops the children in order (SIGTERM, a grace period, SIGKILL), so
no process is left behind whatever way the demo ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (good enough on a loopback demo)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class ProcessGroup:
    """Starts named child processes with their output in log files; stops them all on exit."""

    def __init__(self, log_dir: Path, grace_s: float = 15.0) -> None:
        self.log_dir = log_dir
        self.grace_s = grace_s
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    def start(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = self.log_dir / f"{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        self.children[name] = proc
        self.logs[name] = log
        return proc

    def wait_for_port(self, name: str, port: int, timeout_s: float = 60.0) -> None:
        """Block until the child listens on ``port``; fail with its log tail if it died."""
        proc = self.children[name]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with code {proc.returncode}:\n{self.tail(name)}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
                return
            time.sleep(0.2)
        raise TimeoutError(
            f"{name} did not listen on port {port} in {timeout_s:.0f} s:\n{self.tail(name)}"
        )

    def tail(self, name: str, lines: int = 20) -> str:
        text = self.logs[name].read_text(errors="replace") if name in self.logs else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, name: str) -> int | None:
        """SIGTERM (the server drains in-flight calls), then SIGKILL after the grace period."""
        proc = self.children.pop(name, None)
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(self.grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            return proc.wait()

    def stop_all(self) -> dict[str, int | None]:
        return {name: self.stop(name) for name in reversed(list(self.children))}

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()
