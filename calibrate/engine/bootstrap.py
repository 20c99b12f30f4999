"""Class-level (cluster) bootstrap intervals for the achieved FAR and the threshold.

Pairs share images and classes, so the pair errors are far from independent and a
binomial interval over pairs is too narrow. We resample classes with replacement,
inside each dataset, and recompute from per-class counts that pass 3 collected:

- a resample gives each class a weight w_c (how often it was drawn);
- an impostor pair between classes c and c' gets weight (w_c + w_c') / 2, which
  is what summing the per-class counts (each pair is credited to both its classes)
  with weights w_c and halving gives. A product weight w_c w_c' would need counts
  per pair of classes; the additive form has the same expectation;
- the achieved FAR at the global threshold is exact per resample; the resampled
  threshold is read on the bootstrap grid (BOOT_GRID thresholds between the
  threshold of a 4x looser FAR and the top impostor score), so it is rounded up
  to that grid's step.
"""

from __future__ import annotations

import numpy as np

from calibrate.engine.assemble import Measured
from calibrate.engine.prepare import Prepared
from calibrate.engine.results import Interval

LEVEL = 0.95


def class_bootstrap(m: Measured, n: int, seed: int) -> Measured:
    """``m`` with a percentile interval per measurable target (None where unmeasurable)."""
    boot = m.impostor_counts["boot"]
    grid = boot.grids[0]
    if grid is None or n < 1:
        return m
    weights = class_weights(m.prep, n, np.random.default_rng(seed))  # (n, classes)
    pairs = weights @ m.prep.class_impostor_pairs().astype(np.float64) / 2
    accepted_grid = weights @ boot.at_least().astype(np.float64) / 2  # (n, G)
    targets_grid = m.impostor_counts["targets"].grids[0]
    at_targets = m.impostor_counts["targets"].at_least().astype(np.float64)
    intervals = []
    for a, t in zip(m.ranks.targets, m.global_t, strict=True):
        if t is None:
            intervals.append(None)
            continue
        g = int(np.flatnonzero(targets_grid == t)[0])
        with np.errstate(invalid="ignore", divide="ignore"):
            far = (weights @ at_targets[:, g]) / 2 / pairs
        ok = accepted_grid <= a * pairs[:, None]
        first = np.argmax(ok, axis=1)  # ok is monotone in g and true at the top
        thresholds = grid[first]
        intervals.append(Interval(LEVEL, n, _percentiles(far), _percentiles(thresholds)))
    return m.with_intervals(intervals)


def class_weights(prep: Prepared, n: int, rng: np.random.Generator) -> np.ndarray:
    """(n, classes): how often each class is drawn, resampling classes inside each dataset."""
    w = np.zeros((n, prep.n_classes))
    for k in range(prep.n_datasets):
        cs = prep.ds_classes(k)
        draws = rng.integers(0, len(cs), size=(n, len(cs)))
        for b in range(n):
            w[b, cs] = np.bincount(draws[b], minlength=len(cs))
    return w


def _percentiles(values: np.ndarray) -> tuple[float, float]:
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.nanpercentile(values, [tail, 100 - tail])
    return float(lo), float(hi)
