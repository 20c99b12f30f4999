"""Start and stop a real Milvus standalone server (``pip install milvus==2.3.5``) by PID.

    python scripts/milvus_standalone.py start --data /tmp/milvus --port 19530
    python scripts/milvus_standalone.py stop --data /tmp/milvus

The ``milvus`` package ships the standalone binary (etcd, message queue and local
storage built in). This wrapper writes its config with every component advertising
127.0.0.1 and the proxy on ``--port``, starts the binary in its own process group,
waits until ``/healthz`` answers and records the PID in ``DATA/milvus.pid``. ``stop``
sends SIGTERM to that group and SIGKILL after ``--grace`` seconds (2.3.5 was seen to
ignore SIGTERM for a minute). Clients must connect to 127.0.0.1: the 2.3.5 binary
binds its ports on every interface, whatever the advertised address.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

COMPONENTS = (
    "rootCoord",
    "proxy",
    "queryCoord",
    "queryNode",
    "indexCoord",
    "indexNode",
    "dataCoord",
    "dataNode",
)
PIDFILE = "milvus.pid"


def start(data: Path, port: int, timeout: float = 180.0) -> int:
    """Start Milvus; returns its PID once it answers health checks."""
    from milvus import MilvusServerConfig, _initialize_data_files

    data.mkdir(parents=True, exist_ok=True)
    config = MilvusServerConfig()
    config.configs["data_dir"] = str(data)
    config.configs["proxy_port"] = port
    for component in COMPONENTS:
        config.set(f"{component}.ip", "127.0.0.1")
    config.resolve()  # writes configs/milvus.yaml, picks free internal ports
    _embedded_etcd_on_free_ports(data, config)
    _initialize_data_files(str(data))
    web_port = _free_port()
    binary = data / "bin" / "milvus"
    env = dict(
        os.environ,
        DEPLOY_MODE="STANDALONE",
        METRICS_PORT=str(web_port),
        MILVUS_RUN_DIR=str(data / "run"),
        LD_LIBRARY_PATH=f"{binary.parent}:{os.environ.get('LD_LIBRARY_PATH', '')}",
    )
    log = (data / "logs" / "milvus-stdout.log").open("w")
    proc = subprocess.Popen(
        [str(binary), "run", "standalone"],
        cwd=data,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group: stop() ends all of it
    )
    (data / PIDFILE).write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"milvus exited with {proc.returncode}; see {log.name}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz", timeout=2) as r:
                if b"OK" in r.read():
                    return proc.pid
        except OSError:
            pass
        time.sleep(0.25)
    stop(data)
    raise TimeoutError(f"milvus did not become healthy in {timeout:.0f} s; see {log.name}")


def _embedded_etcd_on_free_ports(data: Path, config) -> None:
    """The embedded etcd's peer port is not in Milvus' configurable items and defaults
    to 127.0.0.1:2380, so a second Milvus on the machine died with -6 ("address already in
    use"). Point etcd at its own config with a free peer port (and the client port the
    configuration resolved)."""
    client = int(config.configurable_items["etcd_port"][1])
    etcd_data = config.configurable_items["etcd_data_dir"][1]
    peer = _free_port()
    etcd = data / "configs" / "etcd.yaml"
    etcd.write_text(
        "name: default\n"
        f"data-dir: {etcd_data}\n"
        f"listen-client-urls: http://127.0.0.1:{client}\n"
        f"advertise-client-urls: http://127.0.0.1:{client}\n"
        f"listen-peer-urls: http://127.0.0.1:{peer}\n"
        f"initial-advertise-peer-urls: http://127.0.0.1:{peer}\n"
        f"initial-cluster: default=http://127.0.0.1:{peer}\n"
    )
    milvus_yaml = data / "configs" / "milvus.yaml"
    text = milvus_yaml.read_text()
    anchor = "  use:\n    embed: true"
    if anchor not in text:
        raise RuntimeError(f"{milvus_yaml}: no embedded etcd section to configure")
    milvus_yaml.write_text(text.replace(anchor, f"{anchor}\n  config:\n    path: {etcd}", 1))


def stop(data: Path, grace: float = 5.0) -> bool:
    """Stop the Milvus recorded in ``data``; True when one was running."""
    pidfile = data / PIDFILE
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        pidfile.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _alive(pid):
        time.sleep(0.1)
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    pidfile.unlink(missing_ok=True)
    return True


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:  # not our child: ask the kernel
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("start", "stop"))
    p.add_argument("--data", type=Path, required=True, help="data, config and log folder")
    p.add_argument("--port", type=int, default=19530, help="the proxy's gRPC port")
    p.add_argument("--grace", type=float, default=5.0, help="seconds from SIGTERM to SIGKILL")
    args = p.parse_args(argv)
    if args.action == "start":
        print(start(args.data, args.port), flush=True)
        return 0
    return 0 if stop(args.data, args.grace) else 1


if __name__ == "__main__":
    sys.exit(main())
