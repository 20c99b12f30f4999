"""What the demo prints: per-tenant outcomes of the traffic and the live FAR it exported."""

from __future__ import annotations

import math
import urllib.request
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class TenantOutcome:
    """Counts of one tenant's decisions, with the ground truth the demo knows.

    Each Match answer carries both scales, so every query is decided twice at the same
    global threshold: on the raw similarity (what a server without normalisation does)
    and on the normalised score (what this server did). Impostor pairs are counted from
    the returned neighbours (top-k reaches every pair that can clear the threshold).
    """

    tenant: str
    gallery: int = 0
    genuine: int = 0
    genuine_accepted: int = 0  # normalised (the served decision)
    genuine_accepted_raw: int = 0
    genuine_correct: int = 0  # accepted and the top-1 label is the query's label
    impostor: int = 0
    impostor_accepted: int = 0
    impostor_accepted_raw: int = 0
    impostor_pairs: int = 0
    pairs_accepted: int = 0
    pairs_accepted_raw: int = 0
    live: dict[str, float] = field(default_factory=dict)
    normalization: dict = field(default_factory=dict)  # GetTenant after the traffic

    def record(
        self, genuine: bool, result, label_ok: bool, label_of: dict, query_label: str
    ) -> None:
        t = result.threshold
        raw = result.similarity >= t
        if genuine:
            self.genuine += 1
            self.genuine_accepted += result.matched
            self.genuine_accepted_raw += raw
            self.genuine_correct += result.matched and label_ok
            return
        self.impostor += 1
        self.impostor_accepted += result.matched
        self.impostor_accepted_raw += raw
        self.impostor_pairs += self.gallery
        others = [n for n in result.neighbors if label_of.get(n.item_id) != query_label]
        self.pairs_accepted += sum(n.score >= t for n in others)
        self.pairs_accepted_raw += sum(n.similarity >= t for n in others)


def scrape(url: str) -> dict[str, dict[str, float]]:
    """Gauges of the metrics endpoint by name, then by tenant label."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values: dict[str, dict[str, float]] = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            tenant = sample.labels.get("tenant")
            if tenant is not None:
                values[sample.name][tenant] = sample.value
    return values


LIVE_GAUGES = ("tcm_far_label_free", "tcm_far_label_free_pairs")
# The window's feedback numbers are in GetTenant's stats, not in the exposition.
FEEDBACK_STATS = {
    "tcm_far_feedback": "far_feedback",
    "tcm_far_feedback_ci_lower": "far_feedback_ci_lower",
    "tcm_far_feedback_ci_upper": "far_feedback_ci_upper",
    "tcm_far_feedback_impostor_decisions": "impostor_decisions",
}


def attach_live(outcomes: Sequence[TenantOutcome], metrics: dict[str, dict[str, float]]) -> None:
    """The label-free window gauges scraped from /metrics (the demo serves one target),
    and the feedback window from the GetTenant answer kept in ``outcome.normalization``."""
    for outcome in outcomes:
        stats = outcome.normalization.get("stats", {})
        outcome.live = {
            name: metrics.get(name, {}).get(outcome.tenant, math.nan) for name in LIVE_GAUGES
        }
        for name, key in FEEDBACK_STATS.items():
            outcome.live[name] = stats.get(key, math.nan)


def _rate(num: int, den: int) -> str:
    return f"{num / den:6.1%} ({num}/{den})" if den else "      - (0/0)"


def _far(value: float) -> str:
    return "       -" if math.isnan(value) else f"{value:8.2e}"


def _versus(value: float, target_far: float) -> str:
    return f"{_far(value)} ({value / target_far:4.1f}x)" if not math.isnan(value) else _far(value)


def table(outcomes: Sequence[TenantOutcome], target_far: float) -> str:
    """Two tables per tenant: decisions raw vs normalised, then the live FAR estimates."""
    head = (
        f"{'tenant':<10} {'gallery':>7} {'map':>16}  {'genuine accepted':>23}  "
        f"{'impostor queries accepted':>25}  {'impostor pair FAR / target':>26}"
    )
    sub = (
        f"{'':<10} {'':>7} {'(shift)':>16}  {'raw -> normalised':>23}  "
        f"{'raw -> normalised':>25}  {'raw -> normalised':>26}"
    )
    rows = [head, sub, "-" * len(head)]
    for o in outcomes:
        n = o.normalization
        if n.get("normalization_active"):
            mapping = f"on ({n['raw_threshold'] - n['threshold']:+.4f})"
        else:
            mapping = "off (raw)"
        rows.append(
            f"{o.tenant:<10} {o.gallery:>7} {mapping:>16}  "
            f"{_pct(o.genuine_accepted_raw, o.genuine)} -> {_pct(o.genuine_accepted, o.genuine)}"
            f"{'':>3}  "
            f"{_pct(o.impostor_accepted_raw, o.impostor):>11} -> "
            f"{_pct(o.impostor_accepted, o.impostor):>10}  "
            f"{_ratio(o.pairs_accepted_raw, o.impostor_pairs, target_far):>12} -> "
            f"{_ratio(o.pairs_accepted, o.impostor_pairs, target_far):>10}"
        )
    rows.append(
        "Both columns use the one global threshold; 'raw' decides on the cosine similarity, "
        "'normalised' on the score mapped\nthrough the tenant's own impostor tail (the map's "
        "shift is the tenant's raw threshold minus the global one)."
    )
    rows += ["", _live_table(outcomes, target_far)]
    return "\n".join(rows)


def _pct(num: int, den: int) -> str:
    return f"{num / den:6.1%}" if den else "     -"


def _ratio(num: int, den: int, target: float) -> str:
    return f"{num / den / target:5.2f} ({num})" if den else "-"


def _live_table(outcomes: Sequence[TenantOutcome], target_far: float) -> str:
    """The live estimates the server exported for the same traffic."""
    head = (
        f"{'tenant':<10} {'right label':>17}  {'label-free FAR (x target)':>25}  "
        f"{'feedback FAR [95% CI]':>30}"
    )
    rows = [head, "-" * len(head)]
    for o in outcomes:
        live = o.live
        feedback = _far(live.get("tcm_far_feedback", math.nan))
        ci = (
            f"[{_far(live.get('tcm_far_feedback_ci_lower', math.nan)).strip()}, "
            f"{_far(live.get('tcm_far_feedback_ci_upper', math.nan)).strip()}]"
        )
        rows.append(
            f"{o.tenant:<10} {_rate(o.genuine_correct, o.genuine):>17}  "
            f"{_versus(live.get('tcm_far_label_free', math.nan), target_far):>25}  "
            f"{feedback + ' ' + ci:>30}"
        )
    rows.append(
        f"target FAR {target_far:g} per impostor PAIR. The label-free estimate is per pair (on "
        "the served scores), so it compares with the target directly;\nan impostor QUERY meets "
        "every gallery item, so it is accepted with probability up to gallery x FAR, and "
        "feedback FAR counts decisions."
    )
    return "\n".join(rows)
