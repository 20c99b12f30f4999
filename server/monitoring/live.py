"""LiveMonitor: per-tenant FAR (feedback and label-free), spread, OPIS and drift gauges.

The server calls ``record_decision`` for every Match answer and ``record_feedback`` when
a client says whether a past decision was the same identity. Everything exported is
computed from sliding windows at scrape time (a custom collector), so a scrape sees the
window as it is then, and the request path only appends to a deque.

Metric names are the contract of docs/METRICS.md, section "Live FAR and consistency".
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from calibrate.consistency import opis, opis_terms, utility
from server.monitoring.drift import ReferenceHistogram, load_references
from server.monitoring.estimators import NAN, rate, spread_ratio, wilson_interval
from server.monitoring.labels import TenantLabels
from server.monitoring.window import SlidingWindow, validate_window


@dataclass(frozen=True)
class _Decision:
    top1: float
    matched: bool
    impostor_accepted: int
    impostor_total: int


@dataclass
class _Feedback:
    decision_id: str
    matched: bool
    is_same: bool


class _TenantWindows:
    """The two windows of one tenant label, plus the feedback index by decision id."""

    def __init__(self, max_items: int | None, max_age: float | None, clock: Callable[[], float]):
        self.decisions: SlidingWindow[_Decision] = SlidingWindow(max_items, max_age, clock)
        self.feedback: SlidingWindow[_Feedback] = SlidingWindow(max_items, max_age, clock)
        self.by_id: dict[str, _Feedback] = {}
        # drift_reference="baseline": the tenant's first scores, then their histogram.
        self.baseline_scores: list[float] = []
        self.baseline: ReferenceHistogram | None = None

    def add_feedback(self, entry: _Feedback) -> None:
        """Adds a verdict; a repeated verdict for a decision in the window replaces it."""
        self._forget(self.feedback.expire())
        known = self.by_id.get(entry.decision_id)
        if known is not None:
            known.matched, known.is_same = entry.matched, entry.is_same
            return
        dropped = self.feedback.append(entry)
        self._forget([dropped] if dropped is not None else [])
        self.by_id[entry.decision_id] = entry

    def expire(self) -> None:
        self.decisions.expire()
        self._forget(self.feedback.expire())

    def _forget(self, gone: list[_Feedback]) -> None:
        for entry in gone:
            if self.by_id.get(entry.decision_id) is entry:
                del self.by_id[entry.decision_id]


class LiveMonitor:
    """Implements server.matching.observer.DecisionObserver and exports the live gauges.

    ``target_far`` is the FAR the served threshold was calibrated for; the ``*_ratio``
    gauges divide by it. Windows hold the last ``window_decisions`` decisions (and, as a
    separate window, feedback verdicts) per tenant label, and/or those younger than
    ``window_seconds``. ``reference_top1`` is the calibration document's
    ``reference.top1_similarity``; without it the drift gauges are NaN.
    ``min_feedback`` / ``min_label_free_pairs``: evidence a tenant needs to enter the
    cross-tenant spread and OPIS; ``min_drift_samples``: decisions before drift is
    reported (PSI of a handful of scores is noise). ``labels``: a shared tenant-label
    mapping (the server's), so both sets of series bound tenants the same way.
    ``drift_reference``: ``"calibration"`` compares with ``reference_top1``;
    ``"baseline"`` with each tenant's own first ``baseline_decisions`` top-1 scores
    (binned on the reference's edges, else 200 bins over [-1, 1]). The calibration
    histogram reflects the calibration set's gallery make-up (every other image of a
    class), so a live gallery of a few images per class reads as drift against it;
    a tenant's own baseline only sees change over time.
    """

    def __init__(
        self,
        target_far: float,
        *,
        registry: CollectorRegistry,
        window_decisions: int | None = 1000,
        window_seconds: float | None = None,
        max_tenant_labels: int = 20,
        reference_top1: Mapping[str, Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
        min_feedback: int = 10,
        min_label_free_pairs: int = 100,
        min_drift_samples: int = 100,
        psi_bins: int = 10,
        labels: TenantLabels | None = None,
        drift_reference: str = "calibration",
        baseline_decisions: int = 1000,
    ) -> None:
        if not (isinstance(target_far, int | float) and 0 < target_far < 1):
            raise ValueError(f"target_far must lie in (0, 1), got {target_far!r}")
        validate_window(window_decisions, window_seconds)
        self.target_far = float(target_far)
        # Pass the server's TenantLabels so serving and monitoring series agree on which
        # tenants keep their name; max_tenant_labels only applies to a new mapping.
        self.labels = labels if labels is not None else TenantLabels(max_tenant_labels)
        self._window = (window_decisions, window_seconds)
        _check_drift_settings(drift_reference, baseline_decisions)
        self._references = load_references(reference_top1, psi_bins)
        self._drift_reference = drift_reference
        self._baseline_size = baseline_decisions
        self._psi_bins = psi_bins
        self._edges = _bin_edges(reference_top1)
        self._clock = clock
        self._min_feedback = min_feedback
        self._min_pairs = min_label_free_pairs
        self._min_drift = min_drift_samples
        self._tenants: dict[str, _TenantWindows] = {}
        self._feedback_calls: dict[tuple[str, str], int] = {}
        # Monotonic counts that add up across replicas (Prometheus sums them by tenant and
        # divides there: deploy/prometheus/rules/recording.yml); ratios of windows do not.
        self._counts = _Counts()
        self._lock = threading.Lock()
        registry.register(_Collector(self))

    # -- DecisionObserver -------------------------------------------------------------

    def record_decision(
        self,
        tenant: str,
        decision_id: str,
        top1_similarity: float,
        matched: bool,
        threshold: float,
        impostor_accepted: int,
        impostor_total: int,
    ) -> None:
        """Adds one Match answer. The impostor counts are the label-free pair counts, taken
        at ``threshold`` (the server's; kept for the Protocol, not used here)."""
        if not 0 <= impostor_accepted <= impostor_total:
            raise ValueError(
                f"need 0 <= impostor_accepted <= impostor_total, "
                f"got {impostor_accepted} of {impostor_total}"
            )
        if not math.isfinite(top1_similarity):
            raise ValueError(f"top1_similarity must be finite, got {top1_similarity}")
        entry = _Decision(float(top1_similarity), bool(matched), impostor_accepted, impostor_total)
        with self._lock:
            label = self.labels.label(tenant)
            self._counts.decision(label, entry)
            windows = self._windows(tenant)
            windows.decisions.append(entry)
            if self._drift_reference == "baseline" and windows.baseline is None:
                self._grow_baseline(windows, entry.top1)

    def record_feedback(self, tenant: str, decision_id: str, matched: bool, is_same: bool) -> None:
        """Adds a ground-truth verdict on a past decision (is_same: query and match agree)."""
        if not decision_id:
            raise ValueError("decision_id must be a non-empty string")
        with self._lock:
            windows = self._windows(tenant)
            key = (self.labels.label(tenant), "same" if is_same else "different")
            self._feedback_calls[key] = self._feedback_calls.get(key, 0) + 1
            self._counts.feedback(key[0], key[1], matched)
            windows.add_feedback(_Feedback(decision_id, bool(matched), bool(is_same)))

    def tenant_stats(self, tenant: str) -> dict[str, float]:
        """The window statistics of ``tenant``'s label (overflow tenants share ``other``).

        Asking about a tenant never seen gives empty statistics and uses no label slot.
        """
        label = self.labels.get(tenant)
        stats = self.snapshot()
        if label is None or label not in stats:
            return _empty_stats(self.target_far)
        # The tenant's own term of the cross-tenant OPIS (its OPIS drift), NaN when the
        # tenant (or the set of tenants) lacks the feedback for it.
        terms = self._opis_feedback(stats)[1]
        return {**stats[label], "opis_drift_feedback": terms.get(label, NAN)}

    def model_changed(self, reference_top1: Mapping[str, Any] | None) -> None:
        """After a reload: drop every window and baseline (they hold the old model's
        scores) and take the new calibration's histogram as the drift reference.
        Counters (``tcm_feedback_total``) keep counting: Prometheus expects them monotonic."""
        with self._lock:
            self._references = load_references(reference_top1, self._psi_bins)
            self._edges = _bin_edges(reference_top1)
            self._tenants.clear()

    def reset_drift_baseline(self, tenant: str | None = None) -> None:
        """Start a new baseline (all tenants when None), e.g. after a gallery was rebuilt."""
        with self._lock:
            label = self.labels.get(tenant) if tenant is not None else None
            for name, windows in self._tenants.items():
                if tenant is None or name == label:
                    windows.baseline, windows.baseline_scores = None, []

    def _grow_baseline(self, windows: _TenantWindows, score: float) -> None:
        windows.baseline_scores.append(score)
        if len(windows.baseline_scores) >= self._baseline_size:
            edges = np.asarray(self._edges)
            idx = np.clip(
                np.searchsorted(edges, windows.baseline_scores, "right") - 1, 0, len(edges) - 2
            )
            counts = np.bincount(idx, minlength=len(edges) - 1)
            windows.baseline = ReferenceHistogram(edges, counts, self._psi_bins)
            windows.baseline_scores = []

    def tenant_label(self, tenant: str) -> str:
        """The bounded label the server should use for ``tenant`` in its own metrics."""
        return self.labels.label(tenant)

    # -- computing the gauges --------------------------------------------------------------

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Per-label statistics of the current windows."""
        with self._lock:
            for windows in self._tenants.values():
                windows.expire()
            return {label: self._stats(label, w) for label, w in self._tenants.items()}

    def cross_tenant(self, stats: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
        """Spread ratios and cross-tenant OPIS over the per-label statistics."""
        fb = [(int(s["impostor_accepted"]), int(s["impostor_decisions"])) for s in stats.values()]
        lf = [(int(s["label_free_accepted"]), int(s["label_free_pairs"])) for s in stats.values()]
        return {
            "spread_feedback": spread_ratio(fb, self._min_feedback),
            "spread_label_free": spread_ratio(lf, self._min_pairs),
            "opis_feedback": self._opis_feedback(stats)[0],
        }

    def _opis_feedback(self, stats: Mapping[str, Mapping[str, float]]) -> tuple[float, dict]:
        """Cross-tenant OPIS at the served threshold, from feedback TAR and FAR.

        Live data has one threshold, so each tenant's utility curve has one point (G = 1).
        Tenants need ``min_feedback`` genuine and impostor verdicts. NaN below two tenants.
        """
        members = [
            (label, s["tar_feedback"], s["far_feedback"])
            for label, s in stats.items()
            if s["genuine_decisions"] >= self._min_feedback
            and s["impostor_decisions"] >= self._min_feedback
        ]
        if len(members) < 2:
            return NAN, {}
        u = utility(np.array([m[1] for m in members]), np.array([m[2] for m in members]))
        curves = u.reshape(-1, 1)
        terms = opis_terms(curves)
        return opis(curves), {m[0]: float(t) for m, t in zip(members, terms, strict=True)}

    def _windows(self, tenant: str) -> _TenantWindows:
        label = self.labels.label(tenant)
        found = self._tenants.get(label)
        if found is None:
            found = self._tenants[label] = _TenantWindows(*self._window, self._clock)
        return found

    def _stats(self, label: str, w: _TenantWindows) -> dict[str, float]:
        decisions = list(w.decisions)
        verdicts = list(w.feedback)
        impostors = [f for f in verdicts if not f.is_same]
        genuines = [f for f in verdicts if f.is_same]
        imp_acc = sum(f.matched for f in impostors)
        lf_acc = sum(d.impostor_accepted for d in decisions)
        lf_pairs = sum(d.impostor_total for d in decisions)
        far_fb = rate(imp_acc, len(impostors))
        far_lf = rate(lf_acc, lf_pairs)
        lo, hi = wilson_interval(imp_acc, len(impostors))
        psi, ks = self._drift(label, w, [d.top1 for d in decisions])
        return {
            "decisions": float(len(decisions)),
            "match_rate": rate(sum(d.matched for d in decisions), len(decisions)),
            "impostor_decisions": float(len(impostors)),
            "impostor_accepted": float(imp_acc),
            "genuine_decisions": float(len(genuines)),
            "tar_feedback": rate(sum(f.matched for f in genuines), len(genuines)),
            "far_feedback": far_fb,
            "far_feedback_ci_lower": lo,
            "far_feedback_ci_upper": hi,
            "far_feedback_ratio": far_fb / self.target_far,
            "far_label_free": far_lf,
            "label_free_accepted": float(lf_acc),
            "label_free_pairs": float(lf_pairs),
            "far_label_free_ratio": far_lf / self.target_far,
            "score_drift_psi": psi,
            "score_drift_ks": ks,
        }

    def _drift(self, label: str, w: _TenantWindows, scores: list[float]) -> tuple[float, float]:
        ref: ReferenceHistogram | None
        if self._drift_reference == "baseline":
            ref = w.baseline
        else:
            ref = self._references.get(label, self._references.get(""))
        if ref is None or len(scores) < max(self._min_drift, 1):
            return NAN, NAN
        return ref.psi(scores), ref.ks(scores)


def _check_drift_settings(drift_reference: str, baseline_decisions: int) -> None:
    if drift_reference not in ("calibration", "baseline"):
        raise ValueError(
            f'drift_reference must be "calibration" or "baseline", got {drift_reference!r}'
        )
    if not (isinstance(baseline_decisions, int) and baseline_decisions >= 2):
        raise ValueError(f"baseline_decisions must be an integer >= 2, got {baseline_decisions!r}")


def _empty_stats(target_far: float) -> dict[str, float]:
    keys = ("decisions", "impostor_decisions", "impostor_accepted", "genuine_decisions")
    stats = dict.fromkeys(keys, 0.0)
    stats.update({"label_free_accepted": 0.0, "label_free_pairs": 0.0})
    for key in (
        "match_rate",
        "tar_feedback",
        "far_feedback",
        "far_feedback_ci_lower",
        "far_feedback_ci_upper",
        "far_feedback_ratio",
        "far_label_free",
        "far_label_free_ratio",
        "score_drift_psi",
        "score_drift_ks",
        "opis_drift_feedback",
    ):
        stats[key] = NAN
    return stats


# Gauge name -> (key in the per-tenant stats, help text).
_TENANT_GAUGES = {
    "tcm_far_feedback": ("far_feedback", "Accepted impostor decisions / impostor decisions"),
    "tcm_far_feedback_ci_lower": ("far_feedback_ci_lower", "Lower end of the 95% Wilson interval"),
    "tcm_far_feedback_ci_upper": ("far_feedback_ci_upper", "Upper end of the 95% Wilson interval"),
    "tcm_far_feedback_impostor_decisions": (
        "impostor_decisions",
        "Impostor decisions with feedback in the window",
    ),
    "tcm_far_feedback_ratio": ("far_feedback_ratio", "tcm_far_feedback / target FAR"),
    "tcm_far_label_free": (
        "far_label_free",
        "Pairs with a label other than the top-1's at or above threshold / all such pairs",
    ),
    "tcm_far_label_free_pairs": ("label_free_pairs", "Pairs behind tcm_far_label_free"),
    "tcm_far_label_free_ratio": ("far_label_free_ratio", "tcm_far_label_free / target FAR"),
    "tcm_score_drift_psi": ("score_drift_psi", "PSI of top-1 similarity vs the reference"),
    "tcm_score_drift_ks": ("score_drift_ks", "Binned KS statistic of top-1 similarity"),
}


_DECISION = {True: "match", False: "no_match"}


class _Counts:
    """Per tenant label: monitored decisions, label-free pairs and exceedances, feedback
    verdicts by the decision they judge. Guarded by the monitor's lock."""

    def __init__(self) -> None:
        self.decisions: dict[tuple[str, str], int] = {}
        self.lf_accepted: dict[str, int] = {}
        self.lf_pairs: dict[str, int] = {}
        self.feedback_outcomes: dict[tuple[str, str, str], int] = {}

    def decision(self, label: str, entry: _Decision) -> None:
        key = (label, _DECISION[entry.matched])
        self.decisions[key] = self.decisions.get(key, 0) + 1
        self.lf_accepted[label] = self.lf_accepted.get(label, 0) + entry.impostor_accepted
        self.lf_pairs[label] = self.lf_pairs.get(label, 0) + entry.impostor_total

    def feedback(self, label: str, verdict: str, matched: bool) -> None:
        key = (label, verdict, _DECISION[bool(matched)])
        self.feedback_outcomes[key] = self.feedback_outcomes.get(key, 0) + 1

    def families(self) -> Iterator[CounterMetricFamily]:
        decisions = CounterMetricFamily(
            "tcm_monitored_decisions",
            "Match decisions at the monitored target FAR",
            labels=["tenant", "decision"],
        )
        for (label, decision), n in sorted(self.decisions.items()):
            decisions.add_metric([label, decision], n)
        yield decisions
        accepted = CounterMetricFamily(
            "tcm_label_free_accepted",
            "Label-free impostor pairs at or above the threshold (exceedances)",
            labels=["tenant"],
        )
        pairs = CounterMetricFamily(
            "tcm_label_free_pairs", "Label-free impostor pairs counted", labels=["tenant"]
        )
        for label in sorted(self.lf_pairs):
            accepted.add_metric([label], self.lf_accepted.get(label, 0))
            pairs.add_metric([label], self.lf_pairs[label])
        yield accepted
        yield pairs
        outcomes = CounterMetricFamily(
            "tcm_feedback_outcomes",
            "Feedback verdicts by the decision they judge (different+match = accepted impostor)",
            labels=["tenant", "verdict", "decision"],
        )
        for (label, verdict, decision), n in sorted(self.feedback_outcomes.items()):
            outcomes.add_metric([label, verdict, decision], n)
        yield outcomes


class _Collector(Collector):
    """Computes every live gauge from the monitor's windows when Prometheus scrapes."""

    def __init__(self, monitor: LiveMonitor) -> None:
        self._monitor = monitor

    def describe(self) -> Iterator[Any]:
        # Names only, so registering never computes (or locks) anything.
        yield CounterMetricFamily("tcm_feedback", "Feedback calls", labels=["tenant", "verdict"])
        yield CounterMetricFamily("tcm_monitored_decisions", "", labels=["tenant", "decision"])
        yield CounterMetricFamily("tcm_label_free_accepted", "", labels=["tenant"])
        yield CounterMetricFamily("tcm_label_free_pairs", "", labels=["tenant"])
        yield CounterMetricFamily(
            "tcm_feedback_outcomes", "", labels=["tenant", "verdict", "decision"]
        )
        for name, (_, doc) in _TENANT_GAUGES.items():
            yield GaugeMetricFamily(name, doc, labels=["tenant"])
        yield GaugeMetricFamily("tcm_far_spread_ratio", "", labels=["estimate"])
        yield GaugeMetricFamily("tcm_tenant_opis", "", labels=["estimate"])

    def collect(self) -> Iterator[Any]:
        m = self._monitor
        stats = m.snapshot()
        with m._lock:
            calls = dict(m._feedback_calls)
            counts = list(m._counts.families())
        counter = CounterMetricFamily(
            "tcm_feedback", "Feedback calls by verdict", labels=["tenant", "verdict"]
        )
        for (label, verdict), n in sorted(calls.items()):
            counter.add_metric([label, verdict], n)
        yield counter
        yield from counts
        for name, (key, doc) in _TENANT_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=["tenant"])
            for label in sorted(stats):
                family.add_metric([label], stats[label][key])
            yield family
        cross = m.cross_tenant(stats)
        spread = GaugeMetricFamily(
            "tcm_far_spread_ratio",
            "max / min per-tenant FAR across tenants (a zero counts as half an accept)",
            labels=["estimate"],
        )
        spread.add_metric(["feedback"], cross["spread_feedback"])
        spread.add_metric(["label_free"], cross["spread_label_free"])
        yield spread
        opis_family = GaugeMetricFamily(
            "tcm_tenant_opis",
            "Cross-tenant OPIS at the served threshold from feedback TAR/FAR",
            labels=["estimate"],
        )
        opis_family.add_metric(["feedback"], cross["opis_feedback"])
        yield opis_family


def _bin_edges(reference_top1: Mapping[str, Any] | None) -> list[float]:
    """Baseline histograms bin like the calibration reference, else 200 bins over [-1, 1]."""
    return list(reference_top1["edges"]) if reference_top1 else np.linspace(-1, 1, 201).tolist()
