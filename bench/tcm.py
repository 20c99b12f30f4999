"""TCM cost: our matrix form vs PML's ThresholdConsistentMarginLoss, the GEMM floor, base losses.

Forward + backward of each loss on random (B, D) embeddings with m images per class,
for several B, run side by side in one process (interleaved medians, bench/harness.py).
Peak memory is the allocator's peak on CUDA, and on CPU the peak resident set size
above the pre-call level, sampled every millisecond by a thread (torch's CPU
allocations are invisible to tracemalloc).

  python -m bench.tcm                     # B = 128 512 2048 4096, D = 512, m = 4
  python -m bench.tcm --sizes 128 512 --pml-max 512 --device cuda

Cases:
  floor        normalise + B x B GEMM + sum, backward: the least any matrix loss can cost
  ours         TCMLoss (computes its own similarity matrix)
  pml          PML ThresholdConsistentMarginLoss (gathers per-pair embeddings)
  tcm on shared matrix   TCM from a precomputed similarity matrix (its own cost when a
               base loss shares its matrix: masks and their backward, no GEMM)
  ms, ms+tcm   MultiSimilarityLoss alone / with TCM sharing its matrix
  proxy_anchor, contrastive   base losses, for scale
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
from collections.abc import Callable

import torch
from pytorch_metric_learning import losses
from torch.nn import functional as F  # noqa: N812

from bench.harness import Measurement, print_table
from train.losses import SharedCosineSimilarity, TCMLoss


class PeakMemory:
    """Peak bytes used by one call: CUDA allocator peak, or sampled RSS growth on CPU."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - before
        return self._cpu(fn)

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:  # noqa: PTH123 - a proc file, read each ms
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _cpu(self, fn: Callable[[], object]) -> int:
        base = self._rss()
        peak = [base]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], self._rss())
                time.sleep(0.001)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        try:
            fn()
        finally:
            done.set()
            thread.join()
        return max(peak[0], self._rss()) - base


# The goals the issues set (issue 11): printed as met/missed, never asserted in tests.
SPEEDUP_GOAL = 100.0  # ours vs PML, at B >= GOAL_BATCH
GOAL_BATCH = 512
OWN_COST_GOAL = 0.5  # TCM's own cost on a shared matrix, relative to the GEMM floor


def goal(text: str, met: bool) -> str:
    return f"goal {text}: {'met' if met else 'MISSED'}"


def make_cases(b: int, d: int, m: int, device: torch.device, pml_max: int):
    g = torch.Generator().manual_seed(b)
    emb0 = torch.randn(b, d, generator=g).to(device)
    labels = torch.arange(b // m).repeat_interleave(m).to(device)
    classes = b // m

    def step(loss_fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            x = emb0.clone().requires_grad_(True)
            loss_fn(x).backward()
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    def floor(x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(x)
        return (z @ z.T).sum()

    ours = TCMLoss()
    sim0 = F.normalize(emb0) @ F.normalize(emb0).T

    def tcm_on_matrix() -> None:
        sim = sim0.clone().requires_grad_(True)
        ours.from_similarity(sim, labels).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()

    ms = losses.MultiSimilarityLoss()
    shared = SharedCosineSimilarity()
    ms_shared, tcm_shared = losses.MultiSimilarityLoss(distance=shared), TCMLoss(distance=shared)
    proxy = losses.ProxyAnchorLoss(classes, d).to(device)
    contrastive = losses.ContrastiveLoss()
    cases = {
        "floor": step(floor),
        "ours": step(lambda x: ours(x, labels)),
        "tcm on shared matrix": tcm_on_matrix,
        "ms": step(lambda x: ms(x, labels)),
        "ms+tcm (shared)": step(lambda x: ms_shared(x, labels) + tcm_shared(x, labels)),
        "proxy_anchor": step(lambda x: proxy(x, labels)),
        "contrastive": step(lambda x: contrastive(x, labels)),
    }
    if b <= pml_max:
        pml = losses.ThresholdConsistentMarginLoss()
        cases["pml"] = step(lambda x: pml(x, labels))
    return cases


def fresh_process_peak(case: str, b: int, args: argparse.Namespace) -> int:
    """Peak RSS growth of one case in a new process, so no case reuses another's memory."""
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "bench.tcm",
        "--one",
        case,
        "--sizes",
        str(b),
        "--dim",
        str(args.dim),
        "--m",
        str(args.m),
        "--threads",
        str(args.threads),
        "--device",
        args.device,
        "--pml-max",
        str(args.pml_max),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1])


def measure(cases: dict[str, Callable[[], None]], repeat: int, peak: PeakMemory):
    slow = {"pml"}
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up
    for i in range(repeat):
        for name, fn in cases.items():
            if name in slow and i > 0:
                continue  # PML takes seconds: one timed call is enough to show the gap
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return [Measurement(n, statistics.median(samples[n]), peak(fn)) for n, fn in cases.items()]


def run_one(case: str, b: int, args: argparse.Namespace, device: torch.device) -> None:
    """Child of fresh_process_peak: build the case, run it once, print the peak bytes."""
    cases = make_cases(b, args.dim, args.m, device, args.pml_max)
    print(PeakMemory(device)(cases[case]))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 512, 2048, 4096])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--m", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument(
        "--pml-max", type=int, default=512, help="largest B to run PML at (it needs O(B^2 D))"
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: one case, print peak
    parser.add_argument(
        "--fresh-memory",
        action="store_true",
        help="measure each case's peak memory in its own process (CPU RSS is otherwise "
        "hidden by memory the allocator kept from earlier cases)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device if torch.cuda.is_available() else "cpu")
    if args.one:
        run_one(args.one, args.sizes[0], args, device)
        return
    print(f"device {device}, torch threads {torch.get_num_threads()}, D={args.dim}, m={args.m}")
    peak = PeakMemory(device)
    for b in args.sizes:
        cases = make_cases(b, args.dim, args.m, device, args.pml_max)
        results = measure(cases, args.repeat, peak)
        if args.fresh_memory:
            results = [
                Measurement(r.name, r.seconds, fresh_process_peak(r.name, b, args)) for r in results
            ]
        print_table(f"B={b}", results, baseline="floor")
        by = {r.name: r for r in results}
        own = by["tcm on shared matrix"].seconds
        print(
            f"  TCM own cost on a shared matrix (masks, forward+backward): {own * 1e3:.2f} ms"
            f" = {own / by['floor'].seconds:.2f}x floor"
        )
        print(f"  ours vs floor: {by['ours'].seconds / by['floor'].seconds:.2f}x")
        print(f"  {goal('TCM own cost <= 0.5x floor', own / by['floor'].seconds <= OWN_COST_GOAL)}")
        if "pml" in by:
            speedup = by["pml"].seconds / by["ours"].seconds
            print(
                f"  ours is {speedup:.0f}x faster than PML, "
                f"peak memory {by['pml'].peak_bytes / max(by['ours'].peak_bytes, 1):.0f}x less"
            )
            if b >= GOAL_BATCH:
                print(f"  {goal('ours >= 100x faster than PML', speedup >= SPEEDUP_GOAL)}")
        else:
            need = 2 * 2 * b * b * args.dim * 4 / 2**30
            print(f"  pml skipped at B={b}: its pair gathers alone need ~{need:.0f} GiB")


if __name__ == "__main__":
    main()
