"""Per-class pair counts at a few fixed thresholds, accumulated block by block.

Each class gets, for every threshold t_g of its dataset's grid, the number of its
impostor pairs (one member in the class) and genuine pairs with s >= t_g. An
impostor pair is credited to the classes of both members, so a dataset's count is
the sum over its classes divided by two.
"""

from __future__ import annotations

import numpy as np


class GridCounts:
    """Counts of s >= grid[g] per class; each dataset may have its own grid (or none)."""

    def __init__(self, grids: list[np.ndarray | None], class_ds: np.ndarray) -> None:
        self.grids = grids
        self.class_ds = class_ds
        self.width = max((len(g) for g in grids if g is not None), default=0) + 1
        self.hist = np.zeros((len(class_ds), self.width), np.int64)

    def lowest(self) -> float:
        """Scores below this never reach any grid threshold."""
        lows = [float(g[0]) for g in self.grids if g is not None and len(g)]
        return min(lows) if lows else np.inf

    def add(self, dataset: int, values: np.ndarray, classes: np.ndarray) -> None:
        grid = self.grids[dataset]
        if grid is None or not len(values):
            return
        self.add_index(np.searchsorted(grid, values, side="right"), classes)

    def add_index(self, idx: np.ndarray, classes: np.ndarray) -> None:
        """Add values by their grid index: how many thresholds are <= the value."""
        keep = idx > 0
        flat = classes[keep] * self.width + idx[keep]
        self.hist += np.bincount(flat, minlength=self.hist.size).reshape(self.hist.shape)

    def at_least(self) -> np.ndarray:
        """(classes, width - 1): pairs with s >= grid[g]."""
        rev = np.cumsum(self.hist[:, ::-1], axis=1)[:, ::-1]
        return rev[:, 1:]
