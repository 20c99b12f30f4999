"""Held-out evaluation: Recall@1, MAP@R, OPIS, eps-OPIS and per-tenant FAR at a global threshold.

Definitions are docs/DESIGN.md's. The counting (pairs above each threshold per class and
per tenant, exact order-statistic thresholds) is done here in blocks of rows on the
similarity matrix so an N of ten thousand costs seconds and O(block x N) memory; the
metrics built from the counts (utility, OPIS, eps-OPIS) are calibrate.consistency's,
the one implementation in the project.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from calibrate.consistency import eps_opis, opis, threshold_grid, utility

BLOCK = 1024


@dataclass
class Curves:
    """Per-member utility curves over the calibration grid (for figures)."""

    grid: np.ndarray  # (G,) similarity thresholds
    class_utility: np.ndarray  # (T, G)
    tenant_utility: np.ndarray  # (K, G)


def _blocks(n: int):
    for start in range(0, n, BLOCK):
        yield slice(start, min(start + BLOCK, n))


def _impostor_top(emb: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest impostor similarities over unordered pairs (i < j), descending."""
    n = len(emb)
    best = torch.empty(0, dtype=emb.dtype)
    idx = torch.arange(n)
    for rows in _blocks(n):
        sim = emb[rows] @ emb.T
        keep = (labels[rows, None] != labels[None, :]) & (idx[rows, None] < idx[None, :])
        vals = sim[keep]
        best = (
            torch.cat([best, vals.topk(min(k, len(vals))).values])
            .topk(min(k, len(best) + len(vals)))
            .values
        )
    return best


def far_threshold(top: torch.Tensor, k: int, total: int) -> float:
    """Smallest similarity threshold accepting at most k impostor pairs (ties included).

    ``top`` holds the k+1 largest impostor scores. Every score equal to the (k+1)-th
    must be rejected too, so the threshold is the next float above it.
    """
    if k >= total:
        return -math.inf
    kth = top[k].to(torch.float32)
    return float(torch.nextafter(kth, torch.tensor(math.inf, dtype=torch.float32)))


def _counts(emb, labels, groups, n_groups, grid, same_group_only):
    """Genuine/impostor pair counts per group with s >= t_g: arrays (n_groups, G).

    A row contributes its pairs to its own group; with ``same_group_only`` a pair counts
    only when both ends share a group (tenants), else any pair of the row counts
    (classes: an impostor pair with one end in c counts once for c, as defined).
    """
    g = len(grid)
    gen = torch.zeros(n_groups * (g + 1), dtype=torch.float64)
    imp = torch.zeros_like(gen)
    grid_t = torch.as_tensor(grid, dtype=emb.dtype)
    n = len(emb)
    for rows in _blocks(n):
        sim = emb[rows] @ emb.T
        bucket = torch.bucketize(sim, grid_t, right=True)  # number of thresholds <= s
        same = labels[rows, None] == labels[None, :]
        ar = torch.arange(rows.start, rows.stop)
        same[torch.arange(len(ar)), ar] = False  # self-pairs are no pairs
        valid = torch.ones_like(same)
        valid[torch.arange(len(ar)), ar] = False
        if same_group_only:
            valid &= groups[rows, None] == groups[None, :]
        key = groups[rows, None] * (g + 1) + bucket
        gen.index_add_(0, key[same & valid], torch.ones(int((same & valid).sum()), dtype=gen.dtype))
        neg = ~same & valid
        imp.index_add_(0, key[neg], torch.ones(int(neg.sum()), dtype=imp.dtype))

    # counts of s >= t_g = pairs whose bucket is above g: reverse cumulative sum.
    def at_least(h):
        h = h.view(n_groups, g + 1).numpy()
        return np.cumsum(h[:, ::-1], axis=1)[:, ::-1][:, 1:]

    return at_least(gen), at_least(imp)


def _rates(gen: np.ndarray, imp: np.ndarray, gen_total: np.ndarray, imp_total: np.ndarray):
    with np.errstate(invalid="ignore", divide="ignore"):
        tar = gen / gen_total[:, None]
        far = imp / imp_total[:, None]
    return tar, far


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
    """All held-out metrics of one embedding set, and the curves behind OPIS."""
    emb = torch.as_tensor(np.asarray(embeddings, np.float32))
    lab = torch.as_tensor(np.unique(labels, return_inverse=True)[1].reshape(-1))
    ten = torch.as_tensor(np.asarray(tenants, np.int64))
    n = len(emb)
    sizes = torch.bincount(lab)
    gen_pairs = int((sizes * (sizes - 1) // 2).sum())
    imp_pairs = n * (n - 1) // 2 - gen_pairs
    far_lo, far_hi = far_range
    k_of = {a: math.floor(a * imp_pairs) for a in (far_lo, far_hi, target_far)}
    if min(k_of.values()) < 1:
        raise ValueError(
            f"{imp_pairs} impostor pairs cannot measure FAR {min(k_of)}: evaluate more images"
        )
    top = _impostor_top(emb, lab, max(k_of.values()) + 1)
    t_hi = far_threshold(top, k_of[far_lo], imp_pairs)
    t_lo = far_threshold(top, k_of[far_hi], imp_pairs)
    t_star = far_threshold(top, k_of[target_far], imp_pairs)
    grid = threshold_grid(t_lo, t_hi, grid_size)

    recall1, map_r = _retrieval(emb, lab)

    # classes with >= 2 samples only
    cls_gen, cls_imp = _counts(emb, lab, lab, len(sizes), grid, same_group_only=False)
    ok = (sizes >= 2).numpy()
    cls_gen_tot = (sizes * (sizes - 1)).double().numpy()
    cls_imp_tot = (sizes * (n - sizes)).double().numpy()
    tar, far = _rates(cls_gen[ok], cls_imp[ok], cls_gen_tot[ok], cls_imp_tot[ok])
    class_u = utility(tar, far)

    n_ten = len(tenant_names)
    t_grid = np.concatenate([grid, [t_star]])
    ten_gen, ten_imp = _counts(emb, lab, ten, n_ten, t_grid, same_group_only=True)
    ten_gen_tot, ten_imp_tot = _tenant_totals(lab, ten, n_ten)
    # A tenant's FAR at the target is measurable only with >= 1/a impostor pairs inside it.
    present = (ten_gen_tot > 0) & (ten_imp_tot / 2 * target_far >= 1)
    ttar, tfar = _rates(
        ten_gen[present], ten_imp[present], ten_gen_tot[present], ten_imp_tot[present]
    )
    tenant_u = utility(ttar[:, :-1], tfar[:, :-1])
    tenant_far = tfar[:, -1]
    names = [t for t, p in zip(tenant_names, present, strict=True) if p]
    achieved = _far_at(emb, lab, t_star) / imp_pairs
    far_min, far_max = float(tenant_far.min()), float(tenant_far.max())
    metrics = {
        "recall_at_1": recall1,
        "map_at_r": map_r,
        "opis": opis(class_u),
        "eps_opis": eps_opis(class_u, eps),
        "tenant_opis": opis(tenant_u) if len(tenant_u) > 1 else 0.0,
        "target_far": target_far,
        "global_threshold": t_star,
        "global_distance": 1.0 - t_star,
        "achieved_far": achieved,
        "tenant_far": dict(zip(names, map(float, tenant_far), strict=True)),
        "far_min": far_min,
        "far_max": far_max,
        # max/min; infinite (null in JSON) when some measurable tenant accepted nothing
        "far_spread": far_max / far_min if far_min > 0 else math.inf,
        "tenants_unmeasurable": [t for t, p in zip(tenant_names, present, strict=True) if not p],
        "calibration_range": [t_lo, t_hi],
        "images": n,
        "classes": int(ok.sum()),
        "classes_left_out": int((~ok).sum()),
        "impostor_pairs": imp_pairs,
    }
    return metrics, Curves(grid, class_u, tenant_u)


def _tenant_totals(lab, ten, n_ten):
    gen = np.zeros(n_ten)
    imp = np.zeros(n_ten)
    for k in range(n_ten):
        sub = lab[ten == k]
        m = len(sub)
        s = torch.bincount(sub) if m else torch.zeros(0, dtype=torch.long)
        g = int((s * (s - 1)).sum())
        gen[k], imp[k] = g, m * (m - 1) - g
    return gen, imp


def _far_at(emb: torch.Tensor, labels: torch.Tensor, t: float) -> int:
    """Impostor pairs (unordered) with s >= t."""
    count = 0
    idx = torch.arange(len(emb))
    for rows in _blocks(len(emb)):
        sim = emb[rows] @ emb.T
        keep = (labels[rows, None] != labels[None, :]) & (idx[rows, None] < idx[None, :])
        count += int(((sim >= t) & keep).sum())
    return count
