"""``evaluate``: global thresholds, per-dataset drift and OPIS in three blocked passes.

Pass 1 bins the tail of the impostor scores per dataset (and finds every row's best
impostor for Recall@1 and collects the genuine pairs); pass 2 resolves the few bins
holding the needed order statistics; pass 3 counts, per class, pairs above the
thresholds of the calibration grids. Memory is O(N D + counts): scores exist one
block at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import numpy as np

from calibrate.consistency import threshold_grid
from calibrate.engine.assemble import Measured, assemble
from calibrate.engine.bootstrap import class_bootstrap
from calibrate.engine.device import score_function
from calibrate.engine.grids import GridCounts
from calibrate.engine.passes import SENTINEL_FLOOR, Engine, genuine_grid_counts
from calibrate.engine.prepare import Prepared, prepare
from calibrate.engine.progress import Ticker
from calibrate.engine.results import Evaluation
from calibrate.engine.sweep import DEFAULT_BLOCK, n_blocks
from calibrate.engine.tail import Tail, TailTooShortError, bin_of, pooled
from imagesets import EmbeddingSet

BOOT_GRID = 512  # thresholds at which the bootstrap counts pairs
PLOT_GRID = 200  # thresholds of the FAR-vs-threshold plot


def evaluate(
    embeddings: EmbeddingSet | Sequence[EmbeddingSet],
    target_fars: Sequence[float] = (1e-3,),
    *,
    far_range: tuple[float, float] = (1e-4, 1e-2),
    grid_size: int = 101,
    beta: float = 1.0,
    eps: float = 0.05,
    bootstrap: int = 0,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    block: int = DEFAULT_BLOCK,
    distributed: bool = False,
    tail_level: float | None = None,
    thresholds: Sequence[float] | None = None,
) -> Evaluation:
    """Calibrate one global threshold per target FAR and measure its consistency.

    Datasets are the tenants of one EmbeddingSet, or the sets when several are given;
    pairs never cross datasets. Thresholds are exact order statistics of the impostor
    scores (docs/DESIGN.md); ``bootstrap`` > 0 adds class-bootstrap intervals.

    ``distributed=True`` shares the score blocks among the processes of torch.distributed's
    default process group (initialised by the caller, e.g. under torchrun with gloo);
    every process must call this with the same data and gets the same result, equal
    bit for bit to a single-process run.

    ``tail_level``: bin the pooled impostor tail at least down to this upper-tail level
    (``Evaluation.global_tail``, the F_G of score normalisation). ``thresholds``: one
    deployed similarity threshold per target FAR; everything is then measured at
    those instead of calibrating new ones (``python -m calibrate --check``).
    """
    targets = _check_settings(target_fars, far_range, grid_size, beta, eps, bootstrap, block)
    fixed = _check_fixed(thresholds, targets)
    prep = prepare(embeddings)
    score_fn, device_used = score_function(device)
    ranks = _Ranks(prep, targets, far_range, bootstrap > 0, tail_level)
    shard = None
    if distributed:
        from calibrate.engine.distributed import torch_sharding  # the only route that imports torch

        shard = torch_sharding()
        progress = progress and shard.rank == 0
    ticker = Ticker(n_blocks(prep, block), progress)  # grows if passes 2-3 must sweep
    engine = Engine(prep, score_fn, block, ticker, shard)
    try:
        measured = _measure(engine, ranks, grid_size, seed, bootstrap > 0, fixed)
    finally:
        ticker.close()
    if bootstrap > 0:
        measured = class_bootstrap(measured, bootstrap, seed)
    settings = {
        "far_range": [float(far_range[0]), float(far_range[1])],
        "grid_size": int(grid_size),
        "beta": float(beta),
        "eps": float(eps),
        "bootstrap": int(bootstrap),
        "device": device_used,
    }
    return assemble(measured, beta=beta, eps=eps, settings=settings)


def _measure(
    engine: Engine, ranks: _Ranks, grid_size: int, seed: int, boot: bool, fixed: list[float] | None
) -> Measured:
    prep = engine.prep
    cutoff = engine.cutoff(ranks.deepest_fraction(), seed)
    if fixed:  # counts at a deployed threshold need every score above it binned
        cutoff = min(cutoff, float(np.nextafter(np.float32(min(fixed)), np.float32(-np.inf))))
    first = engine.tail_pass(cutoff)
    try:
        bins = _bins(first.tails, ranks)
    except TailTooShortError:  # the sampled cutoff was too high: bin everything
        cutoff = SENTINEL_FLOOR
        first = engine.tail_pass(cutoff)
        bins = _bins(first.tails, ranks)
    if fixed:
        bins |= {int(b) for b in bin_of(np.asarray(fixed))}
    engine.resolve_pass(first, bins, cutoff)
    pool = pooled(first.tails)
    pool_t = _thresholds(pool, ranks.pool_k)
    ds_t = [_thresholds(t, ks) for t, ks in zip(first.tails, ranks.ds_k, strict=True)]
    pool_range = _range(pool_t)
    pooled_grid = None if pool_range is None else threshold_grid(*pool_range, grid_size)
    own_grids = [
        None if _range(ts) is None else threshold_grid(*_range(ts), grid_size) for ts in ds_t
    ]
    global_t = fixed or [pool_t[f"target{j}"] for j in range(len(ranks.targets))]
    target_grid = np.unique([t for t in global_t if t is not None]).astype(np.float64)
    boot_grid = None
    if boot and pool_t["boot"] is not None:
        boot_grid = np.linspace(pool_t["boot"], pool_t["top"], BOOT_GRID)
    n = prep.n_datasets
    plot_grid = _plot_grid(pool_range, global_t, ds_t, len(ranks.targets), cutoff)
    grids = {
        "pooled": GridCounts([pooled_grid] * n, prep.class_ds),
        "own": GridCounts(own_grids, prep.class_ds),
        "targets": GridCounts([target_grid if len(target_grid) else None] * n, prep.class_ds),
        "boot": GridCounts([boot_grid] * n, prep.class_ds),
        "plot": GridCounts([plot_grid] * n, prep.class_ds),
    }
    engine.grid_pass(first, list(grids.values()))
    genuine = {name: genuine_grid_counts(prep, first.genuine, g) for name, g in grids.items()}
    return Measured(
        prep=prep,
        ranks=ranks,
        tails=first.tails,
        pool=pool,
        pool_t=pool_t,
        ds_t=ds_t,
        global_t=global_t,
        pool_range=pool_range,
        own_ranges=[_range(ts) for ts in ds_t],
        best_impostor=first.best_impostor,
        genuine=first.genuine,
        impostor_counts=grids,
        genuine_counts=genuine,
    )


def _plot_grid(pool_range, global_t, ds_t, n_targets: int, cutoff: float) -> np.ndarray | None:
    """Thresholds for the FAR plots: the calibration range widened to every target threshold."""
    ts = [t for t in global_t if t is not None]
    ts += [d[f"target{j}"] for d in ds_t for j in range(n_targets) if d[f"target{j}"] is not None]
    if pool_range is not None:
        ts += list(pool_range)
    if not ts:
        return None
    lo, hi = min(ts), max(ts)
    pad = 0.05 * (hi - lo) + 1e-6
    return np.linspace(max(lo - pad, cutoff), hi + pad, PLOT_GRID)  # pass 1 kept only >= cutoff


def _bins(tails: list[Tail], ranks: _Ranks) -> set[int]:
    bins = _needed_bins(pooled(tails), ranks.pool_k)
    for tail, ks in zip(tails, ranks.ds_k, strict=True):
        bins |= _needed_bins(tail, ks)
    return bins


def _check_settings(target_fars, far_range, grid_size, beta, eps, bootstrap, block) -> list[float]:
    targets = [float(a) for a in ([target_fars] if np.isscalar(target_fars) else target_fars)]
    if not targets:
        raise ValueError("give at least one target FAR, e.g. 0.001")
    for a in targets:
        if not (0.0 < a < 1.0) or math.isnan(a):
            raise ValueError(f"target FAR must lie in (0, 1), got {a:g}; e.g. 0.001 for 1 in 1000")
    if len(set(targets)) != len(targets):
        raise ValueError(f"target FARs repeat: {targets}")
    lo, hi = (float(v) for v in far_range)
    if not (0.0 < lo < hi < 1.0):
        raise ValueError(f"far_range must be 0 < low < high < 1, got ({lo:g}, {hi:g})")
    if int(grid_size) < 2:
        raise ValueError(f"grid_size must be >= 2, got {grid_size}")
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if not 0.0 < eps <= 0.5:
        raise ValueError(f"eps must lie in (0, 0.5], got {eps}")
    if int(bootstrap) < 0:
        raise ValueError(f"bootstrap must be >= 0 resamples, got {bootstrap}")
    if int(block) < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    return targets


def _check_fixed(thresholds: Sequence[float] | None, targets: list[float]) -> list[float] | None:
    if thresholds is None:
        return None
    fixed = [float(t) for t in thresholds]
    if len(fixed) != len(targets):
        raise ValueError(f"{len(fixed)} thresholds for {len(targets)} target FARs: give one each")
    if not all(-1.0 <= t <= 1.0 + 1e-6 for t in fixed):
        raise ValueError(f"thresholds must be similarities in [-1, 1], got {fixed}")
    return fixed


def allowed_errors(far: float, pairs: int) -> int:
    """k = floor(a M), with a read as the decimal it prints as (0.29 * 100 is 29, not 28)."""
    return math.floor(Fraction(repr(float(far))) * pairs)


class _Ranks:
    """The order statistics needed, by name: each target, the range ends, the bootstrap span.

    Names map to a FAR; ``top`` (no impostor accepted) is only used to end the
    bootstrap grid. A rank with k < 1 is not measurable on that data.
    """

    def __init__(self, prep: Prepared, targets, far_range, boot: bool, tail_level=None) -> None:
        self.m_ds = [prep.impostor_pairs(k) for k in range(prep.n_datasets)]
        self.m = sum(self.m_ds)
        self.targets = list(targets)
        self.fars: dict[str, float] = {f"target{j}": a for j, a in enumerate(targets)}
        self.fars["far_lo"], self.fars["far_hi"] = far_range
        self.boot = boot
        if boot:
            self.fars["boot"] = min(0.5, 4 * max(*targets, far_range[1]))
        self.pool_k = self._ks(self.m, boot)
        self.ds_k = [self._ks(m, False) for m in self.m_ds]
        if tail_level is not None:  # only the pooled tail must reach it (global_tail)
            self.pool_k["tail_level"] = allowed_errors(min(float(tail_level), 0.5), self.m)

    def _ks(self, m: int, top: bool) -> dict[str, int]:
        ks = {name: allowed_errors(a, m) for name, a in self.fars.items()}
        if top:
            ks["top"] = 0
        return ks

    def deepest_fraction(self) -> float:
        """The largest fraction of any dataset's impostors that a needed rank reaches."""
        fr = [(k + 1) / m for m, ks in zip(self.m_ds, self.ds_k, strict=True) for k in ks.values()]
        fr += [(k + 1) / self.m for k in self.pool_k.values()]
        return max(fr)


def _needed_bins(tail: Tail, ks: dict[str, int]) -> set[int]:
    bins: set[int] = set()
    for name, k in ks.items():
        if k >= 1 or name == "top":
            bins.update(tail.bins_for_rank(k))
    return bins


def _thresholds(tail: Tail, ks: dict[str, int]) -> dict[str, float | None]:
    return {
        name: tail.threshold(k)[0] if (k >= 1 or name == "top") else None for name, k in ks.items()
    }


def _range(ts: dict[str, float | None]) -> tuple[float, float] | None:
    """(t_lo, t_hi): similarities where the FAR reaches far_hi and far_lo."""
    if ts["far_lo"] is None or ts["far_hi"] is None:
        return None
    return ts["far_hi"], ts["far_lo"]
