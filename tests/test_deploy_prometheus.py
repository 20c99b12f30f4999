"""deploy/prometheus: config and rules are valid, rule unit tests pass and can fail.

These run Debian's promtool. A missing promtool is a failure, not a skip: the rules are
part of the product and would otherwise go untested.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from testing.prometheus_harness import (
    INSTALL_HINT,
    PROMETHEUS_DIR,
    RULE_FILES,
    binary,
    contract_names,
    promql_names,
    recording_names,
    rule_groups,
)

TESTS = sorted((PROMETHEUS_DIR / "tests").glob("*.yml"))


def promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    found = binary("promtool")
    if found is None:
        pytest.fail(f"promtool is not installed: {INSTALL_HINT}")
    return subprocess.run(
        [found, *args], check=False, cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_config_and_rules_check():
    result = promtool("check", "config", "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 rule files found" in result.stdout + result.stderr
    result = promtool("check", "rules", *[str(p) for p in RULE_FILES])
    assert result.returncode == 0, result.stdout + result.stderr


def test_rule_unit_tests_pass():
    assert len(TESTS) >= 2
    result = promtool("test", "rules", *[str(p) for p in TESTS])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("path", "old", "new"),
    [
        # twice as strict a bound: the new customer at 3.5x must no longer page
        ("rules/alerts.yml", "ci_lower_target_ratio1h > 2", "ci_lower_target_ratio1h > 4"),
        # a point estimate instead of the interval: the 1.2x and thin tenants would page
        ("rules/alerts.yml", "ci_lower_target_ratio1h > 2", "target_ratio1h > 1"),
        # a 99% interval (z = 2.576): 600 pairs at 3.5x are no longer enough in time
        ("rules/recording.yml", "- 1.959963984540054 *", "- 2.575829303549 *"),
    ],
)
def test_rule_unit_tests_catch_a_wrong_alert(tmp_path: Path, path: str, old: str, new: str):
    """The unit tests are able to fail: each change of the FAR alert's bound, of the
    estimate it reads or of the interval's confidence breaks them."""
    shutil.copytree(PROMETHEUS_DIR, tmp_path / "p")
    changed = tmp_path / "p" / path
    text = changed.read_text()
    assert old in text
    changed.write_text(text.replace(old, new))
    result = promtool("test", "rules", "tests/far_alerts_test.yml", cwd=tmp_path / "p")
    assert result.returncode != 0
    assert "TcmTenantFarHigh" in result.stdout + result.stderr


def test_every_alert_the_issue_asks_for_exists_and_is_tested():
    alerts = {r["alert"] for g in rule_groups() for r in g["rules"] if "alert" in r}
    assert alerts >= {
        "TcmTenantFarHigh",
        "TcmTenantFeedbackFarHigh",
        "TcmFarSpreadHigh",
        "TcmScoreDrift",
        "TcmServerDown",
        "TcmHighErrorRate",
        "TcmNoTraffic",
        "TcmLatencyHigh",
    }
    tested = "".join(p.read_text() for p in TESTS)
    for name in alerts:
        assert f"alertname: {name}" in tested, f"{name} has no promtool unit test"


def test_rules_read_only_contract_metrics():
    known = contract_names() | recording_names()
    for group in rule_groups():
        for rule in group["rules"]:
            unknown = promql_names(rule["expr"]) - known
            assert not unknown, f"{rule.get('alert') or rule.get('record')}: {unknown}"


def test_rule_files_are_all_loaded_by_the_config():
    import yaml

    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    loaded = {(PROMETHEUS_DIR / p).resolve() for p in config["rule_files"]}
    assert loaded == {p.resolve() for p in RULE_FILES}
    assert [j["job_name"] for j in config["scrape_configs"]] == ["tcm-server"]


def test_promql_names_ignores_label_values():
    assert promql_names('tcm_a{tenant="tcm_b"} / on(x) tcm:c:rate5m') == {"tcm_a", "tcm:c:rate5m"}
    assert promql_names("topk(3, tenant_target_far:tcm_x:ratio1h > 2)") == {
        "tenant_target_far:tcm_x:ratio1h"
    }
    assert "tcm_requests_total" in contract_names()
    assert "tcm_request_duration_seconds_bucket" in contract_names()
    assert "tcm_model_info" in contract_names()
