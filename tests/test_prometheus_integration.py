"""A real Prometheus scraping live monitoring gauges: the drifting tenant pages, others don't.

Debian's prometheus runs on loopback with a temporary config, a 1 s scrape and evaluation
interval and the project's rules (their ``for:`` shortened to 1 s; the real durations are
covered by the promtool unit tests). The endpoint is prometheus_client's HTTP server fed by
LiveMonitor with a seeded stream of three tenants; one of them ("cyrillic") drifts:
its top-1 similarities drop, ten times more gallery pairs pass the threshold and clients
report many accepted impostors.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from server.monitoring import LiveMonitor
from tests.prometheus_harness import INSTALL_HINT, PrometheusProcess, binary, free_port

TARGET_FAR = 0.001
GALLERY = 51  # items per tenant: 50 impostor pairs per query besides the top-1
CALM = ("latin", "greek")
DRIFTING = "cyrillic"


def reference(rng: np.random.Generator) -> dict:
    edges = np.linspace(0.0, 1.0, 41)
    counts, _ = np.histogram(np.clip(rng.normal(0.8, 0.05, 20000), 0, 1), edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


def feed(monitor: LiveMonitor, rng: np.random.Generator, stop: threading.Event) -> None:
    """Decisions and feedback for every tenant, 40 per tenant per 100 ms, until stopped."""
    n = 0
    while not stop.is_set():
        for tenant in (*CALM, DRIFTING):
            drifting = tenant == DRIFTING
            pair_far = 10 * TARGET_FAR if drifting else TARGET_FAR
            decision_far = 0.5 if drifting else 1 - (1 - TARGET_FAR) ** (GALLERY - 1)
            for _ in range(40):
                n += 1
                top1 = rng.normal(0.6, 0.08) if drifting else rng.normal(0.8, 0.05)
                accepted = int(rng.binomial(GALLERY - 1, pair_far))
                decision = f"{tenant}-{n}"
                monitor.record_decision(tenant, decision, top1, top1 >= 0.7, 0.7, accepted, 50)
                if n % 2 == 0:  # every other query was an impostor, and the client says so
                    monitor.record_feedback(tenant, decision, rng.random() < decision_far, False)
        stop.wait(0.1)


@pytest.fixture
def metrics_endpoint() -> Iterator[str]:
    rng = np.random.default_rng(6)
    registry = CollectorRegistry()
    monitor = LiveMonitor(
        TARGET_FAR,
        registry=registry,
        window_decisions=400,
        reference_top1=reference(rng),
        min_drift_samples=100,
    )
    # The two serving gauges the feedback alert joins on (server/metrics.py exports them).
    Gauge("tcm_target_far", "target FAR", registry=registry).set(TARGET_FAR)
    gallery = Gauge("tcm_gallery_items", "items", ["tenant"], registry=registry)
    for tenant in (*CALM, DRIFTING):
        gallery.labels(tenant).set(GALLERY)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    stop = threading.Event()
    feeder = threading.Thread(target=feed, args=(monitor, rng, stop), daemon=True)
    feeder.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        stop.set()
        feeder.join(5)
        server.shutdown()
        thread.join(5)


@pytest.mark.slow
def test_prometheus_alerts_on_the_drifting_tenant_only(metrics_endpoint: str, tmp_path: Path):
    if binary("prometheus") is None:
        pytest.fail(f"prometheus is not installed: {INSTALL_HINT}")
    with PrometheusProcess(tmp_path, [metrics_endpoint], hold="1s") as prom:
        print(prom.version())
        prom.wait(lambda: prom.query('up{job="tcm-server"} == 1'), 30, "a successful scrape")
        expected = {
            "TcmTenantFarHigh": {DRIFTING},
            "TcmTenantFeedbackFarHigh": {DRIFTING},
            "TcmScoreDrift": {DRIFTING},
        }
        prom.wait(
            lambda: all(prom.firing(name) >= who for name, who in expected.items()),
            60,
            "the drifting tenant's alerts",
        )
        for name, who in expected.items():
            assert prom.firing(name) == who, name
        assert prom.firing("TcmServerDown") == set()

        assert prom.value("tcm_far_label_free_ratio", tenant=DRIFTING) > 5
        assert prom.value("tcm_score_drift_psi", tenant=DRIFTING) > 0.25
        for tenant in CALM:
            assert prom.value("tcm_far_label_free_ratio", tenant=tenant) < 3
            assert prom.value("tcm_score_drift_psi", tenant=tenant) < 0.25
        assert prom.value('tcm_far_spread_ratio{estimate="label_free"}') > 5
        assert prom.value("tcm:far_decision_expected", tenant=DRIFTING) == pytest.approx(
            1 - (1 - TARGET_FAR) ** GALLERY
        )
        broken = [r for r in prom.rules_health() if r[1] == "err"]
        assert not broken, broken
