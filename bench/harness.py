"""The one way every benchmark times things and prints its table.

Machines here are shared and noisy, so each case is repeated and the median kept,
cases run interleaved in one process, and results are printed as ratios against a
named baseline rather than as absolute promises.
"""

from __future__ import annotations

import os
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Measurement:
    """Median wall time and peak traced Python/numpy memory of one case."""

    name: str
    seconds: float
    peak_bytes: int | None = None


def time_median(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median seconds of ``repeat`` calls after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def peak_memory(fn: Callable[[], object]) -> int:
    """Peak bytes allocated through Python's allocator (numpy included) during one call."""
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def compare(
    cases: dict[str, Callable[[], object]],
    *,
    repeat: int = 5,
    memory: bool = False,
) -> list[Measurement]:
    """Time every case (and optionally its peak memory), interleaving repeats across cases."""
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for fn in cases.values():
        fn()  # warm-up: imports, caches, lazy initialisation
    for _ in range(repeat):
        for name, fn in cases.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return [
        Measurement(
            name,
            statistics.median(samples[name]),
            peak_memory(fn) if memory else None,
        )
        for name, fn in cases.items()
    ]


def print_table(title: str, results: Sequence[Measurement], baseline: str) -> None:
    """Print each case's time and memory with its ratio to the named baseline."""
    base = next(r for r in results if r.name == baseline)
    print(f"\n{title}  (baseline: {baseline})")
    print(f"{'case':<32} {'median s':>10} {'speed-up':>9} {'peak MiB':>9} {'mem ratio':>9}")
    for r in results:
        speedup = base.seconds / r.seconds if r.seconds > 0 else float("inf")
        mem = f"{r.peak_bytes / 2**20:9.1f}" if r.peak_bytes is not None else f"{'-':>9}"
        ratio = (
            f"{r.peak_bytes / base.peak_bytes:9.2f}"
            if r.peak_bytes is not None and base.peak_bytes
            else f"{'-':>9}"
        )
        print(f"{r.name:<32} {r.seconds:10.4f} {speedup:8.2f}x {mem} {ratio}")


TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads (/proc/PID/stat fields 14 and 15)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK
