"""What score normalisation costs: per Match, and per enrolment, side by side.

    python -m bench.normalization [--seconds 3] [--repeat 3] [--clients 64] [--items 100000]

1. Match throughput of two servers on the same gallery, one serving raw scores
   (``--normalize none``) and one mapping every score through the tenant's tail
   (``--normalize tenant-tail``); runs alternate between them and the median is kept.
   Goal (issue 10): normalisation costs at most 5% (ratio >= 0.95).
2. What the decision statistics (server/matching/statistics.py) add per Match image in
   process, against the CPU per image of a real server on the same tenant (issue 17:
   at most 5%).
3. The statistics update when one item is enrolled into a gallery of ``--items``
   items: the worst case (the item enters the tail sample and evicts a member), the
   common case (it does not), against rebuilding the sample's histogram from scratch.
   Goal: at most 10 ms.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from bench.harness import compare, print_table  # noqa: E402

GALLERY = 600  # items per tenant in the Match case: enough pairs for an active map


def match_cost(args) -> None:
    from bench.server import _median, measure, start
    from imagesets import load_images
    from testing.server_fixtures import png

    glyphs = load_images("glyphs-tiny", "test")
    images = [png(glyphs.pixels[i]) for i in range(len(glyphs))]
    labels = [str(v) for v in glyphs.labels]
    servers = {}
    samples: dict[str, list[dict]] = {}
    try:
        for mode in ("none", "tenant-tail"):
            server, client = start(
                args.model, args.calibration, args.work / mode, 64, ["--normalize", mode]
            )
            servers[mode] = (server, client)
            client.create_tenant("bench")
            for s in range(0, GALLERY, 200):
                rows = range(s, min(s + 200, GALLERY))
                client.enroll_many("bench", [(f"i{n}", images[n], labels[n]) for n in rows])
            info = client.get_tenant("bench")
            print(
                f"{mode:<12} gallery {info['gallery_size']} items, map active: "
                f"{info['normalization_active']}, tail pairs {info['tail_pairs']}"
            )
        for _ in range(args.repeat):
            for mode, (server, _client) in servers.items():
                got = measure(server.address, args.clients, 1, args.seconds, images)
                samples.setdefault(mode, []).append(got)
    finally:
        for server, client in servers.values():
            client.close()
            server.stop()
    raw, norm = _median(samples["none"]), _median(samples["tenant-tail"])
    print(f"\nMatch at {args.clients} clients (median of {args.repeat} runs, {args.seconds:g} s)")
    print(f"{'serving':<12} {'img/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
    for name, r in (("none", raw), ("tenant-tail", norm)):
        print(f"{name:<12} {r['rate']:>8.0f} {r['p50']:>8.1f} {r['p99']:>8.1f} {r['errors']:>7}")
    ratio = norm["rate"] / raw["rate"]
    verdict = "met" if ratio >= 0.95 else "MISSED"
    print(f"throughput tenant-tail / none = {ratio:.3f} (goal >= 0.95: {verdict})")


def statistics_cost(args) -> None:
    """What the decision statistics add per Match image, against the server's CPU per image.

    In process, on a real glyph tenant (shipped model): the search of a micro-batch alone,
    and the search with what server/matching/statistics.py adds (the tail snapshot, the
    tenant's map, one GEMM of the batch against the tail sample, the residual histograms
    and the window refits), interleaved. Then a real server on the same tenant, driven by
    single-image Match calls from 16 clients, gives the server's CPU per image (/proc).
    Goal (issue 17): the added statistics cost at most 5% of it.
    """
    import faiss
    from threadpoolctl import threadpool_limits

    from bench.match_cpu import window
    from bench.server import start
    from contracts import load_calibration
    from embedding import OnnxEmbedder
    from imagesets import load_images
    from scorenorm import ScoreHistogram
    from server.matching.statistics import StatisticsSettings, TenantStatistics
    from server.storage import open_store
    from server.storage.base import Item
    from testing.server_fixtures import png

    faiss.omp_set_num_threads(1)  # as the server's search threads
    threadpool_limits(limits=1, user_api="blas")  # as the server (server/cli.py)
    doc = load_calibration(args.calibration)
    norm = doc.normalization()
    glyphs = load_images("glyphs", "test")
    rows = glyphs.tenant_indices("latin")[: args.search_items + 256]
    embedder = OnnxEmbedder(args.model, device="cpu")
    x = embedder.embed_set(glyphs.subset(rows))
    labels = [glyphs.class_names[c] for c in glyphs.labels[rows]]
    n = len(rows) - 256
    sha = doc.raw["model"]["sha256"]
    store = open_store("faiss", args.work / "stats-store", x.shape[1], sha)
    store.load_all()
    gallery = store.create("bench", None).gallery
    items = [Item(f"i{i}", labels[i], b"") for i in range(n)]
    for s0 in range(0, n, 5000):
        gallery.add(items[s0 : s0 + 5000], x[s0 : min(s0 + 5000, n)], sha)
    stats = TenantStatistics(
        store,
        "bench",
        lambda: {"bench": gallery.tail_snapshot()},
        norm.global_tail if norm else ScoreHistogram(),
        norm.settings if norm else None,
        StatisticsSettings(),
    )
    queries = x[n:]
    threshold = doc.target(1e-3).threshold
    cursor = {"at": 0}

    def batch(size: int) -> np.ndarray:
        at = cursor["at"] = (cursor["at"] + size) % (len(queries) - size)
        return queries[at : at + size]

    def search_only(size: int):
        return lambda: gallery.search(batch(size), 5, sha)

    def with_statistics(size: int):
        def run() -> None:
            q = batch(size)
            snapshot = gallery.tail_snapshot()
            mapping = stats.mapping("bench", snapshot)
            gallery.search(q, 5, sha)
            stats.observe("bench", snapshot, q, float(mapping.inverse(threshold)))

        return run

    added = {}
    for size in (1, 8, 16):  # 8: the server's mean micro-batch at 16 clients (bench.match_cpu)
        results = compare(
            {
                f"search, batch {size}": search_only(size),
                f"search + statistics, batch {size}": with_statistics(size),
            },
            repeat=args.repeat * 5,
        )
        print_table(
            f"per micro-batch, tenant of {n} items (tail sample "
            f"{len(gallery.tail_snapshot().codes)})",
            results,
            f"search, batch {size}",
        )
        alone, both = (r.seconds for r in results)
        added[size] = (both - alone) / size
    store.close()
    pngs = [png(glyphs.pixels[i]) for i in rows[n : n + 256]]
    server, client = start(args.model, args.calibration, args.work / "stats-server", 64, [])
    try:
        client.create_tenant("bench")
        for s0 in range(0, n, 200):
            chunk = range(s0, min(s0 + 200, n))
            client.enroll_many(
                "bench", [(f"i{i}", png(glyphs.pixels[rows[i]]), labels[i]) for i in chunk]
            )
        w = window(server.address, 16, 1, args.seconds, pngs, server.proc.pid)
    finally:
        client.close()
        server.stop()
    per_image = w["server_cpu"] / max(w["rate"] * args.seconds, 1)
    print(
        f"server: {w['rate']:.0f} img/s at 16 clients, {1000 * per_image:.2f} ms CPU per image "
        f"(load average {os.getloadavg()[0]:.1f})"
    )
    for size, cost in added.items():
        share = cost / per_image
        verdict = "met" if share <= 0.05 else "MISSED"
        print(
            f"statistics added per image at batch {size}: {1e6 * cost:.0f} us = "
            f"{100 * share:.1f}% of the server's CPU per image (goal <= 5%: {verdict})"
        )


def enrol_cost(args) -> None:
    from scorenorm import gallery_histogram
    from server.storage.tail_stats import DEFAULT_CAPACITY, Entry, TenantTail

    rng = np.random.default_rng(0)
    dim, n = 64, args.items
    x = rng.normal(size=(n + 2, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    codes = rng.integers(0, n // 3, n + 2)
    hashes = rng.integers(1 << 20, 1 << 62, n + 2)
    tail = TenantTail(dim, DEFAULT_CAPACITY)
    tail.add([Entry(i, int(hashes[i]), x[i], int(codes[i])) for i in range(n)])
    low = Entry(n, 1, x[n], int(codes[n]))  # smallest hash: enters, evicts a member
    high = Entry(n + 1, 1 << 62, x[n + 1], int(codes[n + 1]))  # never enters

    def worst() -> None:
        tail.add([low])
        tail.remove([low.fid])  # undo (costs the same again; halved below)
        tail.refill([])  # the evicted member is not re-added: keep the sample size steady

    _, members, member_codes = tail.sample()
    cases = {
        "rebuild the sample histogram": lambda: gallery_histogram(members, member_codes),
        "enrol: enters the sample (x2)": worst,
        "enrol: outside the sample": lambda: tail.add([high]),
    }
    results = compare(cases, repeat=args.repeat)
    print_table(
        f"tail statistics update, one item into {n} items (sample {tail.members})",
        results,
        "rebuild the sample histogram",
    )
    entering = next(r for r in results if r.name.startswith("enrol: enters")).seconds / 2
    verdict = "met" if entering <= 0.010 else "MISSED"
    print(f"one item entering the sample: {entering * 1000:.2f} ms (goal <= 10 ms: {verdict})")


def main(argv: list[str] | None = None) -> int:
    from embedding.defaults import DEFAULT_CALIBRATION, DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    p.add_argument("--skip-match", action="store_true", help="no servers (in-process cases only)")
    p.add_argument(
        "--search-items", type=int, default=5000, help="glyph gallery of the statistics case"
    )
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tcm-bench-norm")
    args = p.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    enrol_cost(args)
    statistics_cost(args)
    if not args.skip_match:
        match_cost(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
