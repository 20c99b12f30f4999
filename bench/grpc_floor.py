"""What a unary call costs the server in gRPC alone: an echo Match, no work, side by side.

    python -m bench.grpc_floor [--clients 16] [--seconds 6] [--repeat 3]

Servers in their own processes answer Match with an empty MatchResponse, one after the
other, driven by the same client process as bench.match_cpu (``--clients`` concurrent
single-image calls): grpc.aio bare; the RetrievalInterceptor (auth off, default
admission) as a grpc.aio interceptor (``interceptors=[...]``, asked at every call) and
registered with the handlers (``register``, what build_server does); the sync grpc
server with a thread pool. Printed: server CPU
per call (all its threads, /proc). This is the floor under a Match's cost per image that
no change to the service can remove (docs/SERVER.md, "Per-call cost").
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]


def _serve(kind: str, ready) -> None:
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from prometheus_client import CollectorRegistry
    from retrieval.v1 import retrieval_pb2 as pb
    from retrieval.v1 import retrieval_pb2_grpc as rpc

    class Echo(rpc.RetrievalServicer):
        def Match(self, request, context):  # noqa: N802
            return pb.MatchResponse()

    class AsyncEcho(rpc.RetrievalServicer):
        async def Match(self, request, context):  # noqa: N802
            return pb.MatchResponse()

    if kind == "sync":
        server = grpc.server(ThreadPoolExecutor(16))
        rpc.add_RetrievalServicer_to_server(Echo(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        ready.send(port)
        server.wait_for_termination()
        return

    async def main() -> None:
        interceptor = None
        if kind != "aio":
            from server.api.interceptor import RetrievalInterceptor
            from server.auth import KeyRing
            from server.monitoring.serving import ServerMetrics

            keys = KeyRing(enabled=False)  # as --no-auth
            interceptor = RetrievalInterceptor(keys, ServerMetrics(CollectorRegistry()))
        if kind == "aio+interceptor":
            server = grpc.aio.server(interceptors=[interceptor])
            rpc.add_RetrievalServicer_to_server(AsyncEcho(), server)
        elif kind == "aio+registered":
            server = grpc.aio.server()
            interceptor.register(rpc.add_RetrievalServicer_to_server, AsyncEcho(), server)
        else:
            server = grpc.aio.server()
            rpc.add_RetrievalServicer_to_server(AsyncEcho(), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        ready.send(port)
        await server.wait_for_termination()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    from bench.harness import cpu_seconds
    from bench.server import measure

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--repeat", type=int, default=3)
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    kinds = ("aio", "aio+interceptor", "aio+registered", "sync")
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in kinds}
    for _ in range(args.repeat):  # interleaved: the shared machine's load drifts
        for kind in kinds:
            here, there = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(kind, there), daemon=True)
            proc.start()
            port = here.recv()
            time.sleep(0.5)
            before = cpu_seconds(proc.pid)
            out = measure(f"127.0.0.1:{port}", args.clients, 1, args.seconds, [b"x" * 200])
            cpu = cpu_seconds(proc.pid) - before
            runs[kind].append((out["rate"], cpu / (out["rate"] * args.seconds)))
            proc.terminate()
            proc.join()
    print(f"| server | calls/s | server CPU per call (median of {args.repeat}) | all runs |")
    print("|---|---|---|---|")
    for kind in kinds:
        rates, costs = zip(*runs[kind], strict=True)
        print(
            f"| {kind} | {statistics.median(rates):.0f} | "
            f"{1000 * statistics.median(costs):.3f} ms | "
            + " ".join(f"{1000 * c:.3f}" for c in costs)
            + " |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
