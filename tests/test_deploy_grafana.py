"""deploy/grafana: the dashboard reads only contract metrics and is wired to its provisioning."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from testing.prometheus_harness import DEPLOY, contract_names, promql_names, recording_names

GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "tcm-retrieval.json"


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard's panels (rows included)."""
    found = []
    stack = list(dashboard()["panels"])
    while stack:
        panel = stack.pop()
        stack += panel.get("panels", [])
        found += [t["expr"] for t in panel.get("targets", [])]
    return found


def test_every_expr_reads_only_contract_metrics_or_recording_rules():
    known = contract_names() | recording_names()
    exprs = dashboard_exprs()
    assert len(exprs) >= 25
    for expr in exprs:
        unknown = promql_names(expr) - known
        assert not unknown, f"{expr}: {unknown} is neither in docs/METRICS.md nor a rule"


def test_dashboard_shows_what_the_issue_asks_for():
    names = set().union(*(promql_names(e) for e in dashboard_exprs()))
    assert names >= {
        "tcm_far_label_free",
        "tcm_far_label_free_ci_lower",
        "tcm_far_label_free_ci_upper",
        "tcm_served_target_far",
        "tcm_threshold_similarity",
        "tcm_far_spread_ratio",
        "tcm_tenant_opis",
        "tcm_score_drift_psi",
        "tcm_gallery_items",
        "tcm:decisions:match_ratio_rate5m",
        "tcm:request_duration_seconds:p99_5m",
        "tcm:request_errors:ratio_rate5m",
        # issue 21: the fleet view, from counters summed over replicas
        "tenant_target_far:tcm_label_free_far:target_ratio1h",
        "tenant_target_far:tcm_label_free_far:ci_lower_target_ratio1h",
        "tenant_target_far:tcm_label_free_far:ci_upper_target_ratio1h",
        "target_far:tcm_tenants_in_band:count1h",
        "tenant_target_far:tcm_feedback_far:ratio1h",
        "tenant_target_far:tcm_feedback_far:ci_lower1h",
        "tenant_target_far:tcm_feedback_far:ci_upper1h",
        "tenant_target_far:tcm_far_decision_expected",
    }
    assert any(e.startswith("topk(") for e in dashboard_exprs())


def panels() -> list[dict]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def test_feedback_and_label_free_ratios_never_share_an_axis():
    """Feedback FAR is per decision (about G x a for a calibrated G-item gallery), the
    label-free FAR per pair (1x when calibrated): one panel drawing both read 30x
    'breaches' off a calibrated tenant. Each has its own panel and reference line."""
    for panel in panels():
        exprs = " ".join(t["expr"] for t in panel.get("targets", []))
        feedback = "feedback_far" in exprs or "tcm_feedback_outcomes" in exprs
        label_free = "label_free" in exprs
        assert not (feedback and label_free), panel["title"]
        if "tcm_feedback_far:ratio1h" in exprs:
            assert "tcm_far_decision_expected" in exprs, panel["title"]


def test_tenant_variable_is_used_by_per_tenant_panels():
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["tenant"]["multi"] and variables["tenant"]["includeAll"]
    per_tenant = [e for e in dashboard_exprs() if "tcm_far_label_free{" in e]
    assert per_tenant
    assert all('tenant=~"$tenant"' in e for e in per_tenant)


def test_datasource_uid_matches_provisioning():
    provisioned = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    uids = {d["uid"] for d in provisioned["datasources"]}
    used = {p["datasource"]["uid"] for p in dashboard()["panels"] if "datasource" in p}
    assert used == uids == {"tcm-prometheus"}


def test_dashboard_provider_points_at_a_folder():
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "tcm.yml").read_text())
    paths = [p["options"]["path"] for p in provider["providers"]]
    assert paths == ["/var/lib/grafana/dashboards"]
    assert Path(DASHBOARD).is_file()


def test_panel_ids_and_positions_do_not_collide():
    grid = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard()["panels"]]
    assert len(grid) == len(set(grid))
    assert all(p["gridPos"]["x"] + p["gridPos"]["w"] <= 24 for p in dashboard()["panels"])
