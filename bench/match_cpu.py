"""Where a Match server's CPU goes: server CPU per image against the work itself, one run.

    python -m bench.match_cpu [DATA_DIR] [--items 5000] [--clients 16] [--batch-clients 4]
        [--per-call 16] [--seconds 8] [--repeat 1] [--profile DIR] [--server 'FLAGS']
        [--baseline-tree DIR]

Side by side in one run (issue 18, part 2):

* **in process**: decode + embed + search in this process, batches of ``--per-call``
  images, one onnxruntime thread, one faiss thread: this process's CPU per image (read
  from /proc) is the work a Match cannot avoid;
* **server, Match**: ``--clients`` concurrent single-image Match calls;
* **server, MatchBatch**: ``--batch-clients`` concurrent MatchBatch calls of
  ``--per-call`` images;

each server window's CPU is the server process's (all its threads, /proc), divided by
the images it answered. The in-process case runs before and after the server windows;
their mean is the baseline, and the ratio server / in-process is printed per window
(the goal of issue 18: at most 1.5x for Match at 16 clients, 1.2x for MatchBatch(16)).
CPU time, not wall time, so that the shared machine's load moves the ratio little.
``--baseline-tree DIR`` runs a second server from another source tree (for a before /
after: ``git archive COMMIT | tar -x -C DIR``), its windows interleaved with this tree's
(``--repeat`` rounds, the median window kept), both against the same in-process work.

Without DATA_DIR a ``--items`` gallery of random unit vectors (bench.scale's
build_gallery) is built once under /tmp/tcm-bench-match-cpu. ``--profile DIR`` records
each server window with py-spy (raw collapsed stacks, DIR/<window>.txt; py-spy must be
installed) and prints the share of samples by component (bench/profile_shares.py).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from bench.harness import TICK, cpu_seconds
from bench.pipeline import in_process

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

WORK = Path("/tmp/tcm-bench-match-cpu")
PY_SPY = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")


def thread_cpu(pid: int) -> dict[int, tuple[str, float]]:
    """CPU seconds of each thread of a process: {tid: (name, seconds)}."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            stat = (task / "stat").read_text()
        except FileNotFoundError:
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        if int(task.name) == pid:
            name = "main (event loop)"
        elif name == "python":  # Python's threads are not named for the OS: tell them apart
            name = f"thread {task.name}"
        fields = stat.rsplit(")", 1)[1].split()
        out[int(task.name)] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def by_thread_name(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds spent between two thread_cpu() reads, summed by thread name (native
    threads such as onnxruntime's pool and gRPC core's are invisible to py-spy)."""
    spent: dict[str, float] = {}
    for tid, (name, seconds) in after.items():
        spent[name] = spent.get(name, 0.0) + seconds - before.get(tid, (name, 0.0))[1]
    return dict(sorted(spent.items(), key=lambda kv: -kv[1]))


def batches(metrics_url: str) -> tuple[float, float]:
    """(images, onnxruntime calls) so far, from the server's tcm_embed_batch_size."""
    import urllib.request

    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    found = {}
    for line in text.splitlines():
        for key in ("tcm_embed_batch_size_sum", "tcm_embed_batch_size_count"):
            if line.startswith(key + " "):
                found[key] = float(line.split()[1])
    return found.get("tcm_embed_batch_size_sum", 0.0), found.get("tcm_embed_batch_size_count", 0.0)


def window(
    address: str,
    clients: int,
    per_call: int,
    seconds: float,
    pngs,
    server_pid: int,
    profile: Path | None = None,
) -> dict:
    """One measure() window: images/s, and the server's CPU while the client ran (its
    start-up and one warm-up call included: the server is idle then, a small bias up)."""
    from bench.server import measure

    out: dict = {}
    runner = threading.Thread(
        target=lambda: out.update(measure(address, clients, per_call, seconds, pngs))
    )
    threads = thread_cpu(server_pid)
    before, t0 = cpu_seconds(server_pid), time.perf_counter()
    runner.start()
    spy = None
    if profile is not None:  # half the window, from well after the client's start-up
        time.sleep(3.0)
        duration = str(max(1, int(seconds / 2)))
        spy = subprocess.Popen(
            [
                PY_SPY,
                "record",
                "--pid",
                str(server_pid),
                "--format",
                "raw",
                "--rate",
                "200",
                "--duration",
                duration,
                "--nonblocking",
                "--full-filenames",
                "--output",
                str(profile),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    runner.join()
    wall = time.perf_counter() - t0
    server_cpu = cpu_seconds(server_pid) - before
    threads = by_thread_name(threads, thread_cpu(server_pid))
    if spy is not None:
        spy.wait()
    return out | {"wall": wall, "server_cpu": server_cpu, "threads": threads}


def start_server(root: Path, data_dir: Path, extra: list[str]):
    """``python -m server`` of the source tree ``root`` on ``data_dir``, as bench.server."""
    from embedding.defaults import DEFAULT_CALIBRATION, DEFAULT_MODEL
    from testing.server_fixtures import ServerProcess

    args = ["--no-auth", "--model", str(DEFAULT_MODEL), "--calibration", str(DEFAULT_CALIBRATION),
            "--data-dir", str(data_dir), "--max-batch", "64", "--max-queue", "100000",
            "--max-inflight", "100000", "--log-level", "WARNING", *extra]  # fmt: skip
    return ServerProcess(args, root=root)


def main(argv: list[str] | None = None) -> int:
    from bench.scale import TENANT, build_gallery, glyph_pngs
    from embedding.defaults import DEFAULT_CALIBRATION, DEFAULT_MODEL
    from server.matching.model import ServingModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path, nargs="?", help="a server data dir with a gallery")
    p.add_argument("--items", type=int, default=5000, help="gallery size without DATA_DIR")
    p.add_argument("--clients", type=int, default=16, help="Match clients")
    p.add_argument("--batch-clients", type=int, default=4, help="MatchBatch clients")
    p.add_argument("--per-call", type=int, default=16, help="images per MatchBatch call")
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--repeat", type=int, default=1, help="windows per cell, median kept")
    p.add_argument("--profile", type=Path, help="record each server window with py-spy here")
    p.add_argument("--server", default="", help="extra server flags, e.g. '--embed-threads 1'")
    p.add_argument(
        "--baseline-tree",
        type=Path,
        help="also run the server of this source tree (e.g. `git archive` of the commit "
        "before a change), windows interleaved with this tree's, on a copy of the gallery",
    )
    args = p.parse_args(argv)
    if args.data_dir is not None and str(args.data_dir).startswith("-"):
        p.error(f"DATA_DIR {args.data_dir}: a flag? server flags go in --server='...'")
    extra = shlex.split(args.server)
    pngs = glyph_pngs()
    model = ServingModel.load(DEFAULT_MODEL, DEFAULT_CALIBRATION, "cpu", 1e-3, 1)
    data_dir = args.data_dir
    if data_dir is None:
        data_dir = WORK / f"store-{args.items}"
        build_gallery(data_dir, args.items, model.embedder.dim, model.sha256, pngs)
    folder = data_dir / "tenants" / TENANT
    if args.profile is not None:
        shutil.rmtree(args.profile, ignore_errors=True)
        args.profile.mkdir(parents=True)
    trees = [("this tree", ROOT, data_dir)]
    if args.baseline_tree is not None:
        copy = data_dir.with_name(data_dir.name + "-baseline")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(data_dir, copy)
        trees.insert(0, (f"baseline {args.baseline_tree}", args.baseline_tree.resolve(), copy))
    print(
        f"gallery {folder} ; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} "
        f"at start; {args.seconds:g} s per window, {args.repeat} per cell; server flags "
        f"{extra or 'default'}",
        flush=True,
    )
    cases = [
        ("match", f"Match, {args.clients} clients", args.clients, 1),
        ("batch", f"MatchBatch({args.per_call}), {args.batch_clients} clients",
         args.batch_clients, args.per_call),
    ]  # fmt: skip
    baseline = [in_process(folder, model, pngs, args.per_call, args.seconds)]
    servers = [start_server(root, d, extra) for _, root, d in trees]
    windows: dict[tuple[int, str], list[dict]] = {}
    try:
        for r in range(args.repeat):  # interleaved: the shared machine's load drifts
            for key, _, clients, per_call in cases:
                for n, server in enumerate(servers):
                    profile = None
                    if args.profile is not None and r == 0:
                        profile = (
                            args.profile / f"{'baseline-' if n < len(servers) - 1 else ''}{key}.txt"
                        )
                    first = batches(server.metrics_url)
                    w = window(
                        server.address, clients, per_call, args.seconds, pngs, server.proc.pid,
                        profile,
                    )  # fmt: skip
                    last = batches(server.metrics_url)
                    w["batch"] = (last[0] - first[0]) / max(1.0, last[1] - first[1])
                    w["per_image"] = w["server_cpu"] / (w["rate"] * args.seconds)
                    windows.setdefault((n, key), []).append(w)
    finally:
        for server in servers:
            server.stop()
    baseline.append(in_process(folder, model, pngs, args.per_call, args.seconds))
    work = float(np.mean([b["cpu_per_image"] for b in baseline]))
    print(
        f"\nin process (decode + embed + search, batches of {args.per_call}, 1 thread): "
        + " / ".join(f"{1000 * b['cpu_per_image']:.2f}" for b in baseline)
        + f" ms CPU per image (before / after the server windows), mean {1000 * work:.2f}"
    )
    print(
        "\n| server | case | img/s | mean micro-batch | server CPU/image "
        "| in-process CPU/image | ratio |"
    )
    print("|---|---|---|---|---|---|---|")
    chosen = {}
    for key, name, _, _ in cases:
        for n, (label, _, _) in enumerate(trees):
            runs = sorted(windows[(n, key)], key=lambda w: w["per_image"])
            w = chosen[(n, key)] = runs[len(runs) // 2]
            every = " / ".join(f"{1000 * x['per_image']:.2f}" for x in windows[(n, key)])
            print(
                f"| {label} | {name} | {w['rate']:.0f} | {w['batch']:.1f} | "
                f"{1000 * w['per_image']:.2f} ms ({every}) | {1000 * work:.2f} ms | "
                f"{w['per_image'] / work:.2f}x |"
            )
    for (n, key), w in chosen.items():
        images = w["rate"] * args.seconds
        print(
            f"{trees[n][0]}, {key}: server CPU by thread, ms per image: "
            + ", ".join(f"{t} {1000 * s / images:.2f}" for t, s in list(w["threads"].items())[:5])
        )
    errors = sum(w["errors"] for ws in windows.values() for w in ws)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end; failed calls: {errors}")
    if args.profile is not None:
        from bench.profile_shares import report

        for path in sorted(args.profile.glob("*.txt")):
            print(f"\npy-spy, {path.stem} ({path}):")
            report(path)
    return 0


if __name__ == "__main__":
    mp.set_start_method("spawn", force=True)
    sys.exit(main())
