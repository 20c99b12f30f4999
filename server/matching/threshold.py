"""The threshold one tenant is served at one target FAR, worked out once per search.

The calibration gives one threshold t per target FAR on the calibration's (normalised)
scale; a tenant's raw similarity s matches when its map sends s to t or above, i.e.
when s >= map^-1(t) (server/matching/normalization.py). The search counts label-free impostors
at that raw threshold, the decision compares the top-1 with it and the reply reports
both: they must be one number, so it is computed here once and passed down.
"""

from __future__ import annotations

from dataclasses import dataclass

from contracts.calibration import Target
from scorenorm import TailMap


@dataclass(frozen=True)
class TenantThreshold:
    threshold: float  # on the normalised scale (= raw similarity without normalisation)
    raw: float  # the tenant's raw similarity that clears ``threshold`` after mapping
    mapping: TailMap  # the tenant's score map
    target_far: float
    method: str  # the normalisation method's name

    @classmethod
    def of(cls, mapping: TailMap, target: Target, method: str) -> TenantThreshold:
        raw = float(mapping.inverse(target.threshold))
        return cls(target.threshold, raw, mapping, target.target_far, method)
