"""``--workers 2`` on the faiss store: one writer, one reader, one port, one data dir.

Real server processes on loopback (server/workers.py). New connections spread over
the workers (SO_REUSEPORT), so each check runs over many fresh clients: the calls that
land on the reader are forwarded (writes) or served from the followed gallery (Match).
"""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from client import RetrievalClient
from testing import server_fixtures
from testing.server_fixtures import ADMIN_KEY, Assets, start_server

server_assets = server_fixtures.server_assets
pytestmark = pytest.mark.slow
FRESH = 16  # fresh connections per check: all on one worker has odds 2**-15


def workers(assets: Assets, tmp: Path):
    return start_server(
        assets,
        tmp,
        "--api-keys",
        str(assets.keys),
        "--metrics-port",
        "0",
        "--workers",
        "2",
    )


def test_every_worker_sees_each_write_its_token_names(assets_tmp) -> None:
    assets, server = assets_tmp
    with RetrievalClient(server.address, api_key=ADMIN_KEY) as admin:
        admin.create_tenant("w")
    tokens: dict[str, int] = {}
    for n in range(8):  # writes through fresh connections: some reach the reader
        with RetrievalClient(server.address, api_key=ADMIN_KEY) as fresh:
            fresh.write_tokens.update(tokens)
            fresh.enroll("w", f"x{n}", assets.png(n), label=f"L{n}")
            tokens.update(fresh.write_tokens)
            for probe in range(n + 1):  # at once, on whichever worker: every write so far
                assert fresh.match("w", assets.png(probe)).item_id == f"x{probe}"
    with RetrievalClient(server.address, api_key=ADMIN_KEY) as fresh:
        fresh.write_tokens.update(tokens)
        fresh.remove("w", ["x3"])
        tokens.update(fresh.write_tokens)
    for _ in range(FRESH):
        with RetrievalClient(server.address, api_key=ADMIN_KEY) as fresh:
            fresh.write_tokens.update(tokens)
            assert fresh.match("w", assets.png(3)).item_id != "x3"
            assert fresh.get_tenant("w")["gallery_size"] == 7
    matches = server.per_worker("tcm_requests_total", "Match")
    assert all(m > 0 for m in matches), matches  # both workers served Match
    # each write handled (and counted) once, by the writer, wherever it arrived
    assert server.per_worker("tcm_requests_total", "Enroll") == [8.0, 0.0]
    assert server.per_worker("tcm_requests_total", "CreateTenant") == [1.0, 0.0]


def test_a_new_tenant_its_key_and_feedback_work_on_every_worker(assets_tmp) -> None:
    assets, server = assets_tmp
    with RetrievalClient(server.address, api_key=ADMIN_KEY) as admin:
        key = admin.create_tenant("k")
        admin.enroll("k", "a", assets.png(1), label="A")
        tokens = dict(admin.write_tokens)
    decisions = []
    for _ in range(FRESH):  # at once: a reader looks a key it does not know up on disk
        with RetrievalClient(server.address, api_key=key) as fresh:
            fresh.write_tokens.update(tokens)
            decisions.append(fresh.match("k", assets.png(1)).decision_id)
    for decision in decisions:  # a decision id verifies on the worker that did not make it
        with RetrievalClient(server.address, api_key=key) as fresh:
            assert fresh.feedback("k", decision, True) is True


def test_reload_by_rpc_is_refused_and_says_how(assets_tmp) -> None:
    import json

    _, server = assets_tmp
    for _ in range(FRESH):
        with RetrievalClient(server.address, api_key=ADMIN_KEY) as fresh:
            with pytest.raises(grpc.RpcError) as err:
                fresh.reload()
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "SIGHUP" in err.value.details()
    # audited once each, by the writer, under the client's address even when relayed
    lines = (server.data_dir / "audit.log").read_text().splitlines()
    reloads = [json.loads(line) for line in lines if '"Reload"' in line]
    assert len(reloads) == FRESH
    assert all(r["peer"].startswith("ipv4:127.0.0.1:") for r in reloads)
    assert any(r["peer"].endswith("(via a reader worker)") for r in reloads)


def test_a_deleted_tenant_leaves_every_worker(assets_tmp) -> None:
    assets, server = assets_tmp
    with RetrievalClient(server.address, api_key=ADMIN_KEY) as admin:
        admin.create_tenant("gone")
        admin.enroll("gone", "a", assets.png(1))
        admin.delete_tenant("gone")
    deadline = time.monotonic() + 15
    for _ in range(FRESH):
        with RetrievalClient(server.address, api_key=ADMIN_KEY) as fresh:
            while True:
                try:
                    fresh.match("gone", assets.png(1))
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND, err
                    break
                assert time.monotonic() < deadline, "a worker still serves the deleted tenant"
                time.sleep(0.2)


@pytest.fixture(scope="module")
def assets_tmp(server_assets: Assets, tmp_path_factory):
    directory = tmp_path_factory.mktemp("workers")
    server = workers(server_assets, directory)
    server.data_dir = directory
    try:
        assert server.ready_line.endswith("(2 workers)")
        yield server_assets, server
    finally:
        server.stop()


def model_shas(server) -> list[str]:
    """tcm_model_info's model_sha256 on each worker."""
    urls = server.ready_line.split("metrics on ")[1].split(" (")[0].split()
    shas = []
    for url in urls:
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        for f in text_string_to_metric_families(text):
            shas += [s.labels["model_sha256"] for s in f.samples if s.name == "tcm_model_info"]
    return shas


def test_sighup_reloads_a_new_model_on_every_worker(server_assets: Assets, tmp_path: Path):
    import shutil
    import signal

    from testing.server_fixtures import make_assets

    other = make_assets(tmp_path / "other", server_assets.images, server_assets.labels, seed=2)
    model, calibration = tmp_path / "model.onnx", tmp_path / "calibration.json"
    shutil.copy(server_assets.model, model)
    shutil.copy(server_assets.calibration, calibration)
    server = start_server(
        server_assets, tmp_path / "data", "--no-auth", "--workers", "2", "--metrics-port", "0",
        "--model", str(model), "--calibration", str(calibration),
    )  # fmt: skip
    try:
        with RetrievalClient(server.address) as client:
            client.create_tenant("m")
            for i in range(6):
                client.enroll("m", f"o{i}", server_assets.png(i))
            tokens = dict(client.write_tokens)
        before = model_shas(server)
        assert len(before) == 2 and len(set(before)) == 1
        shutil.copy(other.model, model)
        shutil.copy(other.calibration, calibration)
        server.proc.send_signal(signal.SIGHUP)  # the parent passes it to every worker
        deadline = time.monotonic() + 60
        while server.log().count("reloaded on SIGHUP") < 2:
            assert time.monotonic() < deadline, server.log()[-3000:]
            time.sleep(0.2)
        after = model_shas(server)
        assert len(set(after)) == 1 and after[0] != before[0]
        for n in range(FRESH):  # the readers re-read the galleries under the new model
            with RetrievalClient(server.address) as fresh:
                fresh.write_tokens.update(tokens)
                hit = fresh.match("m", server_assets.png(n % 6))
                assert hit.item_id == f"o{n % 6}" and hit.similarity > 0.999
    finally:
        assert server.stop() == 0


def test_a_reader_looks_for_a_new_tenant_off_the_event_loop(server_assets: Assets, tmp_path):
    """The first call naming a tenant a reader has not followed reads the disk in the work
    pool: while a refresh or a reload holds the reader's tenant lock, other calls go on."""
    import asyncio
    import threading

    from prometheus_client import CollectorRegistry

    from server.auth import KeyRing
    from server.matching.model import ServingModel
    from server.matching.service import RetrievalService, ServiceConfig
    from server.monitoring import LiveMonitor, TenantLabels
    from server.monitoring.serving import ServerMetrics

    model = ServingModel.load(server_assets.model, server_assets.calibration, "cpu", 0.01, 1)

    def service(role: str) -> RetrievalService:
        registry, labels = CollectorRegistry(), TenantLabels()
        monitor = LiveMonitor(0.01, registry=registry, labels=labels)
        config = ServiceConfig(store_options={"role": role})
        metrics = ServerMetrics(registry, labels)
        return RetrievalService(model, tmp_path, KeyRing(False), monitor, metrics, config)

    writer, reader = service("writer"), service("reader")
    held, release = threading.Event(), threading.Event()

    def refresh_holding_the_lock() -> None:
        with reader.tenants._following:
            held.set()
            release.wait(30)

    async def run() -> None:
        await writer.start()
        await reader.start()
        try:
            await writer.create_tenant("shop")
            holder = threading.Thread(target=refresh_holding_the_lock, daemon=True)
            holder.start()
            held.wait(10)
            looking = asyncio.ensure_future(reader.tenant_now("shop"))
            await asyncio.sleep(0.3)  # the loop runs: the look waits in the pool
            assert not looking.done()
            release.set()
            assert (await looking).name == "shop"
        finally:
            release.set()
            await reader.close()
            await writer.close()

    asyncio.run(run())
