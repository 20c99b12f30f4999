"""The demo's pieces (traffic plan, report, child processes) and the demo end to end."""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from client import MatchResult, Neighbor
from contracts import load_calibration
from demo.__main__ import parse_args
from demo.compare import comparison_table
from demo.processes import ProcessGroup, free_port
from demo.prometheus import Prometheus
from demo.report import TenantOutcome, attach_live, scrape, table
from demo.traffic import plan_tenant, png_bytes

ROOT = Path(__file__).resolve().parent.parent


def test_plan_keeps_impostor_classes_out_of_the_gallery(tiny_glyphs):
    plan = plan_tenant(
        tiny_glyphs, "latin", enrolled_classes=3, genuine_per_class=2, impostor_classes=2, seed=1
    )
    enrolled = {label for _, label, _ in plan.gallery}
    assert len(enrolled) == 3
    genuine = [q for q in plan.queries if q.genuine]
    impostor = [q for q in plan.queries if not q.genuine]
    assert {q.label for q in genuine} <= enrolled
    assert not {q.label for q in impostor} & enrolled
    assert len(impostor) == 2
    gallery_rows = {row for _, _, row in plan.gallery}
    assert not gallery_rows & {q.index for q in plan.queries}  # a query never is its gallery image
    for q in plan.queries:
        assert tiny_glyphs.class_names[tiny_glyphs.labels[q.index]] == q.label
        assert tiny_glyphs.tenant_names[tiny_glyphs.tenants[q.index]] == "latin"


def test_plan_is_seeded(tiny_glyphs):
    a = plan_tenant(tiny_glyphs, "greek", 3, 2, 2, seed=5)
    b = plan_tenant(tiny_glyphs, "greek", 3, 2, 2, seed=5)
    c = plan_tenant(tiny_glyphs, "greek", 3, 2, 2, seed=6)
    assert a == b
    assert a != c


def test_plan_rejects_a_tenant_without_classes(tiny_glyphs):
    with pytest.raises(KeyError):
        plan_tenant(tiny_glyphs, "klingon", 3, 2, 2)


def test_png_bytes_round_trip(tiny_glyphs):
    import io

    from PIL import Image

    img = Image.open(io.BytesIO(png_bytes(tiny_glyphs, 7)))
    assert np.array_equal(np.asarray(img), tiny_glyphs.image(7))


def answer(matched: bool, similarity: float, neighbours=()) -> MatchResult:
    """A Match answer at threshold 0.5 whose normalised scores sit 0.1 below the raw ones."""
    near = [Neighbor(i, "", s, s - 0.1) for i, s in neighbours]
    return MatchResult("d", matched, "g0", similarity, 0.5, neighbors=near, score=similarity - 0.1)


def test_outcome_counts_raw_and_normalised_decisions():
    o = TenantOutcome("t", gallery=10)
    labels = {"g0": "a", "g1": "b"}
    o.record(True, answer(True, 0.9), True, labels, "a")
    o.record(True, answer(True, 0.9), False, labels, "a")
    o.record(True, answer(False, 0.55), False, labels, "a")  # raw accepts, normalised not
    o.record(False, answer(False, 0.55, [("g0", 0.55), ("g1", 0.52)]), False, labels, "z")
    o.record(False, answer(False, 0.2, [("g0", 0.2)]), False, labels, "z")
    assert (o.genuine, o.genuine_accepted, o.genuine_correct) == (3, 2, 1)
    assert o.genuine_accepted_raw == 3
    assert (o.impostor, o.impostor_accepted, o.impostor_accepted_raw) == (2, 0, 1)
    assert (o.impostor_pairs, o.pairs_accepted_raw, o.pairs_accepted) == (20, 2, 0)


def test_scrape_reads_tenant_gauges_from_a_real_endpoint():
    registry = CollectorRegistry()
    gauge = Gauge("tcm_far_label_free", "x", ["tenant"], registry=registry)
    gauge.labels("latin").set(0.002)
    gauge.labels("greek").set(math.nan)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        values = scrape(f"http://127.0.0.1:{port}/metrics")
    finally:
        server.shutdown()
        thread.join()
    assert values["tcm_far_label_free"]["latin"] == pytest.approx(0.002)
    assert math.isnan(values["tcm_far_label_free"]["greek"])

    outcome = TenantOutcome("latin", gallery=4)
    attach_live([outcome], values)
    assert outcome.live["tcm_far_label_free"] == pytest.approx(0.002)
    assert math.isnan(outcome.live["tcm_far_feedback"])
    text = table([outcome], 1e-3)
    assert "latin" in text and "2.00e-03" in text and "per impostor PAIR" in text
    assert "raw -> normalised" in text and "off (raw)" in text


def test_comparison_table_shows_both_runs():
    text = comparison_table(
        {
            "baseline": {"recall_at_1": 0.8, "opis": 1e-3, "eps_opis": 2e-4, "far_spread": 9.0},
            "baseline + TCM": {"recall_at_1": 0.81, "opis": 4e-4},
        }
    )
    lines = text.splitlines()
    assert lines[2].startswith("baseline ") and "0.800" in lines[2] and "9.0" in lines[2]
    assert lines[3].startswith("baseline + TCM") and "4.00e-04" in lines[3]
    assert lines[3].rstrip().endswith("-")  # a metric the run did not write shows as '-'


def test_process_group_stops_children_and_reports_a_dead_one(tmp_path):
    group = ProcessGroup(tmp_path, grace_s=2)
    with group:
        sleeper = group.start("sleeper", [sys.executable, "-c", "import time; time.sleep(60)"])
        group.start("dies", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"])
        with pytest.raises(RuntimeError, match="boom"):
            group.wait_for_port("dies", free_port(), timeout_s=10)
    assert sleeper.poll() is not None  # stopped on the way out


def test_process_group_kills_a_child_that_ignores_sigterm(tmp_path):
    code = (
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('up', flush=True); time.sleep(60)"
    )
    group = ProcessGroup(tmp_path, grace_s=0.5)
    proc = group.start("stubborn", [sys.executable, "-c", code])
    deadline = time.monotonic() + 10
    while "up" not in group.tail("stubborn") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert group.stop("stubborn") == -9
    assert proc.poll() == -9


def test_cli_validates_target_far():
    with pytest.raises(SystemExit):
        parse_args(["--target-far", "2"])
    config = parse_args(["--tiny", "--tenants", "latin, greek"])
    assert config.tenants == ("latin", "greek") and config.dataset == "glyphs-tiny"


def test_generated_prometheus_config_is_valid(tmp_path):
    promtool = shutil.which("promtool") or "/usr/bin/promtool"
    assert Path(promtool).exists(), "promtool missing: run scripts/install_prometheus.sh"
    config = tmp_path / "prometheus.yml"
    config.write_text(Prometheus(promtool, tmp_path, "http://127.0.0.1:9/metrics").config_text())
    out = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.slow
def test_demo_end_to_end_tiny(tmp_path):
    """``python -m demo --tiny --prometheus``: the shipped model, server, traffic and report."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}"}
    out = subprocess.run(
        [sys.executable, "-m", "demo", "--tiny", "--prometheus", "--out", str(tmp_path / "demo")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    report = (tmp_path / "demo" / "report.txt").read_text()
    for tenant in ("latin", "greek", "cyrillic", "math"):
        assert tenant in report
    assert "tcm_far_label_free" in report  # the Prometheus part answered
    doc = load_calibration(tmp_path / "demo" / "calibrate" / "calibration.json")
    assert doc.target(1e-3).threshold > -1
    table_rows = [line.split() for line in report.splitlines()]
    decided = {row[0]: row for row in table_rows if row and row[0] in doc.dataset_names}
    assert set(decided) >= {"latin", "greek", "cyrillic", "math"}
    for row in decided.values():  # genuine and impostor queries were answered: "(a/b)" with b > 0
        totals = [int(m.group(2)) for m in re.finditer(r"\((\d+)/(\d+)\)", " ".join(row))]
        assert totals and all(total > 0 for total in totals), row
    assert "server (exit code 0)" in out.stdout  # drained and stopped cleanly
    assert "demo finished" in out.stdout
    # a user's first command runs again in the same checkout (issue 12: ALREADY_EXISTS)
    again = subprocess.run(
        [sys.executable, "-m", "demo", "--tiny", "--out", str(tmp_path / "demo")],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    assert "removed the previous run's galleries" in again.stdout
    assert "demo finished" in again.stdout


def test_demo_prints_a_grpc_status_not_a_traceback(monkeypatch, capsys):
    import grpc

    import demo.__main__ as entry

    class Refused(grpc.RpcError):
        def code(self) -> grpc.StatusCode:
            return grpc.StatusCode.ALREADY_EXISTS

        def details(self) -> str:
            return "tenant 'latin' already exists"

    def refuse(config):
        raise Refused()

    monkeypatch.setattr(entry, "run", refuse)
    monkeypatch.setattr(entry, "_stop_on_signals", lambda: None)  # keep pytest's handlers
    assert entry.main(["--tiny"]) == 1
    err = capsys.readouterr().err
    assert "ALREADY_EXISTS: tenant 'latin' already exists" in err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_demo_interrupted_while_serving_leaves_nothing_behind(tmp_path, sig):
    """Ctrl-C or SIGTERM during ``--serve`` stops the server before the demo exits."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'protos'}"}
    out = tmp_path / "demo"
    demo = subprocess.Popen(
        [sys.executable, "-m", "demo", "--tiny", "--serve", "--out", str(out)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in demo.stdout:
            lines.append(line)
            if "press Ctrl-C" in line:
                break
        assert "press Ctrl-C" in lines[-1], "".join(lines[-30:])
        ready = (out / "logs" / "server.log").read_text()
        port = int(re.search(r"serving retrieval\.v1 on [\d.]+:(\d+)", ready).group(1))
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the server is up
        demo.send_signal(sig)
        rest = demo.communicate(timeout=60)[0]
    finally:
        if demo.poll() is None:
            demo.kill()
    assert demo.returncode == 130, rest
    assert "every process it started has been stopped" in rest
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
