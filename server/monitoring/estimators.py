"""Small pure estimators behind the live gauges: rates, intervals, spread."""

from __future__ import annotations

import math
from collections.abc import Iterable

# Two-sided 95% normal quantile.
Z95 = 1.959963984540054
NAN = float("nan")


def rate(accepted: int, total: int) -> float:
    """accepted / total, NaN when there is nothing to count."""
    return accepted / total if total > 0 else NAN


def wilson_interval(accepted: int, total: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (NaN, NaN) when total is 0.

    Wilson rather than the normal approximation because live FARs sit near 0, where the
    normal interval collapses to a point or goes negative.
    """
    if total <= 0:
        return NAN, NAN
    p = accepted / total
    z2n = z * z / total
    centre = (p + z2n / 2) / (1 + z2n)
    half = z * math.sqrt(p * (1 - p) / total + z2n / (4 * total)) / (1 + z2n)
    lower = 0.0 if accepted == 0 else max(0.0, centre - half)
    upper = 1.0 if accepted == total else min(1.0, centre + half)
    return lower, upper


def spread_ratio(counts: Iterable[tuple[int, int]], min_total: int) -> float:
    """max / min of the per-member rates accepted/total, over members with enough evidence.

    A member with zero accepts counts as half an accept (0.5 / total), so one quiet
    tenant gives a large but finite ratio instead of infinity. NaN with fewer than two
    members that have at least ``min_total`` trials.
    """
    rates = [max(a, 0.5) / n for a, n in counts if n >= max(min_total, 1)]
    if len(rates) < 2:
        return NAN
    return max(rates) / min(rates)
