"""The demo's steps, each through the product's own entry points.

Calibration and training run as the CLIs a user would type, the server as the
process an operator would start, and the traffic goes through the public gRPC client,
so the demo exercises exactly what is shipped and nothing demo-specific.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from client import MatchResult, RetrievalClient
from demo.config import DemoConfig
from demo.processes import ProcessGroup, free_port
from demo.prometheus import Prometheus, prometheus_binary
from demo.report import TenantOutcome, attach_live, scrape, table
from demo.traffic import TenantPlan, plan_tenant, png_bytes
from embedding.defaults import require_default_model
from imagesets import ImageSet, load_images

PYTHON = sys.executable


@dataclass(frozen=True)
class Endpoints:
    address: str
    metrics_url: str


def banner(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def run_step(title: str, argv: list[str]) -> None:
    """Run one product CLI in the foreground, its output going straight to the terminal."""
    banner(f"{title}: {shlex.join(['python', *argv[1:]])}")
    result = subprocess.run(argv, check=False)
    if result.returncode != 0:
        raise SystemExit(f"demo: {title} failed (exit code {result.returncode}); see above")


def run(config: DemoConfig) -> int:
    config.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    if config.compare:
        from demo.compare import compare_models  # only --compare needs the train extra

        compare_models(config, run_step)
    model = config.model or (train_model(config) if config.train else require_default_model())
    calibration = calibrate(model, config)
    with ProcessGroup(config.out / "logs") as processes:
        endpoints = start_server(processes, model, calibration, config)
        prometheus = start_prometheus(processes, endpoints, config) if config.prometheus else None
        outcomes = send_traffic(endpoints.address, config)
        report = build_report(outcomes, endpoints, prometheus, config)
        print(report, flush=True)
        (config.out / "report.txt").write_text(report + "\n")
        print_where(config, endpoints, prometheus, time.monotonic() - started)
        if config.serve:
            wait_for_interrupt()
        stopped = processes.stop_all()
    print("stopped: " + ", ".join(f"{name} (exit code {code})" for name, code in stopped.items()))
    return 0


def train_model(config: DemoConfig) -> Path:
    out = config.out / "train"
    argv = [PYTHON, "-m", "train", "--out", str(out), "--seed", str(config.seed)]
    # --tcm explicitly: the default recipe (train/configs/default.toml) trains without TCM
    argv += ["--device", config.device, "--tcm"]
    if config.tiny:
        argv.append("--tiny")
    run_step("train (TCM)", argv)
    return out / "model.onnx"


def calibrate(model: Path, config: DemoConfig) -> Path:
    out = config.out / "calibrate" / "calibration.json"
    argv = [PYTHON, "-m", "calibrate", "--model", str(model), "--dataset", config.dataset]
    argv += ["--target-far", repr(config.target_far), "--out", str(out)]
    argv += ["--device", "cuda" if config.device == "cuda" else "cpu"]
    run_step("calibrate", argv)
    return out


def fresh_data_dir(directory: Path) -> Path:
    """The demo enrols the same tenants every run: start from empty galleries, and say so."""
    if directory.exists():
        shutil.rmtree(directory)
        print(f"demo: removed the previous run's galleries in {directory}", flush=True)
    return directory


def start_server(
    processes: ProcessGroup, model: Path, calibration: Path, config: DemoConfig
) -> Endpoints:
    port, metrics_port = free_port(), free_port()
    data_dir = fresh_data_dir(config.out / "server")
    argv = [PYTHON, "-m", "server", "--model", str(model), "--calibration", str(calibration)]
    argv += ["--target-far", repr(config.target_far), "--port", str(port)]
    argv += ["--metrics-port", str(metrics_port), "--data-dir", str(data_dir)]
    argv += ["--device", config.device, "--no-auth"]
    banner(f"serve: {shlex.join(['python', *argv[1:]])}")
    processes.start("server", argv)
    processes.wait_for_port("server", port)
    processes.wait_for_port("server", metrics_port)
    return Endpoints(f"127.0.0.1:{port}", f"http://127.0.0.1:{metrics_port}/metrics")


def start_prometheus(
    processes: ProcessGroup, endpoints: Endpoints, config: DemoConfig
) -> Prometheus:
    binary = prometheus_binary()
    prometheus = Prometheus(binary, config.out / "prometheus", endpoints.metrics_url)
    banner(f"prometheus: {binary} scraping {endpoints.metrics_url} every second")
    prometheus.start(processes)
    return prometheus


def send_traffic(address: str, config: DemoConfig) -> list[TenantOutcome]:
    """Enrol each tenant's gallery, then query it and tell the server the truth."""
    images = load_images(config.dataset, split="test")
    plans = [
        plan_tenant(
            images,
            tenant,
            config.enrolled,
            config.genuine_per_class,
            config.impostor_classes,
            seed=config.seed + i,
            gallery_per_class=config.gallery_per_class,
            impostor_per_class=config.impostor_per_class,
        )
        for i, tenant in enumerate(config.tenants)
    ]
    banner(
        f"traffic: {len(plans)} tenants, "
        f"{sum(len(p.gallery) for p in plans)} enrolled images, "
        f"{sum(len(p.queries) for p in plans)} queries with feedback"
    )
    with RetrievalClient(address) as client:
        return [run_tenant(client, images, plan) for plan in plans]


def run_tenant(client: RetrievalClient, images: ImageSet, plan: TenantPlan) -> TenantOutcome:
    client.create_tenant(plan.tenant)
    items = [(item_id, png_bytes(images, row), label) for item_id, label, row in plan.gallery]
    for start in range(0, len(items), 100):
        results, _ = client.enroll_many(plan.tenant, items[start : start + 100])
        refused = [r for r in results if not r.ok]
        if refused:
            raise RuntimeError(f"{plan.tenant}: enrolment refused: {refused[0].error.message}")
    label_of = {item_id: label for item_id, label, _ in plan.gallery}
    outcome = TenantOutcome(plan.tenant, gallery=len(plan.gallery))
    top_k = min(100, len(plan.gallery))  # every impostor pair that can clear the threshold

    def query(index: int) -> tuple[int, MatchResult]:
        image = png_bytes(images, plan.queries[index].index)
        return index, client.match(plan.tenant, image, top_k=top_k)

    # Concurrent callers let the server micro-batch, as real traffic would.
    with ThreadPoolExecutor(max_workers=8) as pool:
        for index, result in pool.map(query, range(len(plan.queries))):
            asked = plan.queries[index]
            same = label_of.get(result.item_id) == asked.label
            outcome.record(asked.genuine, result, same, label_of, asked.label)
            client.feedback(plan.tenant, result.decision_id, is_same=same)
    outcome.normalization = client.get_tenant(plan.tenant)
    print(f"  {plan.tenant:<10} done", flush=True)
    return outcome


def build_report(
    outcomes: list[TenantOutcome],
    endpoints: Endpoints,
    prometheus: Prometheus | None,
    config: DemoConfig,
) -> str:
    attach_live(outcomes, scrape(endpoints.metrics_url))
    parts = [
        "",
        "=== live per-tenant FAR (scraped from the server)",
        table(outcomes, config.target_far),
    ]
    if prometheus is not None:
        parts += ["", "=== the same, as Prometheus stored it", prometheus.summary()]
    return "\n".join(parts)


def print_where(
    config: DemoConfig, endpoints: Endpoints, prometheus: Prometheus | None, seconds: float
) -> None:
    out = config.out
    lines = [
        f"\ndemo finished in {seconds:.0f} s. Outputs:",
        f"  calibration     {out / 'calibrate' / 'calibration.json'} (+ report.md and plots there)",
        f"  report          {out / 'report.txt'}",
        f"  server data     {out / 'server'} (WAL and snapshots)",
        f"  logs            {out / 'logs'}",
        f"  metrics         {endpoints.metrics_url}"
        + (" (live while --serve runs)" if config.serve else " (stopped now)"),
    ]
    if prometheus is not None:
        lines.append(f"  prometheus      {prometheus.url}")
    print("\n".join(lines), flush=True)


def wait_for_interrupt() -> None:
    print("serving; press Ctrl-C to stop", flush=True)
    while True:
        time.sleep(3600)
