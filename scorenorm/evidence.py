"""A tenant's impostor tail from all it has: gallery pairs, its traffic, and a prior.

A new customer's tenant has few identities (a few dozen pairs at 1e-2 depth is
typical), so its own gallery pairs cannot say where its tail lies. Three sources are
combined, each for what it is good at:

- **gallery pairs** (enrolment labels, exact but few: N(N-1)/2 for N identities);
- **traffic** (scorenorm.traffic: the queries it is served, label-free; many pairs,
  estimated), its share of the evidence capped so that a tenant's own traffic cannot
  pull its threshold without bound;
- **a deployment-level prior**: the same evidence pooled over every tenant of the
  deployment. Tenants of one customer share a domain, and the pool measures how far
  that domain's tail lies from the calibration's. A tenant's own evidence shrinks
  toward this prior (empirical Bayes with ``prior_pairs`` pseudo-pairs) instead of
  toward the calibration set.

Where a tenant's own evidence runs out (fewer than ``min_errors`` pairs above a
level), its tail continues with the prior's *shape*, scaled to meet it there: the
shift is held in quantile space. The prior in turn continues with the calibration's
global tail beyond its own support. So every target, however deep, gets a threshold
from the deepest evidence available, instead of reverting to the raw threshold.

Everything is a :class:`Survival` on the fixed bin edges of scorenorm.histogram.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from scorenorm.histogram import NBINS, WIDTH, ScoreHistogram

EDGES = -1.0 + WIDTH * np.arange(NBINS + 1)


@dataclass(frozen=True)
class Survival:
    """S(t): the share of impostor pairs scoring >= t, at every bin edge, non-increasing
    from S(-1) = 1; ``pairs``: how many pairs (or pseudo-pairs) stand behind it."""

    values: np.ndarray
    pairs: float

    @classmethod
    def of_histogram(cls, hist: ScoreHistogram) -> Survival:
        """Exact wherever the histogram was binned (a calibration bins only its tail)."""
        if hist.total <= 0:
            return cls(np.zeros(NBINS + 1), 0.0)
        above = np.concatenate([np.cumsum(hist.counts[::-1])[::-1], [0]]).astype(np.float64)
        above[0] = max(above[0], hist.total)
        return cls(np.minimum(above / hist.total, 1.0), float(hist.total))

    def above(self) -> np.ndarray:
        """Pairs at or above each edge."""
        return self.values * self.pairs

    def at(self, t: np.ndarray | float) -> np.ndarray:
        return _log_interp(np.asarray(t, np.float64), self.values)

    def quantile(self, p: np.ndarray | float) -> np.ndarray:
        """The lowest similarity t with S(t) <= p (log-linear within a bin); NaN past the
        last pair (no level deeper than the data is read)."""
        p = np.atleast_1d(np.asarray(p, np.float64))
        out = np.full(p.shape, np.nan)
        s = self.values
        for i, level in enumerate(p):
            idx = int(np.searchsorted(-s, -level, side="left"))  # first edge with S <= level
            if idx >= len(s) or s[idx] <= 0 or level <= 0:
                continue
            if idx == 0:
                out[i] = EDGES[0]
                continue
            hi, lo = np.log(s[idx - 1]), np.log(s[idx])
            f = 1.0 if hi == lo else (hi - np.log(level)) / (hi - lo)
            out[i] = EDGES[idx - 1] + f * WIDTH
        return out

    def support_edge(self, min_errors: float) -> int:
        """Index of the highest edge with at least ``min_errors`` pairs at or above it
        (-1 when even the lowest has fewer)."""
        idx = np.flatnonzero(self.above() >= min_errors)
        return int(idx[-1]) if len(idx) else -1

    def continued(self, shape: Survival, min_errors: float) -> Survival:
        """Beyond this survival's support, ``shape`` scaled to meet it at the last
        supported edge (the shift held in quantile space)."""
        edge = self.support_edge(min_errors)
        if edge < 0 or shape.values[edge] <= 0:
            return self
        values = self.values.copy()
        values[edge:] = shape.values[edge:] * (values[edge] / shape.values[edge])
        return Survival(np.minimum.accumulate(values), self.pairs)


@dataclass(frozen=True)
class EvidenceSettings:
    """How a tenant's sources are weighed (docs/CONSISTENCY.md, "New customers").

    ``prior_pairs``: pseudo-pairs of the deployment prior in every tenant's estimate.
    ``traffic_share``: the most of a tenant's own evidence its traffic may make up.
    ``min_errors``: pairs above a level for a source to speak about it (Doddington).
    ``min_prior_pairs``: pairs the deployment must have in all before its prior is used
    (the tenant-tail map's own activation level: 30 errors at the 2% level).
    ``traffic_level``: the upper-tail level at which the traffic's worth is measured
    (scorenorm.traffic.TrafficFit.effective_pairs), the loosest target usually served.
    """

    prior_pairs: float = 2000.0
    traffic_share: float = 0.8
    min_errors: int = 30
    min_prior_pairs: float = 1500.0
    traffic_level: float = 0.01

    def __post_init__(self) -> None:
        if self.prior_pairs < 0:
            raise ValueError(f"prior_pairs must be >= 0, got {self.prior_pairs}")
        if not 0.0 <= self.traffic_share < 1.0:
            raise ValueError(f"traffic_share must lie in [0, 1), got {self.traffic_share}")
        if self.min_errors < 1:
            raise ValueError(f"min_errors must be >= 1, got {self.min_errors}")

    def to_json(self) -> dict[str, float]:
        return {
            "prior_pairs": self.prior_pairs,
            "traffic_share": self.traffic_share,
            "min_errors": self.min_errors,
            "min_prior_pairs": self.min_prior_pairs,
            "traffic_level": self.traffic_level,
        }


def traffic_survival(fit, settings: EvidenceSettings) -> Survival | None:
    """A traffic fit (scorenorm.traffic.TrafficFit) as evidence: its survival, worth its
    effective pairs at ``traffic_level``, not its raw pair count (pairs of one query are
    not independent, and the genuine share's error scales them all). None without one."""
    if fit is None:
        return None
    return Survival(fit.survival(), fit.effective_pairs(settings.traffic_level))


def own_evidence(
    gallery: ScoreHistogram, traffic: Survival | None, settings: EvidenceSettings
) -> Survival:
    """Gallery pairs and traffic as one survival. The traffic's share of all the estimate
    rests on (gallery pairs and the prior's pseudo-pairs) is capped at ``traffic_share``,
    so a tenant's own traffic can pull its threshold only so far."""
    g = Survival.of_histogram(gallery)
    if traffic is None or traffic.pairs <= 0 or settings.traffic_share == 0:
        return g
    share = settings.traffic_share
    weight = min(traffic.pairs, share / (1 - share) * (g.pairs + settings.prior_pairs))
    total = g.pairs + weight
    if total <= 0:
        return g
    return Survival((g.above() + weight * traffic.values) / total, total)


def prior_of(
    tenants: Sequence[Survival], reference: Survival, settings: EvidenceSettings
) -> Survival | None:
    """The deployment prior: the tenants' own evidence averaged in log-survival with equal
    weights (one large or heavy-tailed tenant must not stand for the domain: on the
    glyph tenants an arithmetic mean let one tenant's tail set everyone's threshold at
    1e-3), continued by ``reference`` (the calibration's tail) beyond its support. None
    without a tenant that has evidence."""
    usable = [t for t in tenants if t.pairs > 0]
    if sum(t.pairs for t in usable) < settings.min_prior_pairs:
        return None
    with np.errstate(divide="ignore"):
        logs = np.log(np.maximum([t.values for t in usable], 1e-300))
    values = np.exp(logs.mean(axis=0))  # the typical tenant: heavy tails must not dominate
    values[np.max([t.values for t in usable], axis=0) <= 0] = 0.0
    pooled = Survival(values, float(sum(t.pairs for t in usable)))
    return pooled.continued(reference, settings.min_errors)


def tenant_survival(
    own: Survival, prior: Survival | None, reference: Survival, settings: EvidenceSettings
) -> Survival:
    """The tenant's estimate: own evidence shrunk toward the prior, continued by the
    prior's shape (or, without a prior, the reference's) beyond its own support."""
    if prior is None or settings.prior_pairs == 0:
        return own.continued(reference, settings.min_errors) if own.pairs > 0 else own
    k = settings.prior_pairs
    shrunk = Survival((own.above() + k * prior.values) / (own.pairs + k), own.pairs + k)
    if own.pairs <= 0:
        return shrunk
    edge = own.support_edge(settings.min_errors)
    if edge < 0:
        return shrunk
    values = shrunk.values.copy()
    scale = values[edge] / prior.values[edge] if prior.values[edge] > 0 else 0.0
    values[edge:] = prior.values[edge:] * scale
    return Survival(np.minimum.accumulate(values), shrunk.pairs)


def _log_interp(t: np.ndarray, values: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        logs = np.log(np.maximum(values, 1e-300))
    out = np.exp(np.interp(t, EDGES, logs))
    return np.where(np.interp(t, EDGES, values) <= 0, 0.0, out)
