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
SAMPLE_ROWS = 256
SAFETY = 4.0  # the sampled cutoff aims this many times deeper than needed


@dataclass
class TailPass:
    tails: list[Tail]
    best_impostor: np.ndarray  # per sorted row: highest impostor score (-inf if none)
    genuine: Genuine


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
            pick = rng.choice(rows, size=min(SAMPLE_ROWS, len(rows)), replace=False)
            s = self.score_fn(prep.x[pick], prep.x[rows])
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

        def visit(b: Block) -> None:
            s = b.scores
            tails[b.dataset].add_tail(s[s >= cut])
            rows = slice(b.i0, b.i0 + s.shape[0])
            cols = slice(b.j0, b.j0 + s.shape[1])
            np.maximum(best[rows], s.max(axis=1), out=best[rows])
            np.maximum(best[cols], s.max(axis=0), out=best[cols])

        genuine = self._sweep(visit, collect=True)
        assert genuine is not None
        return TailPass(tails, best, genuine)

    def resolve_pass(self, tails: list[Tail], bins: set[int], cutoff: float) -> None:
        """Pass 2: exact values (with counts) of the scores in the selected bins."""
        if not bins:
            return
        table = np.zeros(NBINS, bool)
        table[list(bins)] = True
        cut = max(cutoff, SENTINEL_FLOOR)

        def visit(b: Block) -> None:
            v = b.scores[b.scores >= cut]
            vb = bin_of(v)
            sel = table[vb]
            if sel.any():
                tails[b.dataset].add_exact(v[sel], vb[sel])

        self._sweep(visit)

    def grid_pass(self, counts: list[GridCounts]) -> None:
        """Pass 3: per-class impostor counts at the thresholds of every grid."""
        low = min(c.lowest() for c in counts)
        if not np.isfinite(low):
            return
        cls = self.prep.cls

        def visit(b: Block) -> None:
            r, q = np.nonzero(b.scores >= low)
            if not len(r):
                return
            v = b.scores[r, q]
            members = np.concatenate([cls[r + b.i0], cls[q + b.j0]])
            both = np.concatenate([v, v])
            for c in counts:
                c.add(b.dataset, both, members)

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
