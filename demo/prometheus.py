"""A real Prometheus beside the demo server: one scrape job, the project's rules, a query.

The demo writes its own small configuration (one target on loopback, a one-second
scrape interval so the numbers show up while the demo runs) and loads the alerting
and recording rules from ``deploy/prometheus`` when they are there, so what the demo
shows is what a deployment would alert on.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import urllib.parse
import urllib.request
from pathlib import Path

from demo.processes import ProcessGroup, free_port

RULES = Path(__file__).resolve().parent.parent / "deploy" / "prometheus" / "rules"
QUERIES = (
    ("label-free FAR", "tcm_far_label_free"),
    ("feedback FAR", "tenant_target_far:tcm_feedback_far:ratio1h"),
)
PASTE = (
    "tenant_target_far:tcm_label_free_far:target_ratio1h  # per-tenant FAR / target, all replicas",
    "tenant_target_far:tcm_label_free_far:ci_lower_target_ratio1h  # its 95% interval's lower end",
    'tcm_far_spread_ratio{estimate="label_free"}  # max/min FAR across tenants: 1 is consistent',
)


def prometheus_binary() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        raise SystemExit(
            "demo: --prometheus needs the prometheus binary; install it with "
            "`sudo scripts/install_prometheus.sh` (Debian's prometheus package)"
        )
    return found


class Prometheus:
    """One Prometheus process with its own config and data folder under ``root``."""

    def __init__(self, binary: str, root: Path, metrics_url: str) -> None:
        self.binary = binary
        self.root = root
        self.target = urllib.parse.urlsplit(metrics_url).netloc
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        rule_files = sorted(str(p) for p in RULES.glob("*.yml")) if RULES.is_dir() else []
        rules = "".join(f"  - {path}\n" for path in rule_files)
        return (
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            + (f"rule_files:\n{rules}" if rules else "")
            + "scrape_configs:\n  - job_name: tcm-server\n"
            + f"    static_configs:\n      - targets: ['{self.target}']\n"
        )

    def start(self, processes: ProcessGroup) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        config = self.root / "prometheus.yml"
        config.write_text(self.config_text())
        argv = [
            self.binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={self.root / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        processes.start("prometheus", argv)
        processes.wait_for_port("prometheus", self.port)

    def series(self, expr: str) -> list[tuple[dict[str, str], float]]:
        """Instant query through the HTTP API: (labels, value) per series."""
        url = f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(url, timeout=10) as response:
            body = json.load(response)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query {expr!r} failed: {body}")
        return [(item["metric"], float(item["value"][1])) for item in body["data"]["result"]]

    def query(self, expr: str) -> dict[str, float]:
        """The value per tenant label ('' for series without one)."""
        return {labels.get("tenant", ""): value for labels, value in self.series(expr)}

    def wait_for(self, expr: str, timeout_s: float = 20.0) -> dict[str, float]:
        """Poll until the expression has samples (the first scrapes take a second or two)."""
        deadline = time.monotonic() + timeout_s
        while True:
            values = self.query(expr)
            if values or time.monotonic() > deadline:
                return values
            time.sleep(0.5)

    def summary(self) -> str:
        rows = []
        for title, expr in QUERIES:
            values = self.wait_for(expr)
            shown = ", ".join(
                f"{tenant}={'NaN' if math.isnan(v) else f'{v:.2e}'}"
                for tenant, v in sorted(values.items())
            )
            rows.append(f"{title:<16} {expr}: {shown or 'no samples yet'}")
        firing = sorted(
            f"{labels.get('alertname')}{{tenant={labels.get('tenant', '-')}}}"
            for labels, _ in self.series('ALERTS{alertstate="firing"}')
        )
        rows.append(f"{'alerts firing':<16} {', '.join(firing) or 'none'}")
        rows.append(f"open {self.url}/graph and paste, for example:")
        rows += [f"  {expr}" for expr in PASTE]
        return "\n".join(rows)
