"""Score drift of live top-1 similarities against the calibration-time histogram.

The reference is ``{"edges": [...], "counts": [...] or {dataset: [...]}}`` as stored in
the calibration document under ``reference.top1_similarity``. Live scores are binned on
the same edges (values outside go to the end bins).

- KS: the largest gap between the live and reference CDFs at the bin edges (the binned
  Kolmogorov-Smirnov statistic; it can only under-state the exact one).
- PSI: sum (p - q) ln(p / q) over ``psi_bins`` groups of reference bins, each holding
  about 1/psi_bins of the reference mass (deciles by default). Fine calibration bins
  would make PSI mostly measure sampling noise of a small live window; empty live
  groups are floored at ``PSI_FLOOR``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

PSI_FLOOR = 1e-4


class ReferenceHistogram:
    """One reference distribution of top-1 similarity on fixed edges."""

    def __init__(self, edges: Sequence[float], counts: Sequence[float], psi_bins: int = 10) -> None:
        e = np.asarray(edges, dtype=np.float64)
        c = np.asarray(counts, dtype=np.float64)
        if e.ndim != 1 or len(e) < 2 or not np.all(np.diff(e) > 0):
            raise ValueError("reference edges must be at least 2 strictly increasing numbers")
        if c.shape != (len(e) - 1,):
            raise ValueError(f"reference has {len(e) - 1} bins but {c.size} counts")
        if np.any(c < 0) or c.sum() <= 0 or not np.isfinite(c).all():
            raise ValueError("reference counts must be non-negative with a positive total")
        if psi_bins < 2:
            raise ValueError(f"psi_bins must be >= 2, got {psi_bins}")
        self.edges = e
        self.fractions = c / c.sum()
        self.groups = _quantile_groups(self.fractions, psi_bins)

    def bin_counts(self, scores: Sequence[float]) -> np.ndarray:
        """Live counts per reference bin; scores outside the edges go to the end bins."""
        idx = np.searchsorted(self.edges, np.asarray(scores, dtype=np.float64), side="right") - 1
        idx = np.clip(idx, 0, len(self.fractions) - 1)
        return np.bincount(idx, minlength=len(self.fractions)).astype(np.float64)

    def ks(self, scores: Sequence[float]) -> float:
        """Binned KS statistic; NaN without scores."""
        live = self.bin_counts(scores)
        if live.sum() == 0:
            return float("nan")
        gap = np.cumsum(live / live.sum()) - np.cumsum(self.fractions)
        return float(np.max(np.abs(gap)))

    def psi(self, scores: Sequence[float]) -> float:
        """PSI over the reference-quantile groups; NaN without scores."""
        live = self.bin_counts(scores)
        if live.sum() == 0:
            return float("nan")
        p = np.maximum(np.add.reduceat(live / live.sum(), self.groups), PSI_FLOOR)
        q = np.maximum(np.add.reduceat(self.fractions, self.groups), PSI_FLOOR)
        return float(np.sum((p - q) * np.log(p / q)))


def _quantile_groups(fractions: np.ndarray, n_groups: int) -> np.ndarray:
    """Start indices of runs of adjacent bins holding about 1/n_groups of the mass each.

    A group closes at the first bin where the cumulative mass reaches k / n_groups; a
    trailing run with no mass joins the group before it, so no group is empty.
    """
    cum = np.cumsum(fractions)
    ends = sorted({int(np.argmax(cum >= k / n_groups - 1e-12)) for k in range(1, n_groups)})
    starts = [0] + [e + 1 for e in ends if e + 1 < len(fractions)]
    last_mass = fractions[starts[-1] :].sum()
    if len(starts) > 1 and last_mass <= 0:
        starts.pop()
    return np.asarray(starts, dtype=np.intp)


def load_references(reference: Mapping[str, Any] | None, psi_bins: int = 10) -> dict[str, Any]:
    """Parses the calibration document's reference into {"": pooled, name: per-dataset}.

    ``counts`` may be a plain list (one reference) or a map from dataset name to counts;
    a tenant whose name is a dataset name is compared with its own histogram, every
    other tenant with the pooled one.
    """
    if reference is None:
        return {}
    if not isinstance(reference, Mapping) or "edges" not in reference or "counts" not in reference:
        raise ValueError(
            'reference_top1 must be {"edges": [...], "counts": [...] or {name: [...]}}'
        )
    edges, counts = reference["edges"], reference["counts"]
    if isinstance(counts, Mapping):
        if not counts:
            raise ValueError("reference_top1 counts map is empty")
        refs = {name: ReferenceHistogram(edges, c, psi_bins) for name, c in counts.items()}
        pooled = np.sum([np.asarray(c, dtype=np.float64) for c in counts.values()], axis=0)
        refs[""] = ReferenceHistogram(edges, pooled, psi_bins)
        return refs
    return {"": ReferenceHistogram(edges, counts, psi_bins)}
