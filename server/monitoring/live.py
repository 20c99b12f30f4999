"""LiveMonitor: per-tenant, per-target FAR (label-free and feedback), spread, OPIS, drift.

The server calls ``record_decision`` for every Match answer, ``record_feedback`` when a
client says whether a past decision was the same identity, and ``tenant_deleted`` when a
tenant goes. Every series carries a bounded tenant label (server/monitoring/labels.py)
and, where it depends on the threshold, the decision's ``target_far`` label (one of the
calibration's targets, formatted ``f"{far:g}"`` like ``tcm_threshold_similarity``).

Two kinds of numbers are exported (docs/METRICS.md):

- counters that add up across replicas (Prometheus sums them by tenant and target, then
  divides; the fleet view and the alerts are built on them);
- window gauges of this process (the label-free FAR over the last N decisions, with its
  Wilson interval) and the drift, spread and OPIS gauges, computed at scrape time by a
  custom collector, so a scrape sees the windows as they are then and the request path
  only appends a row.

Only what must be per tenant is: the feedback-window numbers (FAR, interval, TAR) and
KS are in ``tenant_stats`` (GetTenant), not in the exposition, because Prometheus
computes the same from the counters (deploy/prometheus/rules/recording.yml).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from calibrate.consistency import opis, opis_terms, utility
from server.monitoring.drift import ReferenceHistogram, load_references
from server.monitoring.estimators import NAN, rate, spread_ratio, wilson_interval
from server.monitoring.labels import (
    DEFAULT_MAX_NAMED,
    TenantLabels,
    bucket_label,
    is_bucket,
    tenant_hash,
)
from server.monitoring.window import RowWindow, SlidingWindow, validate_window

# Columns of a decision row. The tenant column tells tenants sharing a bucket apart (a
# 52-bit hash of the name: exact in a float64), so a deleted one can be taken out.
TOP1, MATCHED, EXCEEDANCES, PAIRS, TENANT = range(5)
_DECISION = {True: "match", False: "no_match"}
_OUTCOMES = [(v, d) for v in ("same", "different") for d in ("match", "no_match")]


def _zeros(keys: Iterable[Any]) -> dict[Any, int]:
    return dict.fromkeys(keys, 0)


def far_label(target_far: float) -> str:
    """The ``target_far`` label value of a target (the format of tcm_threshold_similarity)."""
    return f"{target_far:g}"


def _tenant_key(tenant: str) -> float:
    return float(tenant_hash(tenant) >> 12)


@dataclass
class _Feedback:
    decision_id: str
    matched: bool
    is_same: bool
    tenant: str


class _TargetWindows:
    """Decisions and verdicts of one tenant label at one target FAR."""

    def __init__(
        self,
        target_far: float,
        max_items: int | None,
        max_age: float | None,
        clock: Callable[[], float],
    ) -> None:
        self.target_far = target_far
        self.decisions = RowWindow(5, max_items, max_age, clock)
        self.feedback: SlidingWindow[_Feedback] = SlidingWindow(max_items, max_age, clock)
        self.by_id: dict[str, _Feedback] = {}

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

    def drop_tenant(self, tenant: str) -> None:
        """Takes a deleted tenant's rows and verdicts out of a shared (bucket) window."""
        rows = self.decisions.values()
        self.decisions.keep(rows[:, TENANT] != _tenant_key(tenant))
        self._forget(self.feedback.keep(lambda f: f.tenant != tenant))

    def _forget(self, gone: list[_Feedback]) -> None:
        for entry in gone:
            if self.by_id.get(entry.decision_id) is entry:
                del self.by_id[entry.decision_id]


@dataclass
class _LabelState:
    """Everything kept for one tenant label: a window pair per target, the drift baseline."""

    targets: dict[str, _TargetWindows] = field(default_factory=dict)
    # drift_reference="baseline": the tenant's first scores, then their histogram.
    baseline_scores: list[float] = field(default_factory=list)
    baseline: ReferenceHistogram | None = None

    def scores(self) -> np.ndarray:
        """Top-1 similarities of every target's window (the score does not depend on it)."""
        parts = [w.decisions.values()[:, TOP1] for w in self.targets.values()]
        return np.concatenate(parts) if parts else np.empty(0)


@dataclass
class _Counts:
    """Counters of one (tenant label, target) key. They never go down while the key is
    exported; a deleted or relabelled tenant's key is dropped whole."""

    decisions: dict[str, int] = field(default_factory=lambda: _zeros(_DECISION.values()))
    exceedances: float = 0.0
    pairs: float = 0.0
    # Every outcome starts at 0 when the key appears, so a ratio of two of them exists
    # (as 0) before the first accepted impostor, and rate() sees the first verdict.
    outcomes: dict[tuple[str, str], int] = field(default_factory=lambda: _zeros(_OUTCOMES))


class LiveMonitor:
    """Implements server.matching.observer.DecisionObserver and exports the live metrics.

    ``target_far`` is the server's default target: ``tenant_stats`` (GetTenant) and the
    cross-tenant spread and OPIS are about decisions at it; every other served target
    has its own windows and series. Windows hold the last ``window_decisions`` decisions
    (and, as a separate window, feedback verdicts) per tenant label and target, and/or
    those younger than ``window_seconds``. ``reference_top1`` is the calibration
    document's ``reference.top1_similarity``; without it the drift gauge is NaN.
    ``min_feedback`` / ``min_label_free_pairs``: evidence a tenant needs to enter the
    cross-tenant spread and OPIS; ``min_drift_samples``: decisions before drift is
    reported (PSI of a handful of scores is noise). ``labels``: the server's tenant-label
    mapping, so serving and monitoring series agree (``max_tenant_labels`` only applies
    to a new one). ``drift_reference``: ``"calibration"`` compares with
    ``reference_top1``; ``"baseline"`` with each tenant's own first
    ``baseline_decisions`` top-1 scores (binned on the reference's edges, else 200 bins
    over [-1, 1]). The calibration histogram reflects the calibration set's gallery
    make-up, so a live gallery of a few images per class reads as drift against it; a
    tenant's own baseline only sees change over time.
    """

    def __init__(
        self,
        target_far: float,
        *,
        registry: CollectorRegistry,
        window_decisions: int | None = 1000,
        window_seconds: float | None = None,
        max_tenant_labels: int = DEFAULT_MAX_NAMED,
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
        _check_target(target_far)
        validate_window(window_decisions, window_seconds)
        _check_drift_settings(drift_reference, baseline_decisions)
        self.target_far = float(target_far)
        self.labels = labels if labels is not None else TenantLabels(max_tenant_labels)
        self._window = (window_decisions, window_seconds)
        self._references = load_references(reference_top1, psi_bins)
        self._drift_reference = drift_reference
        self._baseline_size = baseline_decisions
        self._psi_bins = psi_bins
        self._edges = _bin_edges(reference_top1)
        self._clock = clock
        self._min_feedback = min_feedback
        self._min_pairs = min_label_free_pairs
        self._min_drift = min_drift_samples
        self._states: dict[str, _LabelState] = {}
        self._counts: dict[tuple[str, str], _Counts] = {}
        self._generation = self.labels.generation
        self._lock = threading.Lock()
        registry.register(_Collector(self))

    # -- DecisionObserver -------------------------------------------------------------

    def record_decision(
        self,
        tenant: str,
        decision_id: str,
        top1_similarity: float,
        matched: bool,
        target_far: float,
        label_free_exceedances: float,
        label_free_pairs: float,
    ) -> None:
        """Adds one Match answer made at ``target_far``. ``label_free_exceedances``: the
        expected impostor pairs at or above the decision's threshold; ``label_free_pairs``:
        the impostor pairs behind that expectation (both may be fractional)."""
        _check_label_free(label_free_exceedances, label_free_pairs)
        if not math.isfinite(top1_similarity):
            raise ValueError(f"top1_similarity must be finite, got {top1_similarity}")
        _check_target(target_far)
        row = (
            float(top1_similarity),
            float(bool(matched)),
            float(label_free_exceedances),
            float(label_free_pairs),
            _tenant_key(tenant),
        )
        with self._lock:
            label, key = self._key(tenant, target_far)
            counts = self._counts[key]
            counts.decisions[_DECISION[bool(matched)]] += 1
            counts.exceedances += row[EXCEEDANCES]
            counts.pairs += row[PAIRS]
            state = self._states[label]
            state.targets[key[1]].decisions.append(row)
            if self._drift_reference == "baseline" and state.baseline is None:
                self._grow_baseline(state, row[TOP1])

    def record_feedback(
        self, tenant: str, decision_id: str, matched: bool, is_same: bool, target_far: float
    ) -> None:
        """Adds a ground-truth verdict on a past decision made at ``target_far``
        (is_same: query and match are the same identity)."""
        if not decision_id:
            raise ValueError("decision_id must be a non-empty string")
        _check_target(target_far)
        with self._lock:
            label, key = self._key(tenant, target_far)
            verdict = "same" if is_same else "different"
            self._counts[key].outcomes[verdict, _DECISION[bool(matched)]] += 1
            windows = self._states[label].targets[key[1]]
            windows.add_feedback(_Feedback(decision_id, bool(matched), bool(is_same), tenant))

    def tenant_deleted(self, tenant: str) -> None:
        """Forget a deleted tenant: its windows, counters and label (a tenant created
        later with the same name starts from nothing). A tenant that shared a bucket
        leaves the bucket's windows; the bucket's counters keep what it counted, since
        counters never go down."""
        with self._lock:
            self._drop_label(tenant)  # its own label, if it had one
            bucket = bucket_label(tenant, self.labels.buckets)
            for windows in self._states.get(bucket, _LabelState()).targets.values():
                windows.drop_tenant(tenant)  # its rows, if it shared a bucket
            self.labels.remove(tenant)
            self._follow_labels()

    def tenant_stats(self, tenant: str) -> dict[str, float]:
        """The window statistics of ``tenant``'s label at the default target FAR (tenants
        sharing a bucket share its statistics). A tenant never seen gets empty ones."""
        label = self.labels.get(tenant)
        stats = self.snapshot()
        key = (label, far_label(self.target_far))
        if label is None or key not in stats:
            return _empty_stats()
        with self._lock:
            state = self._states.get(label)
            psi, ks = self._drift(label, state) if state is not None else (NAN, NAN)
        terms = self._opis_feedback(self._default_stats(stats))[1]
        extra = {"score_drift_psi": psi, "score_drift_ks": ks}
        return {**stats[key], **extra, "opis_drift_feedback": terms.get(label, NAN)}

    def model_changed(self, reference_top1: Mapping[str, Any] | None) -> None:
        """After a reload: drop every window and baseline (they hold the old model's
        scores) and take the new calibration's histogram as the drift reference.
        Counters keep counting: Prometheus expects them monotonic."""
        with self._lock:
            self._references = load_references(reference_top1, self._psi_bins)
            self._edges = _bin_edges(reference_top1)
            self._states.clear()

    def reset_drift_baseline(self, tenant: str | None = None) -> None:
        """Start a new baseline (all tenants when None), e.g. after a gallery was rebuilt."""
        with self._lock:
            label = self.labels.get(tenant) if tenant is not None else None
            for name, state in self._states.items():
                if tenant is None or name == label:
                    state.baseline, state.baseline_scores = None, []

    def tenant_label(self, tenant: str) -> str:
        """The bounded label the server should use for ``tenant`` in its own metrics."""
        return self.labels.label(tenant)

    # -- state per label ------------------------------------------------------------------

    def _key(self, tenant: str, target_far: float) -> tuple[str, tuple[str, str]]:
        """(label, (label, target label)); creates the key's windows and zeroed counters."""
        label = self.labels.label(tenant)
        self._follow_labels()
        key = (label, far_label(target_far))
        if key not in self._counts:
            self._counts[key] = _Counts()
        state = self._states.setdefault(label, _LabelState())
        if key[1] not in state.targets:
            state.targets[key[1]] = _TargetWindows(float(target_far), *self._window, self._clock)
        return label, key

    def _follow_labels(self) -> None:
        """When the label mapping changed, drop what is kept under a name that is no
        longer a label (a tenant removed, or moved into a bucket)."""
        if self.labels.generation == self._generation:
            return
        self._generation = self.labels.generation
        stale = {k for k in self._states if not is_bucket(k) and self.labels.get(k) != k}
        stale |= {k for k, _ in self._counts if not is_bucket(k) and self.labels.get(k) != k}
        for label in stale:
            self._drop_label(label)

    def _drop_label(self, label: str) -> None:
        self._states.pop(label, None)
        for key in [k for k in self._counts if k[0] == label]:
            del self._counts[key]

    def _grow_baseline(self, state: _LabelState, score: float) -> None:
        state.baseline_scores.append(score)
        if len(state.baseline_scores) >= self._baseline_size:
            edges = np.asarray(self._edges)
            idx = np.clip(
                np.searchsorted(edges, state.baseline_scores, "right") - 1, 0, len(edges) - 2
            )
            counts = np.bincount(idx, minlength=len(edges) - 1)
            state.baseline = ReferenceHistogram(edges, counts, self._psi_bins)
            state.baseline_scores = []

    # -- computing the gauges --------------------------------------------------------------

    def snapshot(self) -> dict[tuple[str, str], dict[str, float]]:
        """Statistics of every (tenant label, target label) window."""
        with self._lock:
            self._follow_labels()
            out = {}
            for label, state in self._states.items():
                for target, windows in state.targets.items():
                    windows.expire()
                    out[label, target] = _window_stats(windows)
            return out

    def psi(self) -> dict[str, float]:
        """PSI per tenant label, over the scores of all its windows (KS, in GetTenant
        only, is not computed here: a scrape of a thousand full windows is half drift)."""
        with self._lock:
            return {label: self._drift(label, s, ks=False)[0] for label, s in self._states.items()}

    def counts(self) -> dict[tuple[str, str], _Counts]:
        """A copy of the counters, per (tenant label, target label)."""
        with self._lock:
            self._follow_labels()
            return {
                k: _Counts(dict(c.decisions), c.exceedances, c.pairs, dict(c.outcomes))
                for k, c in self._counts.items()
            }

    def cross_tenant(self, stats: Mapping[tuple[str, str], Mapping[str, float]]) -> dict:
        """Spread ratios and cross-tenant OPIS across tenants, at the default target."""
        at_default = self._default_stats(stats)
        fb = [(s["impostor_accepted"], s["impostor_decisions"]) for s in at_default.values()]
        lf = [(s["label_free_exceedances"], s["label_free_pairs"]) for s in at_default.values()]
        return {
            "spread_feedback": spread_ratio(fb, self._min_feedback),
            "spread_label_free": spread_ratio(lf, self._min_pairs),
            "opis_feedback": self._opis_feedback(at_default)[0],
        }

    def _default_stats(self, stats: Mapping[tuple[str, str], Mapping[str, float]]) -> dict:
        target = far_label(self.target_far)
        return {label: s for (label, t), s in stats.items() if t == target}

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

    def _drift(self, label: str, state: _LabelState, ks: bool = True) -> tuple[float, float]:
        ref: ReferenceHistogram | None
        if self._drift_reference == "baseline":
            ref = state.baseline
        else:
            ref = self._references.get(label, self._references.get(""))
        scores = state.scores()
        if ref is None or len(scores) < max(self._min_drift, 1):
            return NAN, NAN
        return ref.psi(scores), ref.ks(scores) if ks else NAN


def _window_stats(w: _TargetWindows) -> dict[str, float]:
    """The label-free and feedback statistics of one window pair."""
    rows = w.decisions.values()
    exceedances, pairs = float(rows[:, EXCEEDANCES].sum()), float(rows[:, PAIRS].sum())
    far_lf = rate(exceedances, pairs)
    lf_lo, lf_hi = wilson_interval(exceedances, pairs)
    verdicts = list(w.feedback)
    impostors = [f for f in verdicts if not f.is_same]
    genuines = [f for f in verdicts if f.is_same]
    imp_acc = sum(f.matched for f in impostors)
    far_fb = rate(imp_acc, len(impostors))
    fb_lo, fb_hi = wilson_interval(imp_acc, len(impostors))
    return {
        "decisions": float(len(rows)),
        "match_rate": rate(float(rows[:, MATCHED].sum()), len(rows)),
        "impostor_decisions": float(len(impostors)),
        "impostor_accepted": float(imp_acc),
        "genuine_decisions": float(len(genuines)),
        "tar_feedback": rate(sum(f.matched for f in genuines), len(genuines)),
        "far_feedback": far_fb,
        "far_feedback_ci_lower": fb_lo,
        "far_feedback_ci_upper": fb_hi,
        "far_label_free": far_lf,
        "far_label_free_ci_lower": lf_lo,
        "far_label_free_ci_upper": lf_hi,
        "label_free_exceedances": exceedances,
        "label_free_pairs": pairs,
        "far_label_free_ratio": far_lf / w.target_far,
    }


def _check_target(target_far: float) -> None:
    if not (isinstance(target_far, int | float) and 0 < target_far < 1):
        raise ValueError(f"target_far must lie in (0, 1), got {target_far!r}")


def _check_label_free(exceedances: float, pairs: float) -> None:
    if not (math.isfinite(exceedances) and math.isfinite(pairs) and 0 <= exceedances <= pairs):
        raise ValueError(
            "need finite 0 <= label_free_exceedances <= label_free_pairs, "
            f"got {exceedances} of {pairs}"
        )


def _check_drift_settings(drift_reference: str, baseline_decisions: int) -> None:
    if drift_reference not in ("calibration", "baseline"):
        raise ValueError(
            f'drift_reference must be "calibration" or "baseline", got {drift_reference!r}'
        )
    if not (isinstance(baseline_decisions, int) and baseline_decisions >= 2):
        raise ValueError(f"baseline_decisions must be an integer >= 2, got {baseline_decisions!r}")


def _empty_stats() -> dict[str, float]:
    keys = ("decisions", "impostor_decisions", "impostor_accepted", "genuine_decisions")
    stats = dict.fromkeys(keys, 0.0)
    stats.update({"label_free_exceedances": 0.0, "label_free_pairs": 0.0})
    for key in (
        "match_rate",
        "tar_feedback",
        "far_feedback",
        "far_feedback_ci_lower",
        "far_feedback_ci_upper",
        "far_label_free",
        "far_label_free_ci_lower",
        "far_label_free_ci_upper",
        "far_label_free_ratio",
        "score_drift_psi",
        "score_drift_ks",
        "opis_drift_feedback",
    ):
        stats[key] = NAN
    return stats


# Window gauge name -> (key in the window statistics, help text); labels tenant, target_far.
_WINDOW_GAUGES = {
    "tcm_far_label_free": (
        "far_label_free",
        "Label-free FAR over the window: expected impostor exceedances / impostor pairs",
    ),
    "tcm_far_label_free_pairs": ("label_free_pairs", "Impostor pairs behind tcm_far_label_free"),
    "tcm_far_label_free_ratio": ("far_label_free_ratio", "tcm_far_label_free / target_far"),
    "tcm_far_label_free_ci_lower": (
        "far_label_free_ci_lower",
        "Lower end of the 95% Wilson interval of tcm_far_label_free",
    ),
    "tcm_far_label_free_ci_upper": (
        "far_label_free_ci_upper",
        "Upper end of the 95% Wilson interval of tcm_far_label_free",
    ),
}
_KEY = ["tenant", "target_far"]


def _counter_families(counts: Mapping[tuple[str, str], _Counts]) -> Iterator[CounterMetricFamily]:
    """The counters that add up across replicas, one sample per key (and outcome)."""
    decisions = CounterMetricFamily(
        "tcm_monitored_decisions",
        "Match decisions, by the target FAR they were made at",
        labels=["tenant", "decision", "target_far"],
    )
    exceedances = CounterMetricFamily(
        "tcm_label_free_exceedances",
        "Expected label-free impostor pairs at or above the decision's threshold",
        labels=_KEY,
    )
    pairs = CounterMetricFamily(
        "tcm_label_free_pairs", "Label-free impostor pairs counted", labels=_KEY
    )
    outcomes = CounterMetricFamily(
        "tcm_feedback_outcomes",
        "Feedback verdicts by the decision they judge (different+match = accepted impostor)",
        labels=["tenant", "target_far", "verdict", "decision"],
    )
    for (label, target), c in sorted(counts.items()):
        for decision, n in c.decisions.items():
            decisions.add_metric([label, decision, target], n)
        exceedances.add_metric([label, target], c.exceedances)
        pairs.add_metric([label, target], c.pairs)
        for (verdict, decision), n in c.outcomes.items():
            outcomes.add_metric([label, target, verdict, decision], n)
    yield from (decisions, exceedances, pairs, outcomes)


class _Collector(Collector):
    """Computes every live series from the monitor's state when Prometheus scrapes."""

    def __init__(self, monitor: LiveMonitor) -> None:
        self._monitor = monitor

    def describe(self) -> Iterator[Any]:
        # Names only, so registering never computes (or locks) anything.
        yield from _counter_families({})
        for name, (_, doc) in _WINDOW_GAUGES.items():
            yield GaugeMetricFamily(name, doc, labels=_KEY)
        yield GaugeMetricFamily("tcm_score_drift_psi", "", labels=["tenant"])
        yield GaugeMetricFamily("tcm_far_spread_ratio", "", labels=["estimate"])
        yield GaugeMetricFamily("tcm_tenant_opis", "", labels=["estimate"])

    def collect(self) -> Iterator[Any]:
        m = self._monitor
        stats = m.snapshot()
        yield from _counter_families(m.counts())
        for name, (key, doc) in _WINDOW_GAUGES.items():
            family = GaugeMetricFamily(name, doc, labels=_KEY)
            for (label, target), s in sorted(stats.items()):
                family.add_metric([label, target], s[key])
            yield family
        psi = GaugeMetricFamily(
            "tcm_score_drift_psi", "PSI of top-1 similarity vs the reference", labels=["tenant"]
        )
        for label, value in sorted(m.psi().items()):
            psi.add_metric([label], value)
        yield psi
        cross = m.cross_tenant(stats)
        spread = GaugeMetricFamily(
            "tcm_far_spread_ratio",
            "max / min per-tenant FAR across tenants at the default target (a zero counts "
            "as half an accept)",
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
