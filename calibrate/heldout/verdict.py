"""The verdict of ``--check`` on one (dataset, target) row: pass, fail or insufficient evidence.

A row is the served FAR of one dataset at one deployed threshold, counted on held-out
pairs (calibrate/heldout/normalized.py): ``accepted`` of ``pairs`` impostor pairs, from
``classes`` classes, with a 95% class-bootstrap interval. The band a deploy accepts is
[a / 2, 2 a] around the target a. The rule (docs/CALIBRATION.md, "Verdicts"):

- the **decision interval** is the hull of the class-bootstrap interval and the exact
  95% Poisson (Garwood) interval of the accepted count, divided by the pairs. The
  bootstrap alone says nothing when few pairs are accepted (zero accepted pairs give
  [0, 0] on every resample); the count's interval alone ignores that pairs share
  classes. Each end is a 97.5% one-sided bound;
- **pass**: the upper end is at most 2a (and, with ``fail_if_too_safe``, the lower end
  at least a/2): the data show the FAR is acceptable, so a point estimate above 2a can
  never pass, however wide its interval;
- **fail**: the lower end is above 2a (or, with ``fail_if_too_safe``, the upper end is
  below a/2): the data show the FAR is off target;
- **insufficient evidence**: anything else (the interval straddles a boundary, or the
  dataset has too few classes for held-out pairs). The row then says how much data
  would decide it at the rate observed (:func:`needed`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from statistics import NormalDist

PASS = "pass"
FAIL = "fail"
INSUFFICIENT = "insufficient"  # printed "insufficient evidence" where room allows
LEVEL = 0.95
FACTOR = 2.0  # the acceptable band is [a / FACTOR, a * FACTOR]
# what moving an interval end past a boundary shows: (end, the boundary is 2a) -> relation
_SHOWS = {
    ("upper", True): "<=",
    ("lower", True): ">",
    ("upper", False): "<",
    ("lower", False): ">=",
}
_EXACT_UP_TO = 5000.0  # counts above this use the Wilson-Hilferty approximation
_MAX_PAIRS = 1e18


@dataclass(frozen=True)
class Need:
    """Data that would decide an undecided row at the observed rate (estimates).

    ``pairs`` is None when the dataset has no held-out pairs at all (too few classes).
    """

    pairs: int | None  # held-out impostor pairs in all
    classes: int  # classes in all, at this data's images per class
    shows: str  # what the extra data would show, e.g. "FAR <= 2x target"

    def text(self, pairs: int, classes: int) -> str:
        if self.pairs is None:
            return f"needs >= {self.classes} classes (has {classes}) {self.shows}"
        return (
            f"needs ~{self.pairs:,} pairs / ~{self.classes:,} classes "
            f"(has {pairs:,} / {classes:,}) to show {self.shows}"
        )


@dataclass(frozen=True)
class Verdict:
    verdict: str  # PASS, FAIL or INSUFFICIENT
    interval: tuple[float, float] | None  # the decision interval (FAR), None: no pairs
    reason: str  # one line: why
    need: Need | None = None  # for INSUFFICIENT rows: what would decide them

    def ratio_text(self, target: float) -> str:
        """The decision interval over the target, e.g. "[0.35, 2.17]"; "n/a" without pairs."""
        if self.interval is None:
            return "n/a"
        return f"[{self.interval[0] / target:.2f}, {self.interval[1] / target:.2f}]"


def decide(
    accepted: int,
    pairs: int,
    ci: tuple[float, float] | None,
    target: float,
    *,
    classes: int,
    min_classes: int = 6,
    fail_if_too_safe: bool = False,
    factor: float = FACTOR,
    level: float = LEVEL,
) -> Verdict:
    """The verdict on ``accepted`` of ``pairs`` held-out impostor pairs (module docstring).

    ``ci`` is the class-bootstrap interval of the FAR (None: no bootstrap was run),
    ``classes`` the classes the pairs come from, ``min_classes`` what a dataset needs
    for held-out pairs at all.
    """
    lo_ok, hi_ok = target / factor, target * factor
    if pairs <= 0:
        need = Need(None, min_classes, "for held-out pairs")
        reason = f"no held-out impostor pairs from {classes} classes"
        return Verdict(INSUFFICIENT, None, reason, need)
    rate = accepted / pairs
    p_lo, p_hi = poisson_interval(accepted, level)
    lo, hi = p_lo / pairs, p_hi / pairs
    if ci is not None and all(math.isfinite(x) for x in ci):
        lo, hi = min(lo, ci[0]), max(hi, ci[1])
    interval = (lo, hi)
    if lo > hi_ok:
        return Verdict(FAIL, interval, f"wholly above {_times(factor)}")
    if fail_if_too_safe and hi < lo_ok:
        return Verdict(FAIL, interval, f"wholly below {_times(1 / factor)}")
    if hi <= hi_ok and (not fail_if_too_safe or lo >= lo_ok):
        band = f"inside [{_times(1 / factor)}, {_times(factor)}]"
        return Verdict(PASS, interval, band if fail_if_too_safe else f"at most {_times(factor)}")
    # undecided: which boundaries does the interval straddle, and what would settle them?
    bounds = []  # (the interval end that must cross, the boundary it must cross)
    if hi > hi_ok:  # lo <= 2a < hi
        bounds.append(("lower" if rate > hi_ok else "upper", hi_ok))
    if fail_if_too_safe and lo < lo_ok:  # lo < a/2 <= hi
        bounds.append(("upper" if rate < lo_ok else "lower", lo_ok))
    where = " and ".join(_times(b / target) for _, b in bounds)
    if len(bounds) == 2 and bounds[0][0] == bounds[1][0]:  # one end must cross both:
        bounds = [max(bounds, key=lambda eb: eb[1] if eb[0] == "lower" else -eb[1])]  # the far one
    need = needed(rate, pairs, classes, ci, bounds, level)
    if need is not None:
        shows = [f"FAR {_SHOWS[end, b == hi_ok]} {_times(b / target)}" for end, b in bounds]
        at = f" at the observed {rate / target:.2f}x"
        need = replace(need, shows=" and ".join(shows) + at)
    return Verdict(INSUFFICIENT, interval, f"straddles {where}", need)


def needed(
    rate: float,
    pairs: int,
    classes: int,
    ci: tuple[float, float] | None,
    bounds: list[tuple[str, float]],
    level: float = LEVEL,
) -> Need | None:
    """Pairs and classes that would move each interval end past its boundary at ``rate``.

    Two estimates, the larger wins: the Poisson interval of the count r n at n pairs
    (its width shrinks like 1/sqrt(n)), and the class bootstrap, whose half-width
    shrinks like 1/sqrt(classes). Held-out impostor pairs grow with the square of the
    classes (pairs among the classes of a part), so classes = C sqrt(n / pairs here).
    None when the rate sits on a boundary (no amount of data decides it).
    """
    total = 0.0
    for end, bound in bounds:
        if rate == bound:
            return None
        n = _pairs_for(rate, bound, end, level)
        if n is None:
            return None
        if ci is not None and all(
            math.isfinite(x) for x in ci
        ):  # the bootstrap's half-width on that side, scaled by classes
            half = (ci[1] - rate) if end == "upper" else (rate - ci[0])
            c = classes * (max(half, 0.0) / abs(bound - rate)) ** 2
            n = max(n, pairs * (c / classes) ** 2)
        total = max(total, n)
    total = max(total, pairs + 1.0)
    n_classes = math.ceil(classes * math.sqrt(total / pairs)) if classes else 0
    return Need(math.ceil(total), max(n_classes, classes + 1), "")


def _pairs_for(rate: float, bound: float, end: str, level: float) -> float | None:
    """Smallest n at which the Poisson interval's ``end`` of r n, over n, clears ``bound``."""

    def clears(n: float) -> bool:
        lo, hi = poisson_interval(rate * n, level)
        return hi / n <= bound if end == "upper" else lo / n >= bound

    lo, hi = 1.0, 2.0
    while not clears(hi):
        lo, hi = hi, hi * 2
        if hi > _MAX_PAIRS:
            return None
    for _ in range(60):  # bisection on log n: a relative precision far below 1%
        mid = math.sqrt(lo * hi)
        lo, hi = (lo, mid) if clears(mid) else (mid, hi)
        if hi / lo < 1.0005:
            break
    return hi


def _times(x: float) -> str:
    """2 -> "2x target", 0.5 -> "target/2"."""
    return f"{x:g}x target" if x >= 1 else f"target/{1 / x:g}"


def overall(verdicts: Iterable[str]) -> str:
    """The whole check: fail if any row fails, else insufficient if any is, else pass."""
    seen = set(verdicts)
    if FAIL in seen:
        return FAIL
    if INSUFFICIENT in seen:
        return INSUFFICIENT
    return PASS


# ------------------------------------------------------------------ the count's interval
def poisson_interval(k: float, level: float = LEVEL) -> tuple[float, float]:
    """Exact (Garwood) two-sided interval of a Poisson mean after observing ``k`` events.

    Lower: the mean at which P(X >= k) = (1 - level)/2 (0 when k = 0); upper: the mean
    at which P(X <= k) = (1 - level)/2; e.g. k = 0 gives [0, 3.689] at 95%. ``k`` may be
    fractional (an expected count): the bounds are gamma quantiles, continuous in k.
    Counts above 5,000 use the Wilson-Hilferty approximation (relative error < 1e-5).
    """
    alpha = (1.0 - level) / 2
    if k < 0:
        raise ValueError(f"a count cannot be negative, got {k}")
    lower = 0.0 if k == 0 else _gamma_quantile(alpha, k)
    upper = _gamma_quantile(1.0 - alpha, k + 1.0)
    return lower, upper


def _gamma_quantile(p: float, a: float) -> float:
    """x with P(a, x) = p, P the regularised lower incomplete gamma function."""
    if a > _EXACT_UP_TO:
        z = NormalDist().inv_cdf(p)
        return a * (1.0 - 1.0 / (9 * a) + z / (3 * math.sqrt(a))) ** 3
    lo, hi = 0.0, a + 10.0 * math.sqrt(a) + 20.0
    while _gamma_p(a, hi) < p:
        hi *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if _gamma_p(a, mid) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(hi, 1e-300):
            break
    return 0.5 * (lo + hi)


def _gamma_p(a: float, x: float) -> float:
    """Regularised lower incomplete gamma P(a, x) (series below a + 1, continued fraction above)."""
    if x <= 0:
        return 0.0
    log_front = -x + a * math.log(x) - math.lgamma(a)
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        for _ in range(100_000):
            n += 1
            term *= x / n
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return min(1.0, total * math.exp(log_front))
    # Lentz's continued fraction for Q(a, x)
    tiny = 1e-300
    b = x + 1 - a
    c = 1 / tiny
    d = 1 / b
    h = d
    for i in range(1, 100_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1 / d
        step = d * c
        h *= step
        if abs(step - 1) < 1e-15:
            break
    return max(0.0, 1.0 - math.exp(log_front) * h)
