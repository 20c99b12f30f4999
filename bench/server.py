"""Match throughput of the server: micro-batched vs one-request-per-call, side by side.

    python bench/server.py [--seconds 3] [--clients 1,8,64] [--per-call 16]

For each number of concurrent clients (a separate client process using grpc.aio)
and each call type (Match = one image per call; MatchBatch = --per-call images per
call) it measures images/s and p50/p99 call latency against:

* the same server with micro-batching off (``--max-batch 1``: one onnxruntime call
  per image), the baseline the ratio ``batched/unbatched`` is taken against;
* the in-process ceiling: the same decode + onnxruntime session + faiss search
  called directly in this process on the same images and batch size, no gRPC.

Model: ``--model``/``--calibration`` (default: the shipped embedder when present,
else the tiny linear test embedder, which the output says). No torch needed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

GALLERY = 500


def _client_process(
    address: str, clients: int, per_call: int, seconds: float, images, queue, connections: int = 1
):
    """Runs in another process: ``clients`` concurrent callers for ``seconds``, spread over
    ``connections`` TCP connections (the kernel gives each to one ``--workers`` process)."""
    import grpc
    from retrieval.v1 import retrieval_pb2 as pb
    from retrieval.v1 import retrieval_pb2_grpc as rpc

    async def run() -> tuple[int, list[float], int]:
        # a local subchannel pool each: channels to one address would share one connection
        options = [("grpc.use_local_subchannel_pool", 1)] if connections > 1 else []
        channels = [grpc.aio.insecure_channel(address, options=options) for _ in range(connections)]
        stubs = [rpc.RetrievalStub(c) for c in channels]
        try:
            latencies: list[float] = []
            done = 0
            errors = 0
            stop_at = time.perf_counter() + seconds

            async def caller(n: int) -> None:
                nonlocal done, errors
                stub = stubs[n % connections]
                i = n
                while time.perf_counter() < stop_at:
                    batch = [images[(i + j) % len(images)] for j in range(per_call)]
                    i += per_call * clients
                    started = time.perf_counter()
                    try:
                        if per_call == 1:
                            await stub.Match(pb.MatchRequest(tenant="bench", image=batch[0]))
                        else:
                            await stub.MatchBatch(
                                pb.MatchBatchRequest(tenant="bench", images=batch)
                            )
                    except grpc.aio.AioRpcError:
                        errors += 1
                        continue
                    latencies.append(time.perf_counter() - started)
                    done += per_call

            for warm in stubs:  # every connection open before the clock starts
                await warm.Match(pb.MatchRequest(tenant="bench", image=images[0]))
            t0 = time.perf_counter()
            await asyncio.gather(*(caller(n) for n in range(clients)))
            return done / (time.perf_counter() - t0), latencies, errors
        finally:
            for channel in channels:
                await channel.close()

    queue.put(asyncio.run(run()))


def measure(
    address: str, clients: int, per_call: int, seconds: float, images, connections: int = 1
) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_client_process,
        args=(address, clients, per_call, seconds, images, queue, connections),
    )
    proc.start()
    rate, latencies, errors = queue.get(timeout=seconds + 120)
    proc.join()
    lat = np.asarray(latencies) * 1000 if latencies else np.asarray([np.nan])
    return {
        "rate": rate,
        "p50": float(np.percentile(lat, 50)),
        "p99": float(np.percentile(lat, 99)),
        "errors": errors,
    }


def in_process_ceiling(
    model, calibration, images, batch: int, seconds: float, threads: int = 0
) -> float:
    """decode + embed + search in this process, ``batch`` images at a time: images/s."""
    import faiss

    from server.matching.imaging import ImageLimits, to_model_input
    from server.matching.model import ServingModel
    from server.storage.faiss.gallery import Gallery, Item

    faiss.omp_set_num_threads(1)  # as the server does (--search-threads 1)
    served = ServingModel.load(model, calibration, "auto", 1e-3, threads)
    limits = ImageLimits()
    with tempfile.TemporaryDirectory() as tmp:
        gallery = Gallery.open(Path(tmp), served.embedder.dim, served.sha256)
        vectors = served.embed_images(images[:GALLERY], limits)
        gallery.add([Item(f"i{n}", "", b"") for n in range(len(vectors))], vectors, served.sha256)
        threshold = served.target(0).threshold
        done, i = 0, 0
        stop_at = time.perf_counter() + seconds
        t0 = time.perf_counter()
        while time.perf_counter() < stop_at:
            chunk = [images[(i + j) % len(images)] for j in range(batch)]
            i += batch
            inputs = np.stack([to_model_input(c, served.embedder.meta, limits) for c in chunk])
            gallery.search(served.embedder.run(inputs), 1, threshold, served.sha256)
            done += batch
        rate = done / (time.perf_counter() - t0)
        gallery.close()
    return rate


def _median(runs: list[dict]) -> dict:
    """The run with the median throughput (its latencies belong to it)."""
    ordered = sorted(runs, key=lambda r: r["rate"])
    return ordered[len(ordered) // 2] | {"errors": sum(r["errors"] for r in runs)}


def start(model, calibration, data_dir: Path, max_batch: int, extra: list[str]):
    from client import RetrievalClient
    from testing.server_fixtures import ServerProcess

    server = ServerProcess(
        [
            "--no-auth",
            "--model",
            str(model),
            "--calibration",
            str(calibration),
            "--data-dir",
            str(data_dir),
            "--max-batch",
            str(max_batch),
            "--max-queue",
            "100000",
            "--max-inflight",  # measure throughput, not admission control's refusals
            "100000",
            "--log-level",
            "WARNING",
            *extra,
        ]
    )
    return server, RetrievalClient(server.address)


def assets(args) -> tuple[Path, Path, list[bytes], str]:
    from embedding.defaults import DEFAULT_CALIBRATION, DEFAULT_MODEL
    from imagesets import load_images
    from testing.server_fixtures import make_assets, png

    glyphs = load_images("glyphs-tiny", "test")
    images = [png(glyphs.pixels[i]) for i in range(len(glyphs))]
    if args.model:
        return args.model, args.calibration, images, str(args.model)
    if DEFAULT_MODEL.exists() and DEFAULT_CALIBRATION.exists():
        return DEFAULT_MODEL, DEFAULT_CALIBRATION, images, "shipped default embedder"
    made = make_assets(args.work / "assets", glyphs.pixels[:400], np.asarray(glyphs.labels)[:400])
    return made.model, made.calibration, images, "tiny linear test embedder (no default model)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--clients", default="1,8,64")
    p.add_argument("--per-call", type=int, default=16, help="images per MatchBatch call")
    p.add_argument("--max-batch", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3, help="runs per cell, median kept")
    p.add_argument("--embed-threads", type=int, default=0, help="passed to both sides")
    p.add_argument("--model", type=Path)
    p.add_argument("--calibration", type=Path)
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "tcm-bench-server")
    args = p.parse_args(argv)
    shutil.rmtree(args.work, ignore_errors=True)
    model, calibration, images, which = assets(args)
    clients = [int(c) for c in args.clients.split(",")]
    load = os.getloadavg()[0]
    print(
        f"model: {which}; gallery {GALLERY} items; {args.seconds:g} s x {args.repeat} per cell; "
        f"{os.cpu_count()} CPUs, load average {load:.1f} at start"
    )
    # Both servers run side by side (idle while the other is measured) and every cell is
    # measured --repeat times, alternating servers, keeping the median: the shared
    # machine's load drifts, and interleaving keeps that drift out of the ratios.
    servers = {}
    extra = ["--embed-threads", str(args.embed_threads)]
    try:
        for label, max_batch in (("batched", args.max_batch), ("unbatched", 1)):
            server, client = start(model, calibration, args.work / label, max_batch, extra)
            servers[label] = (server, client)
            client.create_tenant("bench")
            for s in range(0, GALLERY, 250):
                items = [(f"i{n}", images[n], "") for n in range(s, min(s + 250, GALLERY))]
                client.enroll_many("bench", items)
        samples: dict[tuple, list[dict]] = {}
        for c in clients:
            for per_call in (1, args.per_call):
                for _ in range(args.repeat):
                    for label, (server, _client) in servers.items():
                        got = measure(server.address, c, per_call, args.seconds, images)
                        samples.setdefault((label, c, per_call), []).append(got)
    finally:
        for server, client in servers.values():
            client.close()
            server.stop()
    results = {key: _median(runs) for key, runs in samples.items()}
    ceilings = {}
    for c in clients:
        for per_call in (1, args.per_call):
            size = min(c * per_call, args.max_batch)
            if size not in ceilings:
                runs = [
                    in_process_ceiling(
                        model, calibration, images, size, args.seconds, args.embed_threads
                    )
                    for _ in range(args.repeat)
                ]
                ceilings[size] = float(np.median(runs))
    head = (
        f"{'clients':>7} {'call':>10} | {'batched img/s':>13} {'p50 ms':>7} {'p99 ms':>7} | "
        f"{'unbatched img/s':>15} {'p50 ms':>7} {'p99 ms':>7} | {'ratio':>5} | "
        f"{'in-proc img/s (batch)':>21} {'of ceiling':>10}"
    )
    print(head)
    print("-" * len(head))
    for c in clients:
        for per_call in (1, args.per_call):
            b, u = results["batched", c, per_call], results["unbatched", c, per_call]
            size = min(c * per_call, args.max_batch)
            ceiling = ceilings[size]
            call = "Match" if per_call == 1 else f"Batch({per_call})"
            errors = b["errors"] + u["errors"]
            print(
                f"{c:>7} {call:>10} | {b['rate']:>13.0f} {b['p50']:>7.1f} {b['p99']:>7.1f} | "
                f"{u['rate']:>15.0f} {u['p50']:>7.1f} {u['p99']:>7.1f} | "
                f"{b['rate'] / u['rate']:>5.2f} | {ceiling:>13.0f} ({size:>3}) "
                f"{b['rate'] / ceiling:>10.0%}" + (f"  [{errors} errors]" if errors else "")
            )
    print("ratio = batched / unbatched images/s; of ceiling = batched / in-process ceiling")
    return 0


if __name__ == "__main__":
    sys.exit(main())
