"""What per-tenant metrics cost a fleet: Prometheus series, scrape time, server memory.

    python -m bench.fleet [--tenants 100,1000,10000] [--caps all,default]

For each fleet size N it starts a real ``python -m server`` (faiss galleries, the tiny
linear test embedder of testing/server_fixtures, no auth), creates N tenants with
``--items`` gallery items each, sends each tenant one MatchBatch of ``--matches`` images
and ``--feedback`` Feedback calls, then scrapes ``/metrics`` ``--scrapes`` times. It
reports every series of the exposition, the series that carry a ``tenant`` label (and
how many per tenant label value), the median scrape time, the payload size and the
server's resident memory (VmRSS of the process, before the tenants and after).

The galleries are made once per N by a first server; each ``--caps`` value then starts
a server on the same data folder with that ``--max-tenant-labels`` (``all``: N, every
tenant keeps its name; ``default``: the flag left out) and sends the traffic, so every
configuration holds the same galleries, loaded from disk, and the monitoring state that
cap gives. The RSS growth is over the first server before its first tenant; it is
mostly galleries, not metrics. Servers run one after another, never together.

The second table is the monitor alone (server.monitoring.LiveMonitor in this process),
with every tenant's window FULL (``--window`` decisions): what a long-running server's
windows cost in memory and scrape time, which a few Match calls per tenant cannot show.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]


@dataclass(frozen=True)
class Scrape:
    """One configuration's measurement."""

    tenants: int
    cap: str
    series: int
    tenant_series: int
    tenant_labels: int
    seconds: float  # median scrape
    fastest: float  # quickest scrape: the least disturbed by other load
    payload_bytes: int
    rss_empty: int  # a server with no tenant at all
    rss_after: int
    by_family: dict[str, int]

    @property
    def per_label(self) -> float:
        return self.tenant_series / max(self.tenant_labels, 1)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def scrape(url: str) -> tuple[float, str]:
    started = time.perf_counter()
    with urllib.request.urlopen(url, timeout=600) as response:
        text = response.read().decode()
    return time.perf_counter() - started, text


def count_series(text: str) -> tuple[int, int, set[str], Counter]:
    """(all series, series with a tenant label, tenant label values, per-family counts of
    one tenant-labelled family member)."""
    from prometheus_client.parser import text_string_to_metric_families

    total, with_tenant, values, per_family = 0, 0, set(), Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            total += 1
            tenant = sample.labels.get("tenant")
            if tenant is not None:
                with_tenant += 1
                values.add(tenant)
                per_family[sample.name] += 1
    return total, with_tenant, values, per_family


def populate(address: str, tenants: list[str], images: list[bytes], items: int) -> None:
    """Create every tenant and enrol ``items`` images (labels: one identity each)."""
    from client import RetrievalClient

    def one(chunk: list[str]) -> None:
        with RetrievalClient(address, timeout=120) as client:
            for n, name in enumerate(chunk):
                client.create_tenant(name)
                batch = [
                    (f"i{k}", images[(n * items + k) % len(images)], f"c{k}") for k in range(items)
                ]
                client.enroll_many(name, batch)

    _spread(one, tenants)


def traffic(address: str, tenants: list[str], images: list[bytes], matches: int, fb: int) -> None:
    """One MatchBatch of ``matches`` images per tenant, then ``fb`` verdicts on them."""
    from client import RetrievalClient

    def one(chunk: list[str]) -> None:
        with RetrievalClient(address, timeout=120) as client:
            for n, name in enumerate(chunk):
                batch = [images[(7 * n + k) % len(images)] for k in range(matches)]
                results = client.match_batch(name, batch)
                for k, result in enumerate(results[:fb]):
                    client.feedback(name, result.decision_id, is_same=k % 2 == 0)

    _spread(one, tenants)


def _spread(fn, tenants: list[str], workers: int = 4) -> None:
    chunks = [tenants[i::workers] for i in range(workers)]
    with ThreadPoolExecutor(workers) as pool:
        for done in pool.map(fn, chunks):
            del done


FLAGS = ("--no-auth", "--log-level", "WARNING", "--max-inflight", "100000")


def make_fleet(assets, data: Path, n: int, images: list[bytes], items: int) -> int:
    """Create the ``n`` tenants in ``data`` with a server that is then stopped; returns
    that server's RSS before the first tenant (the empty server)."""
    from testing.server_fixtures import start_server

    server = start_server(assets, data, *FLAGS)
    try:
        time.sleep(1.0)
        empty = rss_bytes(server.proc.pid)
        populate(server.address, tenant_names(n), images, items)
        return empty
    finally:
        server.stop()


def tenant_names(n: int) -> list[str]:
    return [f"t{i:05d}" for i in range(n)]


def measure_server(
    assets, data: Path, n: int, cap: str, images: list[bytes], args, empty_rss: int
) -> Scrape:
    """A server restarted on the fleet in ``data`` with ``cap`` (every configuration
    loads the same galleries from disk, so their RSS compares), after the traffic."""
    from testing.server_fixtures import start_server

    flags = list(FLAGS)
    if cap != "default":
        flags += ["--max-tenant-labels", str(n if cap == "all" else int(cap))]
    server = start_server(assets, data, *flags)
    try:
        traffic(server.address, tenant_names(n), images, args.matches, args.feedback)
        times, text = [], ""
        for _ in range(args.scrapes):
            seconds, text = scrape(server.metrics_url)
            times.append(seconds)
        total, with_tenant, values, per_family = count_series(text)
        return Scrape(
            n,
            cap,
            total,
            with_tenant,
            len(values),
            statistics.median(times),
            min(times),
            len(text.encode()),
            empty_rss,
            rss_bytes(server.proc.pid),
            dict(per_family),
        )
    finally:
        server.stop()


def monitor_alone(
    labels: int, window: int, targets: int, repeat: int = 5
) -> tuple[float, float, int]:
    """(quickest and median scrape seconds, traced bytes) of a LiveMonitor whose
    ``labels`` tenants each have a full window at each of ``targets`` target FARs."""
    import tracemalloc

    from prometheus_client import CollectorRegistry, generate_latest

    from server.monitoring import LiveMonitor

    rng = np.random.default_rng(0)
    edges = np.linspace(-1, 1, 201)
    reference = {"edges": edges.tolist(), "counts": np.ones(200, int).tolist()}
    tracemalloc.start()
    registry = CollectorRegistry()
    monitor = LiveMonitor(
        1e-3,
        registry=registry,
        window_decisions=window,
        max_tenant_labels=labels,
        reference_top1=reference,
    )
    fars = [10.0 ** -(3 - k) for k in range(targets)]
    scores = rng.uniform(0.3, 0.95, window)
    for t in range(labels):
        for far in fars:
            for k in range(window):
                top1 = float(scores[k])
                monitor.record_decision(f"t{t:05d}", f"d{t}-{k}", top1, top1 > 0.9, far, 0.5, 50.0)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        generate_latest(registry)
        times.append(time.perf_counter() - started)
    return min(times), statistics.median(times), held


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tenants", default="100,1000,10000")
    p.add_argument("--caps", default="all,default", help="comma list: all, default or a number")
    p.add_argument("--items", type=int, default=4, help="gallery items per tenant")
    p.add_argument("--matches", type=int, default=3, help="Match decisions per tenant")
    p.add_argument("--feedback", type=int, default=2, help="Feedback calls per tenant")
    p.add_argument("--scrapes", type=int, default=7, help="scrapes per configuration")
    p.add_argument("--window", type=int, default=1000, help="decisions per full window")
    p.add_argument(
        "--monitor-labels", default="100,1000", help="tenant labels of the monitor-alone table"
    )
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tcm-bench-fleet")
    args = p.parse_args(argv)

    from imagesets import load_images
    from testing.server_fixtures import make_assets, png

    glyphs = load_images("glyphs-tiny", "test")
    images = [png(glyphs.pixels[i]) for i in range(len(glyphs))]
    assets = make_assets(args.work / "assets", glyphs.pixels[:400], np.asarray(glyphs.labels)[:400])
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; per tenant "
        f"{args.items} items, {args.matches} decisions, {args.feedback} verdicts; "
        f"tiny linear test embedder; faiss galleries"
    )
    results = []
    for n in (int(x) for x in args.tenants.split(",")):
        with tempfile.TemporaryDirectory(dir=args.work) as data_name:
            data = Path(data_name)
            started = time.perf_counter()
            empty = make_fleet(assets, data, n, images, args.items)
            print(f"  made {n} tenants in {time.perf_counter() - started:.0f} s")
            for cap in args.caps.split(","):
                started = time.perf_counter()
                results.append(measure_server(assets, data, n, cap, images, args, empty))
                print(f"  measured {n} tenants, cap {cap} in {time.perf_counter() - started:.0f} s")
    print_server_table(results)
    print_families(results)
    print("\nmonitor alone, full windows (LiveMonitor in this process)")
    head = f"{'tenant labels':>13} {'window':>6} {'scrape s min/med':>16} {'traced MiB':>10}"
    print(f"{head} {'KiB/label':>9}")
    for labels in (int(x) for x in args.monitor_labels.split(",")):
        fastest, seconds, held = monitor_alone(labels, args.window, 1)
        print(
            f"{labels:>13} {args.window:>6} {fastest:>7.3f} {seconds:>8.3f} "
            f"{held / 2**20:>10.1f} {held / labels / 1024:>9.1f}"
        )
    return 0


def print_server_table(results: list[Scrape]) -> None:
    head = (
        f"{'tenants':>7} {'cap':>7} | {'series':>7} {'w/ tenant':>9} {'labels':>6} "
        f"{'per label':>9} | {'scrape s min/med':>16} {'KiB':>7} | {'RSS MiB':>7} {'+MiB':>6} "
        f"{'KiB/tenant':>10}"
    )
    print("\n" + head)
    print("-" * len(head))
    for r in results:
        grown = r.rss_after - r.rss_empty
        print(
            f"{r.tenants:>7} {r.cap:>7} | {r.series:>7} {r.tenant_series:>9} "
            f"{r.tenant_labels:>6} {r.per_label:>9.1f} | {r.fastest:>7.3f} {r.seconds:>8.3f} "
            f"{r.payload_bytes / 1024:>7.0f} | {r.rss_after / 2**20:>7.0f} "
            f"{grown / 2**20:>6.0f} {grown / r.tenants / 1024:>10.1f}"
        )
    print(
        "series: every sample line of /metrics; per label: tenant-labelled series / labels; "
        "+MiB: RSS over the same server with no tenant"
    )


def print_families(results: list[Scrape]) -> None:
    """Tenant-labelled series per label value, by family, of the largest uncapped run."""
    pick = max(results, key=lambda r: (r.cap == "all", r.tenants))
    print(f"\nseries per tenant label by name ({pick.tenants} tenants, cap {pick.cap})")
    for name, count in sorted(pick.by_family.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {name:<48} {count / pick.tenant_labels:6.2f}")


if __name__ == "__main__":
    sys.exit(main())
