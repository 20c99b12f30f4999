"""A real Prometheus scraping live monitoring gauges: the drifting tenant pages, others don't.

Two endpoints: (1) prometheus_client's HTTP server fed by LiveMonitor with a seeded
stream, where drift is also visible in PSI; (2) the real ``python -m server`` (the loopback
fixture's linear embedder and its measured calibration) with glyph traffic, where one
tenant's queries are faded halfway to a blank page. The fixture's calibration histogram has
0.05-wide bins with all top-1 similarities in the last one or two, so PSI cannot see that
drift there; the FAR alerts must.

Debian's prometheus runs on loopback with a temporary config, a 1 s scrape and evaluation
interval and the project's rules (their ``for:`` shortened to 1 s; the real durations are
covered by the promtool unit tests). In the seeded stream one of three tenants
("cyrillic") drifts: its top-1 similarities drop, ten times more gallery pairs pass the
threshold and clients report many accepted impostors.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from server.monitoring import LiveMonitor
from testing.prometheus_harness import INSTALL_HINT, PrometheusProcess, binary, free_port

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
                matched = top1 >= 0.7
                monitor.record_decision(
                    tenant, decision, top1, matched, TARGET_FAR, float(accepted), 50.0
                )
                if n % 2 == 0:  # every other query was an impostor, and the client says so
                    accepted_impostor = rng.random() < decision_far
                    monitor.record_feedback(tenant, decision, accepted_impostor, False, TARGET_FAR)
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
    # The serving gauges the FAR rules join on (server/monitoring/serving.py exports them).
    Gauge("tcm_target_far", "target FAR", registry=registry).set(TARGET_FAR)
    served = Gauge("tcm_served_target_far", "targets", ["target_far"], registry=registry)
    served.labels(f"{TARGET_FAR:g}").set(TARGET_FAR)
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
        expected = prom.value("tenant_target_far:tcm_far_decision_expected", tenant=DRIFTING)
        assert expected == pytest.approx(1 - (1 - TARGET_FAR) ** GALLERY)
        # the fleet view: the drifting tenant is the one whose interval lies above 2a
        above = prom.query('target_far:tcm_tenants_in_band:count1h{band="above"}')
        assert [float(r["value"][1]) for r in above] == [1.0]
        broken = [r for r in prom.rules_health() if r[1] == "err"]
        assert not broken, broken


# ---------------------------------------------------------------------------------------
# The real server: python -m server with the loopback fixture's model and calibration.

CALM_TENANTS = ("latin", "cyrillic")
DRIFTING_TENANT = "greek"
PER_CLASS = 10  # gallery items per class; the rest of each tenant's images are queries
FADE = 0.5  # the drifting tenant's queries are blended halfway toward the white page
# Series that exist only after an event the traffic does not cause.
EVENT_ONLY = ("tcm_reloads_total",)


def fade(pixels: np.ndarray, amount: float) -> np.ndarray:
    """Heavy augmentation: the glyph fades toward the background (white)."""
    x = pixels.astype(np.float32) * (1 - amount) + 255 * amount
    return np.clip(x, 0, 255).astype(np.uint8)


def split_tenant(glyphs, tenant: str) -> tuple[np.ndarray, np.ndarray]:
    """(gallery indices, query indices) of one glyph tenant: PER_CLASS per class enrolled."""
    gallery, queries, seen = [], [], {}
    for i in glyphs.tenant_indices(tenant):
        label = glyphs.labels[i]
        if seen.get(label, 0) < PER_CLASS:
            gallery.append(i)
            seen[label] = seen.get(label, 0) + 1
        else:
            queries.append(i)
    return np.asarray(gallery), np.asarray(queries)


class Traffic:
    """Enrols the three tenants, then queries every held-out image over and over, telling
    the server the truth after each decision, until stopped (so rates never drop to 0)."""

    def __init__(self, address: str, glyphs, drifting: bool = True) -> None:
        from client import RetrievalClient

        self.drifting = drifting  # may be switched on while traffic runs
        self.client = RetrievalClient(address)
        self.glyphs = glyphs
        self.plans = {t: split_tenant(glyphs, t) for t in (*CALM_TENANTS, DRIFTING_TENANT)}
        self.feedback: dict[str, int] = {}
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> Traffic:
        from testing.server_fixtures import png

        names = self.glyphs.class_names
        for tenant, (gallery, _) in self.plans.items():
            self.client.create_tenant(tenant)
            items = [
                (f"g{i}", png(self.glyphs.image(i)), names[self.glyphs.labels[i]]) for i in gallery
            ]
            results, _ = self.client.enroll_many(tenant, items)
            assert all(r.ok for r in results)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(30)
        self.client.close()

    def _loop(self) -> None:
        from testing.server_fixtures import png

        names = self.glyphs.class_names
        while not self.stop.is_set():
            for tenant, (_, queries) in self.plans.items():
                amount = FADE if tenant == DRIFTING_TENANT and self.drifting else 0.0
                images = [png(fade(self.glyphs.image(i), amount)) for i in queries]
                truth = [names[self.glyphs.labels[i]] for i in queries]
                for start in range(0, len(images), 32):
                    if self.stop.is_set():
                        return
                    chunk = self.client.match_batch(tenant, images[start : start + 32])
                    for result, label in zip(chunk, truth[start : start + 32], strict=True):
                        self.client.feedback(tenant, result.decision_id, result.label == label)
                        self.feedback[tenant] = self.feedback.get(tenant, 0) + 1


def dashboard_exprs() -> list[str]:
    from tests.test_deploy_grafana import dashboard_exprs as exprs

    return [e.replace("$tenant", ".*").replace("$target_far", ".*") for e in exprs()]


@pytest.mark.slow
def test_real_server_drifting_tenant_pages_and_every_expression_has_data(
    tiny_glyphs, tmp_path: Path
):
    """python -m server + synthetic traffic + a real Prometheus with the project's rules."""
    if binary("prometheus") is None:
        pytest.fail(f"prometheus is not installed: {INSTALL_HINT}")
    from testing.prometheus_harness import promql_names, recording_names, rule_groups
    from testing.server_fixtures import make_assets, start_server

    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(tiny_glyphs), 400, replace=False))
    assets = make_assets(
        tmp_path / "assets", tiny_glyphs.pixels[pick], np.asarray(tiny_glyphs.labels)[pick]
    )
    server = start_server(assets, tmp_path / "data", "--no-auth", "--target-far", "0.001")
    try:
        target = server.metrics_url.split("//")[1].split("/")[0]
        with PrometheusProcess(tmp_path / "prom", [target], hold="1s") as prom:
            print(prom.version())
            prom.wait(lambda: prom.query('up{job="tcm-server"} == 1'), 30, "a scrape")
            with Traffic(server.address, tiny_glyphs) as traffic:
                prom.wait(
                    lambda: DRIFTING_TENANT in prom.firing("TcmTenantFarHigh"),
                    90,
                    "the FAR alert",
                )
                time.sleep(3)  # a few more evaluations: a calm tenant would fire by now too
                firing = {a["labels"]["alertname"] for a in prom.alerts()}
                print("feedback calls per tenant:", traffic.feedback, "firing:", sorted(firing))
                assert prom.firing("TcmTenantFarHigh") == {DRIFTING_TENANT}
                assert prom.firing("TcmTenantFeedbackFarHigh") == {DRIFTING_TENANT}
                assert not firing & {"TcmNoTraffic", "TcmServerDown", "TcmHighErrorRate"}
                for tenant in (*CALM_TENANTS, DRIFTING_TENANT):
                    ratio = prom.value("tcm_far_label_free_ratio", tenant=tenant)
                    far = prom.value("tenant_target_far:tcm_feedback_far:ratio1h", tenant=tenant)
                    psi = prom.value("tcm_score_drift_psi", tenant=tenant)
                    print(
                        f"{tenant}: label-free/target {ratio:.2f}, feedback FAR {far:.3f}", end=""
                    )
                    print(f", PSI {psi:.3f}")
                    assert (ratio > 3) == (tenant == DRIFTING_TENANT)

                # Alert expressions hold only while they fire; every series they read must.
                alert_inputs = {
                    name
                    for g in rule_groups()
                    for r in g["rules"]
                    if "alert" in r
                    for name in promql_names(r["expr"])
                }
                exprs = dashboard_exprs() + sorted(recording_names() | alert_inputs)
                empty = [
                    e
                    for e in exprs
                    if not any(name in e for name in EVENT_ONLY) and not prom.query(e)
                ]
                assert not empty, f"no data for {empty}"
                broken = [r for r in prom.rules_health() if r[1] != "ok"]
                assert not broken, broken
    finally:
        server.stop()


# ---------------------------------------------------------------------------------------
# docs/figures/monitoring_far.png: python -m tests.test_prometheus_integration OUT.png

TENANTS = sorted((*CALM_TENANTS, DRIFTING_TENANT))
# Per panel: expression -> what its line is (the first solid, the others dashed).
FIGURE_PANELS = (
    {
        "tenant_target_far:tcm_label_free_far:target_ratio1h": "",
        "tenant_target_far:tcm_label_free_far:ci_lower_target_ratio1h": "lower end",
    },
    {
        "tenant_target_far:tcm_feedback_far:ratio1h": "",
        "tenant_target_far:tcm_far_decision_expected": "expected",
    },
)


def record_figure(out: Path, calm_s: float = 20.0, drift_s: float = 25.0) -> None:
    """Real server + real Prometheus; the drifting tenant fades after ``calm_s`` seconds.
    Plots the per-tenant FAR panel from Prometheus's range API."""
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from imagesets import load_images
    from testing.server_fixtures import make_assets, start_server

    glyphs = load_images("glyphs-tiny", "test")
    rng = np.random.default_rng(0)
    pick = np.sort(rng.choice(len(glyphs), 400, replace=False))
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        assets = make_assets(tmp / "assets", glyphs.pixels[pick], np.asarray(glyphs.labels)[pick])
        server = start_server(assets, tmp / "data", "--no-auth", "--target-far", "0.001")
        try:
            target = server.metrics_url.split("//")[1].split("/")[0]
            with PrometheusProcess(tmp / "prom", [target], hold="1s") as prom:
                prom.wait(lambda: prom.query('up{job="tcm-server"} == 1'), 30, "a scrape")
                with Traffic(server.address, glyphs, drifting=False) as traffic:
                    start = time.time()
                    time.sleep(calm_s)
                    traffic.drifting = True
                    switched = time.time()
                    time.sleep(drift_s)
                    end = time.time()
                series = {
                    expr: prom.query_range(expr, start, end, 1.0)
                    for panel in FIGURE_PANELS
                    for expr in panel
                }
                alerts = prom.query_range('ALERTS{alertstate="firing"}', start, end, 1.0)
        finally:
            server.stop()
    fig, axes = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    for ax, panel in zip(axes, FIGURE_PANELS, strict=True):
        for n, (expr, style) in enumerate(panel.items()):
            for item in sorted(series[expr], key=lambda r: r["metric"]["tenant"]):
                t = np.array([float(v[0]) for v in item["values"]]) - start
                y = np.array([float(v[1]) for v in item["values"]])
                color = f"C{TENANTS.index(item['metric']['tenant'])}"
                label = f"{item['metric']['tenant']} {style}".strip()
                ax.plot(t, y, color=color, linestyle="-" if n == 0 else "--", label=label)
        ax.axvline(switched - start, color="grey", linestyle=":", label="greek queries fade")
        ax.legend(loc="upper left", fontsize=7, ncol=2)
    axes[0].axhline(2, color="red", linestyle=":", label="alert: lower end above 2 x target")
    axes[0].set_title("label-free FAR / target (per pair), all replicas, last hour, 95% interval")
    axes[1].set_title("feedback FAR (per impostor decision) and 1 - (1 - a)^G")
    axes[0].legend(loc="upper left", fontsize=7, ncol=2)
    fired = sorted(
        {f"{a['metric']['alertname']}{{{a['metric'].get('tenant', '')}}}" for a in alerts}
    )
    axes[-1].set_xlabel("seconds (Prometheus range query, 1 s step)")
    fig.text(0.01, 0.01, "firing: " + ", ".join(fired), fontsize=8)
    fig.suptitle(f"python -m server + {prom.version().split(' (')[0]}, target FAR 0.001")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}; firing during the run: {fired}")


if __name__ == "__main__":
    import sys

    record_figure(Path(sys.argv[1] if len(sys.argv) > 1 else "docs/figures/monitoring_far.png"))
