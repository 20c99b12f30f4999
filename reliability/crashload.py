"""``python -m reliability.crashload``: kill, fill, flood and stall a real server; report it.

Four sections, each against ``python -m server`` started as an operator would:

1. **crash**: ``--rounds`` rounds of SIGKILL at a random instant while three clients
   enrol, one removes and one reloads the model back and forth (every reload
   re-embeds every gallery). After each restart every acknowledged enrolment must be
   there (probed with Enroll, replace=false: ALREADY_EXISTS), every acknowledged
   removal must stay removed (probed with Remove: not_found), and the gallery size
   must equal what was acknowledged once the calls cut by the kill are resolved.
2. **disk-full** (needs root): the data dir on a small tmpfs. Enrol until the disk
   is full: the refusal must be RESOURCE_EXHAUSTED saying so, Match must go on; then
   the tmpfs is grown, enrolment must work again, and after a SIGKILL every
   acknowledged item must be back.
3. **overload**: capacity is measured with a closed loop, then calls are offered
   open-loop at ``--overload-factor`` times that for ``--overload-seconds``. Only OK
   and RESOURCE_EXHAUSTED may come back; the server's RSS is sampled throughout.
4. **slow clients**: a stream whose reader takes one answer every 50 ms, idle
   streams, raw TCP connections that never finish the HTTP/2 preface, and clients
   killed mid-stream, while a probe client measures Match latency; afterwards no
   call may be left in flight.

Prints a summary and writes the JSON report (``--report``); exit 1 when a pass
criterion failed. The figures in docs/RELIABILITY.md come from this command.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from retrieval.v1 import retrieval_pb2 as pb  # noqa: E402
from retrieval.v1 import retrieval_pb2_grpc as rpc  # noqa: E402

from testing.server_fixtures import ServerProcess  # noqa: E402


# ------------------------------------------------------------------ helpers
def rss_mib(pid: int, field_name: str = "VmRSS") -> float:
    """Of the server process and its children (``--workers``: the workers), summed."""
    total = 0.0
    for each in [pid, *_children(pid)]:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{each}/status").read_text().splitlines():
                if line.startswith(field_name + ":"):
                    total += int(line.split()[1]) / 1024
    return total or float("nan")


def _children(pid: int) -> list[int]:
    try:
        found = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return []
    return [int(c) for c in found]


class RssSampler(threading.Thread):
    """The server's resident set every ``every`` seconds, until stopped."""

    def __init__(self, pid: int, every: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.pid, self.every = pid, every
        self.samples: list[tuple[float, float]] = []
        self._halt = threading.Event()
        self._t0 = time.monotonic()

    def run(self) -> None:
        while not self._halt.is_set():
            with contextlib.suppress(OSError, ValueError):
                self.samples.append((time.monotonic() - self._t0, rss_mib(self.pid)))
            self._halt.wait(self.every)

    def stop(self) -> list[tuple[float, float]]:
        self._halt.set()
        self.join()
        return self.samples


def scrape(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


_STARTED: list[ServerProcess] = []  # stopped by main() however a section ends


def start(data_dir: Path, model: Path, calibration: Path, *extra: str) -> ServerProcess:
    server = ServerProcess(
        ["--model", str(model), "--calibration", str(calibration), "--data-dir", str(data_dir),
         "--device", "cpu", "--log-level", "WARNING", *extra]
    )  # fmt: skip
    _STARTED.append(server)
    return server


def log_problems(server: ServerProcess) -> list[str]:
    """Tracebacks and ERROR lines of the server log, except gRPC's ExecuteBatchError: gRPC
    logs it (with a traceback) when it cannot send the status of a call whose client has
    already gone (deadline passed), which the flood makes happen by design."""
    lines = server.log().splitlines()
    benign = {i for i, line in enumerate(lines) if "ExecuteBatchError" in line}
    benign |= {i + 1 for i in benign}  # its "Traceback (most recent call last):"
    return [
        line
        for i, line in enumerate(lines)
        if ("Traceback" in line or " ERROR " in line) and i not in benign
    ]


@dataclass
class Assets:
    model_a: Path
    calibration_a: Path
    model_b: Path
    calibration_b: Path
    images: list[bytes]


def make_assets(work: Path) -> Assets:
    from imagesets import load_images
    from testing.server_fixtures import make_assets as make
    from testing.server_fixtures import png

    glyphs = load_images("glyphs-tiny", "test")
    pick = np.sort(np.random.default_rng(0).choice(len(glyphs), 400, replace=False))
    pixels, labels = glyphs.pixels[pick], np.asarray(glyphs.labels)[pick]
    a = make(work / "a", pixels, labels, seed=0)
    b = make(work / "b", pixels, labels, seed=1)
    return Assets(a.model, a.calibration, b.model, b.calibration, [png(p) for p in pixels])


# -------------------------------------------------------------- 1. crashes
@dataclass
class Ledger:
    """What the clients were told: acknowledged, removed, or unknown (cut by the kill)."""

    present: dict[str, int] = field(default_factory=dict)  # item id -> image index
    removed: set[str] = field(default_factory=set)
    in_doubt: dict[str, int] = field(default_factory=dict)
    statuses: Counter = field(default_factory=Counter)
    enrolments_acknowledged: int = 0
    removals_acknowledged: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


def crash_round(n: int, server: ServerProcess, assets: Assets, ledger: Ledger, rng) -> None:
    stop = threading.Event()
    channel = grpc.insecure_channel(server.address)
    stub, admin = rpc.RetrievalStub(channel), rpc.AdminStub(channel)

    def enroller(w: int) -> None:
        serial = 0
        while not stop.is_set():
            batch = {f"r{n}-w{w}-{serial + i}": rng.randrange(len(assets.images))
                     for i in range(rng.randint(1, 8))}  # fmt: skip
            serial += len(batch)
            items = [pb.EnrollItem(item_id=i, image=assets.images[k]) for i, k in batch.items()]
            try:
                reply = stub.Enroll(pb.EnrollRequest(tenant="crash", items=items), timeout=30)
            except grpc.RpcError as err:
                with ledger.lock:
                    ledger.statuses[f"Enroll {err.code().name}"] += 1
                    ledger.in_doubt.update(batch)
                continue
            with ledger.lock:
                ledger.statuses["Enroll OK"] += 1
                for r in reply.results:
                    if r.ok:
                        ledger.present[r.item_id] = batch[r.item_id]
                        ledger.enrolments_acknowledged += 1

    def remover() -> None:
        while not stop.is_set():
            with ledger.lock:
                ids = list(ledger.present)[-40:]
                chosen = rng.sample(ids, min(4, len(ids)))
                victims = {i: ledger.present.pop(i) for i in chosen}
            if not victims:
                time.sleep(0.02)
                continue
            try:
                stub.Remove(pb.RemoveRequest(tenant="crash", item_ids=list(victims)), timeout=30)
            except grpc.RpcError as err:
                with ledger.lock:
                    ledger.statuses[f"Remove {err.code().name}"] += 1
                    ledger.in_doubt.update(victims)
                continue
            with ledger.lock:
                ledger.statuses["Remove OK"] += 1
                ledger.removed |= set(victims)
                ledger.removals_acknowledged += len(victims)

    def reloader() -> None:
        models = [(assets.model_b, assets.calibration_b), (assets.model_a, assets.calibration_a)]
        k = 0
        while not stop.is_set():
            model, calibration = models[k % 2]
            try:
                admin.Reload(
                    pb.ReloadRequest(model_path=str(model), calibration_path=str(calibration)),
                    timeout=30,
                )
                ledger.statuses["Reload OK"] += 1
                k += 1
            except grpc.RpcError as err:
                ledger.statuses[f"Reload {err.code().name}"] += 1
            stop.wait(0.2)

    threads = [threading.Thread(target=enroller, args=(w,)) for w in range(3)]
    threads += [threading.Thread(target=remover), threading.Thread(target=reloader)]
    for t in threads:
        t.start()
    time.sleep(rng.uniform(0.3, 2.5))
    server.proc.send_signal(signal.SIGKILL)
    server.proc.wait()
    stop.set()
    for t in threads:
        t.join()
    channel.close()


def verify(server: ServerProcess, assets: Assets, ledger: Ledger) -> dict:
    """Probe every acknowledged fact; resolve the calls the kill cut short."""
    channel = grpc.insecure_channel(server.address)
    stub = rpc.RetrievalStub(channel)
    lost, resurrected = [], []
    ids = list(ledger.present)
    for s in range(0, len(ids), 256):
        chunk = ids[s : s + 256]
        items = [pb.EnrollItem(item_id=i, image=assets.images[ledger.present[i]]) for i in chunk]
        reply = stub.Enroll(pb.EnrollRequest(tenant="crash", items=items), timeout=120)
        lost += [r.item_id for r in reply.results if r.ok]  # it was not there any more
    gone = list(ledger.removed)
    for s in range(0, len(gone), 256):
        reply = stub.Remove(
            pb.RemoveRequest(tenant="crash", item_ids=gone[s : s + 256]), timeout=60
        )
        if reply.removed:
            back = set(gone[s : s + 256]) - set(reply.not_found)
            resurrected += sorted(back)
    doubt = list(ledger.in_doubt)
    for s in range(0, len(doubt), 256):  # either outcome was allowed: settle on "removed"
        stub.Remove(pb.RemoveRequest(tenant="crash", item_ids=doubt[s : s + 256]), timeout=60)
    ledger.removed |= set(doubt)
    ledger.in_doubt.clear()
    size = stub.GetTenant(pb.GetTenantRequest(tenant="crash"), timeout=30).gallery_size
    channel.close()
    return {"lost": lost, "resurrected": resurrected, "size": size,
            "expected_size": len(ledger.present), "in_doubt_resolved": len(doubt)}  # fmt: skip


def crash_section(assets: Assets, work: Path, rounds: int, seed: int) -> dict:
    rng = random.Random(seed)
    data = work / "crash-data"
    ledger = Ledger()
    server = start(data, assets.model_a, assets.calibration_a, "--no-auth")
    grpc_channel = grpc.insecure_channel(server.address)
    rpc.AdminStub(grpc_channel).CreateTenant(pb.CreateTenantRequest(tenant="crash"), timeout=30)
    grpc_channel.close()
    per_round = []
    failures = []
    restart_seconds = []
    for n in range(rounds):
        crash_round(n, server, assets, ledger, rng)
        t0 = time.monotonic()
        server = start(data, assets.model_a, assets.calibration_a, "--no-auth")
        restart_seconds.append(time.monotonic() - t0)
        check = verify(server, assets, ledger)
        per_round.append({k: (len(v) if isinstance(v, list) else v) for k, v in check.items()})
        if check["lost"] or check["resurrected"] or check["size"] != check["expected_size"]:
            failures.append(f"round {n}: {check}")
        print(f"  crash round {n + 1}/{rounds}: {len(ledger.present)} items present, "
              f"lost {len(check['lost'])}, resurrected {len(check['resurrected'])}, "
              f"size {check['size']}/{check['expected_size']}", flush=True)  # fmt: skip
    problems = log_problems(server)
    server.stop()
    return {
        "rounds": rounds,
        "enrolments_acknowledged": ledger.enrolments_acknowledged,
        "removals_acknowledged": ledger.removals_acknowledged,
        "items_present_at_end": len(ledger.present),
        "items_lost": sum(r["lost"] for r in per_round),
        "removals_undone": sum(r["resurrected"] for r in per_round),
        "items_in_calls_cut_by_a_kill": sum(r["in_doubt_resolved"] for r in per_round),
        "calls_by_status": dict(ledger.statuses),
        "restart_seconds_median": round(float(np.median(restart_seconds)), 2),
        "failures": failures + [f"log: {p}" for p in problems],
    }


# ------------------------------------------------------------ 2. disk full
def noise_png(rng: np.random.Generator, side: int = 256) -> bytes:
    from testing.server_fixtures import png

    return png(rng.integers(0, 256, (side, side), dtype=np.uint8))


def disk_full_section(assets: Assets, work: Path, size_mib: int) -> dict:
    if os.geteuid() != 0:
        return {"skipped": "needs root to mount a tmpfs"}
    mount = work / "tmpfs"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mount)],
                   check=True)  # fmt: skip
    rng = np.random.default_rng(1)
    out: dict = {"tmpfs_mib": size_mib}
    failures: list[str] = []
    acked: dict[str, bytes] = {}
    try:
        server = start(mount / "data", assets.model_a, assets.calibration_a, "--no-auth")
        channel = grpc.insecure_channel(server.address)
        stub, admin = rpc.RetrievalStub(channel), rpc.AdminStub(channel)
        admin.CreateTenant(pb.CreateTenantRequest(tenant="disk"), timeout=30)
        refusal = None
        statuses: Counter = Counter()
        for n in range(10_000):
            items = {f"d{n}-{i}": noise_png(rng) for i in range(4)}
            request = pb.EnrollRequest(
                tenant="disk", items=[pb.EnrollItem(item_id=i, image=b) for i, b in items.items()]
            )
            try:
                reply = stub.Enroll(request, timeout=60)
            except grpc.RpcError as err:
                statuses[err.code().name] += 1
                refusal = (err.code().name, err.details())
                break
            statuses["OK"] += 1
            acked.update({r.item_id: items[r.item_id] for r in reply.results if r.ok})
        out["enrol_calls_before_full"] = dict(statuses)
        out["refusal"] = refusal
        if (
            refusal is None
            or refusal[0] != "RESOURCE_EXHAUSTED"
            or "disk is full" not in refusal[1]
        ):
            failures.append(f"the full disk was answered {refusal}")
        try:  # reads go on while the disk is full
            stub.Match(pb.MatchRequest(tenant="disk", image=next(iter(acked.values()))), timeout=30)
            out["match_while_full"] = "OK"
        except grpc.RpcError as err:
            out["match_while_full"] = err.code().name
            failures.append(f"Match while the disk was full: {err.code().name}")
        try:
            admin.CreateTenant(pb.CreateTenantRequest(tenant="another"), timeout=30)
            out["create_tenant_while_full"] = "OK"
        except grpc.RpcError as err:
            out["create_tenant_while_full"] = err.code().name
        subprocess.run(["mount", "-o", f"remount,size={4 * size_mib}m", str(mount)], check=True)
        more = {f"after-{i}": noise_png(rng) for i in range(8)}
        reply = stub.Enroll(pb.EnrollRequest(tenant="disk", items=[
            pb.EnrollItem(item_id=i, image=b) for i, b in more.items()]), timeout=60)  # fmt: skip
        out["enrol_after_space_returned"] = all(r.ok for r in reply.results)
        if not out["enrol_after_space_returned"]:
            failures.append(f"enrolment after space returned: {reply}")
        acked.update({r.item_id: more[r.item_id] for r in reply.results if r.ok})
        channel.close()
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait()
        problems = log_problems(server)
        server = start(mount / "data", assets.model_a, assets.calibration_a, "--no-auth")
        channel = grpc.insecure_channel(server.address)
        stub = rpc.RetrievalStub(channel)
        ids = list(acked)
        lost = []
        for s in range(0, len(ids), 64):
            items = [pb.EnrollItem(item_id=i, image=acked[i]) for i in ids[s : s + 64]]
            reply = stub.Enroll(pb.EnrollRequest(tenant="disk", items=items), timeout=60)
            lost += [r.item_id for r in reply.results if r.ok]
        channel.close()
        server.stop()
        out |= {"items_acknowledged": len(acked), "items_lost": len(lost)}
        if lost:
            failures.append(f"lost after the disk filled: {lost[:10]}")
        failures += [f"log: {p}" for p in problems if "disk is full" not in p]
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    out["failures"] = failures
    return out


# ------------------------------------------------------------- 3. overload
def _load_process(address: str, images: list[bytes], plan: dict, queue) -> None:
    """Another process: the capacity run (closed loop), then the open-loop overload.

    A call is one Match, or a MatchBatch of ``per_call`` images."""
    per_call = plan["per_call"]

    async def call(stub, i: int, timeout: float) -> tuple[str, float]:
        started = time.perf_counter()
        try:
            if per_call == 1:
                request = pb.MatchRequest(tenant="load", image=images[i % len(images)])
                await stub.Match(request, timeout=timeout)
            else:
                batch = [images[(i + j) % len(images)] for j in range(per_call)]
                await stub.MatchBatch(pb.MatchBatchRequest(tenant="load", images=batch),
                                      timeout=timeout)  # fmt: skip
            return "OK", time.perf_counter() - started
        except grpc.aio.AioRpcError as err:
            return err.code().name, time.perf_counter() - started

    async def run() -> dict:
        # four connections (a local subchannel pool each: channels to one address would
        # share one), so a --workers server gets calls on more than one process
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(4)]
        stubs = [rpc.RetrievalStub(c) for c in channels]
        done = 0
        stop_at = time.perf_counter() + plan["capacity_seconds"]

        async def closed(n: int) -> None:
            nonlocal done
            i = n
            while time.perf_counter() < stop_at:
                status, _ = await call(stubs[n % 4], i, 30)
                done += status == "OK"
                i += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(closed(n) for n in range(plan["capacity_clients"])))
        capacity = done / (time.perf_counter() - t0)
        rate = capacity * plan["factor"]
        results: list[tuple[str, float]] = []
        tasks = set()
        started = 0
        t0 = time.perf_counter()
        end = t0 + plan["seconds"]
        while (now := time.perf_counter()) < end:
            due = int((now - t0) * rate)
            for _ in range(due - started):
                task = asyncio.ensure_future(call(stubs[started % 4], started, plan["timeout"]))
                task.add_done_callback(lambda t: results.append(t.result()))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                started += 1
            await asyncio.sleep(0.005)
        offered = started / (time.perf_counter() - t0)
        await asyncio.gather(*tasks)
        for c in channels:
            await c.close()
        return {"capacity": capacity, "target_rate": rate, "offered_rate": offered,
                "results": results}  # fmt: skip

    queue.put(asyncio.run(run()))


def histogram_quantile(metrics: dict[str, float], name: str, method: str, q: float) -> float:
    """Upper bound of the bucket holding quantile ``q`` of a server-side histogram."""
    buckets = sorted(
        (float(key.split('le="')[1].split('"')[0]), value)
        for key, value in metrics.items()
        if key.startswith(name + "_bucket{") and f'method="{method}"' in key
    )
    total = buckets[-1][1] if buckets else 0
    for bound, count in buckets:
        if total and count >= q * total:
            return bound
    return float("nan")


def overload_section(
    work: Path, seconds: float, factor: float, per_call: int, flags: list[str]
) -> dict:
    from embedding.defaults import DEFAULT_CALIBRATION, DEFAULT_MODEL
    from imagesets import load_images
    from testing.server_fixtures import png

    glyphs = load_images("glyphs-tiny", "test")
    images = [png(glyphs.pixels[i]) for i in range(len(glyphs))]
    data = work / f"load-data-{per_call}"
    server = start(data, DEFAULT_MODEL, DEFAULT_CALIBRATION, "--no-auth", *flags)
    channel = grpc.insecure_channel(server.address)
    rpc.AdminStub(channel).CreateTenant(pb.CreateTenantRequest(tenant="load"), timeout=30)
    stub = rpc.RetrievalStub(channel)
    for s in range(0, 500, 100):
        items = [pb.EnrollItem(item_id=f"g{i}", label=str(glyphs.labels[i]), image=images[i])
                 for i in range(s, s + 100)]  # fmt: skip
        stub.Enroll(pb.EnrollRequest(tenant="load", items=items), timeout=60)
    channel.close()
    idle_rss = rss_mib(server.proc.pid)
    sampler = RssSampler(server.proc.pid)
    sampler.start()
    plan = {"capacity_seconds": 8.0, "capacity_clients": 16, "factor": factor,
            "seconds": seconds, "timeout": 30.0, "per_call": per_call}  # fmt: skip
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load_process, args=(server.address, images, plan, queue))
    proc.start()
    result = queue.get(timeout=seconds + 600)
    proc.join()
    samples = sampler.stop()
    metrics: dict[str, float] = {}
    for url in server.metrics_urls:  # --workers: one endpoint per worker, counts add up
        for name, value in scrape(url).items():
            metrics[name] = metrics.get(name, 0.0) + value
    problems = log_problems(server)
    peak = rss_mib(server.proc.pid, "VmHWM")
    server.stop()
    method = "Match" if per_call == 1 else "MatchBatch"
    codes = Counter(status for status, _ in result["results"])
    ok = [lat * 1000 for status, lat in result["results"] if status == "OK"]
    refused = [lat * 1000 for status, lat in result["results"] if status == "RESOURCE_EXHAUSTED"]
    load_start = plan["capacity_seconds"]
    first = [r for t, r in samples if load_start <= t < load_start + seconds / 2]
    second = [r for t, r in samples if t >= load_start + seconds / 2]
    failures = [f"{code}: {n} calls" for code, n in codes.items()
                if code not in ("OK", "RESOURCE_EXHAUSTED")]  # fmt: skip
    failures += [f"log: {p}" for p in problems]
    return {
        "model": "shipped glyphnet",
        "server_flags": flags,
        "call": method if per_call == 1 else f"{method}({per_call} images)",
        "capacity_calls_per_s": round(result["capacity"], 1),
        "factor": factor,
        "target_rate_calls_per_s": round(result["target_rate"], 1),
        "offered_rate_calls_per_s": round(result["offered_rate"], 1),
        "seconds": seconds,
        "calls_by_status": dict(codes),
        "accepted_calls_per_s": round(len(ok) / seconds, 1),
        "accepted_latency_ms_client": {"p50": round(percentile(ok, 50), 1),
                                       "p99": round(percentile(ok, 99), 1)},
        "refusal_latency_ms_client": {"p50": round(percentile(refused, 50), 1),
                                      "p99": round(percentile(refused, 99), 1)},
        "server_side_latency_s_p99_bucket": histogram_quantile(
            metrics, "tcm_request_duration_seconds", method, 0.99),
        "server_rss_mib": {"idle_before": round(idle_rss, 1),
                           "max_first_half": round(max(first, default=float("nan")), 1),
                           "max_second_half": round(max(second, default=float("nan")), 1),
                           "peak_vmhwm": round(peak, 1)},
        "server_rejections": {k.split('"')[1]: v for k, v in metrics.items()
                              if k.startswith("tcm_overload_rejections_total{")},
        "load_average_after": round(os.getloadavg()[0], 2),
        "failures": failures,
    }  # fmt: skip


# --------------------------------------------------------- 4. slow clients
_KILLED_MID_STREAM = r"""
import sys, grpc, os
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/protos"]
from retrieval.v1 import retrieval_pb2 as pb, retrieval_pb2_grpc as rpc
from pathlib import Path
image = Path(sys.argv[3]).read_bytes()
stub = rpc.RetrievalStub(grpc.insecure_channel(sys.argv[1]))
replies = stub.MatchStream(iter([pb.MatchRequest(tenant="slow", image=image)] * 200))
for n, _ in enumerate(replies):
    if n == 10:
        os.kill(os.getpid(), 9)  # vanish mid-stream: no goodbye to the server
"""


def slow_section(work: Path, assets: Assets, streams: int, stalls: int, kills: int) -> dict:
    server = start(work / "slow-data", assets.model_a, assets.calibration_a, "--no-auth")
    channel = grpc.insecure_channel(server.address)
    stub = rpc.RetrievalStub(channel)
    rpc.AdminStub(channel).CreateTenant(pb.CreateTenantRequest(tenant="slow"), timeout=30)
    stub.Enroll(
        pb.EnrollRequest(
            tenant="slow",
            items=[pb.EnrollItem(item_id=f"g{i}", image=assets.images[i]) for i in range(50)],
        ),
        timeout=60,
    )

    def probe(seconds: float) -> list[float]:
        latencies = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            stub.Match(pb.MatchRequest(tenant="slow", image=assets.images[3]), timeout=30)
            latencies.append((time.perf_counter() - t0) * 1000)
        return latencies

    baseline = probe(5)
    sampler = RssSampler(server.proc.pid)
    sampler.start()
    stop = threading.Event()
    slow_read = {"answers": 0}

    def slow_reader() -> None:
        requests = iter([pb.MatchRequest(tenant="slow", image=assets.images[5])] * 400)
        for _ in stub.MatchStream(requests, timeout=120):
            slow_read["answers"] += 1
            if stop.wait(0.05):
                break

    idle_channel = grpc.insecure_channel(server.address)
    idle_stub = rpc.RetrievalStub(idle_channel)
    idle_gate = threading.Event()

    def never_send():
        idle_gate.wait()
        return
        yield  # an iterator that blocks, then ends without a request

    idle_calls = [idle_stub.MatchStream(never_send()) for _ in range(streams)]
    host, port = server.address.rsplit(":", 1)
    stalled = []
    for _ in range(stalls):  # slowloris: half an HTTP/2 preface, then nothing
        sock = socket.create_connection((host, int(port)), timeout=5)
        sock.sendall(b"PRI * HTTP/2.0\r\n")
        stalled.append(sock)
    reader = threading.Thread(target=slow_reader)
    reader.start()
    under_stress = probe(10)
    killed_codes = []
    image_file = work / "slow-query.png"
    image_file.write_bytes(assets.images[7])
    for _ in range(kills):
        argv = [
            sys.executable,
            "-c",
            _KILLED_MID_STREAM,
            server.address,
            str(ROOT),
            str(image_file),
        ]
        done = subprocess.run(argv, capture_output=True, timeout=120, check=False)
        killed_codes.append(done.returncode)
    stop.set()
    reader.join()
    idle_gate.set()
    for call in idle_calls:
        call.cancel()
    idle_channel.close()
    for sock in stalled:
        sock.close()
    time.sleep(1.0)
    metrics = scrape(server.metrics_url)
    after = probe(3)
    samples = sampler.stop()
    problems = log_problems(server)
    channel.close()
    server.stop()
    inflight = metrics.get("tcm_inflight_images", float("nan"))
    cancelled = metrics.get('tcm_requests_total{code="CANCELLED",method="MatchStream"}', 0.0)
    failures = [f"log: {p}" for p in problems]
    if inflight != 0:
        failures.append(f"{inflight} calls still in flight after the clients left")
    if not after:
        failures.append("no Match answered after the slow clients")
    return {
        "idle_streams": streams,
        "stalled_tcp_connections": stalls,
        "slow_reader_answers_read": slow_read["answers"],
        "clients_killed_mid_stream": kills,
        "killed_client_exit_codes": dict(Counter(killed_codes)),
        "probe_match_ms_baseline": {"p50": round(percentile(baseline, 50), 2),
                                    "p99": round(percentile(baseline, 99), 2)},
        "probe_match_ms_under_slow_clients": {"p50": round(percentile(under_stress, 50), 2),
                                              "p99": round(percentile(under_stress, 99), 2),
                                              "calls": len(under_stress)},
        "inflight_images_after": inflight,
        "streams_counted_cancelled": cancelled,
        "server_rss_mib_max": round(max((r for _, r in samples), default=float("nan")), 1),
        "failures": failures,
    }  # fmt: skip


# ------------------------------------------------------------------ command
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m reliability.crashload",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("--rounds", type=int, default=20, help="SIGKILL rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmpfs-mib", type=int, default=8, help="size of the full disk")
    p.add_argument("--overload-seconds", type=float, default=60.0)
    p.add_argument("--overload-factor", type=float, default=4.0, help="times the capacity")
    p.add_argument(
        "--sections", default="crash,disk,overload_batch,overload_single,slow", help="comma list"
    )
    p.add_argument("--report", type=Path, default=Path("out/reliability/crashload.json"))
    p.add_argument("--server-flags", default="", help="extra flags for the overload servers")
    args = p.parse_args(argv)
    sections = set(args.sections.split(","))
    flags = shlex.split(args.server_flags)
    work = Path(tempfile.mkdtemp(prefix="tcm-crashload-"))
    report: dict = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "cpus": os.cpu_count(),
                    "load_average_at_start": round(os.getloadavg()[0], 2)}  # fmt: skip
    steps: dict[str, Callable[[], dict]] = {}
    try:
        assets = make_assets(work / "assets")
        steps = {
            "crash": lambda: crash_section(assets, work, args.rounds, args.seed),
            "disk": lambda: disk_full_section(assets, work, args.tmpfs_mib),
            "overload_batch": lambda: overload_section(
                work, args.overload_seconds, args.overload_factor, 16, flags
            ),
            "overload_single": lambda: overload_section(
                work, args.overload_seconds, args.overload_factor, 1, flags
            ),
            "slow": lambda: slow_section(work, assets, streams=100, stalls=100, kills=10),
        }
        for name, step in steps.items():
            if name in sections:
                print(f"== {name}", flush=True)
                t0 = time.monotonic()
                report[name] = step()
                report[name]["section_seconds"] = round(time.monotonic() - t0, 1)
                print(json.dumps(report[name], indent=1), flush=True)
    finally:
        for server in _STARTED:  # a section that failed half-way leaves no server behind
            if server.proc.poll() is None:
                server.stop(signal.SIGKILL)
        shutil.rmtree(work, ignore_errors=True)
    failures = [f"{name}: {f}" for name in steps if name in report
                for f in report[name].get("failures", [])]  # fmt: skip
    report["passed"] = not failures
    args.report.parent.mkdir(parents=True, exist_ok=True)
    args.report.write_text(json.dumps(report, indent=1) + "\n")
    print(f"report: {args.report}; {'PASSED' if not failures else 'FAILED'}")
    for f in failures:
        print("  " + f)
    return 0 if not failures else 1


if __name__ == "__main__":
    sys.exit(main())
