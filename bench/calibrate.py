"""Calibration engine vs the naive route, side by side, at a few sizes.

Cases (D = 128, 10 images per class, one dataset, target FAR 1e-3):

- ``naive full matrix + sort`` (baseline): all N x N scores materialised (float64
  product rounded to float32, the engine's score definition), the impostor scores
  of the upper triangle gathered and fully sorted; threshold only.
- ``calibrate.evaluate``: the streaming engine, doing the whole evaluation
  (thresholds, per-class grids, OPIS, Recall@1) in three blocked passes.
- ``bare blocked sgemm`` (the ceiling): one float32 pass of the same blocks, no
  counting at all.

Run: ``.venv/bin/python -m bench.calibrate [--sizes 2000 5000 10000] [--repeat 1]``.
Prints time and peak traced memory with ratios to the baseline, and whether the
engine's threshold equals the naive one.
"""

from __future__ import annotations

import argparse

import numpy as np

from bench.harness import compare, print_table
from calibrate import evaluate
from imagesets import EmbeddingSet

TARGET = 1e-3
BLOCK = 2048


def make(n: int, dim: int = 128, per_class: int = 10, seed: int = 0) -> EmbeddingSet:
    rng = np.random.default_rng(seed)
    classes = n // per_class
    labels = np.repeat(np.arange(classes), per_class)[:n]
    x = rng.normal(size=(classes, dim))[labels] + 1.5 * rng.normal(size=(n, dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return EmbeddingSet(
        "bench",
        labels,
        tuple(str(i) for i in range(classes)),
        np.zeros(n, np.int64),
        ("all",),
        x.astype(np.float32),
    )


def naive_threshold(es: EmbeddingSet) -> float:
    x = es.embeddings.astype(np.float64)
    s = (x @ x.T).astype(np.float32)
    i, j = np.triu_indices(len(x), 1)
    impostor = s[i, j][es.labels[i] != es.labels[j]]
    desc = np.sort(impostor)[::-1]
    k = int(np.floor(TARGET * len(desc)))
    v = desc[k]
    return float(desc[desc > v].min())


def bare_sgemm(es: EmbeddingSet) -> float:
    x = es.embeddings
    total = 0.0
    for i0 in range(0, len(x), BLOCK):
        for j0 in range(i0, len(x), BLOCK):
            total += float((x[i0 : i0 + BLOCK] @ x[j0 : j0 + BLOCK].T)[0, 0])
    return total


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 5000, 10000])
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument(
        "--naive-max",
        type=int,
        default=20000,
        help="largest N for the naive route (it needs ~20 N^2 bytes); above it the "
        "baseline is the bare sgemm",
    )
    args = p.parse_args(argv)
    for n in args.sizes:
        es = make(n)
        cases = {
            "calibrate.evaluate": lambda es=es: evaluate(es, (TARGET,), block=BLOCK),
            "bare blocked sgemm": lambda es=es: bare_sgemm(es),
        }
        naive = n <= args.naive_max
        if naive:
            cases = {"naive full matrix + sort": lambda es=es: naive_threshold(es), **cases}
        results = compare(cases, repeat=args.repeat, memory=True)
        baseline = "naive full matrix + sort" if naive else "bare blocked sgemm"
        print_table(f"N = {n}, D = 128, FAR {TARGET:g}", results, baseline)
        by = {r.name: r.seconds for r in results}
        line = (
            f"engine / bare sgemm time {by['calibrate.evaluate'] / by['bare blocked sgemm']:.2f}x"
        )
        if naive:
            engine_t = evaluate(es, (TARGET,), block=BLOCK).targets[0].threshold
            naive_t = naive_threshold(es)
            same = "same" if engine_t == naive_t else "DIFFERENT"
            line = f"threshold engine {engine_t!r} vs naive {naive_t!r}: {same}; " + line
        print(line)


if __name__ == "__main__":
    main()
