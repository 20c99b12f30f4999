"""Per-dataset FAR at the global threshold, raw and normalised, on held-out classes.

A calibration (or a ``--check`` of new data) reports, next to the exact in-sample
numbers of the engine, what a tenant would see in service: its statistics come from a
gallery of some of its classes, and its FAR is counted on pairs of other classes.
Each dataset's classes are split into three parts; every part is once the gallery and
once evaluated (calibrate/heldout/holdout.py), and both columns, raw and normalised, are
counted on exactly the same pairs, with class-bootstrap intervals (classes resampled
within the dataset, thresholds held fixed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from calibrate.engine.bootstrap import class_weights
from calibrate.engine.prepare import prepare
from calibrate.engine.progress import Ticker
from calibrate.heldout.holdout import (
    Part,
    accepted,
    part_pairs,
    per_class,
    rotations,
    split_classes,
)
from imagesets import EmbeddingSet
from scorenorm import ScoreHistogram, TailSettings, build_map

PARTS = 3
LEVEL = 0.95
MIN_CLASSES = 2 * PARTS  # each part needs two classes for an impostor pair


@dataclass(frozen=True)
class HeldOutFar:
    """FAR of one dataset at one threshold, counted on held-out pairs."""

    far: float | None
    ci: tuple[float, float] | None
    accepted: int
    pairs: int

    def to_json(self, target: float) -> dict:
        return {
            "far": self.far,
            "far_ratio": None if self.far is None else self.far / target,
            "ci": list(self.ci) if self.ci else None,
            "accepted": self.accepted,
            "pairs": self.pairs,
        }


@dataclass(frozen=True)
class DatasetHeldOut:
    name: str
    raw: HeldOutFar
    normalized: HeldOutFar
    shift: float | None  # mean over the galleries of (tenant raw threshold - global)
    active: int  # galleries whose map was active (of PARTS)
    classes: int = 0  # the dataset's classes (all evaluated once, over the rotations)


@dataclass(frozen=True)
class TargetHeldOut:
    target_far: float
    threshold: float
    datasets: list[DatasetHeldOut]

    def dataset(self, name: str) -> DatasetHeldOut:
        return next(d for d in self.datasets if d.name == name)


def held_out(
    embeddings: EmbeddingSet | Sequence[EmbeddingSet],
    thresholds: dict[float, float],
    global_tail: ScoreHistogram | None,
    settings: TailSettings,
    *,
    seed: int = 0,
    bootstrap: int = 200,
    progress: bool = False,
) -> list[TargetHeldOut]:
    """Raw and tenant-tail FAR per dataset at each (target FAR -> threshold); without
    ``global_tail`` only the raw column (the normalised one is left empty).

    Datasets are as in :func:`calibrate.evaluate`: the tenants of one set, or the sets.
    """
    prep = prepare(embeddings)
    labels = prep.cls
    tenants = prep.class_ds[prep.cls]
    rng = np.random.default_rng(seed)
    parts = split_classes(labels, tenants, PARTS, rng)
    classes = [len(np.unique(labels[np.concatenate(p)])) for p in parts]
    usable = [c >= MIN_CLASSES for c in classes]
    ticker = Ticker(sum(usable) * PARTS, progress, "held-out pairs")
    pairs = []
    for k, (rows, ok) in enumerate(zip(parts, usable, strict=True)):
        if not ok:
            pairs.append(None)
            continue
        found = []
        for r in rows:
            found.append(part_pairs(prep.x32, labels, r, prep.n_classes, k))
            ticker()
        pairs.append(found)
    ticker.close()
    weights = class_weights(prep, bootstrap, rng)
    out = []
    for a, t in thresholds.items():
        rows = [
            replace(
                _dataset(
                    prep.dataset_names[k], p, t, global_tail, settings, weights, prep.n_classes
                ),
                classes=classes[k],
            )
            for k, p in enumerate(pairs)
        ]
        out.append(TargetHeldOut(a, t, rows))
    return out


def _dataset(name, parts: list[Part] | None, t, global_tail, settings, weights, n_classes):
    if parts is None:
        empty = HeldOutFar(None, None, 0, 0)
        return DatasetHeldOut(name, empty, empty, None, 0)
    counts = {"raw": np.zeros(n_classes), "normalized": np.zeros(n_classes)}
    totals = {"raw": [0, 0], "normalized": [0, 0]}
    class_pairs = np.zeros(n_classes)
    shifts, active = [], 0
    for g, _, e in rotations(PARTS):
        ev = parts[e].pairs
        class_pairs += parts[e].class_impostors
        thresholds = [("raw", t)]
        if global_tail is not None:
            m = build_map(parts[g].hist, global_tail, settings)
            active += m.active
            shifts.append(m.shift(t))
            # the tenant's raw threshold: s >= r  <=>  m(s) >= t
            thresholds.append(("normalized", float(m.inverse(t))))
        for key, thr in thresholds:
            totals[key][0] += accepted(ev.imp, thr)
            totals[key][1] += ev.imp_total
            counts[key] += per_class(ev.imp, ev.imp_a, ev.imp_b, thr, n_classes)
    result = {
        key: HeldOutFar(
            totals[key][0] / totals[key][1] if totals[key][1] else None,
            _interval(weights, counts[key], class_pairs) if totals[key][1] else None,
            totals[key][0],
            totals[key][1],
        )
        for key in counts
    }
    shift = float(np.mean(shifts)) if shifts else None
    return DatasetHeldOut(name, result["raw"], result["normalized"], shift, active)


def _interval(w: np.ndarray, acc: np.ndarray, pairs: np.ndarray) -> tuple[float, float] | None:
    """Percentile interval of sum_c w_c acc_c / sum_c w_c m_c over the draws."""
    if not len(w):
        return None
    with np.errstate(invalid="ignore", divide="ignore"):
        far = (w @ acc) / (w @ pairs)
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.nanpercentile(far, [tail, 100 - tail])
    return float(lo), float(hi)


def rows_for_document(results: Sequence[TargetHeldOut]) -> dict[float, dict[str, dict]]:
    """{target: {dataset: its "normalized" entry of the calibration document}}."""
    return {
        r.target_far: {
            d.name: {
                "raw": d.raw.to_json(r.target_far),
                "normalized": d.normalized.to_json(r.target_far),
                "shift": d.shift,
                "active_galleries": d.active,
            }
            for d in r.datasets
        }
        for r in results
    }
