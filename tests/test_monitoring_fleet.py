"""Issue 21: tenant labels every replica agrees on, deletion, and one series set per target.

Pure and seeded: TenantLabels, the numpy decision window and LiveMonitor with a fake
clock; every expected value is worked out from the hash order or by hand.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from server.monitoring import LiveMonitor, TenantLabels, bucket_label, is_bucket
from server.monitoring.labels import tenant_hash
from server.monitoring.window import RowWindow

NAMES = [f"shop-{i}" for i in range(40)]


def by_hash(names: list[str]) -> list[str]:
    return sorted(names, key=lambda n: (tenant_hash(n), n))


def test_tenant_hash_is_fixed_blake2b_of_the_name():
    """The label must not depend on the process: no salted hash(), no first-come slots."""
    assert tenant_hash("shop-a") == 0xDA1960D3D796709C  # hashlib.blake2b(digest_size=8)
    assert bucket_label("shop-a", 100) == "_bucket-68"
    assert bucket_label("shop-a", 1000) == f"_bucket-{0xDA1960D3D796709C % 1000:03d}"


def test_every_tenant_is_named_while_the_store_holds_no_more_than_the_cap():
    labels = TenantLabels(40, 10)
    labels.sync(NAMES)
    assert [labels.label(n) for n in NAMES] == NAMES


def test_beyond_the_cap_the_smallest_hashes_keep_their_name_in_any_order():
    """Two replicas that learnt of the tenants in different orders (or after a restart)
    give every tenant the same label: the label is a function of the tenant set."""
    first, second = TenantLabels(10, 7), TenantLabels(10, 7)
    for name in NAMES:
        first.label(name)  # one tenant at a time, as Matches reach a fresh process
    shuffled = NAMES[:]
    random.Random(3).shuffle(shuffled)
    second.sync(shuffled)  # all at once, as a restart reads the store
    named = set(by_hash(NAMES)[:10])
    for name in NAMES:
        expected = name if name in named else bucket_label(name, 7)
        assert first.label(name) == second.label(name) == expected
    assert len(first.values()) <= 10 + 7
    assert all(is_bucket(v) for v in first.values()[10:])


def test_a_bucket_never_collides_with_a_tenant_name():
    from server.storage.base import NAME

    assert not NAME.fullmatch(bucket_label("x", 100))  # tenant names cannot start with _
    labels = TenantLabels(0, 3)  # cap 0: buckets only, even for a tenant named like one
    assert labels.label("bucket-1").startswith("_bucket-")


def test_deleting_a_named_tenant_promotes_the_next_in_hash_order():
    labels = TenantLabels(3, 5)
    labels.sync(NAMES[:6])
    order = by_hash(NAMES[:6])
    generation = labels.generation
    assert labels.label(order[3]) == bucket_label(order[3], 5)
    labels.remove(order[0])
    assert labels.generation > generation
    assert labels.label(order[3]) == order[3]
    assert labels.get(order[0]) is None
    labels.remove(order[0])  # idempotent


def test_creating_a_bucketed_tenant_changes_no_other_label():
    labels = TenantLabels(3, 5)
    labels.sync(NAMES[:6])
    before = {n: labels.label(n) for n in NAMES[:6]}
    generation = labels.generation
    newcomer = next(n for n in NAMES[6:] if tenant_hash(n) > tenant_hash(by_hash(NAMES[:6])[2]))
    labels.add(newcomer)
    assert labels.generation == generation
    assert {n: labels.label(n) for n in NAMES[:6]} == before


def test_row_window_bounds_by_count_and_age_and_grows_from_small():
    now = [0.0]
    window = RowWindow(2, 5, None, lambda: now[0], initial=2)
    for k in range(7):
        window.append((k, 10 * k))
    assert window.values()[:, 0].tolist() == [2, 3, 4, 5, 6]
    aged = RowWindow(1, None, 10.0, lambda: now[0], initial=1)
    for k in range(4):
        now[0] = 5.0 * k
        aged.append((k,))
    assert aged.values()[:, 0].tolist() == [2, 3]  # the one exactly 10 s old is out
    aged.keep(np.array([False, True]))
    assert aged.values()[:, 0].tolist() == [3]
    now[0] = 25.0
    aged.expire()
    assert len(aged) == 0


def make(**kw) -> tuple[LiveMonitor, CollectorRegistry]:
    registry = CollectorRegistry()
    return LiveMonitor(0.01, registry=registry, **kw), registry


def sample(reg: CollectorRegistry, name: str, **labels: str) -> float | None:
    return reg.get_sample_value(name, labels)


def series_of(reg: CollectorRegistry, tenant: str) -> list[str]:
    text = generate_latest(reg).decode()
    return [line for line in text.splitlines() if f'tenant="{tenant}"' in line]


def test_each_served_target_has_its_own_windows_counters_and_ratio():
    mon, reg = make()
    mon.record_decision("shop", "a", 0.9, True, 0.01, 2.5, 100.0)
    mon.record_decision("shop", "b", 0.9, True, 0.001, 0.25, 100.0)
    assert sample(reg, "tcm_far_label_free_ratio", tenant="shop", target_far="0.01") == 2.5
    assert sample(reg, "tcm_far_label_free_ratio", tenant="shop", target_far="0.001") == 2.5
    assert sample(reg, "tcm_label_free_exceedances_total", tenant="shop", target_far="0.001") == (
        0.25
    )
    # GetTenant speaks about the default target (0.01 here)
    assert mon.tenant_stats("shop")["label_free_exceedances"] == 2.5


def test_the_label_free_interval_is_wilson_on_the_window_sums():
    mon, reg = make()
    for k in range(6):
        mon.record_decision("new", f"d{k}", 0.9, True, 0.01, 3.5, 100.0)  # 21 of 600
    lower = sample(reg, "tcm_far_label_free_ci_lower", tenant="new", target_far="0.01")
    upper = sample(reg, "tcm_far_label_free_ci_upper", tenant="new", target_far="0.01")
    z, n, p = 1.959963984540054, 600, 0.035
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert lower == pytest.approx((centre - half) / (1 + z * z / n))
    assert upper == pytest.approx((centre + half) / (1 + z * z / n))
    assert lower > 0.02  # the new-customer case: wholly above 2 x target


def test_deleting_a_tenant_drops_its_series_and_state_and_a_new_one_starts_empty():
    mon, reg = make()
    for k in range(5):
        mon.record_decision("shop", f"d{k}", 0.9, True, 0.01, 1.0, 10.0)
    mon.record_feedback("shop", "d0", True, False, 0.01)
    mon.record_decision("other-shop", "x", 0.9, True, 0.01, 1.0, 10.0)
    assert series_of(reg, "shop")
    mon.tenant_deleted("shop")
    assert series_of(reg, "shop") == []
    assert mon.tenant_stats("shop")["decisions"] == 0
    assert mon.labels.get("shop") is None
    assert series_of(reg, "other-shop")  # others keep theirs
    mon.record_decision("shop", "new", 0.9, False, 0.01, 0.0, 10.0)
    assert mon.tenant_stats("shop")["decisions"] == 1
    assert mon.tenant_stats("shop")["impostor_decisions"] == 0
    assert (
        sample(
            reg, "tcm_monitored_decisions_total", tenant="shop", decision="match", target_far="0.01"
        )
        == 0
    )


def test_deleting_a_bucketed_tenant_takes_its_rows_out_of_the_bucket_window():
    labels = TenantLabels(0, 1)  # every tenant in _bucket-0
    mon, reg = make(labels=labels)
    mon.record_decision("a", "a1", 0.9, True, 0.01, 4.0, 10.0)
    mon.record_decision("b", "b1", 0.9, True, 0.01, 1.0, 10.0)
    mon.record_feedback("a", "a1", True, False, 0.01)
    assert sample(reg, "tcm_far_label_free", tenant="_bucket-0", target_far="0.01") == 0.25
    mon.tenant_deleted("a")
    assert sample(reg, "tcm_far_label_free", tenant="_bucket-0", target_far="0.01") == 0.1
    assert mon.tenant_stats("b")["impostor_decisions"] == 0  # a's verdict left too
    # the bucket's counters keep what a counted: counters never go down
    assert sample(reg, "tcm_label_free_pairs_total", tenant="_bucket-0", target_far="0.01") == 20


def test_a_tenant_moved_into_a_bucket_leaves_no_stale_named_series():
    labels = TenantLabels(2, 3)
    mon, reg = make(labels=labels)
    order = by_hash(NAMES[:3])
    for name in order[1:]:  # the two with the larger hashes: both named while alone
        mon.record_decision(name, f"{name}-d", 0.9, True, 0.01, 1.0, 10.0)
    assert series_of(reg, order[2])
    labels.add(order[0])  # a smaller hash arrives: order[2] moves into its bucket
    assert series_of(reg, order[2]) == []
    mon.record_decision(order[2], "again", 0.9, True, 0.01, 1.0, 10.0)
    bucket = bucket_label(order[2], 3)
    assert sample(reg, "tcm_label_free_pairs_total", tenant=bucket, target_far="0.01") == 10


def test_bad_target_is_refused():
    mon, _ = make()
    with pytest.raises(ValueError, match="target_far"):
        mon.record_decision("t", "d", 0.9, True, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="target_far"):
        mon.record_feedback("t", "d", True, False, 1.0)
