"""Where a Match server's CPU goes: server vs load-generator CPU per image, one window.

    python -m bench.match_cpu DATA_DIR [--clients 16,64] [--seconds 8]

Starts the server on an existing data dir (for example one ``python -m bench.scale``
built under /tmp/tcm-bench-scale/store-100000), drives it with the same client as
bench.scale (a separate process, single-image Match calls) and reads both processes'
CPU time from /proc. Why: on a small machine "server at X% of the in-process ceiling"
mixes two things, the server's own cost per image and how many cores it got; this
separates them (the ceiling in bench.scale runs on one core).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def window(address: str, clients: int, seconds: float, pngs, server_pid: int) -> dict:
    """One measure() window; the client process's CPU is read until it exits."""
    from bench.server import measure

    out: dict = {}
    runner = threading.Thread(
        target=lambda: out.update(measure(address, clients, 1, seconds, pngs))
    )
    before, t0 = cpu_seconds(server_pid), time.perf_counter()
    runner.start()
    children: list = []
    while not children and runner.is_alive():
        children = mp.active_children()
        time.sleep(0.01)
    client_cpu = 0.0
    while runner.is_alive() and children:
        try:
            client_cpu = cpu_seconds(children[0].pid)
        except FileNotFoundError:  # exited between two reads: keep the last one
            break
        time.sleep(0.05)
    runner.join()
    wall = time.perf_counter() - t0
    server_cpu = cpu_seconds(server_pid) - before
    return out | {"wall": wall, "server_cpu": server_cpu, "client_cpu": client_cpu}


def main(argv: list[str] | None = None) -> int:
    from bench.scale import glyph_pngs
    from bench.server import start
    from embedding.defaults import DEFAULT_CALIBRATION, DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path, help="a server data dir with a gallery in it")
    p.add_argument("--clients", default="16,64")
    p.add_argument("--seconds", type=float, default=8.0)
    args = p.parse_args(argv)
    pngs = glyph_pngs()
    server, client = start(DEFAULT_MODEL, DEFAULT_CALIBRATION, args.data_dir, 64, [])
    try:
        for clients in (int(c) for c in args.clients.split(",")):
            w = window(server.address, clients, args.seconds, pngs, server.proc.pid)
            images = w["rate"] * args.seconds  # the server is idle while the client starts
            print(
                f"{clients} clients: {w['rate']:.0f} img/s; server {w['server_cpu']:.1f} CPU s "
                f"in {w['wall']:.1f} s ({w['server_cpu'] / w['wall']:.2f} cores, "
                f"{1000 * w['server_cpu'] / images:.1f} ms per image); client process "
                f"{w['client_cpu']:.1f} CPU s (with its start-up); load average "
                f"{os.getloadavg()[0]:.1f}",
                flush=True,
            )
    finally:
        client.close()
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
