"""Helpers for the deploy/ tests: the metric-name contract, PromQL names, real Prometheus.

- ``contract_names()``: every series name docs/METRICS.md promises (histograms expand to
  _bucket/_sum/_count, info metrics to _info).
- ``promql_names(expr)``: the tcm* series names a PromQL expression reads.
- ``PrometheusProcess``: a real Prometheus on loopback with a temporary config and data
  folder, for the slow integration test, with a small HTTP API client.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from demo.processes import free_port

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
RULE_FILES = sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
INSTALL_HINT = (
    "install it with `sudo scripts/install_prometheus.sh` "
    "(Debian's prometheus package, which ships prometheus and promtool)"
)

_ROW = re.compile(r"^\|\s*`(?P<name>[a-z0-9_:]+)`[^|]*\|\s*(?P<type>[a-z() ]+?)\s*\|", re.M)
# tcm_* series and recording rules, with or without a level (``tenant_target_far:tcm_...``)
_NAME = re.compile(r"(?<![\w:\"'{=~.$])((?:[a-z_]+:)?tcm[a-zA-Z0-9_:]*)")


def binary(name: str) -> str | None:
    """Path of a Prometheus tool, or None. Debian installs both into /usr/bin."""
    found = shutil.which(name)
    if found is None and Path(f"/usr/bin/{name}").exists():
        found = f"/usr/bin/{name}"
    return found


def contract_names(metrics_md: Path = ROOT / "docs" / "METRICS.md") -> set[str]:
    """Series names docs/METRICS.md defines, as they appear in an exposition."""
    names: set[str] = set()
    for row in _ROW.finditer(metrics_md.read_text()):
        name, kind = row["name"], row["type"].strip()
        if kind == "histogram":
            names |= {name, f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind.startswith("info"):
            names |= {name, f"{name}_info"}
        else:
            names.add(name)
    return names


def promql_names(expr: str) -> set[str]:
    """tcm* metric or recording-rule names an expression reads (label values excluded),
    level-prefixed rule names included."""
    without_strings = re.sub(r'"[^"]*"|\'[^\']*\'', '""', expr)
    return set(_NAME.findall(without_strings))


def rule_groups() -> list[dict[str, Any]]:
    import yaml

    groups: list[dict[str, Any]] = []
    for path in RULE_FILES:
        groups += yaml.safe_load(path.read_text())["groups"]
    return groups


def recording_names() -> set[str]:
    return {r["record"] for g in rule_groups() for r in g["rules"] if "record" in r}


class PrometheusProcess:
    """A real Prometheus scraping ``targets`` every ``interval`` with the project's rules."""

    def __init__(
        self, root: Path, targets: list[str], interval: str = "1s", hold: str | None = None
    ) -> None:
        """``hold`` replaces every alert's ``for:`` (the rule tests cover the real ones)."""
        found = binary("prometheus")
        if found is None:
            raise RuntimeError(f"prometheus is not installed: {INSTALL_HINT}")
        self.binary = found
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config = root / "prometheus.yml"
        rules = "".join(f"  - {p}\n" for p in self._rule_files(hold))
        target_list = ", ".join(f"'{t}'" for t in targets)
        self.config.write_text(
            f"global:\n  scrape_interval: {interval}\n  evaluation_interval: {interval}\n"
            f"rule_files:\n{rules}"
            "scrape_configs:\n  - job_name: tcm-server\n"
            f"    static_configs:\n      - targets: [{target_list}]\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def _rule_files(self, hold: str | None) -> list[Path]:
        if hold is None:
            return RULE_FILES
        copies = []
        for path in RULE_FILES:
            copy = self.root / "rules" / path.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(re.sub(r"(?m)^(\s+)for: \S+", rf"\1for: {hold}", path.read_text()))
            copies.append(copy)
        return copies

    def __enter__(self) -> PrometheusProcess:
        self.log = (self.root / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.wait(lambda: self._get("/-/ready") is not None, 30, "prometheus ready")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()

    def version(self) -> str:
        out = subprocess.run(
            [self.binary, "--version"], check=False, capture_output=True, text=True
        )
        return (out.stdout or out.stderr).splitlines()[0]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the API's result list (each with "metric" and "value")."""
        body = self._get("/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if body is None or body.get("status") != "success":
            raise RuntimeError(f"query {expr!r} failed: {body}")
        return body["data"]["result"]

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """Range query; the API's result list (each with "metric" and "values")."""
        params = {"query": expr, "start": start, "end": end, "step": step}
        body = self._get("/api/v1/query_range?" + urllib.parse.urlencode(params))
        if body is None or body.get("status") != "success":
            raise RuntimeError(f"range query {expr!r} failed: {body}")
        return body["data"]["result"]

    def alerts(self, state: str = "firing") -> list[dict[str, Any]]:
        body = self._get("/api/v1/alerts")
        found = [] if body is None else body["data"]["alerts"]
        return [a for a in found if a["state"] == state]

    def firing(self, alertname: str) -> set[str]:
        """Tenants (or instances) for which ``alertname`` fires now."""
        return {
            a["labels"].get("tenant", a["labels"].get("instance", ""))
            for a in self.alerts()
            if a["labels"]["alertname"] == alertname
        }

    def value(self, expr: str, **labels: str) -> float:
        """The value of the one series of ``expr`` whose labels include ``labels``."""
        hits = [
            float(r["value"][1])
            for r in self.query(expr)
            if all(r["metric"].get(k) == v for k, v in labels.items())
        ]
        if len(hits) != 1:
            raise LookupError(f"{expr} {labels}: {len(hits)} series")
        return hits[0]

    def rules_health(self) -> list[tuple[str, str, str]]:
        """(rule name, health, last error) of every loaded rule."""
        body = self._get("/api/v1/rules") or {"data": {"groups": []}}
        return [
            (r["name"], r["health"], r.get("lastError", ""))
            for g in body["data"]["groups"]
            for r in g["rules"]
        ]

    @staticmethod
    def wait(condition: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.5)
        raise TimeoutError(f"waited {timeout} s for {what}")

    def _get(self, path: str) -> Any:
        if self.proc is not None and self.proc.poll() is not None:
            log = (self.root / "prometheus.log").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"prometheus exited with {self.proc.returncode}: {log}")
        try:
            with urllib.request.urlopen(self.url + path, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        return json.loads(text) if text.startswith("{") else {"status": "success"}
