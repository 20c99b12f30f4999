"""Share of py-spy samples by component of the serving path.

    python -m bench.profile_shares PROFILE.txt

Reads ``py-spy record --format raw --full-filenames`` output (collapsed stacks, one
``frame;frame;... count`` line each; idle threads are not sampled) and charges each
stack to the first component, from the innermost frame outwards, whose files it runs
in: numpy called by the label-free counting is the counting's, a future resolved by the
batcher is an asyncio hand-off.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from pathlib import Path

# (component, pattern on a frame's file); the first match walking from the leaf wins
COMPONENTS: list[tuple[str, re.Pattern]] = [
    (name, re.compile(pattern))
    for name, pattern in (
        ("onnxruntime", r"onnxruntime|onnx_embedder\.py"),
        ("decode", r"/PIL/|matching/imaging\.py"),
        ("search (faiss)", r"/faiss/|storage/faiss/"),
        (
            "label-free / statistics",
            r"matching/statistics\.py|scorenorm/|tail_stats\.py|"
            r"matching/threshold\.py|monitoring/live|monitoring/label_free",
        ),
        ("decisions + metrics", r"matching/decisions\.py|prometheus_client|monitoring/serving\.py"),
        (
            "interceptor (auth, admission, metrics)",
            r"server/api/interceptor\.py|api/admission\.py|"
            r"server/auth\.py|api/ratelimit\.py",
        ),
        ("servicer + protobuf", r"server/api/app\.py|google/protobuf"),
        ("service (match, decide)", r"matching/service\.py"),
        ("batcher", r"matching/batcher\.py"),
        ("grpc aio", r"/grpc/"),
        ("asyncio + thread hand-offs", r"/asyncio/|concurrent/futures|threading\.py|/queue\.py"),
    )
]
FRAME = re.compile(r"\((?P<file>[^()]*?)(?::\d+)?\)$")


def component(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        match = FRAME.search(frame)
        file = match.group("file") if match else frame
        for name, pattern in COMPONENTS:
            if pattern.search(file):
                return name
    leaf = FRAME.search(frames[-1])
    return "other: " + (Path(leaf.group("file")).name if leaf else frames[-1][:40])


def shares(path: Path) -> tuple[Counter, int]:
    counts: Counter = Counter()
    for line in path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        counts[component(stack)] += int(n)
    return counts, sum(counts.values())


def report(path: Path, top: int = 14) -> None:
    counts, total = shares(path)
    if not total:
        print("  (no samples)")
        return
    print(f"| component | share of {total} samples |")
    print("|---|---|")
    for name, n in counts.most_common(top):
        print(f"| {name} | {n / total:.1%} |")


if __name__ == "__main__":
    report(Path(sys.argv[1]))
