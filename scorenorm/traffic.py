"""A tenant's impostor score tail, estimated from its unlabelled traffic.

Every served query is scored against the tenant's gallery items (or a sample of them).
Those query-item pairs are what a live FAR is about, and they outnumber a small
gallery's own pairs by far, but nobody labels them. The estimate rests on three facts:

- **Rank 1 carries the genuine pair.** A query is either *genuine* (one scored item is
  its own identity, and that item is its best match) or an *impostor of every item*.
  Leaving out each query's rank-1 pair removes the genuine pairs, so every pair of
  rank >= 2 is an impostor pair.
- **Leaving out rank 1 is not neutral** for an impostor query: its rank-1 pair is the
  highest of N impostor scores, and deep in the tail it is most of what lies above a
  threshold (for an accepted impostor it is the false accept). For N exchangeable
  scores with survival S(t), the pairs of rank >= 2 above t number on average
  ``N S - P(max >= t)`` for an impostor query and ``(N - 1) S`` for a genuine one
  (:func:`_solve`, which also leaves out the rest of the rank-1 item's identity when a
  gallery holds several items of one). Given the genuine share, the count above t is a known,
  increasing function of S(t), and S(t) is read off by inverting it, edge by edge.
  The rank-1 false accepts are thereby put back in expectation.
- **The genuine share comes from the rank-1 scores, judged against the gallery.** Each
  gallery item scored against the items of *other* identities is a query whose every
  pair is an impostor pair: the rank-1 scores of the gallery items are a sample of what
  an impostor query's rank-1 score looks like (:func:`null_maxima`). Queries whose
  rank-1 score lies below that sample's ``lam`` quantile are impostors in all but a few
  cases, and a share ``lam`` of all impostors land there, so their count divided by
  ``lam`` estimates the impostor queries (Storey's null-proportion estimator with an
  empirical null). It assumes, as the gallery-pair statistics of the tenant-tail map
  do, that enrolment images are drawn like query images.

Queries differ in how close they sit to everything (some are "hubs"), which makes the
maxima of different queries non-exchangeable. Scores are therefore taken relative to
each query's own location, the median of its rank >= 2 scores: the model above is
fitted to residuals ``r = (s - mu_q) / 2`` (halved so they stay in [-1, 1]), and S on
the similarity scale is the average over queries of ``S_r((t - mu_q) / 2)``. Past the
last edge with ``TAIL_PAIRS`` pairs of rank >= 2 above it, S decays exponentially at
the rate measured just before it, so a handful of counted pairs never reads as S = 0.
The measured bias, per tenant and pooled, is in docs/CONSISTENCY.md, "New customers".

All evidence is kept as weighted histograms on the fixed bins of scorenorm.histogram,
so it adds up across micro-batches, windows, replicas and restarts, and every process
that holds the same evidence computes the same fit.
"""

from __future__ import annotations

import functools
import io
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from scorenorm.histogram import NBINS, WIDTH, bin_of

LAMBDA = 0.7  # Storey's lambda: the null quantile below which rank-1 scores count
MIN_NULL = 5  # gallery items needed for an empirical null of rank-1 scores
TAIL_PAIRS = 20  # rank >= 2 pairs above an edge for S to be read there; beyond: extrapolated
COARSE = 4  # fine bins per fit bin: the fit solves on 1,024 edges
NEWTON = 8
REST_SAMPLE = 512  # rank >= 2 residuals binned per query at most (the rest by weight)
EDGES = -1.0 + WIDTH * np.arange(NBINS + 1)  # fine bin edges over [-1, 1]
FIT_EDGES = EDGES[::COARSE]


FISHER_CLIP = 0.9999  # |similarity| beyond which Fisher's z is held (z = +-4.95)
FISHER_SPAN = 2 * float(np.arctanh(FISHER_CLIP))


SHIFT = "shift"  # residual = (s - mu) / 2: the scale of the maps' traffic evidence
FISHER = "fisher"  # residual in Fisher's z: the scale of the live monitor's window
SCALES = (SHIFT, FISHER)


def residual(scores: np.ndarray, location: np.ndarray | float, scale: str = SHIFT) -> np.ndarray:
    """Scores relative to a query's location, on [-1, 1].

    ``shift``: (s - mu) / 2. ``fisher``: in Fisher's z (atanh of the cosine), where a
    query that sits close to everything does not have its scores squeezed against 1.
    Measured (docs/CONSISTENCY.md, "New customers"): the monitor reads the true FAR
    better in z (pooled 1.0-1.1x the truth at 1e-3 where the shift read 1.7-1.9x, and
    sane for an embedder whose scores all lie near 1), while the maps' thresholds are
    better calibrated from the shift (pooled FAR 0.9-1.0x at 1e-3 where z gave 1.4-1.6x).
    """
    if scale == SHIFT:
        return (np.asarray(scores, np.float64) - location) / 2.0
    z = np.arctanh(np.clip(np.asarray(scores, np.float64), -FISHER_CLIP, FISHER_CLIP))
    mu = np.arctanh(np.clip(np.asarray(location, np.float64), -FISHER_CLIP, FISHER_CLIP))
    return (z - mu) / FISHER_SPAN


@dataclass(frozen=True)
class Null:
    """What impostor "queries" score at rank 1: their best scores and their locations
    (the gallery's own items against the items of other identities, :func:`null_maxima`)."""

    tops: np.ndarray
    locations: np.ndarray

    def __len__(self) -> int:
        return len(self.tops)

    def residuals(self, scale: str) -> np.ndarray:
        return residual(self.tops, self.locations, scale)

    def quantile(self, scale: str, lam: float) -> float:
        """The ``lam`` quantile of the residuals in ``scale``: Storey's cut, read at every
        refit of a window against the same null (cached: the null is immutable)."""
        cache = self.__dict__.setdefault("_quantiles", {})
        key = (scale, lam)
        if key not in cache:
            cache[key] = float(np.quantile(self.residuals(scale), lam))
        return cache[key]


@dataclass
class TrafficFit:
    """The fitted residual survival S_r at FIT_EDGES and what stands behind it."""

    residual_survival: np.ndarray
    genuine_share: float
    queries: float
    pairs: float  # impostor pairs of the traffic, rank-1 pairs of impostor queries included
    locations: np.ndarray  # histogram (NBINS) of the queries' locations mu_q
    share_error: float = 0.5  # standard error of genuine_share
    rest_pairs: float = 0.0  # rank >= 2 pairs counted
    scale: str = SHIFT  # the residual scale it was fitted in

    def effective_pairs(self, level: float) -> float:
        """How many independent labelled impostor pairs the estimate at upper-tail
        ``level`` is worth: the same relative variance as a binomial count of that many.

        Two errors add up: the Poisson error of the rank >= 2 pairs counted above the level,
        and the error of the genuine share, which in the tail scales the whole estimate
        (S ~ count / (genuine share x pairs per query)). However much traffic comes, the
        second bounds the worth of the estimate, so traffic can never stand for more than
        about 1 / (level x (error / share)^2) pairs."""
        counted = max(self.rest_pairs * level, 1.0)
        relative = self.share_error / max(self.genuine_share, 0.05)
        return float(min(self.pairs, 1.0 / (level * (1.0 / counted + relative**2))))

    def residual_at(self, r: np.ndarray | float) -> np.ndarray:
        """S_r at residual(s) ``r`` (log-linear between edges, 0 past the last pair)."""
        return _log_interp(np.asarray(r, np.float64), FIT_EDGES, self.residual_survival, self._logs)

    @functools.cached_property
    def _logs(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return np.log(np.maximum(self.residual_survival, 1e-300))

    def survival(self) -> np.ndarray:
        """S(t) of the traffic's impostor pairs at every fine edge of the similarity scale:
        the queries' residual survival averaged over their locations."""
        weights = self.locations
        nz = np.flatnonzero(weights)
        if not len(nz):
            return np.zeros(NBINS + 1)
        centres = EDGES[nz] + WIDTH / 2
        out = np.zeros(NBINS + 1)
        for mu, w in zip(centres, weights[nz], strict=True):
            out += w * self.residual_at(residual(EDGES, mu, self.scale))
        return out / weights[nz].sum()

    def far(self, counts: np.ndarray, items: np.ndarray) -> float:
        """Per-pair FAR of a set of decisions: ``counts[b]`` decisions with ``items[b]``
        scored items in all had their threshold's residual in fine bin b. NaN without any."""
        centres = EDGES[:-1] + WIDTH / 2
        s = self.residual_at(centres)
        pairs = items - self.genuine_share * counts
        total = float(pairs.sum())
        return float((pairs * s).sum() / total) if total > 0 else float("nan")


@dataclass(frozen=True)
class ScoredQueries:
    """Queries scored against the same items, reduced once, whatever scale they are then
    binned in (the server bins each micro-batch twice: the maps' evidence and the
    monitor's window).

    All items of the rank-1 item's identity are left out with it: when the query is
    genuine they are its genuine pairs. Beyond REST_SAMPLE items the other scores are read
    at a fixed stride (each standing for its share): the cost per query stays bounded,
    and the same scores always give the same evidence."""

    items: int  # N, the items every query was scored against
    top: np.ndarray  # each query's rank-1 score
    rest: np.ndarray  # the rank >= 2 scores read (-1 where left out, with weight 0)
    weights: np.ndarray  # how many pairs each read score stands for
    location: np.ndarray  # mu_q: the median of the query's rank >= 2 scores read
    group: np.ndarray  # items sharing the query's rank-1 identity
    weight: float = 1.0

    @staticmethod
    def usable(scores: np.ndarray) -> bool:
        return scores.ndim == 2 and scores.shape[1] >= 2 and len(scores) > 0

    @classmethod
    def of(
        cls, scores: np.ndarray, identities: np.ndarray | None = None, weight: float = 1.0
    ) -> ScoredQueries:
        scores = np.asarray(scores, dtype=np.float64)
        q, n = scores.shape
        best = scores.argmax(axis=1)
        top = scores[np.arange(q), best]
        cols = np.arange(0, n, -(-n // REST_SAMPLE)) if n - 1 > REST_SAMPLE else np.arange(n)
        sample = scores[:, cols]
        if identities is None:
            group = np.ones(q)
            out = cols[None, :] == best[:, None]  # rank 1, where the columns meet it
        else:
            ids = np.asarray(identities)
            same = ids[None, :] == ids[best][:, None]  # q x n: the rank-1 identity
            group = same.sum(axis=1).astype(np.float64)
            out = same[:, cols]
        counted = (~out).sum(axis=1)
        weights = np.where(out, 0.0, weight * ((n - group) / np.maximum(counted, 1))[:, None])
        location = np.where(counted > 0, _row_medians(sample, out, counted), top)
        rest = np.where(out, -1.0, sample)
        return cls(n, top, rest, weights, location, group, weight)

    def binned(self, scale: str) -> BinnedQueries:
        """Fine-bin indices of the residuals in ``scale``, ready to add to tails."""
        return BinnedQueries(
            scale=scale,
            items=self.items,
            top=bin_of(residual(self.top, self.location, scale)),
            rest=bin_of(residual(self.rest, self.location[:, None], scale).ravel()),
            rest_weights=self.weights.ravel(),
            locations=bin_of(self.location),
            weight=self.weight,
            kept=self.weight * float((self.items - self.group).sum()),
            grouped=self.weight * float(self.group.sum()),
        )


@dataclass(frozen=True)
class BinnedQueries:
    """:class:`ScoredQueries` binned in one scale: what a :class:`TrafficTail` adds."""

    scale: str
    items: int
    top: np.ndarray
    rest: np.ndarray
    rest_weights: np.ndarray
    locations: np.ndarray
    weight: float
    kept: float
    grouped: float


def _row_medians(values: np.ndarray, out: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """The median of each row's values outside ``out`` (np.nanmedian's result, without its
    masked-array path, which cost most of a one-query micro-batch)."""
    ranked = np.sort(np.where(out, np.inf, values), axis=1)
    c = np.maximum(counted, 1)
    rows = np.arange(len(values))
    return (ranked[rows, (c - 1) // 2] + ranked[rows, c // 2]) / 2.0


@dataclass
class TrafficTail:
    """Unlabelled evidence of one tenant, as weighted histograms of residuals (fine bins):
    rank >= 2 scores (``rest``), rank-1 scores per number N of scored items (``top``) and
    the queries' locations (``locations``). Additive: windows subtract what leaves them,
    replicas add each other's."""

    rest: np.ndarray = field(default_factory=lambda: np.zeros(NBINS))
    top: dict[int, np.ndarray] = field(default_factory=dict)
    locations: np.ndarray = field(default_factory=lambda: np.zeros(NBINS))
    kept: float = 0.0  # items outside each query's rank-1 identity, summed over queries
    grouped: float = 0.0  # items of each query's rank-1 identity, summed over queries
    scale: str = SHIFT  # residual scale of every histogram here (scorenorm.traffic.residual)

    @property
    def queries(self) -> float:
        return float(self.locations.sum())

    def add_scores(
        self, scores: np.ndarray, identities: np.ndarray | None = None, weight: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """Adds queries (rows) scored against the same items; returns each query's location
        and how many items share its rank-1 item's identity (callers turn a threshold into
        the residual they count against, and count the pairs behind it).

        ``identities``: the items' enrolment identities (None: every item its own); see
        :class:`ScoredQueries`, which does the work once when several tails (scales) take
        the same scores."""
        scores = np.asarray(scores, dtype=np.float64)
        if not ScoredQueries.usable(scores):
            return np.zeros(len(scores)), np.ones(len(scores))
        scored = ScoredQueries.of(scores, identities, weight)
        self.add(scored)
        return scored.location, scored.group

    def add(self, scored: ScoredQueries) -> None:
        """Bins reduced queries in this tail's scale."""
        self.add_binned(scored.binned(self.scale))

    def add_binned(self, binned: BinnedQueries) -> None:
        """Adds queries already binned in this tail's scale (binned once, added to a
        window's chunk and total alike)."""
        if binned.scale != self.scale:
            raise ValueError(f"queries binned in {binned.scale!r}, tail in {self.scale!r}")
        hist = self.top.setdefault(size_key(binned.items), np.zeros(NBINS))
        np.add.at(hist, binned.top, binned.weight)
        np.add.at(self.rest, binned.rest, binned.rest_weights)
        np.add.at(self.locations, binned.locations, binned.weight)
        self.kept += binned.kept
        self.grouped += binned.grouped

    def absorb(self, other: TrafficTail, sign: float = 1.0) -> None:
        """Adds ``other`` in place (the serving path: no copies of the histograms)."""
        _same_scale(self, other)
        self.rest += sign * other.rest
        self.locations += sign * other.locations
        self.kept += sign * other.kept
        self.grouped += sign * other.grouped
        for n, h in other.top.items():
            mine = self.top.get(n)
            if mine is None:
                self.top[n] = sign * h
            else:
                mine += sign * h

    def merged(self, other: TrafficTail, sign: float = 1.0) -> TrafficTail:
        _same_scale(self, other)
        top = {n: h.copy() for n, h in self.top.items()}
        for n, h in other.top.items():
            top[n] = top.get(n, np.zeros(NBINS)) + sign * h
        top = {n: h for n, h in top.items() if h.sum() > 1e-9}
        return TrafficTail(
            self.rest + sign * other.rest,
            top,
            self.locations + sign * other.locations,
            self.kept + sign * other.kept,
            self.grouped + sign * other.grouped,
            self.scale,
        )

    def scaled(self, factor: float) -> TrafficTail:
        return TrafficTail(
            self.rest * factor,
            {n: h * factor for n, h in self.top.items()},
            self.locations * factor,
            self.kept * factor,
            self.grouped * factor,
            self.scale,
        )

    def fit(self, null: Null | None = None, lam: float = LAMBDA) -> TrafficFit | None:
        """S_r and the genuine share; None without traffic.

        ``null``: residual rank-1 scores of known impostor "queries", the gallery's own
        items against the other items (:func:`null_maxima`). The share of queries whose
        rank-1 residual lies below the null's ``lam`` quantile, divided by ``lam``, is
        Storey's estimate of the impostor share. Without a null (fewer than
        ``MIN_NULL`` items) the share is taken as one half."""
        sizes = {n: float(h.sum()) for n, h in self.top.items() if h.sum() > 0}
        queries = sum(sizes.values())
        if queries <= 0:
            return None
        genuine, error = 0.5, 0.5  # without a gallery to judge by: a guess, worth little
        if null is not None and len(null) >= MIN_NULL:
            cut = int(bin_of(null.quantile(self.scale, lam)))
            below = sum(float(h[:cut].sum()) for h in self.top.values())
            genuine = 1.0 - min(1.0, below / (lam * queries))
            error = _share_error(below / queries, queries, lam, 1.0 - genuine, len(null))
        coarse = self.rest.reshape(-1, COARSE).sum(axis=1)
        above = np.concatenate([np.cumsum(coarse[::-1])[::-1], [0.0]])
        grouped = self.grouped if self.grouped > 0 else queries
        survival = _continue_tail(
            _solve(above, sizes, genuine, grouped),
            above,
            _solve(above + 3.0, sizes, genuine, grouped),
        )
        pairs = sum(c * n for n, c in sizes.items()) - genuine * grouped
        rest = float(self.rest.sum())
        return TrafficFit(
            survival, genuine, queries, pairs, self.locations.copy(), error, rest, self.scale
        )

    # ------------------------------------------------------------------ persistence
    def to_bytes(self) -> bytes:
        """Compressed arrays (published to a shared store, so a few kB per tenant)."""
        buffer = io.BytesIO()
        tops = {f"top_{n}": h for n, h in self.top.items()}
        totals = np.array([self.kept, self.grouped, SCALES.index(self.scale)])
        np.savez_compressed(buffer, rest=self.rest, locations=self.locations, totals=totals, **tops)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, blob: bytes) -> TrafficTail:
        """The inverse of :meth:`to_bytes`; anything else (truncated, another format) is a
        ValueError, so a reader can skip one bad row and keep the others."""
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as data:
                arrays = {k: np.asarray(data[k], np.float64) for k in data.files}
        except (OSError, EOFError, zipfile.BadZipFile, KeyError) as err:
            raise ValueError(f"unreadable traffic evidence: {err}") from err
        kept, grouped, scale = arrays.pop("totals", np.zeros(3))
        missing = {"rest", "locations"} - arrays.keys()
        if missing:
            raise ValueError(f"traffic evidence lacks {sorted(missing)}")
        if float(scale) not in range(len(SCALES)):
            raise ValueError(f"traffic evidence in unknown residual scale {scale!r}")
        for name, array in arrays.items():
            if array.shape != (NBINS,):
                raise ValueError(f"traffic evidence array {name!r} has shape {array.shape}")
        top = {int(k[4:]): v for k, v in arrays.items() if k.startswith("top_")}
        return cls(
            arrays["rest"],
            top,
            arrays["locations"],
            float(kept),
            float(grouped),
            SCALES[int(scale)],
        )

    def to_json(self) -> dict[str, Any]:
        """Sparse form: only non-empty bins (evidence rows in a shared store stay small)."""
        return {
            "bins": NBINS,
            "rest": _sparse(self.rest),
            "locations": _sparse(self.locations),
            "top": {str(n): _sparse(h) for n, h in self.top.items()},
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> TrafficTail:
        if int(raw["bins"]) != NBINS:
            raise ValueError(f"traffic evidence has {raw['bins']} bins; this build reads {NBINS}")
        return cls(
            _dense(raw["rest"]),
            {int(n): _dense(h) for n, h in raw["top"].items()},
            _dense(raw["locations"]),
        )


def size_key(n: int) -> int:
    """The number of scored items a query's rank-1 histogram is filed under: two
    significant digits, so a growing gallery does not open a histogram per size."""
    n = int(n)
    if n < 100:
        return n
    scale = 10 ** (len(str(n)) - 2)
    return int(round(n / scale) * scale)


def pooled(tails: Iterable[TrafficTail]) -> TrafficTail:
    out = TrafficTail()
    for t in tails:
        out = out.merged(t)
    return out


def _solve(
    above: np.ndarray, sizes: Mapping[int, float], genuine: float, grouped: float
) -> np.ndarray:
    """S_r at every fit edge such that the expected count of kept pairs above it equals
    the observed one.

    A genuine query keeps its N - m impostor items (m: the items of its rank-1
    identity): ``(N - m) S`` above t. An impostor query keeps all but its rank-1
    identity: ``N S - P(max of N >= t) (1 + (m - 1) S)``, its best item being the false
    accept and the rest of that identity lying below it. Summed over queries with the
    genuine share ``genuine`` and the mean group size, f(S) starts at a positive slope
    and is nearly convex; Newton steps from the all-genuine solution (left of the root)
    converge in a few steps."""
    queries = sum(sizes.values())
    items = sum(c * n for n, c in sizes.items())
    group = grouped / max(queries, 1e-12)
    linear = items - genuine * grouped  # the impostor pairs per unit S
    out = np.clip(above / max(items - grouped, 1e-12), 0.0, 1.0)
    inside = (above > 0) & (out < 1.0)
    target = above[inside]
    s = out[inside]
    for _ in range(NEWTON):
        p_max = np.zeros_like(s)
        slope = np.zeros_like(s)
        for n, c in sizes.items():
            miss = (1.0 - s) ** (n - 1)
            p_max += c * (1.0 - miss * (1.0 - s))
            slope += c * n * miss
        lift = 1.0 + (group - 1.0) * s
        f = linear * s - (1.0 - genuine) * lift * p_max - target
        df = linear - (1.0 - genuine) * ((group - 1.0) * p_max + lift * slope)
        s = np.clip(s - f / np.maximum(df, 1e-12), 0.0, 1.0)
    out[inside] = s
    return np.minimum.accumulate(out)  # non-increasing despite rounding


def _log_interp(
    x: np.ndarray, edges: np.ndarray, values: np.ndarray, logs: np.ndarray | None = None
) -> np.ndarray:
    """Interpolate a survival log-linearly (deep tails stay positive between edges)."""
    if logs is None:
        with np.errstate(divide="ignore"):
            logs = np.log(np.maximum(values, 1e-300))
    out = np.exp(np.interp(x, edges, logs))
    return np.where(np.interp(x, edges, values) <= 0, 0.0, out)


def _sparse(h: np.ndarray) -> list[list[float]]:
    nz = np.flatnonzero(np.abs(h) > 1e-12)
    return [[int(i), float(h[i])] for i in nz]


def _dense(pairs: list[list[float]]) -> np.ndarray:
    out = np.zeros(NBINS)
    for i, v in pairs:
        out[int(i)] = float(v)
    return out


def null_maxima(members: np.ndarray, identities: np.ndarray | None = None) -> Null:
    """Each gallery item's rank-1 score against the items of other identities: a sample
    of what an impostor query's rank-1 score looks like."""
    x = np.asarray(members, np.float64)
    if len(x) < 3:
        return Null(np.zeros(0), np.zeros(0))
    s = x @ x.T
    ids = np.arange(len(x)) if identities is None else np.asarray(identities)
    s[ids[:, None] == ids[None, :]] = -np.inf
    return rank1_null(s)


def rank1_null(scores: np.ndarray) -> Null:
    """Each row's rank-1 score and location (the median of its other scores); ``-inf``
    marks pairs a row does not have. Rows with fewer than 3 scores are left out."""
    s = np.where(np.isfinite(scores), np.asarray(scores, np.float64), np.nan)
    s = s[(~np.isnan(s)).sum(axis=1) >= 3]
    if not len(s):
        return Null(np.zeros(0), np.zeros(0))
    best = np.nanargmax(s, axis=1)
    top = s[np.arange(len(s)), best]
    s[np.arange(len(s)), best] = np.nan
    return Null(top, np.nanmedian(s, axis=1))


def _same_scale(a: TrafficTail, b: TrafficTail) -> None:
    if a.scale != b.scale:
        raise ValueError(f"traffic evidence in {a.scale!r} and {b.scale!r} residuals")


def _share_error(below: float, queries: float, lam: float, impostors: float, null: int) -> float:
    """Standard error of Storey's genuine share: the binomial error of the share of queries
    below the cut, and the error of the cut itself (the ``lam`` quantile of ``null``
    gallery items), which moves the impostors' share below it by about
    sqrt(lam (1 - lam) / null)."""
    counting = np.sqrt(max(below * (1 - below), 1e-4) / max(queries, 1.0)) / lam
    cut = impostors * np.sqrt(lam * (1 - lam) / max(null, 1)) / lam
    return float(np.hypot(counting, cut))


def _continue_tail(survival: np.ndarray, above: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """Beyond the last edge with TAIL_PAIRS pairs of rank >= 2 above it, S decays
    exponentially at the rate measured between 4x that many pairs and there: a few
    counted pairs say little, and none would say S = 0. It never exceeds ``upper``, what
    the count above each edge allows at 95% (the count plus 3: zero pairs of many are
    evidence too, and a light tail that ends must not be extrapolated as a heavy one)."""
    enough = np.flatnonzero(above >= TAIL_PAIRS)
    wide = np.flatnonzero(above >= 4 * TAIL_PAIRS)
    if not len(enough) or not len(wide):
        return survival
    b, a = int(enough[-1]), int(wide[-1])
    if b <= a or survival[a] <= 0 or survival[b] <= 0:
        return survival
    rate = (np.log(survival[b]) - np.log(survival[a])) / (FIT_EDGES[b] - FIT_EDGES[a])
    out = survival.copy()
    out[b:] = np.minimum(survival[b] * np.exp(rate * (FIT_EDGES[b:] - FIT_EDGES[b])), upper[b:])
    return np.minimum.accumulate(out)
