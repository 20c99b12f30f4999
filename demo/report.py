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
    """Counts of one tenant's decisions, with the ground truth the demo knows."""

    tenant: str
    gallery: int = 0
    genuine: int = 0
    genuine_accepted: int = 0
    genuine_correct: int = 0  # accepted and the top-1 label is the query's label
    impostor: int = 0
    impostor_accepted: int = 0
    live: dict[str, float] = field(default_factory=dict)

    def record(self, genuine: bool, matched: bool, label_ok: bool) -> None:
        if genuine:
            self.genuine += 1
            self.genuine_accepted += matched
            self.genuine_correct += matched and label_ok
        else:
            self.impostor += 1
            self.impostor_accepted += matched


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


LIVE_GAUGES = (
    "tcm_far_label_free",
    "tcm_far_label_free_pairs",
    "tcm_far_feedback",
    "tcm_far_feedback_ci_lower",
    "tcm_far_feedback_ci_upper",
    "tcm_far_feedback_impostor_decisions",
)


def attach_live(outcomes: Sequence[TenantOutcome], metrics: dict[str, dict[str, float]]) -> None:
    for outcome in outcomes:
        outcome.live = {
            name: metrics.get(name, {}).get(outcome.tenant, math.nan) for name in LIVE_GAUGES
        }


def _rate(num: int, den: int) -> str:
    return f"{num / den:6.1%} ({num}/{den})" if den else "      - (0/0)"


def _far(value: float) -> str:
    return "       -" if math.isnan(value) else f"{value:8.2e}"


def _versus(value: float, target_far: float) -> str:
    return f"{_far(value)} ({value / target_far:4.1f}x)" if not math.isnan(value) else _far(value)


def table(outcomes: Sequence[TenantOutcome], target_far: float) -> str:
    """One row per tenant: decisions against the truth, then both live FAR estimates."""
    head = (
        f"{'tenant':<10} {'gallery':>7}  {'genuine accepted':>17}  {'right label':>17}  "
        f"{'impostor queries accepted':>25}  {'label-free FAR (x target)':>25}  "
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
            f"{o.tenant:<10} {o.gallery:>7}  {_rate(o.genuine_accepted, o.genuine):>17}  "
            f"{_rate(o.genuine_correct, o.genuine):>17}  "
            f"{_rate(o.impostor_accepted, o.impostor):>25}  "
            f"{_versus(live.get('tcm_far_label_free', math.nan), target_far):>25}  "
            f"{feedback + ' ' + ci:>30}"
        )
    rows.append(
        f"target FAR {target_far:g} per impostor PAIR. The label-free estimate is per pair, so it "
        "compares with the target directly;\nan impostor QUERY meets every gallery item, so it is "
        "accepted with probability up to gallery x FAR, and feedback FAR counts decisions."
    )
    return "\n".join(rows)
