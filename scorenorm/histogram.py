"""Impostor score distributions as fixed-bin histograms, and their tail quantiles.

Both sides of the normalisation use this one representation: the calibration stores
the pooled impostor histogram of its data (the global distribution F_G), and the
server keeps one per tenant, updated pair by pair as items are enrolled and removed.
Fixed bins make both cheap: adding or removing a pair is one increment, persisting a
tail is a short run of counts, and the two never disagree on where a score falls.

Within a bin the scores are taken as spread evenly, so the survival function
S(s) = share of pairs with score >= s is continuous and piecewise linear, strictly
decreasing wherever there are scores; its inverse, the quantile at an upper-tail
level p, is what the quantile mapping reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

NBINS = 1 << 12  # equal-width bins over [-1, 1]: width 4.9e-4 in similarity
WIDTH = 2.0 / NBINS


def bin_of(values: np.ndarray) -> np.ndarray:
    """Monotone bin index over [-1, 1]; scores outside go to the end bins."""
    idx = np.floor((np.asarray(values, dtype=np.float64) + 1.0) * (NBINS / 2))
    if idx.ndim == 0:
        return np.int64(min(max(float(idx), 0.0), NBINS - 1))
    # np.minimum/np.maximum, not np.clip: its wrapper costs more than the work per query
    np.minimum(np.maximum(idx, 0, out=idx), NBINS - 1, out=idx)
    return idx.astype(np.int64)


def bin_floor(b: np.ndarray | int) -> np.ndarray:
    """Lower edge (similarity) of bin ``b``."""
    return -1.0 + np.asarray(b, dtype=np.float64) * WIDTH


@dataclass
class ScoreHistogram:
    """Counts of impostor pair scores per bin, out of ``total`` pairs.

    ``total`` may exceed the binned count: a calibration bins only the scores above a
    cutoff (the upper tail), and the rest are known only by number. The survival
    function is exact wherever the tail was binned, which is all the mapping reads.
    """

    counts: np.ndarray = field(default_factory=lambda: np.zeros(NBINS, np.int64))
    total: int = 0

    def __post_init__(self) -> None:
        self.counts = np.asarray(self.counts, dtype=np.int64)
        if self.counts.shape != (NBINS,):
            raise ValueError(f"a score histogram has {NBINS} bins, got {self.counts.shape}")
        if (self.counts < 0).any():
            raise ValueError("histogram counts must be >= 0")
        if self.total < int(self.counts.sum()):
            raise ValueError(f"total {self.total} < binned pairs {int(self.counts.sum())}")

    @classmethod
    def of(cls, scores: np.ndarray, total: int | None = None) -> ScoreHistogram:
        """The histogram of ``scores``; ``total`` counts pairs left out below them."""
        counts = np.bincount(bin_of(scores), minlength=NBINS)
        return cls(counts, len(scores) if total is None else int(total))

    def add(self, scores: np.ndarray, sign: int = 1) -> None:
        """Add (sign=1) or remove (sign=-1) pair scores; all of them are binned."""
        if not len(scores):
            return
        if len(scores) < 512:  # a few scores (online samples): no full-length bincount
            np.add.at(self.counts, bin_of(scores), sign)
        else:
            self.counts += sign * np.bincount(bin_of(scores), minlength=NBINS)
        self.total += sign * len(scores)

    def merged(self, other: ScoreHistogram) -> ScoreHistogram:
        return ScoreHistogram(self.counts + other.counts, self.total + other.total)

    @property
    def binned(self) -> int:
        return int(self.counts.sum())

    def _above(self) -> np.ndarray:
        """above[b] = binned pairs in bins > b."""
        cum = np.cumsum(self.counts[::-1])[::-1]
        return np.r_[cum[1:], 0]

    def survival(self, s: np.ndarray | float) -> np.ndarray:
        """S(s): share of all pairs with score >= s (linear inside a bin).

        Below the binned region the value is a lower bound (the unbinned pairs are
        not placed); callers only read it where the tail was binned.
        """
        s = np.asarray(s, dtype=np.float64)
        if self.total <= 0:
            return np.full(s.shape, np.nan)
        b = bin_of(s)
        frac = np.clip((bin_floor(b + 1) - s) / WIDTH, 0.0, 1.0)
        return (self._above()[b] + self.counts[b] * frac) / self.total

    def quantile(self, p: np.ndarray | float) -> np.ndarray:
        """The similarity s with S(s) = p (upper-tail level p), NaN where not binned.

        Inverse of :meth:`survival` on the binned tail: p = 0 gives the top of the
        highest non-empty bin; a level deeper into the bulk than the binned pairs
        reach is unknown here (NaN).
        """
        p = np.atleast_1d(np.asarray(p, dtype=np.float64))
        out = np.full(p.shape, np.nan)
        if self.total <= 0 or self.binned == 0:
            return out
        at_least = np.cumsum(self.counts[::-1])  # pairs in the top j+1 bins, non-decreasing
        want = p * self.total
        ok = (want >= 0) & (want <= self.binned)
        top = int(np.flatnonzero(self.counts)[-1])
        # the bin b holding level c: pairs in bins >= b reach c, pairs in bins > b do not
        b = NBINS - 1 - np.searchsorted(at_least, np.maximum(want[ok], 1e-300), side="left")
        above = at_least[NBINS - 1 - b] - self.counts[b]
        inside = (want[ok] - above) / self.counts[b]
        out[ok] = np.where(want[ok] > 0, bin_floor(b + 1) - inside * WIDTH, bin_floor(top + 1))
        return out

    # ------------------------------------------------------------------ documents
    def to_json(self) -> dict[str, Any]:
        """The non-empty run of bins: first bin, counts, total pairs."""
        nz = np.flatnonzero(self.counts)
        lo, hi = (int(nz[0]), int(nz[-1]) + 1) if len(nz) else (0, 0)
        return {
            "bins": NBINS,
            "first_bin": lo,
            "counts": [int(c) for c in self.counts[lo:hi]],
            "pairs": int(self.total),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ScoreHistogram:
        if int(raw["bins"]) != NBINS:
            raise ValueError(f"histogram has {raw['bins']} bins; this build reads {NBINS}")
        counts = np.zeros(NBINS, np.int64)
        lo = int(raw["first_bin"])
        run = np.asarray(raw["counts"], dtype=np.int64)
        if lo < 0 or lo + len(run) > NBINS:
            raise ValueError("histogram bins run past the end")
        counts[lo : lo + len(run)] = run
        return cls(counts, int(raw["pairs"]))


def mix(gallery: ScoreHistogram, online: ScoreHistogram, cap: float) -> ScoreHistogram:
    """Gallery pairs and online (query-gallery) pairs as one sample, the online share of
    the distribution at most ``cap``: a tenant's own traffic must not be able to drag
    its tail far from what its labelled gallery says."""
    if online.total == 0 or cap == 0:
        return gallery
    if gallery.total == 0:
        return online if cap == 1 else ScoreHistogram()
    total = gallery.total + online.total
    w = min(cap, online.total / total)
    mixed = (1 - w) * gallery.counts / gallery.total + w * online.counts / online.total
    counts = np.floor(mixed * total + 0.5).astype(np.int64)
    return ScoreHistogram(counts, max(total, int(counts.sum())))
