"""The three blocked passes of an evaluation over the pairs of every dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from calibrate.grids import GridCounts
from calibrate.prepare import Prepared
from calibrate.sweep import Block, Genuine, ScoreFn, sweep
from calibrate.tail import NBINS, Tail, bin_of

SENTINEL_FLOOR = -3.0  # below every real score, above the -inf of ignored pairs
SAMPLE_ROWS = 512
SAFETY = 1.5  # the sampled cutoff aims this many times deeper than needed
CACHE_BYTES = 1 << 28  # tail pairs kept from pass 1 (12 bytes each) to skip passes 2 and 3


class TailCache:
    """The exact tail pairs of pass 1, kept while they fit in ``CACHE_BYTES``.

    When they fit, passes 2 and 3 read them instead of recomputing every block;
    the numbers are the same either way (tests compare both routes).
    """

    def __init__(self, n_datasets: int, budget: int) -> None:
        self.parts: list[list[tuple[np.ndarray, np.ndarray, np.ndarray]]] | None = [
            [] for _ in range(n_datasets)
        ]
        self.budget, self.used = budget, 0

    def add(self, k: int, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
        if self.parts is None:
            return
        self.used += 12 * len(vals)
        if self.used > self.budget:
            self.parts = None  # too big: passes 2 and 3 sweep the blocks again
            return
        self.parts[k].append((rows.astype(np.int32), cols.astype(np.int32), vals))

    @property
    def kept(self) -> bool:
        return self.parts is not None

    def dataset(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        assert self.parts is not None
        got = self.parts[k]
        if not got:
            e = np.zeros(0, np.int32)
            return e, e, np.zeros(0, np.float32)
        return tuple(np.concatenate(p) for p in zip(*got, strict=True))  # type: ignore[return-value]


@dataclass
class TailPass:
    tails: list[Tail]
    best_impostor: np.ndarray  # per sorted row: highest impostor score (-inf if none)
    genuine: Genuine
    cache: TailCache


class Engine:
    """Runs the passes with one score function and block size."""

    def __init__(
        self,
        prep: Prepared,
        score_fn: ScoreFn,
        block: int,
        tick: Callable[[], None] | None = None,
    ) -> None:
        self.prep, self.score_fn, self.block, self.tick = prep, score_fn, block, tick

    def _sweep(self, visit: Callable[[Block], None], collect: bool = False) -> Genuine | None:
        return sweep(
            self.prep,
            visit,
            block=self.block,
            score_fn=self.score_fn,
            collect_genuine=collect,
            tick=self.tick,
        )

    def cutoff(self, fraction: float, seed: int) -> float:
        """A score below which no needed rank lies, estimated on a sample of rows.

        Only the scores above it are binned; the rest are merely not counted. If the
        estimate is too high the caller redoes the pass with no cutoff.
        """
        want = SAFETY * fraction
        if want >= 0.5:
            return SENTINEL_FLOOR
        rng = np.random.default_rng(seed)
        cut = np.inf
        prep = self.prep
        for k in range(prep.n_datasets):
            rows = np.arange(prep.ds_start[k], prep.ds_stop[k])
            pick = np.sort(rng.choice(rows, size=min(SAMPLE_ROWS, len(rows)), replace=False))
            s = prep.x32[pick] @ prep.x32[rows].T
            s = s[prep.cls[pick][:, None] != prep.cls[rows][None, :]]
            if len(s) * want < 50:  # too few sampled impostors to place a quantile
                return SENTINEL_FLOOR
            cut = min(cut, float(np.quantile(s, 1.0 - want, method="lower")))
        return cut

    def tail_pass(self, cutoff: float) -> TailPass:
        """Pass 1: tail bins per dataset, best impostor per row, the genuine pairs."""
        prep = self.prep
        tails = [Tail(total=prep.impostor_pairs(k)) for k in range(prep.n_datasets)]
        best = np.full(len(prep.x), -np.inf, np.float32)
        cut = max(cutoff, SENTINEL_FLOOR)
        cache = TailCache(prep.n_datasets, CACHE_BYTES)

        def visit(b: Block) -> None:
            r, q, v = b.above(cut)
            tails[b.dataset].add_tail(v)
            cache.add(b.dataset, r + b.i0, q + b.j0, v)
            np.maximum.at(best, r + b.i0, v)  # the best impostor when it is in the tail
            np.maximum.at(best, q + b.j0, v)
            for axis in (1, 0):  # rows whose best impostor may lie under the cutoff
                idx, val = b.best(axis, below=cut + b.margin)
                np.maximum.at(best, idx, val)

        genuine = self._sweep(visit, collect=True)
        assert genuine is not None
        return TailPass(tails, best, genuine, cache)

    def resolve_pass(self, first: TailPass, bins: set[int], cutoff: float) -> None:
        """Pass 2: exact values (with counts) of the scores in the selected bins."""
        if not bins:
            return
        table = np.zeros(NBINS, bool)
        table[list(bins)] = True
        tails = first.tails

        def take(k: int, v: np.ndarray) -> None:
            vb = bin_of(v)
            sel = table[vb]
            if sel.any():
                tails[k].add_exact(v[sel], vb[sel])

        if first.cache.kept:
            for k in range(self.prep.n_datasets):
                take(k, first.cache.dataset(k)[2])
            return
        cut = max(cutoff, SENTINEL_FLOOR)
        self._sweep(lambda b: take(b.dataset, b.above(cut)[2]))

    def grid_pass(self, first: TailPass, counts: list[GridCounts]) -> None:
        """Pass 3: per-class impostor counts at the thresholds of every grid."""
        low = min(c.lowest() for c in counts)
        if not np.isfinite(low):
            return
        cls = self.prep.cls

        def take(k: int, rows: np.ndarray, cols: np.ndarray, v: np.ndarray) -> None:
            if not len(v):
                return
            members = np.concatenate([cls[rows], cls[cols]])
            both = np.concatenate([v, v])
            for c in counts:
                c.add(k, both, members)

        if first.cache.kept:
            for k in range(self.prep.n_datasets):
                rows, cols, v = first.cache.dataset(k)
                sel = v >= low
                take(k, rows[sel], cols[sel], v[sel])
            return

        def visit(b: Block) -> None:
            r, q, v = b.above(low)
            take(b.dataset, r + b.i0, q + b.j0, v)

        self._sweep(visit)


def genuine_grid_counts(prep: Prepared, genuine: Genuine, counts: GridCounts) -> GridCounts:
    """Per-class genuine counts on the same grids (each pair counted once, for its class)."""
    out = GridCounts(counts.grids, counts.class_ds)
    cls = prep.cls[genuine.rows]
    ds = prep.class_ds[cls]
    for k in range(prep.n_datasets):
        sel = ds == k
        out.add(k, genuine.scores[sel], cls[sel])
    return out
