"""Exact order statistics of the impostor scores without keeping the scores.

Small target FARs put every threshold in the top tail of the impostor scores. The
first pass counts the scores below a cutoff with one comparison and bins only the
tail into ``NBINS`` equal-width bins (width 2/NBINS, far wider than the float32
GEMM error, so only scores close to a bin edge need an exact recomputation). That
tells, for any rank, which bin holds the score of that rank; a second pass keeps
the exact values that fall into those few bins (distinct values with counts).
Binning is a monotone function of the score, so both passes agree on which score
lies in which bin, and the result is the same order statistic a full sort of all
impostor scores gives, ties included.

Threshold rule (docs/DESIGN.md): with M impostor pairs and k = floor(a M), t*(a) is
the smallest threshold accepting at most k pairs, s >= t. Let v be the (k+1)-th
largest score: every t <= v accepts more than k, so t* is the smallest impostor
score above v. If no score lies above v (the top score is tied more than k times),
t* is the next float32 above v, which accepts none.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# The project's one binning (scorenorm): the global tail a calibration stores for the
# server's score normalisation is this histogram, so the bins must be the same.
from scorenorm.histogram import NBINS, bin_of

__all__ = ["NBINS", "Tail", "TailTooShortError", "bin_of", "pooled"]


class TailTooShortError(Exception):
    """A needed rank lies below the cutoff; the first pass must be redone lower."""


@dataclass
class Tail:
    """Impostor scores of one dataset (or pooled): bulk count, tail bins, resolved bins."""

    total: int  # all impostor pairs
    counts: np.ndarray = field(default_factory=lambda: np.zeros(NBINS, np.int64))
    resolved: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def add_tail(self, values: np.ndarray) -> None:
        self.counts += np.bincount(bin_of(values), minlength=NBINS)

    def add_exact(self, values: np.ndarray, bins: np.ndarray) -> None:
        """Merge exact values of selected bins (``bins`` holds each value's bin)."""
        for b in np.unique(bins):
            v, c = np.unique(values[bins == b], return_counts=True)
            self.merge_bin(int(b), v, c)

    def merge_bin(self, b: int, v: np.ndarray, c: np.ndarray) -> None:
        old = self.resolved.get(b)
        if old is not None:
            v, inv = np.unique(np.concatenate([old[0], v]), return_inverse=True)
            c = np.bincount(inv, weights=np.concatenate([old[1], c])).astype(np.int64)
        self.resolved[b] = (v, c.astype(np.int64))

    @property
    def in_tail(self) -> int:
        return int(self.counts.sum())

    def _above(self) -> np.ndarray:
        """above[b] = tail scores in bins > b."""
        cum = np.cumsum(self.counts[::-1])[::-1]
        return np.r_[cum[1:], 0]

    def bins_for_rank(self, k: int) -> list[int]:
        """The bins a second pass must resolve to find t* for 'at most k accepted'."""
        if k + 1 > self.in_tail:
            raise TailTooShortError(k)
        above = self._above()
        b = self._rank_bin(above, k)
        nxt = np.flatnonzero(self.counts[b + 1 :])
        return [b] + ([b + 1 + int(nxt[0])] if len(nxt) else [])

    def _rank_bin(self, above: np.ndarray, k: int) -> int:
        # the bin holding the (k+1)-th largest: the highest b with above[b] + counts[b] >= k+1
        return int(np.flatnonzero(above + self.counts >= k + 1)[-1])

    def threshold(self, k: int) -> tuple[float, int]:
        """(t*, scores >= t*) for 'at most k accepted'; needs bins_for_rank(k) resolved."""
        above = self._above()
        b = self._rank_bin(above, k)
        vals, cnts = self.resolved[b]
        order = np.arange(len(vals))[::-1]  # descending
        cum = above[b] + np.cumsum(cnts[order])
        pos = int(np.flatnonzero(cum >= k + 1)[0])  # v = vals[order[pos]]
        v_index = order[pos]
        accepted = int(cum[pos] - cnts[v_index])
        if v_index + 1 < len(vals):
            return float(vals[v_index + 1]), accepted
        nxt = np.flatnonzero(self.counts[b + 1 :])
        if len(nxt):
            nb = b + 1 + int(nxt[0])
            return float(self.resolved[nb][0][0]), accepted
        up = np.nextafter(np.float32(vals[v_index]), np.float32(np.inf))
        return float(up), accepted

    def count_at_least(self, t: float) -> int:
        """Impostor scores >= t, exact when t's bin is resolved or empty (t above cutoff)."""
        b = int(bin_of(np.array([t], np.float64))[0])
        base = int(self._above()[b])
        if self.counts[b] == 0:
            return base
        vals, cnts = self.resolved[b]
        return base + int(cnts[vals >= t].sum())


def pooled(tails: list[Tail]) -> Tail:
    """The pooled tail of several datasets (same cutoff, same resolved bins)."""
    out = Tail(total=sum(t.total for t in tails))
    for t in tails:
        out.counts += t.counts
        for b, (v, c) in t.resolved.items():
            out.merge_bin(b, v, c)
    return out
