"""The three blocked passes of an evaluation over the pairs of every dataset."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from calibrate.engine.grids import GridCounts
from calibrate.engine.prepare import Prepared
from calibrate.engine.sweep import (
    Block,
    Genuine,
    ScoreFn,
    exact_scores,
    n_blocks,
    nonzero2d,
    sweep,
    tolerance,
)
from calibrate.engine.tail import NBINS, Tail, bin_of

if TYPE_CHECKING:
    from calibrate.engine.distributed import Sharding

SENTINEL_FLOOR = -3.0  # below every real score, above the -inf of ignored pairs
SAMPLE_ROWS = 256
SAMPLE_COLS = 1 << 15  # the cutoff sample: SAMPLE_ROWS x SAMPLE_COLS pairs at most
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

    def parts_in_order(self):
        """(dataset, rows, cols, scores) block by block, as pass 1 stored them."""
        assert self.parts is not None
        for k, parts in enumerate(self.parts):
            for rows, cols, v in parts:
                yield k, rows, cols, v


@dataclass
class TailPass:
    tails: list[Tail]
    best_impostor: np.ndarray  # per sorted row: highest impostor score (-inf if none)
    genuine: Genuine
    cache: TailCache
    cutoff: float


class Engine:
    """Runs the passes with one score function and block size.

    With ``shard`` this process sweeps only its share of the blocks, and every pass
    ends by combining the ranks' accumulators (calibrate/engine/distributed.py), so each
    rank leaves a pass with the state a single process would have.
    """

    def __init__(
        self,
        prep: Prepared,
        score_fn: ScoreFn,
        block: int,
        tick: Callable[[], None] | None = None,
        shard: Sharding | None = None,
    ) -> None:
        self.prep, self.score_fn, self.block, self.tick = prep, score_fn, block, tick
        self.shard = shard
        self.sweeps = 0

    def _sweep(self, visit: Callable[[Block], None], collect: bool = False) -> Genuine | None:
        if self.sweeps and hasattr(self.tick, "grow"):
            self.tick.grow(n_blocks(self.prep, self.block))
        self.sweeps += 1
        return sweep(
            self.prep,
            visit,
            block=self.block,
            score_fn=self.score_fn,
            collect_genuine=collect,
            tick=self.tick,
            shard=self.shard,
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
            cols = np.sort(rng.choice(rows, size=min(SAMPLE_COLS, len(rows)), replace=False))
            s = prep.x32[pick] @ prep.x32[cols].T  # memory flat in N: a sample of pairs
            s = s[prep.cls[pick][:, None] != prep.cls[cols][None, :]]
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
            rows, cols, v = tail_pairs(b, cut)
            tails[b.dataset].add_tail(v)
            cache.add(b.dataset, rows, cols, v)
            for idx in (rows, cols):  # the best impostor, when it lies in the tail
                at, val = _block_best(b, idx, rows, cols, v)
                np.maximum.at(best, at, val)

        genuine = self._sweep(visit, collect=True)
        assert genuine is not None
        if self.shard is not None:
            best = self._reduce_tail_pass(tails, best, cache)
        self._best_below_cutoff(best)
        return TailPass(tails, best, genuine, cache, cutoff)

    def _reduce_tail_pass(self, tails: list[Tail], best: np.ndarray, cache: TailCache):
        """Sum the tail bins, take the max best impostor, agree on the cache route.

        Each rank's cache holds only its own blocks' tail pairs; passes 2 and 3 read
        it and reduce their outputs. If any rank dropped its cache, all sweep again.
        """
        shard = self.shard
        assert shard is not None
        for t in tails:
            t.counts = shard.sum_(t.counts)
        dropped = shard.sum_(np.array([0 if cache.kept else 1], np.int64))
        if int(dropped[0]):
            cache.parts = None
        return shard.max_(best)

    def _best_below_cutoff(self, best: np.ndarray) -> None:
        """Exact best impostor of the rows that have none in the tail (usually few)."""
        prep = self.prep
        tol = tolerance(prep.x.shape[1], self.score_fn)
        chunk = -1
        for k in range(prep.n_datasets):
            ds = prep.ds_rows(k)
            missing = ds.start + np.flatnonzero(~np.isfinite(best[ds]))
            for s0 in range(0, len(missing), self.block):
                chunk += 1
                if self.shard is not None and not self.shard.owns(chunk):
                    continue
                rows = missing[s0 : s0 + self.block]
                s = np.asarray(self.score_fn(prep.x32[rows], prep.x32[ds]), np.float32)
                s[prep.cls[rows][:, None] == prep.cls[ds][None, :]] = -np.inf
                top = s.max(axis=1)
                r, q = nonzero2d(s >= (top - tol)[:, None])
                v = exact_scores(prep.x32, rows[r], q + ds.start)
                np.maximum.at(best, rows[r], v)
        if self.shard is not None and chunk >= 0:
            best[:] = self.shard.max_(best)

    def resolve_pass(self, first: TailPass, bins: set[int], cutoff: float) -> None:
        """Pass 2: exact values (with counts) of the scores in the selected bins."""
        if not bins:
            return
        table = np.zeros(NBINS, bool)
        table[list(bins)] = True
        tails, x32 = first.tails, self.prep.x32
        tol = tolerance(self.prep.x.shape[1], self.score_fn)

        def take(k: int, rows: np.ndarray, cols: np.ndarray, v: np.ndarray) -> None:
            cand = _touches(table, bin_of(v - tol), bin_of(v + tol))
            exact = exact_scores(x32, rows[cand], cols[cand])
            vb = bin_of(exact)
            sel = table[vb]
            if sel.any():
                tails[k].add_exact(exact[sel], vb[sel])

        self._tail_route(first, cutoff, take)
        if self.shard is not None:
            _merge_resolved(tails, self.shard.gather([t.resolved for t in tails]))

    def grid_pass(self, first: TailPass, counts: list[GridCounts]) -> None:
        """Pass 3: per-class impostor counts at the thresholds of every grid."""
        low = min(c.lowest() for c in counts)
        if not np.isfinite(low):
            return
        cls, x32 = self.prep.cls, self.prep.x32
        tol = tolerance(self.prep.x.shape[1], self.score_fn)

        merged = [_MergedGrids([c.grids[k] for c in counts]) for k in range(self.prep.n_datasets)]

        def take(k: int, rows: np.ndarray, cols: np.ndarray, v: np.ndarray) -> None:
            sel = v >= low - tol
            rows, cols, v = rows[sel], cols[sel], v[sel]
            m = merged[k]
            pos = np.searchsorted(m.edges, v - tol, side="right")
            # a score with a threshold within the error bound is made exact and placed again
            unsure = np.flatnonzero(pos != np.searchsorted(m.edges, v + tol, side="right"))
            exact = exact_scores(x32, rows[unsure], cols[unsure])
            pos[unsure] = np.searchsorted(m.edges, exact, side="right")
            members = np.concatenate([cls[rows], cls[cols]])
            for c, below in zip(counts, m.below, strict=True):
                if below is not None:
                    idx = below[pos]
                    c.add_index(np.concatenate([idx, idx]), members)

        self._tail_route(first, first.cutoff, take)
        if self.shard is not None:
            for c in counts:
                c.hist = self.shard.sum_(c.hist)

    def _tail_route(self, first: TailPass, cutoff: float, take) -> None:
        """Feed pass 1's tail pairs to ``take``: from the cache, or by sweeping again."""
        if first.cache.kept:
            for k, rows, cols, v in first.cache.parts_in_order():
                take(k, rows, cols, v)
            return
        cut = max(cutoff, SENTINEL_FLOOR)
        self._sweep(lambda b: take(b.dataset, *tail_pairs(b, cut)))


def _merge_resolved(tails: list[Tail], per_rank: list[list[dict]]) -> None:
    """Replace each tail's resolved bins by the merge of every rank's (exact, any order)."""
    for k, t in enumerate(tails):
        t.resolved = {}
        for resolved in per_rank:
            for b in sorted(resolved[k]):
                v, c = resolved[k][b]
                t.merge_bin(b, v, c)


class _MergedGrids:
    """All thresholds of a dataset's grids in one sorted array.

    One search in it places a score among every grid at once: ``below[g][pos]`` is
    how many thresholds of grid g are <= a score with position ``pos``.
    """

    def __init__(self, grids: list[np.ndarray | None]) -> None:
        parts = [g for g in grids if g is not None]
        edges = np.concatenate(parts) if parts else np.zeros(0)
        owner = np.concatenate(
            [np.full(len(g), i) for i, g in enumerate(grids) if g is not None] or [np.zeros(0)]
        )
        order = np.argsort(edges, kind="stable")
        self.edges, owner = edges[order], owner[order]
        self.below = [
            None if g is None else np.r_[0, np.cumsum(owner == i)] for i, g in enumerate(grids)
        ]


def tail_pairs(b: Block, cut: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows, cols, scores) of a block's pairs with exact score >= cut.

    Scores are exact where it matters for pass 1 (near the cutoff, near a bin edge)
    and the float32 GEMM value elsewhere: within ``margin``, and in the right bin.
    Later passes refine again where their own boundaries demand it.
    """
    r, q = nonzero2d(b.scores >= cut - b.margin)
    a = b.scores[r, q]
    rows, cols = r + b.i0, q + b.j0
    need = (a < cut + b.margin) | (bin_of(a - b.margin) != bin_of(a + b.margin))
    v = _refine(b.x32, rows, cols, a, need)
    keep = v >= cut
    return rows[keep], cols[keep], v[keep]


def _refine(x32, rows, cols, v, need) -> np.ndarray:
    idx = np.flatnonzero(need)
    if not len(idx):
        return v
    v = v.copy()
    v[idx] = exact_scores(x32, rows[idx], cols[idx])
    return v


def _touches(table: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Whether any selected bin lies in [lo, hi], elementwise."""
    cum = np.r_[0, np.cumsum(table)]
    return cum[hi + 1] - cum[lo] > 0


def _block_best(b: Block, idx, rows, cols, v) -> tuple[np.ndarray, np.ndarray]:
    """Exact best tail score per row in ``idx`` within this block.

    v is exact or within margin/2 of exact, so a row's exact maximum is among the
    entries within ``margin`` of its largest v: only those are recomputed.
    """
    if not len(v):
        return idx, v
    base = b.i0 if idx is rows else b.j0
    local = idx - base
    top = np.full(int(local.max()) + 1, -np.inf, np.float32)
    np.maximum.at(top, local, v)
    cand = np.flatnonzero(v >= top[local] - b.margin)
    return idx[cand], exact_scores(b.x32, rows[cand], cols[cand])


def genuine_grid_counts(prep: Prepared, genuine: Genuine, counts: GridCounts) -> GridCounts:
    """Per-class genuine counts on the same grids (each pair counted once, for its class)."""
    out = GridCounts(counts.grids, counts.class_ds)
    cls = prep.cls[genuine.rows]
    ds = prep.class_ds[cls]
    for k in range(prep.n_datasets):
        sel = ds == k
        out.add(k, genuine.scores[sel], cls[sel])
    return out
