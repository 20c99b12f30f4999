"""Held-out evaluation: Recall@1, MAP@R, OPIS, eps-OPIS and per-tenant FAR at a global threshold.

Everything threshold-related (exact order-statistic thresholds, per-class and per-tenant
utility, OPIS, eps-OPIS, Recall@1) comes from :func:`calibrate.evaluate`, the project's
one implementation, so a training run reports the numbers calibrate will later measure
on the exported model. Only MAP@R, which calibrate does not report, is computed here.
Tenants are calibrate's datasets: pairs never cross tenants.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from calibrate import evaluate as calibrate_evaluate
from imagesets import EmbeddingSet

BLOCK = 1024


@dataclass
class Curves:
    """Per-member utility curves over the pooled calibration grid (for figures)."""

    grid: np.ndarray  # (G,) similarity thresholds
    class_utility: np.ndarray  # (T, G)
    tenant_utility: np.ndarray  # (K, G)


def _blocks(n: int):
    for start in range(0, n, BLOCK):
        yield slice(start, min(start + BLOCK, n))


def _retrieval(emb: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """Recall@1 and MAP@R, leave-one-out (self excluded)."""
    n = len(emb)
    _, class_sizes = torch.unique(labels, return_counts=True)
    r_max = int(class_sizes.max()) - 1
    hits1, ap_sum, counted = 0, 0.0, 0
    sizes = torch.bincount(labels)
    for rows in _blocks(n):
        sim = emb[rows] @ emb.T
        sim[torch.arange(rows.stop - rows.start), torch.arange(rows.start, rows.stop)] = -math.inf
        k = max(1, min(r_max, n - 1))
        top = sim.topk(k, dim=1).indices
        correct = labels[top] == labels[rows, None]
        hits1 += int(correct[:, 0].sum())
        r = sizes[labels[rows]] - 1
        pos = torch.arange(1, k + 1)[None, :]
        in_r = pos <= r[:, None]
        prec = torch.cumsum(correct.double(), 1) / pos
        ap = (prec * correct * in_r).sum(1) / r.clamp(min=1)
        has = r > 0
        ap_sum += float(ap[has].sum())
        counted += int(has.sum())
    return hits1 / n, ap_sum / max(counted, 1)


def evaluate_embeddings(
    embeddings: np.ndarray,
    labels: np.ndarray,
    tenants: np.ndarray,
    tenant_names: tuple[str, ...],
    target_far: float = 1e-3,
    far_range: tuple[float, float] = (1e-4, 1e-2),
    grid_size: int = 101,
    eps: float = 0.05,
) -> tuple[dict, Curves]:
    """All held-out metrics of one embedding set (flat dict for metrics.json), and curves."""
    emb = np.ascontiguousarray(embeddings, dtype=np.float32)
    dense = np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)
    names = tuple(str(c) for c in range(int(dense.max()) + 1))
    es = EmbeddingSet("heldout", dense, names, np.asarray(tenants, np.int64), tenant_names, emb)
    ev = calibrate_evaluate(
        es, target_fars=(target_far,), far_range=far_range, grid_size=grid_size, eps=eps
    )
    target = ev.target(target_far)
    measured = [d for d in target.datasets if d.measurable and d.far is not None]
    fars = np.array([d.far for d in measured], dtype=np.float64)
    far_min = float(fars.min()) if len(fars) else math.nan
    far_max = float(fars.max()) if len(fars) else math.nan
    _, map_r = _retrieval(torch.from_numpy(emb), torch.from_numpy(dense))
    metrics = {
        "recall_at_1": ev.recall_at_1,
        "map_at_r": map_r,
        "opis": ev.overall.opis,
        "eps_opis": ev.overall.eps_opis,
        "tenant_opis": ev.cross_dataset.opis,
        "target_far": target_far,
        "global_threshold": target.threshold,
        "global_distance": target.distance,
        "achieved_far": target.achieved_far,
        "tenant_far": {d.name: d.far for d in measured},
        "far_min": far_min,
        "far_max": far_max,
        # max/min over tenants where the target is measurable; infinite (null in JSON)
        # when one of them accepted no impostor at the global threshold
        "far_spread": far_max / far_min if far_min > 0 else math.inf,
        "tenants_unmeasurable": [d.name for d in target.datasets if not d.measurable],
        "calibration_range": list(ev.similarity_range) if ev.similarity_range else None,
        "images": len(emb),
        "classes": int(sum(d.classes for d in ev.datasets)),
        "impostor_pairs": target.impostor_pairs,
        "warnings": list(target.warnings),
    }
    tenant_u = [d.utility for d in ev.datasets if d.utility is not None]
    curves = Curves(
        grid=np.asarray(ev.grid),
        class_utility=np.asarray(ev.class_utility),
        tenant_utility=np.stack(tenant_u) if tenant_u else np.zeros((0, len(ev.grid))),
    )
    return metrics, curves
