"""A direct dense implementation of docs/DESIGN.md's definitions, for tests only.

Every pair score is materialised and every threshold comes from a full sort, so it
is slow and simple: the streaming engine must agree with it exactly.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from calibrate.consistency import eps_opis, opis, threshold_grid, utility


def pair_scores(x: np.ndarray) -> np.ndarray:
    """The engine's score definition: float64 inner product rounded to float32."""
    x64 = x.astype(np.float64)
    return (x64 @ x64.T).astype(np.float32)


def threshold(impostors: np.ndarray, far: float) -> float | None:
    """t*(a) by sorting: the smallest impostor score accepting at most floor(a M)."""
    m = len(impostors)
    k = int(np.floor(Fraction(repr(far)) * m))
    if k < 1:
        return None
    desc = np.sort(impostors)[::-1]
    v = desc[k]  # the (k+1)-th largest
    above = desc[desc > v]
    if len(above):
        return float(above.min())
    return float(np.nextafter(np.float32(v), np.float32(np.inf)))


class Dense:
    """All pairs of each dataset (rows grouped by dataset code ``ds``)."""

    def __init__(self, x: np.ndarray, labels: np.ndarray, ds: np.ndarray) -> None:
        self.labels, self.ds = labels, ds
        s = pair_scores(x)
        self.s = s
        i, j = np.triu_indices(len(x), 1)
        inside = ds[i] == ds[j]
        self.i, self.j, self.v = i[inside], j[inside], s[i, j][inside]
        self.same = labels[self.i] == labels[self.j]

    def impostors(self, k: int | None = None) -> np.ndarray:
        sel = ~self.same if k is None else ~self.same & (self.ds[self.i] == k)
        return self.v[sel]

    def genuine(self, k: int | None = None) -> np.ndarray:
        sel = self.same if k is None else self.same & (self.ds[self.i] == k)
        return self.v[sel]

    def class_curves(self, classes, grid: np.ndarray, beta: float) -> np.ndarray:
        """Utility per class (a (dataset, label) pair) at each grid threshold."""
        rows = []
        for k, lab in classes:
            a_in = (self.labels[self.i] == lab) & (self.ds[self.i] == k)
            b_in = (self.labels[self.j] == lab) & (self.ds[self.j] == k)
            gen = self.v[a_in & b_in]
            imp = self.v[a_in ^ b_in]
            tar = np.array([(gen >= t).mean() for t in grid])
            far = np.array([(imp >= t).mean() for t in grid])
            rows.append(utility(tar, far, beta))
        return np.array(rows)

    def dataset_curves(self, n_ds: int, grid: np.ndarray, beta: float) -> np.ndarray:
        rows = []
        for k in range(n_ds):
            gen, imp = self.genuine(k), self.impostors(k)
            tar = np.array([(gen >= t).mean() for t in grid])
            far = np.array([(imp >= t).mean() for t in grid])
            rows.append(utility(tar, far, beta))
        return np.array(rows)

    def opis_all(self, far_range, grid_size, beta, eps):
        """(overall OPIS, eps-OPIS, cross-dataset OPIS, eps-OPIS) on the pooled range."""
        imp = self.impostors()
        t_hi, t_lo = threshold(imp, far_range[0]), threshold(imp, far_range[1])
        if t_hi is None or t_lo is None:
            return None
        grid = threshold_grid(t_lo, t_hi, grid_size)
        classes = []
        for k in np.unique(self.ds):
            labs, n = np.unique(self.labels[self.ds == k], return_counts=True)
            classes += [(k, lab) for lab in labs[n >= 2]]
        cu = self.class_curves(classes, grid, beta)
        du = self.dataset_curves(int(self.ds.max()) + 1, grid, beta)
        return opis(cu), eps_opis(cu, eps), opis(du), eps_opis(du, eps)

    def recall_at_1(self) -> float:
        """Leave-one-out top-1 in the own dataset; ties between classes count as misses."""
        s = self.s.astype(np.float64).copy()
        np.fill_diagonal(s, -np.inf)
        s[self.ds[:, None] != self.ds[None, :]] = -np.inf
        same = self.labels[:, None] == self.labels[None, :]
        best_same = np.where(same, s, -np.inf).max(axis=1)
        best_other = np.where(~same, s, -np.inf).max(axis=1)
        has_pair = np.isfinite(best_same)
        return float((best_same > best_other)[has_pair].mean())


def test_reference_threshold_by_hand():
    imp = np.array([0.9, 0.8, 0.8, 0.5, 0.1, 0.1, 0.0, -0.2, -0.3, -0.5], np.float32)
    assert threshold(imp, 0.1) == pytest.approx(0.9)  # k=1: 2nd largest 0.8 is tied, so 0.9
    assert threshold(imp, 0.2) == pytest.approx(0.9)  # k=2: 0.8 would accept 3
    assert threshold(imp, 0.3) == pytest.approx(0.8)  # k=3: accepts 0.9, 0.8, 0.8
    assert threshold(imp, 0.05) is None  # k=0: not measurable
    top = threshold(np.array([0.7, 0.7, 0.1], np.float32), 0.5)  # k=1, top tied twice
    assert top == float(np.nextafter(np.float32(0.7), np.float32(2)))
