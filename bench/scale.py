"""Galleries at scale (issue 13): the in-process default against its goals, search cost
and recall at the decision, and the Milvus backend, side by side in one run.

    python -m bench.scale [--sizes 1000,100000,1000000] [--sections store,search,milvus]
                          [--milvus auto|milvus://HOST:PORT] [--seconds 3] [--repeat 3]

Data: gallery vectors are synthetic unit vectors in the served model's space (64-d for
the shipped glyphnet; Gaussian, so no cluster structure helps HNSW: a hard case for
recall), 5 items per identity, each item stored with a real glyph PNG (the images a
re-embedding would read). Queries to the server are real glyph PNGs embedded by the
model. Sections:

``store`` (per size N, faiss in process, the default):
  enrol throughput (16-item calls into a gallery of N, storage path only: WAL + fsync,
  table, tail statistics, checkpoints and compaction; the embedder is not in it);
  memory per item beyond the vectors (RSS of a process that opened the gallery, minus
  an empty one, minus N x dim x 4); restart time (open after a clean close, and after a
  kill with a non-empty log); the in-process ceilings (faiss batched search alone; and
  decode + embed + search, the same work the server does, without gRPC); Match
  throughput of the real server at 16 and 64 clients against those ceilings.
``search`` (per size): flat and HNSW in process, HNSW in Milvus: per-query time at
  batch 1 and 64, build time, and recall at the decision: the share of queries whose
  decision (matched or not, and which item) equals exact search at the served threshold.
``milvus``: Match throughput and p99 at 64 clients, faiss in process vs Milvus
  (1 and 2 workers); Enroll-then-Match latency across two replicas (write token,
  strong), on a gallery of ``--milvus-items`` items.

Goals (issue 13): Match at 16-64 clients >= 50% of the in-process ceiling at 100k and
1M; enrol at 1M >= 70% of enrol at 1k; <= 300 B per item beyond the vectors; restart
at 1M < 10 s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

TENANT = "bench"
PER_IDENTITY = 5
CALL_ITEMS = 16  # items per enrolment call in the enrol-throughput case


# ----------------------------------------------------------------------- data
def unit_vectors(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def glyph_pngs(count: int = 512) -> list[bytes]:
    from imagesets import load_images
    from testing.server_fixtures import png

    glyphs = load_images("glyphs-tiny", "test")
    return [png(glyphs.pixels[i % len(glyphs)]) for i in range(count)]


def build_gallery(directory: Path, n: int, dim: int, sha: str, pngs: list[bytes], index="flat"):
    """A tenant folder the server can open: ``directory/tenants/bench``. Reused if there."""
    from server.storage.faiss.gallery import Gallery, Item

    folder = directory / "tenants" / TENANT
    if (folder / "tenant.json").exists() and (folder / "manifest.json").exists():
        return folder, None
    shutil.rmtree(directory, ignore_errors=True)
    folder.mkdir(parents=True)
    rng = np.random.default_rng(n)
    started = time.perf_counter()
    gallery = Gallery.open(folder, dim, sha, index=index)
    step = 4096
    for s in range(0, n, step):
        m = min(step, n - s)
        items = [
            Item(f"i{j}", f"c{j // PER_IDENTITY}", pngs[j % len(pngs)]) for j in range(s, s + m)
        ]
        gallery.add(items, unit_vectors(rng, m, dim), sha)
    gallery.close()
    (folder / "tenant.json").write_text(json.dumps({"name": TENANT, "keys": []}) + "\n")
    return folder, time.perf_counter() - started


# ---------------------------------------------------------------- subprocesses
_OPEN = """
import ctypes, gc, json, os, sys, time
from pathlib import Path
from server.storage.faiss.gallery import Gallery
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
dim, sha, index = int(sys.argv[2]), sys.argv[3], sys.argv[4]
base = rss()
t = time.perf_counter()
g = Gallery.open(Path(sys.argv[1]), dim, sha, index=index)
seconds = time.perf_counter() - t
gc.collect()
ctypes.CDLL("libc.so.6").malloc_trim(0)
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork + exec, so a child of a
# bench that held a 1M gallery would report the bench's own peak
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
print(json.dumps({"seconds": seconds, "rss": rss() - base, "size": g.size,
                  "columns": g.memory_bytes(), "peak": hwm * 1024 - base}))
if len(sys.argv) > 5:  # crash case: write records, then die without a checkpoint
    import numpy as np
    from server.storage.faiss.gallery import Item
    rng = np.random.default_rng(1)
    n = int(sys.argv[5])
    x = rng.normal(size=(n, dim)).astype("float32")
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for s in range(0, n, 16):
        g.add([Item(f"crash{j}", "", b"x" * 200) for j in range(s, s + 16)], x[s:s + 16], sha)
    os._exit(0)
g.close()
"""


def open_in_subprocess(
    folder: Path, dim: int, sha: str, index: str = "flat", crash_records: int = 0
) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}:{ROOT / 'protos'}")
    args = [sys.executable, "-c", _OPEN, str(folder), str(dim), sha, index]
    if crash_records:
        args.append(str(crash_records))
    out = subprocess.run(args, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[0])


# --------------------------------------------------------------------- store
def enrol_rate(folder: Path, dim: int, sha: str, pngs: list[bytes], items: int) -> dict:
    """Items/s of 16-item enrolment calls into the gallery (then removed again)."""
    from server.storage.faiss.gallery import Gallery, Item

    gallery = Gallery.open(folder, dim, sha)
    rng = np.random.default_rng(7)
    x = unit_vectors(rng, items, dim)
    times = []
    for s in range(0, items, CALL_ITEMS):
        batch = [
            Item(f"new{j}", f"n{j // PER_IDENTITY}", pngs[j % len(pngs)])
            for j in range(s, s + CALL_ITEMS)
        ]
        t = time.perf_counter()
        gallery.add(batch, x[s : s + CALL_ITEMS], sha)
        times.append(time.perf_counter() - t)
    gallery.remove([f"new{j}" for j in range(items)])
    gallery.close()
    total = float(np.sum(times))
    return {
        "rate": items / total,
        "p50_ms": 1000 * float(np.median(times)),
        "max_ms": 1000 * float(np.max(times)),
    }


def search_ceiling(folder: Path, model, threshold: float, batch: int, seconds: float) -> float:
    """Queries/s of gallery.search alone, ``batch`` queries per call (embeddings ready)."""
    import faiss

    from server.storage.faiss.gallery import Gallery

    faiss.omp_set_num_threads(1)
    gallery = Gallery.open(folder, model.embedder.dim, model.sha256)
    queries = unit_vectors(np.random.default_rng(3), 4096, model.embedder.dim)
    done, i = 0, 0
    stop = time.perf_counter() + seconds
    t0 = time.perf_counter()
    while time.perf_counter() < stop:
        q = queries[i % 4096 : i % 4096 + batch]
        if len(q) < batch:
            q = queries[:batch]
        gallery.search(q, 1, model.sha256)
        done += batch
        i += batch
    rate = done / (time.perf_counter() - t0)
    gallery.close()
    return rate


def pipeline_ceiling(folder: Path, model, threshold, pngs, batch: int, seconds: float) -> float:
    """decode + embed + search in this process, ``batch`` images a call: images/s."""
    from bench.pipeline import in_process

    return in_process(folder, model, pngs, batch, seconds)["rate"]


def server_match(
    directory: Path,
    model_path,
    calibration,
    pngs,
    clients: list[int],
    seconds: float,
    repeat: int,
    extra=(),
) -> tuple[dict, float]:
    from bench.server import _median, measure, start

    t = time.perf_counter()
    server, client = start(model_path, calibration, directory, 64, list(extra))
    startup = time.perf_counter() - t
    out = {}
    try:
        for c in clients:
            out[c] = _median([measure(server.address, c, 1, seconds, pngs) for _ in range(repeat)])
    finally:
        client.close()
        server.stop()
    return out, startup


def store_section(args, model, pngs) -> list[dict]:
    rows = []
    threshold = float(model.target(0).threshold)
    folders, built = {}, {}
    for n in args.sizes:
        folders[n], built[n] = build_gallery(
            args.work / f"store-{n}", n, model.embedder.dim, model.sha256, pngs
        )
        if built[n] is not None:
            print(f"  built {n} items in {built[n]:.1f} s", flush=True)
    # enrolment is dominated by fsync, whose latency drifts with the machine's load:
    # sizes take turns, --repeat rounds, and the median round is kept
    rounds: dict[int, list[dict]] = {n: [] for n in args.sizes}
    for _ in range(args.repeat):
        for n in args.sizes:
            rounds[n].append(
                enrol_rate(folders[n], model.embedder.dim, model.sha256, pngs, args.enrol_items)
            )
    for n in args.sizes:
        directory, folder = args.work / f"store-{n}", folders[n]
        row = {"items": n, "build_s": built[n]}
        row["enrol"] = sorted(rounds[n], key=lambda r: r["rate"])[len(rounds[n]) // 2]
        row["enrol_rounds"] = [r["rate"] for r in rounds[n]]
        row["open"] = open_in_subprocess(folder, model.embedder.dim, model.sha256)
        crash_dir = args.work / f"crash-{n}"
        shutil.rmtree(crash_dir, ignore_errors=True)
        shutil.copytree(folder, crash_dir)
        open_in_subprocess(crash_dir, model.embedder.dim, model.sha256, crash_records=992)
        row["after_kill"] = open_in_subprocess(crash_dir, model.embedder.dim, model.sha256)
        shutil.rmtree(crash_dir, ignore_errors=True)
        if n >= args.match_from:
            row["search_ceiling"] = {
                b: search_ceiling(folder, model, threshold, b, args.seconds) for b in (16, 64)
            }
            row["pipeline_ceiling"] = {
                b: pipeline_ceiling(folder, model, threshold, pngs, b, args.seconds)
                for b in (16, 64)
            }
            row["match"], row["server_start_s"] = server_match(
                directory,
                args.model,
                args.calibration,
                pngs,
                [16, 64],
                args.seconds,
                args.repeat,
            )
        rows.append(row)
        print(json.dumps(row, default=float), flush=True)
    return rows


def print_store(rows: list[dict], dim: int) -> None:
    print("\n### In-process default (faiss flat, segments), per gallery size\n")
    print(
        "| items | enrol items/s (16/call) | enrol p50 / max ms | open s (clean) | "
        "open s (after kill, 992 records) | RSS beyond vectors B/item | columns B/item | "
        "peak RSS MiB |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        n, o = r["items"], r["open"]
        beyond = (o["rss"] - n * dim * 4) / n
        print(
            f"| {n:,} | {r['enrol']['rate']:,.0f} | {r['enrol']['p50_ms']:.1f} / "
            f"{r['enrol']['max_ms']:.0f} | {o['seconds']:.2f} | {r['after_kill']['seconds']:.2f} | "
            f"{beyond:.0f} | {o['columns'] / n:.0f} | {o['peak'] / 2**20:.0f} |"
        )
    matched = [r for r in rows if "match" in r]
    if matched:
        print(
            "\n| items | clients | server Match img/s | p50 ms | p99 ms | pipeline ceiling "
            "img/s (batch) | of ceiling | search-only ceiling q/s | server start s |"
        )
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for r in matched:
            for c, m in r["match"].items():
                b = min(int(c), 64)
                ceiling = r["pipeline_ceiling"][b]
                print(
                    f"| {r['items']:,} | {c} | {m['rate']:,.0f} | {m['p50']:.1f} | "
                    f"{m['p99']:.1f} | {ceiling:,.0f} ({b}) | {m['rate'] / ceiling:.0%} | "
                    f"{r['search_ceiling'][b]:,.0f} | {r['server_start_s']:.1f} |"
                )
    small = next((r for r in rows if r["items"] <= 1000), None)
    big = max(rows, key=lambda r: r["items"])
    print("\nGoals:")
    if small is not None and big is not small:
        ratio = big["enrol"]["rate"] / small["enrol"]["rate"]
        print(
            f"- enrol at {big['items']:,} / at {small['items']:,}: {ratio:.0%} (goal >= 70%: "
            f"{'met' if ratio >= 0.7 else 'MISSED'})"
        )
    beyond = (big["open"]["rss"] - big["items"] * dim * 4) / big["items"]
    print(
        f"- memory beyond vectors at {big['items']:,}: {beyond:.0f} B/item (goal <= 300: "
        f"{'met' if beyond <= 300 else 'MISSED'})"
    )
    worst = max(big["open"]["seconds"], big["after_kill"]["seconds"])
    print(
        f"- restart at {big['items']:,}: {big['open']['seconds']:.2f} s clean, "
        f"{big['after_kill']['seconds']:.2f} s after a kill (goal < 10 s: "
        f"{'met' if worst < 10 else 'MISSED'})"
    )
    for r in matched:
        for c, m in r["match"].items():
            share = m["rate"] / r["pipeline_ceiling"][min(int(c), 64)]
            print(
                f"- Match at {r['items']:,} items, {c} clients: {share:.0%} of the in-process "
                f"ceiling (goal >= 50%: {'met' if share >= 0.5 else 'MISSED'})"
            )


# -------------------------------------------------------------------- search
def decisions(sims: np.ndarray, ids: np.ndarray, threshold: float) -> list:
    return [(str(i) if s >= threshold else None) for s, i in zip(sims, ids, strict=True)]


def search_section(args, model, pngs, milvus_spec: str | None) -> list[dict]:
    import faiss

    from server.storage.faiss.gallery import Gallery

    faiss.omp_set_num_threads(1)
    dim, sha = model.embedder.dim, model.sha256
    threshold = float(model.target(0).threshold)
    rows = []
    for n in args.search_sizes:
        rng = np.random.default_rng(11)
        gallery_x = unit_vectors(np.random.default_rng(n), n, dim)  # as build_gallery
        near = gallery_x[rng.integers(0, n, 500)] + 0.25 * unit_vectors(rng, 500, dim)
        near /= np.linalg.norm(near, axis=1, keepdims=True)
        queries = np.concatenate([near, unit_vectors(rng, 500, dim)])
        row = {"items": n}
        results = {}
        for kind in ("flat", "hnsw"):
            directory = args.work / f"search-{kind}-{n}"
            folder, built = build_gallery(directory, n, dim, sha, pngs[:1], index=kind)
            gallery = Gallery.open(folder, dim, sha, index=kind)
            row[f"{kind}_build_s"] = built
            t = time.perf_counter()
            single = [gallery.search(q[None, :], 1, sha)[0] for q in queries[:200]]
            row[f"{kind}_batch1_ms"] = 1000 * (time.perf_counter() - t) / 200
            t = time.perf_counter()
            found = []
            for s in range(0, len(queries), 64):
                found += gallery.search(queries[s : s + 64], 1, sha)
            row[f"{kind}_batch64_ms"] = 1000 * (time.perf_counter() - t) / len(queries)
            del single
            results[kind] = [
                (r.top1.item_id if r.top1.similarity >= threshold else None, r.top1.item_id)
                for r in found
            ]
            gallery.close()
        exact = results["flat"]
        row["hnsw_decision_recall"] = float(
            np.mean([a[0] == b[0] for a, b in zip(exact, results["hnsw"], strict=True)])
        )
        row["hnsw_top1_recall"] = float(
            np.mean([a[1] == b[1] for a, b in zip(exact, results["hnsw"], strict=True)])
        )
        row["matched_share"] = float(np.mean([a[0] is not None for a in exact]))
        if milvus_spec and n <= args.milvus_search_max:
            row |= milvus_search(milvus_spec, n, dim, sha, gallery_x, queries, threshold, exact)
        rows.append(row)
        print(json.dumps(row, default=float), flush=True)
    return rows


def milvus_search(spec, n, dim, sha, x, queries, threshold, exact) -> dict:
    """Insert the same vectors into Milvus (HNSW M=16, COSINE), time searches, recall."""
    from server.storage.milvus import MilvusStore

    store = MilvusStore(spec, dim, "s" + sha[1:], tail_refresh=0, timeout=600)
    name = f"s{n}"
    raw = store.client
    t = time.perf_counter()
    try:  # a gallery left by an interrupted run (same seed: the same vectors) is reused
        gallery = store.get(name).gallery
        reused = gallery.size == n
    except Exception:
        reused = False
    if not reused:
        with contextlib.suppress(Exception):
            store.delete(name)
        gallery = store.create(name, None).gallery
    for s in range(0, 0 if reused else n, 5000):
        rows = [
            {
                "pk": f"{name}/i{j}",
                "tenant": name,
                "item_id": f"i{j}",
                "label": f"c{j // PER_IDENTITY}",
                "id_hash": j,
                "image": "",
                "vector": x[j].tolist(),
            }
            for j in range(s, min(n, s + 5000))
        ]
        raw("insert", gallery.collection, rows)
    raw("flush", gallery.collection)
    insert_s = time.perf_counter() - t
    deadline = time.monotonic() + 3600
    while time.monotonic() < deadline:  # the HNSW index is built in the background
        info = raw("describe_index", gallery.collection, "vector")
        # (2.3.5 reports pending_index_rows == total_rows when done: not usable)
        if int(info.get("indexed_rows", 0)) >= int(info.get("total_rows", 1)):
            break
        time.sleep(2)
    gallery.write_token = raw.last_write_ts(gallery.collection)
    load_s = time.perf_counter() - t
    gallery.search(queries[:1], 1, gallery.model_sha256)  # waits for the inserts
    t = time.perf_counter()
    for q in queries[:200]:
        gallery.search(q[None, :], 1, gallery.model_sha256)
    batch1 = 1000 * (time.perf_counter() - t) / 200
    t = time.perf_counter()
    found = []
    for s in range(0, len(queries), 64):
        found += gallery.search(queries[s : s + 64], 1, gallery.model_sha256)
    batch64 = 1000 * (time.perf_counter() - t) / len(queries)
    got = [(r.top1.item_id if r.top1.similarity >= threshold else None) for r in found]
    store.delete(name)
    store.close()
    return {
        "milvus_reused": reused,
        "milvus_insert_s": insert_s,
        "milvus_indexed_s": load_s,
        "milvus_batch1_ms": batch1,
        "milvus_batch64_ms": batch64,
        "milvus_decision_recall": float(
            np.mean([a[0] == b for a, b in zip(exact, got, strict=True)])
        ),
    }


def print_search(rows: list[dict]) -> None:
    print("\n### Search cost per query and recall at the decision\n")
    print(
        "| items | flat b1 ms | flat b64 ms | HNSW b1 ms | HNSW b64 ms | HNSW build s | "
        "HNSW decision recall | Milvus HNSW b1 ms | Milvus b64 ms | Milvus decision recall |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        mv = (
            (
                f"{r['milvus_batch1_ms']:.2f} | {r['milvus_batch64_ms']:.3f} | "
                f"{r['milvus_decision_recall']:.3f}"
            )
            if "milvus_batch1_ms" in r
            else "- | - | -"
        )
        build = r.get("hnsw_build_s")
        print(
            f"| {r['items']:,} | {r['flat_batch1_ms']:.2f} | {r['flat_batch64_ms']:.3f} | "
            f"{r['hnsw_batch1_ms']:.2f} | {r['hnsw_batch64_ms']:.3f} | "
            f"{'-' if build is None else f'{build:.0f}'} | {r['hnsw_decision_recall']:.3f} | {mv} |"
        )
    print(
        "decision recall = share of 1,000 queries (500 near a gallery item, 500 random) whose "
        "decision (no match, or the matched item) equals exact flat search at the served "
        "threshold"
    )


# -------------------------------------------------------------------- milvus
def milvus_section(args, model, pngs, spec: str) -> dict:
    """Faiss vs Milvus serving at 64 clients (1 and 2 workers); Enroll-then-Match."""
    from bench.server import _median, measure, start
    from client import RetrievalClient

    out: dict = {"items": args.milvus_items}
    n = args.milvus_items
    rng = np.random.default_rng(5)
    dim = model.embedder.dim
    faiss_dir = args.work / f"store-{n}"
    build_gallery(faiss_dir, n, dim, model.sha256, pngs)
    # the same items in Milvus, through the store (so size, tail and keys are as served)
    from server.storage.milvus import MilvusStore

    store = MilvusStore(spec, dim, model.sha256, tail_refresh=0, timeout=600)
    with contextlib.suppress(Exception):
        store.delete(TENANT)
    gallery = store.create(TENANT, None).gallery
    x = unit_vectors(np.random.default_rng(n), n, dim)
    from server.storage.base import Item

    t = time.perf_counter()
    for s in range(0, n, 2000):
        items = [
            Item(f"i{j}", f"c{j // PER_IDENTITY}", pngs[j % len(pngs)])
            for j in range(s, min(n, s + 2000))
        ]
        rows = [gallery._row(i, v) for i, v in zip(items, x[s : s + len(items)], strict=True)]
        store.client("insert", gallery.collection, rows)
    store.client("flush", gallery.collection)
    out["insert_s"] = time.perf_counter() - t
    while True:  # searches should meet the HNSW index, not growing segments
        info = store.client("describe_index", gallery.collection, "vector")
        if int(info.get("indexed_rows", 0)) >= int(info.get("total_rows", 1)):
            break
        time.sleep(2)
    out["indexed_s"] = time.perf_counter() - t
    store.close()
    extra = ["--store-refresh-seconds", "30"]
    cells = {}
    for label, flags in (
        ("faiss, 1 process", []),
        ("milvus, 1 worker", ["--gallery", spec, *extra]),
        ("milvus, 2 workers", ["--gallery", spec, "--workers", "2", *extra]),
    ):
        directory = faiss_dir if label.startswith("faiss") else args.work / "milvus-server"
        server, client = start(args.model, args.calibration, directory, 64, flags)
        try:
            cells[label] = _median(
                [measure(server.address, 64, 1, args.seconds, pngs) for _ in range(args.repeat)]
            )
        finally:
            client.close()
            server.stop()
        print(label, cells[label], flush=True)
    out["match"] = cells
    # Enroll on replica A, then at once Match on replica B (or on A itself). Every round
    # enrols an image no earlier round used: an image enrolled twice ties at the top and
    # would hide whether the new item was seen.
    a, ca = start(args.model, args.calibration, args.work / "ra", 64, ["--gallery", spec, *extra])
    b, cb = start(args.model, args.calibration, args.work / "rb", 64, ["--gallery", spec, *extra])
    timings: dict[str, list] = {"token": [], "session": [], "none": [], "strong": []}
    fresh = iter(range(len(pngs)))
    try:
        for i in range(args.enrol_match):
            item = f"em{i}-{rng.integers(1 << 30)}"
            image = pngs[next(fresh)]
            t = time.perf_counter()
            ca.enroll(TENANT, item, image)
            enrolled = time.perf_counter()
            mode = ("token", "session", "none")[i % 3]
            # a new client per Match: only the "token" case hands over A's write token
            with RetrievalClient(a.address if mode == "session" else b.address) as other:
                if mode == "token":
                    other.write_tokens.update(ca.write_tokens)
                r = other.match(TENANT, image)
            timings[mode].append((enrolled - t, time.perf_counter() - enrolled, r.item_id == item))
    finally:
        ca.close()
        cb.close()
        a.stop()
        b.stop()
    s_srv, s_cli = start(
        args.model,
        args.calibration,
        args.work / "rs",
        64,
        ["--gallery", spec, "--milvus-consistency", "strong", *extra],
    )
    try:
        for i in range(max(4, args.enrol_match // 3)):
            item = f"es{i}-{rng.integers(1 << 30)}"
            image = pngs[next(fresh)]
            t = time.perf_counter()
            s_cli.enroll(TENANT, item, image)
            enrolled = time.perf_counter()
            with RetrievalClient(s_srv.address) as other:
                r = other.match(TENANT, image)
            timings["strong"].append(
                (enrolled - t, time.perf_counter() - enrolled, r.item_id == item)
            )
    finally:
        s_cli.close()
        s_srv.stop()
    out["enrol_match"] = {
        k: {
            "calls": len(v),
            "enroll_p50_ms": 1000 * float(np.median([e for e, _, _ in v])) if v else None,
            "match_p50_ms": 1000 * float(np.median([m for _, m, _ in v])) if v else None,
            "match_p99_ms": 1000 * float(np.percentile([m for _, m, _ in v], 99)) if v else None,
            "saw_the_item": float(np.mean([ok for _, _, ok in v])) if v else None,
        }
        for k, v in timings.items()
    }
    return out


def print_milvus(out: dict) -> None:
    print(f"\n### Milvus backend ({out['items']:,} items, 64 clients, single-image Match)\n")
    print("| serving | img/s | p50 ms | p99 ms | errors |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for label, m in out["match"].items():
        print(f"| {label} | {m['rate']:,.0f} | {m['p50']:.1f} | {m['p99']:.1f} | {m['errors']} |")
    print(
        "| faiss, 2 processes | not possible: one process owns a faiss data dir "
        "(--workers needs a shared store) | | | |"
    )
    print("\nEnroll on replica A, then at once Match (each round a new image):\n")
    print(
        "| Match on | calls | Enroll p50 ms | Match p50 ms | Match p99 ms | "
        "Match saw the new item |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    names = {
        "token": "B, with A's write token (the default client)",
        "session": "A itself, no token (Session)",
        "none": "B, no token (eventual across replicas)",
        "strong": "same replica, --milvus-consistency strong",
    }
    for k, v in out["enrol_match"].items():
        if v["calls"]:
            print(
                f"| {names[k]} | {v['calls']} | {v['enroll_p50_ms']:.1f} | "
                f"{v['match_p50_ms']:.1f} | {v['match_p99_ms']:.1f} | {v['saw_the_item']:.0%} |"
            )


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    from embedding.defaults import DEFAULT_CALIBRATION, DEFAULT_MODEL
    from server.matching.model import ServingModel

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,100000,1000000")
    p.add_argument("--search-sizes", default="10000,100000,1000000")
    p.add_argument("--sections", default="store,search,milvus")
    p.add_argument("--match-from", type=int, default=100_000, help="sizes with the Match case")
    p.add_argument("--enrol-items", type=int, default=4096)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument(
        "--milvus",
        default="auto",
        help="milvus://HOST:PORT, 'auto' (start a Milvus 2.3.5 standalone), or none",
    )
    p.add_argument("--milvus-items", type=int, default=100_000)
    p.add_argument(
        "--milvus-search-max",
        type=int,
        default=1_000_000,
        help="largest gallery inserted into Milvus for the search section",
    )
    p.add_argument("--enrol-match", type=int, default=60, help="Enroll-then-Match rounds")
    p.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    p.add_argument("--calibration", type=Path, default=DEFAULT_CALIBRATION)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tcm-bench-scale")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    args = p.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    args.search_sizes = [int(s) for s in args.search_sizes.split(",") if s]
    sections = set(args.sections.split(","))
    args.work.mkdir(parents=True, exist_ok=True)
    model = ServingModel.load(args.model, args.calibration, "cpu", 1e-3, 1)
    pngs = glyph_pngs()
    print(
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start; model "
        f"{args.model.name} (dim {model.embedder.dim}); threshold "
        f"{model.target(0).threshold:.4f} at FAR 1e-3",
        flush=True,
    )
    milvus = None
    spec = None
    if args.milvus == "auto" and sections & {"search", "milvus"}:
        from testing.milvus_fixtures import start_milvus

        milvus = start_milvus(args.work / "milvus")
        spec = milvus.spec
    elif args.milvus not in ("auto", "none"):
        spec = args.milvus
    report: dict = {}
    try:
        if "store" in sections:
            report["store"] = store_section(args, model, pngs)
        if "search" in sections:
            report["search"] = search_section(args, model, pngs, spec)
        if "milvus" in sections and spec:
            report["milvus"] = milvus_section(args, model, pngs, spec)
    finally:
        if milvus is not None:
            milvus.stop()
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=float))
    if "store" in report:
        print_store(report["store"], model.embedder.dim)
    if "search" in report:
        print_search(report["search"])
    if "milvus" in report:
        print_milvus(report["milvus"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
