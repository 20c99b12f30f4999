"""DeleteTenant takes the tenant out of monitoring; a tenant created again starts empty.

Before issue 21, DeleteTenant never told the observer: after DeleteTenant + CreateTenant
with the same name the new tenant started with the old one's statistics (decisions=102)
and accepted Feedback on a decision id of the deleted tenant. Real ``python -m server``
(faiss galleries, ids remembered in memory) and a milvus-lite store (ids signed with the
store's secret, as replicas use them).
"""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest

from client import RetrievalClient
from testing import server_fixtures
from testing.server_fixtures import Assets, start_server

server_assets = server_fixtures.server_assets
pytestmark = pytest.mark.slow


def tenant_lines(metrics_url: str, tenant: str) -> list[str]:
    text = urllib.request.urlopen(metrics_url, timeout=10).read().decode()
    return [line for line in text.splitlines() if f'tenant="{tenant}"' in line]


def counter(lines: list[str], name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name + "{"))


def use(client: RetrievalClient, assets: Assets, tenant: str, queries: int) -> list[str]:
    """Enrol 10 images, match ``queries`` of them, tell the truth about the first one."""
    client.enroll_many(tenant, [(f"g{i}", assets.png(i), str(assets.labels[i])) for i in range(10)])
    ids = [client.match(tenant, assets.png(i)).decision_id for i in range(queries)]
    client.feedback(tenant, ids[0], is_same=True)
    return ids


def test_a_tenant_created_again_starts_empty_and_refuses_old_decision_ids(
    server_assets: Assets, tmp_path: Path
) -> None:
    server = start_server(server_assets, tmp_path, "--no-auth", "--target-far", "0.01")
    try:
        with RetrievalClient(server.address) as client:
            client.create_tenant("shop")
            client.create_tenant("neighbour")
            old_ids = use(client, server_assets, "shop", 7)
            use(client, server_assets, "neighbour", 3)
            assert client.get_tenant("shop")["stats"]["decisions"] == 7
            before = tenant_lines(server.metrics_url, "shop")
            assert counter(before, "tcm_monitored_decisions_total") == 7

            client.delete_tenant("shop")
            assert tenant_lines(server.metrics_url, "shop") == []  # every series gone
            assert (
                counter(
                    tenant_lines(server.metrics_url, "neighbour"), "tcm_monitored_decisions_total"
                )
                == 3
            )

            client.create_tenant("shop")
            stats = client.get_tenant("shop")["stats"]
            assert stats["decisions"] == 0 and stats["impostor_decisions"] == 0
            with pytest.raises(grpc.RpcError) as refused:
                client.feedback("shop", old_ids[1], is_same=False)
            assert refused.value.code() == grpc.StatusCode.NOT_FOUND

            client.enroll("shop", "x", server_assets.png(0), str(server_assets.labels[0]))
            fresh = client.match("shop", server_assets.png(0))
            assert client.feedback("shop", fresh.decision_id, is_same=True) is fresh.matched
            lines = tenant_lines(server.metrics_url, "shop")
            assert counter(lines, "tcm_monitored_decisions_total") == 1
            assert counter(lines, "tcm_feedback_outcomes_total") == 1
            assert client.get_tenant("shop")["stats"]["decisions"] == 1
    finally:
        server.stop()


def test_signed_decision_ids_die_with_their_tenant_instance(
    server_assets: Assets, tmp_path: Path
) -> None:
    """With a shared store the ids are signed and verified by any replica: the signature
    binds the tenant's incarnation, which the store keeps and CreateTenant renews."""
    from prometheus_client import CollectorRegistry

    from server.auth import KeyRing
    from server.errors import StatusError
    from server.matching.model import ServingModel
    from server.matching.service import RetrievalService, ServiceConfig
    from server.monitoring import LiveMonitor, TenantLabels
    from server.monitoring.serving import ServerMetrics

    model = ServingModel.load(server_assets.model, server_assets.calibration, "cpu", 0.01, 1)
    registry, labels = CollectorRegistry(), TenantLabels()
    monitor = LiveMonitor(0.01, registry=registry, labels=labels)
    config = ServiceConfig(gallery=f"milvus-lite:{tmp_path / 'lite.db'}")
    metrics = ServerMetrics(registry, labels)
    service = RetrievalService(model, tmp_path, KeyRing(False), monitor, metrics, config)
    image = server_assets.png(3)

    async def run() -> None:
        await service.start()
        try:
            await service.create_tenant("shop")
            first = service.tenant("shop").incarnation
            await service.enroll("shop", [("a", "l", image)], False)
            (outcome,) = await service.match("shop", [image], 1, 0.0)
            assert len(outcome.decision_id) > 24  # signed: verifiable on every replica
            await service.delete_tenant("shop")
            await service.create_tenant("shop")
            assert service.tenant("shop").incarnation not in ("", first)
            assert monitor.tenant_stats("shop")["decisions"] == 0
            with pytest.raises(StatusError) as refused:
                await service.feedback("shop", outcome.decision_id, True)
            assert refused.value.code == grpc.StatusCode.NOT_FOUND
        finally:
            await service.close()

    asyncio.run(run())


def test_every_served_target_is_monitored_under_its_own_label(
    server_assets: Assets, tmp_path: Path
) -> None:
    """A Match at another calibrated target than the default was answered but kept out
    of monitoring before issue 21; now each target has its own series and its Feedback
    counts under that target."""
    server = start_server(server_assets, tmp_path, "--no-auth", "--target-far", "0.001")
    try:
        with RetrievalClient(server.address) as client:
            client.create_tenant("shop")
            use(client, server_assets, "shop", 2)  # at the default 0.001
            other = client.match("shop", server_assets.png(3), target_far=0.01)
            client.feedback("shop", other.decision_id, is_same=False)
            lines = tenant_lines(server.metrics_url, "shop")
        at = {
            far: [line for line in lines if f'target_far="{far}"' in line]
            for far in ("0.001", "0.01")
        }
        assert counter(at["0.001"], "tcm_monitored_decisions_total") == 2
        assert counter(at["0.01"], "tcm_monitored_decisions_total") == 1
        assert counter(at["0.01"], "tcm_feedback_outcomes_total") == 1
        assert any(line.startswith("tcm_far_label_free_ratio{") for line in at["0.01"])
    finally:
        server.stop()


def test_a_match_in_flight_during_delete_brings_nothing_back(
    server_assets: Assets, tmp_path: Path
) -> None:
    """DeleteTenant can finish while a Match of the tenant is between its search and its
    decision: that Match must not put the deleted tenant's label, windows or traffic
    evidence back (nor hand them to a tenant created again under the name)."""
    from prometheus_client import CollectorRegistry

    from server.auth import KeyRing
    from server.matching.model import ServingModel
    from server.matching.service import RetrievalService, ServiceConfig
    from server.monitoring import LiveMonitor, TenantLabels
    from server.monitoring.serving import ServerMetrics

    model = ServingModel.load(server_assets.model, server_assets.calibration, "cpu", 0.01, 1)
    registry, labels = CollectorRegistry(), TenantLabels()
    monitor = LiveMonitor(0.01, registry=registry, labels=labels)
    metrics = ServerMetrics(registry, labels)
    service = RetrievalService(model, tmp_path, KeyRing(False), monitor, metrics, ServiceConfig())
    images = [server_assets.png(i) for i in range(6)]

    async def run() -> None:
        await service.start()
        try:
            await service.create_tenant("shop")
            await service.enroll(
                "shop",
                [(f"g{i}", str(server_assets.labels[i]), images[i]) for i in range(6)],
                False,
            )
            await service.match("shop", images[:2], 1, 0.0)  # the tenant is known everywhere
            assert labels.get("shop") == "shop"
            statistics = service._current().statistics
            assert "shop" in statistics._tenants
            tenant = service.tenant("shop")
            search = tenant.gallery.search

            def search_then_deleted(*args, **kwargs):
                found = search(*args, **kwargs)
                service.tenants.delete("shop")  # DeleteTenant completes meanwhile
                service._tenant_gone("shop")
                return found

            tenant.gallery.search = search_then_deleted
            (outcome,) = await service.match("shop", images[2:3], 1, 0.0)
            assert outcome.result.top1 is not None  # it was answered, from the old gallery
            assert labels.get("shop") is None  # no label, no series, no window
            assert monitor.tenant_stats("shop")["decisions"] == 0
            assert "shop" not in statistics._tenants  # no traffic evidence counted
            await service.create_tenant("shop")
            assert monitor.tenant_stats("shop")["decisions"] == 0
        finally:
            await service.close()

    asyncio.run(run())


def test_a_reload_that_fails_while_re_embedding_leaves_nothing_running(
    server_assets: Assets, tmp_path: Path, monkeypatch
) -> None:
    """The new model's batcher starts before the galleries are re-embedded: when that
    fails, the batcher (and the onnxruntime session it holds) must go, the error be
    counted, and the old model go on serving."""
    from prometheus_client import CollectorRegistry

    from calibrate.cli.main import main as calibrate_main
    from server.auth import KeyRing
    from server.matching.batcher import MicroBatcher
    from server.matching.model import ServingModel
    from server.matching.service import RetrievalService, ServiceConfig
    from server.monitoring import LiveMonitor, TenantLabels
    from server.monitoring.serving import ServerMetrics
    from testing.onnx_models import make_linear_embedder

    other = make_linear_embedder(tmp_path / "other.onnx", seed=1)
    calibration = tmp_path / "other-cal" / "calibration.json"
    args = ["--model", str(other), "--dataset", "glyphs-tiny", "--out", str(calibration)]
    assert calibrate_main([*args, "--target-far", "0.01,0.05", "--no-progress"]) == 0
    model = ServingModel.load(server_assets.model, server_assets.calibration, "cpu", 0.01, 1)
    registry, labels = CollectorRegistry(), TenantLabels()
    monitor = LiveMonitor(0.01, registry=registry, labels=labels)
    metrics = ServerMetrics(registry, labels)
    service = RetrievalService(model, tmp_path, KeyRing(False), monitor, metrics, ServiceConfig())
    image = server_assets.png(0)
    closed: list[MicroBatcher] = []
    close = MicroBatcher.close

    async def recording_close(self: MicroBatcher) -> None:
        closed.append(self)
        await close(self)

    def broken(*_args, **_kwargs):
        raise RuntimeError("the disk went away while re-embedding")

    async def run() -> None:
        await service.start()
        try:
            await service.create_tenant("shop")
            await service.enroll("shop", [("a", "l", image)], False)
            serving = service._current()
            monkeypatch.setattr(MicroBatcher, "close", recording_close)
            monkeypatch.setattr(ServingModel, "embed_images", broken)
            with pytest.raises(RuntimeError, match="disk went away"):
                await service.reload(str(other), str(calibration), "cpu")
            assert service._current() is serving  # still the old model
            assert len(closed) == 1 and closed[0] is not serving.batcher
            errors = registry.get_sample_value("tcm_reloads_total", {"result": "error"})
            assert errors == 1
            monkeypatch.undo()
            (outcome,) = await service.match("shop", [image], 1, 0.0)
            assert outcome.result.top1 is not None
        finally:
            await service.close()

    asyncio.run(run())
