"""Tenant-tail quantile mapping: s' = F_G^-1(F_T(s)), estimated without query labels.

F_T is a tenant's impostor score distribution, estimated from pairs of its gallery
items with different enrolment labels (and, online, from sampled query-gallery
pairs); F_G is the global impostor distribution the threshold was calibrated on.
Mapping a tenant's score through its own upper-tail level onto the global scale
makes "s' >= t*(a)" accept a share a of that tenant's impostor pairs, for every a
at once, so one global threshold means the same FAR for every tenant.

Only the upper tail is estimated, and only as deep as the tenant's sample supports:
a level p is read when at least ``min_errors`` pairs lie above it (Doddington's
rule of 30). The map is a strictly increasing piecewise-linear bijection of [-1, 1]
through knots (F_T^-1(p), F_G^-1(p)) at log-spaced levels; beyond the deepest
supported level it runs straight to (1, 1), so the shift shrinks toward the
identity the further a score lies past what the tenant's sample can say, and a
tenant whose sample cannot support even the shallowest level is not mapped at all.
Ranking within a tenant never changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from scorenorm.evidence import (
    EvidenceSettings,
    Survival,
    own_evidence,
    prior_of,
    tenant_survival,
)
from scorenorm.histogram import ScoreHistogram


@dataclass(frozen=True)
class TailSettings:
    """How deep and how finely a tenant's tail is mapped.

    ``min_errors``: pairs that must lie above a level before it is used (30,
    Doddington). ``top_level``: the shallowest upper-tail level mapped; calibrations
    set it to twice the loosest FAR they report. ``levels_per_decade``: knots per
    factor of ten in level.
    """

    min_errors: int = 30
    top_level: float = 0.02
    levels_per_decade: int = 8

    def __post_init__(self) -> None:
        if self.min_errors < 1:
            raise ValueError(f"min_errors must be >= 1, got {self.min_errors}")
        if not 0.0 < self.top_level < 1.0:
            raise ValueError(f"top_level must lie in (0, 1), got {self.top_level}")
        if self.levels_per_decade < 1:
            raise ValueError(f"levels_per_decade must be >= 1, got {self.levels_per_decade}")

    def min_pairs(self) -> int:
        """Impostor pairs a tenant needs before its map becomes active."""
        return int(np.ceil(self.min_errors / self.top_level))

    def to_json(self) -> dict[str, float | int]:
        return {
            "min_errors": self.min_errors,
            "top_level": self.top_level,
            "levels_per_decade": self.levels_per_decade,
        }


@dataclass(frozen=True)
class TailMap:
    """One tenant's map; ``raw`` and ``norm`` are its knots, both strictly increasing."""

    raw: np.ndarray = field(default_factory=lambda: np.array([-1.0, 1.0]))
    norm: np.ndarray = field(default_factory=lambda: np.array([-1.0, 1.0]))
    pairs: int = 0  # impostor pairs behind the estimate
    deepest_level: float | None = None  # deepest upper-tail level the sample supports

    @property
    def active(self) -> bool:
        """False for the identity a tenant runs with until its sample is large enough."""
        return len(self.raw) > 2

    def __call__(self, scores: np.ndarray | float) -> np.ndarray:
        """Normalised scores on the global scale (same shape, float64)."""
        s = np.asarray(scores, dtype=np.float64)
        return np.interp(s, self.raw, self.norm) if self.active else s  # identity: exact

    def inverse(self, normalised: np.ndarray | float) -> np.ndarray:
        """The raw similarity that maps to ``normalised``: the tenant's raw threshold."""
        t = np.asarray(normalised, dtype=np.float64)
        return np.interp(t, self.norm, self.raw) if self.active else t

    def shift(self, threshold: float) -> float:
        """raw threshold - global threshold: how much lower (negative) or higher this
        tenant's raw scores must be to pass ``threshold`` (cf. threshold drift)."""
        return float(self.inverse(threshold)) - float(threshold)


def identity_map(pairs: int = 0) -> TailMap:
    return TailMap(pairs=pairs)


def levels(settings: TailSettings, deepest: float) -> np.ndarray:
    """Log-spaced upper-tail levels from ``top_level`` down to ``deepest`` (both included)."""
    top = settings.top_level
    if deepest >= top:
        return np.array([top])
    n = int(np.ceil(np.log10(top / deepest) * settings.levels_per_decade))
    return np.geomspace(top, deepest, n + 1)


def build_map(tenant: ScoreHistogram, global_: ScoreHistogram, settings: TailSettings) -> TailMap:
    """The tenant-tail map of ``tenant``'s impostor histogram onto ``global_``."""
    n = tenant.total
    if n <= 0 or n * settings.top_level < settings.min_errors:
        return identity_map(max(n, 0))
    deepest = max(settings.min_errors / n, settings.min_errors / max(global_.total, 1))
    if deepest > settings.top_level:  # the global sample is too small: nothing to map onto
        return identity_map(n)
    ps = levels(settings, deepest)
    return _through_knots(tenant.quantile(ps), global_.quantile(ps), n, float(ps[-1]))


def map_of_survival(
    tenant: Survival, global_: ScoreHistogram, settings: TailSettings, deepest: float | None = None
) -> TailMap:
    """The tenant-tail map of an estimated survival (scorenorm.evidence) onto ``global_``.

    Unlike :func:`build_map`, the tenant side may reach deeper than its own pairs (a
    prior's shape continues it), so the knots run down to ``deepest`` (default: as deep
    as the global tail supports). The identity when the estimate stands on fewer pairs
    than the shallowest level needs."""
    n = tenant.pairs
    if n * settings.top_level < settings.min_errors or global_.total <= 0:
        return identity_map(int(max(n, 0)))
    floor = settings.min_errors / global_.total
    deepest = floor if deepest is None else max(deepest, floor)
    if deepest > settings.top_level:
        return identity_map(int(n))
    ps = levels(settings, deepest)
    return _through_knots(tenant.quantile(ps), global_.quantile(ps), int(n), float(ps[-1]))


def _through_knots(raw: np.ndarray, norm: np.ndarray, n: int, deepest: float) -> TailMap:
    """The increasing map through the pairs of quantiles (tenant's raw, global's) at the
    same levels, keeping those both finite and strictly rising below 1; the identity
    when none is left."""
    knots_r, knots_n = [-1.0], [-1.0]
    for r, g in zip(raw, norm, strict=True):
        if np.isfinite(r) and np.isfinite(g) and knots_r[-1] < r < 1.0 and knots_n[-1] < g < 1.0:
            knots_r.append(float(r))
            knots_n.append(float(g))
    if len(knots_r) == 1:
        return identity_map(n)
    return TailMap(np.array([*knots_r, 1.0]), np.array([*knots_n, 1.0]), n, deepest)


def tenant_map(
    own: Survival,
    prior: Survival | None,
    global_: ScoreHistogram,
    tail: TailSettings,
    evidence: EvidenceSettings,
    reference: Survival | None = None,
) -> TailMap:
    """The map the server serves a tenant: its own evidence shrunk toward the deployment
    prior (scorenorm.evidence), mapped onto the calibration's global tail.

    ``reference``: ``Survival.of_histogram(global_)``, when the caller keeps it (a server
    rebuilds every tenant's map when the prior moves: building it once saves that work
    per tenant)."""
    if reference is None:
        reference = Survival.of_histogram(global_)
    return map_of_survival(tenant_survival(own, prior, reference, evidence), global_, tail)


def deployment_maps(
    galleries: Sequence[ScoreHistogram],
    global_: ScoreHistogram,
    tail: TailSettings,
    evidence: EvidenceSettings | None = None,
    traffic: Sequence[Survival | None] | None = None,
) -> list[TailMap]:
    """The maps of every tenant of one deployment, as the server builds them: each from
    its gallery pairs (and traffic, when given), the prior pooled over all of them. What
    calibrate's held-out evaluations measure, so they measure what is served."""
    evidence = evidence or EvidenceSettings()
    flows = traffic or [None] * len(galleries)
    owns = [own_evidence(g, t, evidence) for g, t in zip(galleries, flows, strict=True)]
    reference = Survival.of_histogram(global_)
    prior = prior_of(owns, reference, evidence)
    return [tenant_map(own, prior, global_, tail, evidence, reference) for own in owns]
