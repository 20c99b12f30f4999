"""LiveMonitor: windows, both FAR estimates, spread, OPIS, drift and label capping.

Deterministic streams and a fake clock; every expected value is worked out by hand.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from server.monitoring import LiveMonitor, ReferenceHistogram, TenantLabels, wilson_interval
from server.monitoring.estimators import spread_ratio


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(**kw) -> tuple[LiveMonitor, CollectorRegistry]:
    registry = CollectorRegistry()
    kw.setdefault("registry", registry)
    return LiveMonitor(0.01, **kw), registry


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """One sample; the window gauges default to the monitor's target FAR 0.01."""
    if name.startswith("tcm_far_label_free"):
        labels.setdefault("target_far", "0.01")
    return registry.get_sample_value(name, labels)


def verdicts(registry: CollectorRegistry, tenant: str, verdict: str) -> float:
    """Feedback calls of ``tenant`` with ``verdict``, over both decisions."""
    return sum(
        registry.get_sample_value(
            "tcm_feedback_outcomes_total",
            {"tenant": tenant, "target_far": "0.01", "verdict": verdict, "decision": d},
        )
        for d in ("match", "no_match")
    )


def ks(mon: LiveMonitor, tenant: str) -> float:
    """The binned KS statistic: in GetTenant's stats, not in the exposition."""
    return mon.tenant_stats(tenant)["score_drift_ks"]


def decide(mon: LiveMonitor, tenant: str, n: int, acc: int = 0, tot: int = 10, top1=0.5) -> None:
    for i in range(n):
        mon.record_decision(tenant, f"{tenant}-{i}", top1, False, 0.01, acc, tot)


def impostor_feedback(mon: LiveMonitor, tenant: str, accepted: int, total: int, start=0) -> None:
    for i in range(start, start + total):
        mon.record_feedback(tenant, f"{tenant}-fb{i}", i - start < accepted, False, 0.01)


def test_label_free_far_is_pair_level_over_the_count_window():
    mon, reg = make(window_decisions=3)
    # Five decisions; only the last three (acc 3, 4, 5 of 100 each) stay in the window.
    for k in range(1, 6):
        mon.record_decision("latin", f"d{k}", 0.9, True, 0.01, k, 100)
    assert value(reg, "tcm_far_label_free", tenant="latin") == pytest.approx(12 / 300)
    assert value(reg, "tcm_far_label_free_pairs", tenant="latin") == 300
    assert value(reg, "tcm_far_label_free_ratio", tenant="latin") == pytest.approx(4.0)


def test_time_window_drops_entries_exactly_window_seconds_old():
    clock = FakeClock()
    mon, reg = make(window_decisions=None, window_seconds=60, clock=clock)
    mon.record_decision("greek", "a", 0.9, True, 0.01, 1, 10)
    clock.now += 30
    mon.record_decision("greek", "b", 0.9, True, 0.01, 3, 10)
    assert value(reg, "tcm_far_label_free", tenant="greek") == pytest.approx(4 / 20)
    clock.now += 30  # "a" is now exactly 60 s old: out
    assert value(reg, "tcm_far_label_free", tenant="greek") == pytest.approx(3 / 10)
    clock.now += 30
    assert math.isnan(value(reg, "tcm_far_label_free", tenant="greek"))
    assert value(reg, "tcm_far_label_free_pairs", tenant="greek") == 0


def test_count_and_time_bounds_apply_together():
    clock = FakeClock()
    mon, reg = make(window_decisions=2, window_seconds=10, clock=clock)
    for k in range(3):
        mon.record_decision("t", f"d{k}", 0.9, True, 0.01, 1, 4)
    assert value(reg, "tcm_far_label_free_pairs", tenant="t") == 8  # count bound
    clock.now += 10
    assert value(reg, "tcm_far_label_free_pairs", tenant="t") == 0  # time bound


def test_feedback_far_with_wilson_interval_and_ratio():
    mon, reg = make()
    impostor_feedback(mon, "cyrillic", accepted=2, total=10)
    for i in range(5):  # genuine verdicts do not enter FAR
        mon.record_feedback("cyrillic", f"g{i}", True, True, 0.01)
    stats = mon.tenant_stats("cyrillic")
    assert stats["far_feedback"] == pytest.approx(0.2)
    assert stats["impostor_decisions"] == 10
    # Wilson 95% for 2/10, as tabulated (e.g. Newcombe 1998): 0.0567 to 0.5098.
    assert stats["far_feedback_ci_lower"] == pytest.approx(0.05668, abs=1e-5)
    assert stats["far_feedback_ci_upper"] == pytest.approx(0.50984, abs=1e-5)
    # feedback FAR is per decision: no ratio to the per-pair target is exported
    assert "far_feedback_ratio" not in stats
    assert verdicts(reg, "cyrillic", "different") == 10
    assert verdicts(reg, "cyrillic", "same") == 5


def test_repeated_feedback_replaces_the_verdict_but_counts_the_call():
    mon, reg = make()
    mon.record_feedback("t", "d1", True, False, 0.01)
    mon.record_feedback("t", "d1", True, True, 0.01)  # corrected: it was the same identity
    assert mon.tenant_stats("t")["impostor_decisions"] == 0
    assert mon.tenant_stats("t")["genuine_decisions"] == 1
    assert verdicts(reg, "t", "different") == 1
    assert verdicts(reg, "t", "same") == 1


def test_feedback_window_slides_and_a_reused_id_after_eviction_counts_again():
    mon, _reg = make(window_decisions=2)
    mon.record_feedback("t", "d1", True, False, 0.01)
    mon.record_feedback("t", "d2", False, False, 0.01)
    mon.record_feedback("t", "d3", False, False, 0.01)  # evicts d1
    assert mon.tenant_stats("t")["far_feedback"] == 0.0
    mon.record_feedback("t", "d1", True, False, 0.01)  # d1 no longer known: a new entry
    assert mon.tenant_stats("t")["far_feedback"] == pytest.approx(0.5)  # d2 evicted


def test_no_data_gives_nan_not_zero():
    mon, reg = make()
    decide(mon, "t", 1, tot=0)  # a gallery with a single item has no impostor pairs
    assert math.isnan(mon.tenant_stats("t")["far_feedback"])
    assert math.isnan(mon.tenant_stats("t")["far_feedback_ci_lower"])
    assert math.isnan(value(reg, "tcm_far_label_free", tenant="t"))
    assert math.isnan(value(reg, "tcm_far_label_free_ci_lower", tenant="t"))
    assert math.isnan(value(reg, "tcm_far_spread_ratio", estimate="feedback"))
    assert math.isnan(value(reg, "tcm_tenant_opis", estimate="feedback"))
    assert math.isnan(value(reg, "tcm_score_drift_psi", tenant="t"))  # no reference


def test_spread_ratio_across_tenants_with_half_count_for_zero():
    mon, reg = make(min_feedback=10, min_label_free_pairs=100)
    impostor_feedback(mon, "a", accepted=2, total=20)
    impostor_feedback(mon, "b", accepted=0, total=20)
    impostor_feedback(mon, "c", accepted=5, total=5)  # below min_feedback: left out
    # a: 0.1, b: 0.5 / 20 = 0.025 -> 4.0
    assert value(reg, "tcm_far_spread_ratio", estimate="feedback") == pytest.approx(4.0)
    decide(mon, "a", 10, acc=3, tot=10)  # 30 / 100
    decide(mon, "b", 10, acc=1, tot=10)  # 10 / 100
    assert value(reg, "tcm_far_spread_ratio", estimate="label_free") == pytest.approx(3.0)


def test_spread_ratio_helper_edges():
    assert math.isnan(spread_ratio([(1, 10)], 1))
    assert spread_ratio([(0, 10), (0, 10)], 1) == 1.0
    assert spread_ratio([(0, 10), (0, 40)], 1) == pytest.approx(4.0)


def test_cross_tenant_opis_from_feedback_tar_and_far():
    mon, reg = make(min_feedback=4)
    # a: TAR 3/4, FAR 1/4 -> U = 0.75; b: TAR 1, FAR 0 -> U = 1.
    for tenant, genuine_acc, impostor_acc in (("a", 3, 1), ("b", 4, 0)):
        for i in range(4):
            mon.record_feedback(tenant, f"g{i}", i < genuine_acc, True, 0.01)
        impostor_feedback(mon, tenant, accepted=impostor_acc, total=4)
    # mean 0.875; each squared deviation 0.125^2 -> OPIS = 0.015625
    assert value(reg, "tcm_tenant_opis", estimate="feedback") == pytest.approx(0.015625)
    stats = mon.tenant_stats("a")
    assert stats["tar_feedback"] == 0.75
    assert stats["far_feedback"] == 0.25
    assert stats["opis_drift_feedback"] == pytest.approx(0.015625)  # its own term
    assert mon.tenant_stats("b")["opis_drift_feedback"] == pytest.approx(0.015625)


def test_drift_psi_and_ks_against_reference():
    ref = {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "counts": [25, 25, 25, 25]}
    mon, reg = make(reference_top1=ref, min_drift_samples=4, psi_bins=4)
    for s in (0.1, 0.1, 0.3, 0.3):  # live: half in bin 0, half in bin 1
        mon.record_decision("t", str(s), s, False, 0.01, 0, 5)
    floor = 1e-4
    expected = 2 * (0.5 - 0.25) * math.log(2) + 2 * (floor - 0.25) * math.log(floor / 0.25)
    assert value(reg, "tcm_score_drift_psi", tenant="t") == pytest.approx(expected)
    assert ks(mon, "t") == pytest.approx(0.5)  # 1.0 vs 0.5


def test_drift_matches_reference_distribution_exactly_gives_zero():
    ref = {"edges": [0.0, 0.5, 1.0], "counts": [30, 10]}
    mon, reg = make(reference_top1=ref, min_drift_samples=4)
    for s in (0.1, 0.2, 0.3, 0.9):
        mon.record_decision("t", str(s), s, False, 0.01, 0, 5)
    assert value(reg, "tcm_score_drift_psi", tenant="t") == pytest.approx(0.0)
    assert ks(mon, "t") == pytest.approx(0.0)


def test_drift_needs_min_samples():
    ref = {"edges": [0.0, 0.5, 1.0], "counts": [1, 1]}
    mon, _reg = make(reference_top1=ref, min_drift_samples=3)
    decide(mon, "t", 2, top1=0.9)
    assert math.isnan(ks(mon, "t"))
    decide(mon, "u", 3, top1=0.9)
    assert ks(mon, "u") == pytest.approx(0.5)


def test_per_dataset_reference_is_used_for_a_tenant_of_that_name():
    ref = {"edges": [0.0, 0.5, 1.0], "counts": {"latin": [0, 10], "greek": [10, 0]}}
    mon, _reg = make(reference_top1=ref, min_drift_samples=1)
    decide(mon, "latin", 2, top1=0.9)
    decide(mon, "greek", 2, top1=0.9)
    decide(mon, "math", 2, top1=0.9)  # pooled reference [10, 10]
    assert ks(mon, "latin") == pytest.approx(0.0)
    assert ks(mon, "greek") == pytest.approx(1.0)
    assert ks(mon, "math") == pytest.approx(0.5)


def test_psi_groups_fine_bins_into_reference_quantiles():
    ref = ReferenceHistogram(np.linspace(0, 1, 11), [0, 0, 10, 10, 10, 10, 0, 0, 0, 0], 4)
    assert list(ref.groups) == [0, 3, 4, 5]  # every group holds a quarter of the mass
    assert ref.psi([0.25, 0.35, 0.45, 0.55]) == pytest.approx(0.0)
    assert ref.psi([-5.0, 0.35, 0.45, 7.0]) == pytest.approx(0.0)  # outside: end bins


def test_tenant_stats_of_unknown_tenant_is_empty_but_complete():
    mon, _ = make(max_tenant_labels=1)
    stats = mon.tenant_stats("nobody")
    assert mon.tenant_label("real") == "real"  # asking about "nobody" took no slot
    assert stats["decisions"] == 0
    assert math.isnan(stats["far_feedback"])
    assert set(stats) >= {"far_label_free", "score_drift_psi", "far_feedback_ci_upper"}
    assert math.isnan(stats["opis_drift_feedback"])


def test_exposition_has_the_contract_names():
    mon, reg = make()
    decide(mon, "t", 1)
    mon.record_feedback("t", "t-0", False, False, 0.01)
    text = generate_latest(reg).decode()
    for name in (
        "tcm_monitored_decisions_total",
        "tcm_label_free_exceedances_total",
        "tcm_label_free_pairs_total",
        "tcm_feedback_outcomes_total",
        "tcm_far_label_free",
        "tcm_far_label_free_pairs",
        "tcm_far_label_free_ratio",
        "tcm_far_label_free_ci_lower",
        "tcm_far_label_free_ci_upper",
        "tcm_far_spread_ratio",
        "tcm_tenant_opis",
        "tcm_score_drift_psi",
    ):
        assert f"\n{name}{{" in text, name
    # cut from the exposition (issue 21): in GetTenant, or computed from the counters
    for name in ("tcm_feedback_total", "tcm_far_feedback", "tcm_score_drift_ks"):
        assert f"\n{name}{{" not in text, name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"target_far": 0.0}, "target_far"),
        ({"target_far": 1.5}, "target_far"),
        ({"window_decisions": None}, "window"),
        ({"window_decisions": 0}, "window_decisions"),
        ({"window_seconds": -1.0}, "window_seconds"),
        ({"max_tenant_labels": -1}, "max_tenant_labels"),
        ({"reference_top1": {"edges": [0, 1]}}, "reference_top1"),
        ({"reference_top1": {"edges": [1, 0], "counts": [1]}}, "increasing"),
        ({"reference_top1": {"edges": [0, 1], "counts": [1, 2]}}, "bins"),
    ],
)
def test_bad_configuration_is_refused(kwargs, match):
    kwargs = {"target_far": 0.01, **kwargs}
    with pytest.raises(ValueError, match=match):
        LiveMonitor(kwargs.pop("target_far"), registry=CollectorRegistry(), **kwargs)


def test_bad_records_are_refused_and_change_nothing():
    mon, reg = make()
    with pytest.raises(ValueError, match="label_free_exceedances"):
        mon.record_decision("t", "d", 0.9, True, 0.01, 5, 4)
    with pytest.raises(ValueError, match="finite"):
        mon.record_decision("t", "d", float("nan"), True, 0.01, 0, 4)
    with pytest.raises(ValueError, match="decision_id"):
        mon.record_feedback("t", "", True, False, 0.01)
    with pytest.raises(ValueError, match="tenant"):
        mon.record_decision("", "d", 0.9, True, 0.01, 0, 4)
    assert value(reg, "tcm_far_label_free_pairs", tenant="t") is None
    key = {"tenant": "t", "target_far": "0.01", "verdict": "different", "decision": "match"}
    assert reg.get_sample_value("tcm_feedback_outcomes_total", key) is None


def test_wilson_interval_edges():
    lo, hi = wilson_interval(0, 100)
    assert lo == 0.0
    assert hi == pytest.approx(1.959963984540054**2 / (100 + 1.959963984540054**2))
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_a_shared_label_mapping_is_used_as_given():
    shared = TenantLabels(1)
    shared.label("first")
    mon, reg = make(labels=shared)
    mon.record_decision("second", "d", 0.9, True, 0.01, 1, 10)
    assert mon.labels is shared
    label = shared.get("second")
    assert label is not None and label != "first"
    assert value(reg, "tcm_far_label_free_pairs", tenant=label) == 10


def test_drift_against_the_tenants_own_baseline():
    ref = {"edges": [0.0, 0.5, 1.0], "counts": [1, 1]}
    mon, _reg = make(
        reference_top1=ref,
        drift_reference="baseline",
        baseline_decisions=4,
        window_decisions=4,
        min_drift_samples=4,
    )
    decide(mon, "t", 3, top1=0.9)
    assert math.isnan(ks(mon, "t"))  # baseline not complete
    decide(mon, "t", 1, top1=0.9)
    assert ks(mon, "t") == 0.0  # against the calibration: 0.5
    decide(mon, "t", 4, top1=0.1)
    assert ks(mon, "t") == 1.0
    mon.reset_drift_baseline("t")
    assert math.isnan(ks(mon, "t"))
    decide(mon, "t", 4, top1=0.1)
    assert ks(mon, "t") == 0.0


def test_baseline_without_a_calibration_reference_uses_200_bins_over_minus_one_to_one():
    mon, _reg = make(drift_reference="baseline", baseline_decisions=2, min_drift_samples=2)
    decide(mon, "t", 2, top1=0.001)  # bin [0, 0.01)
    assert ks(mon, "t") == 0.0
    decide(mon, "t", 2, top1=0.011)  # the next bin: half the window moved
    assert ks(mon, "t") == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"drift_reference": "live"}, "drift_reference"), ({"baseline_decisions": 1}, "baseline")],
)
def test_bad_drift_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LiveMonitor(0.01, registry=CollectorRegistry(), **kwargs)


def test_model_changed_starts_the_windows_afresh_with_the_new_reference():
    old = {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "counts": [25, 25, 25, 25]}
    new = {"edges": [0.0, 0.25, 0.5, 0.75, 1.0], "counts": [50, 50, 0, 0]}
    mon, reg = make(reference_top1=old, min_drift_samples=4, psi_bins=4, min_feedback=1)
    decide(mon, "t", 4, acc=2, tot=10, top1=0.1)
    impostor_feedback(mon, "t", accepted=1, total=2)
    assert value(reg, "tcm_far_label_free", tenant="t") == pytest.approx(0.2)
    before = verdicts(reg, "t", "different")

    mon.model_changed(new)
    assert mon.tenant_stats("t")["decisions"] == 0  # the old model's decisions are gone
    assert value(reg, "tcm_far_label_free", tenant="t") is None
    for s in (0.1, 0.1, 0.3, 0.3):  # exactly the new reference's distribution
        mon.record_decision("t", f"n{s}", s, False, 0.01, 0, 5)
    assert value(reg, "tcm_far_label_free", tenant="t") == 0.0
    assert value(reg, "tcm_score_drift_psi", tenant="t") == pytest.approx(0.0, abs=1e-9)
    # counters never go backwards, whatever the windows do
    assert verdicts(reg, "t", "different") == before == 2


def test_cross_tenant_opis_gives_each_tenant_its_own_term():
    """Three unequal tenants, so a mix-up of which term belongs to whom cannot pass."""
    mon, reg = make(min_feedback=4)
    # (TAR, FAR) = (3/4, 1/4), (1, 0), (1/2, 0) -> U = 3/4, 1, 2/3 (harmonic mean of TAR, TRR)
    for tenant, genuine_acc, impostor_acc in (("a", 3, 1), ("b", 4, 0), ("c", 2, 0)):
        for i in range(4):
            mon.record_feedback(tenant, f"g{i}", i < genuine_acc, True, 0.01)
        impostor_feedback(mon, tenant, accepted=impostor_acc, total=4)
    u = {"a": 0.75, "b": 1.0, "c": 2 / 3}
    mean = sum(u.values()) / 3
    terms = {t: (v - mean) ** 2 for t, v in u.items()}
    assert value(reg, "tcm_tenant_opis", estimate="feedback") == pytest.approx(
        sum(terms.values()) / 3
    )
    for tenant, term in terms.items():
        assert mon.tenant_stats(tenant)["opis_drift_feedback"] == pytest.approx(term)


def test_counts_that_add_up_across_replicas_survive_a_window_reset():
    """The counters Prometheus sums over replicas: monitored decisions, label-free pairs
    and exceedances, feedback verdicts by decision; a model change empties the windows
    but never lowers a counter."""
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    m = LiveMonitor(1e-3, registry=registry, window_decisions=2)
    m.record_decision("shop", "d1", 0.9, True, 1e-3, 3, 100)
    m.record_decision("shop", "d2", 0.2, False, 1e-3, 0, 50)
    m.record_decision("shop", "d3", 0.8, True, 1e-3, 1.5, 10)  # the window holds 2; counts 3
    m.record_feedback("shop", "d1", True, False, 1e-3)  # an accepted impostor
    m.record_feedback("shop", "d2", False, False, 1e-3)
    m.model_changed(None)

    def samples() -> dict:
        out = {}
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    got = samples()
    shop = (("target_far", "0.001"), ("tenant", "shop"))
    assert got["tcm_label_free_pairs_total", shop] == 160
    assert got["tcm_label_free_exceedances_total", shop] == 4.5  # float: expected exceedances
    assert got["tcm_monitored_decisions_total", (("decision", "match"), *shop)] == 2
    assert got["tcm_monitored_decisions_total", (("decision", "no_match"), *shop)] == 1
    key = (("decision", "match"), *shop, ("verdict", "different"))
    assert got["tcm_feedback_outcomes_total", key] == 1
    # the other outcomes exist at 0 (a ratio of two of them is 0, not "no data")
    key = (("decision", "no_match"), *shop, ("verdict", "same"))
    assert got["tcm_feedback_outcomes_total", key] == 0
