"""``--workers`` on the faiss store: img/s and CPU per image at 1 and N workers, one run.

    python -m bench.workers [--items 5000] [--workers 2] [--clients 16]
        [--batch-clients 4] [--per-call 16] [--seconds 8] [--repeat 3]

Side by side (issue 18, part 3): one server with ``--workers 1`` and one with
``--workers N`` (one writer, N-1 readers following its data dir, server/workers.py),
each on its own copy of the same ``--items`` gallery, their windows interleaved for
``--repeat`` rounds (the median window kept): single-image Match at ``--clients`` and
MatchBatch(``--per-call``) at ``--batch-clients``, each client on its own connection
(the kernel hands a connection, not a call, to one worker). CPU per image is the CPU of the
whole server process tree (parent and workers, /proc) over the images answered; the
in-process work (decode + embed + search, bench/pipeline.py) is the baseline of the
ratio. The load generator runs on the same machine and takes its share of the cores:
the scaling printed is what this machine gives, not what N free cores would.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from bench.harness import cpu_seconds
from bench.pipeline import in_process

ROOT = Path(__file__).resolve().parents[1]
WORK = Path("/tmp/tcm-bench-workers")


def process_tree(pid: int) -> list[int]:
    """``pid`` and every descendant (Linux /proc children lists)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except FileNotFoundError:
                continue
    return out


def tree_cpu(pid: int) -> float:
    total = 0.0
    for p in process_tree(pid):
        try:
            total += cpu_seconds(p)
        except FileNotFoundError:
            continue
    return total


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) CPU jiffies of the whole machine so far (/proc/stat)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def window(server, clients: int, per_call: int, seconds: float, pngs) -> dict:
    """One load window: the server tree's CPU per image, and how busy the machine was
    (the load generator shares the cores)."""
    from bench.server import measure

    before, (busy0, total0) = tree_cpu(server.proc.pid), machine_jiffies()
    out = measure(server.address, clients, per_call, seconds, pngs, connections=clients)
    spent = tree_cpu(server.proc.pid) - before
    busy1, total1 = machine_jiffies()
    per_image = spent / max(1.0, out["rate"] * seconds)
    return out | {"per_image": per_image, "busy": (busy1 - busy0) / max(1, total1 - total0)}


def main(argv: list[str] | None = None) -> int:
    from bench.match_cpu import start_server
    from bench.scale import TENANT, build_gallery, glyph_pngs
    from embedding.defaults import DEFAULT_CALIBRATION, DEFAULT_MODEL
    from server.matching.model import ServingModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--items", type=int, default=5000)
    p.add_argument("--workers", type=int, default=2, help="N, compared with 1")
    p.add_argument("--clients", type=int, default=16, help="single-image Match clients")
    p.add_argument("--batch-clients", type=int, default=4, help="MatchBatch clients")
    p.add_argument("--per-call", type=int, default=16, help="images per MatchBatch call")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--repeat", type=int, default=3, help="windows per cell, median kept")
    args = p.parse_args(argv)
    pngs = glyph_pngs()
    model = ServingModel.load(DEFAULT_MODEL, DEFAULT_CALIBRATION, "cpu", 1e-3, 1)
    source = WORK / f"store-{args.items}"
    build_gallery(source, args.items, model.embedder.dim, model.sha256, pngs)
    folder = source / "tenants" / TENANT
    counts = (1, args.workers)
    servers = []
    for n in counts:
        copy = WORK / f"serve-{n}"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(source, copy)
        servers.append(start_server(ROOT, copy, ["--workers", str(n)]))
    print(
        f"{args.items:,} items; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
        f"at start; {args.seconds:g} s per window, {args.repeat} per cell",
        flush=True,
    )
    cases = [
        ("Match", args.clients, 1),
        (f"MatchBatch({args.per_call})", args.batch_clients, args.per_call),
    ]
    work = [in_process(folder, model, pngs, args.per_call, args.seconds)["cpu_per_image"]]
    windows: dict[tuple[int, str], list[dict]] = {}
    try:
        for _ in range(args.repeat):  # interleaved: the shared machine's load drifts
            for name, clients, per_call in cases:
                for n, server in zip(counts, servers, strict=True):
                    w = window(server, clients, per_call, args.seconds, pngs)
                    windows.setdefault((n, name), []).append(w)
                    print(f"{n} worker(s), {name}: {w['rate']:.0f} img/s", flush=True)
    finally:
        for server in servers:
            server.stop()
    work.append(in_process(folder, model, pngs, args.per_call, args.seconds)["cpu_per_image"])
    base = float(np.mean(work))
    print(f"\nin process: {1000 * base:.2f} ms CPU per image (mean of before / after)\n")
    print(
        "| case | workers | img/s | p50 ms | server CPU/image | vs in-process "
        "| img/s vs 1 worker | machine busy |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, _, _ in cases:
        one = None
        for n in counts:
            runs = sorted(windows[(n, name)], key=lambda w: w["rate"])
            w = runs[len(runs) // 2]
            one = one or w["rate"]
            every = " / ".join(f"{x['rate']:.0f}" for x in windows[(n, name)])
            print(
                f"| {name} | {n} | {w['rate']:.0f} ({every}) | {w['p50']:.1f} | "
                f"{1000 * w['per_image']:.2f} ms | {w['per_image'] / base:.2f}x | "
                f"{w['rate'] / one:.2f}x | {w['busy']:.0%} |"
            )
    errors = sum(w["errors"] for ws in windows.values() for w in ws)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; failed calls: {errors}")
    return 0


if __name__ == "__main__":
    mp.set_start_method("spawn", force=True)
    sys.exit(main())
