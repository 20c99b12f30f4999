"""A gallery store that fails reaches the client with its status AND the retry hint.

docs/SCALE.md promises that a store failure is UNAVAILABLE and a store timeout
DEADLINE_EXCEEDED, both with a retry hint. The store contract tests check the exception
(server/storage/base.py StoreUnavailableError); this checks what a client sees: the real
RetrievalService behind the real server (build_server, the interceptor) on loopback,
its tenant's gallery failing the way a stalled or unreachable Milvus makes it fail.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as rpc
from retrieval.v1.metadata import PUSHBACK_KEY, retry_after_of

from server.api.app import build_server
from server.auth import KeyRing
from server.matching.model import ServingModel
from server.matching.observer import NullObserver
from server.matching.service import RetrievalService, ServiceConfig
from server.monitoring.serving import ServerMetrics
from server.storage.base import RETRY_AFTER, StoreUnavailableError
from testing import server_fixtures
from testing.server_fixtures import Assets

server_assets = server_fixtures.server_assets


@pytest.mark.parametrize(
    ("timeout", "code"),
    [(True, grpc.StatusCode.DEADLINE_EXCEEDED), (False, grpc.StatusCode.UNAVAILABLE)],
)
def test_a_store_failure_reaches_the_client_with_a_retry_hint(
    server_assets: Assets, tmp_path: Path, timeout: bool, code: grpc.StatusCode
) -> None:
    model = ServingModel.load(server_assets.model, server_assets.calibration, "cpu", 0.01, 1)
    registry = CollectorRegistry()
    keys = KeyRing()
    service = RetrievalService(
        model, tmp_path, keys, NullObserver(), ServerMetrics(registry), ServiceConfig()
    )

    def stalled(*args, **kwargs):
        raise StoreUnavailableError("milvus did not answer within 2 s", timeout=timeout)

    async def scenario() -> grpc.aio.AioRpcError:
        await service.start()
        server, _ = build_server(service, "cpu")
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            api_key = await service.create_tenant("acme")
            errors, size = await service.enroll("acme", [("a", "x", server_assets.png(0))], False)
            assert errors == [None] and size == 1
            service.tenant("acme").gallery.search = stalled
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = rpc.RetrievalStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await stub.Match(
                        pb.MatchRequest(tenant="acme", image=server_assets.png(1)),
                        metadata=(("x-api-key", api_key),),
                        timeout=30,
                    )
                return caught.value
        finally:
            await server.stop(None)
            await service.close()

    err = asyncio.run(scenario())
    assert err.code() == code
    assert "did not answer" in err.details()
    assert retry_after_of(err) == RETRY_AFTER
    trailers = dict(err.trailing_metadata())
    status = rpc_status.from_call(err)
    info = error_details_pb2.RetryInfo()
    assert status.code == code.value[0]
    assert status.details[0].Unpack(info)
    assert info.retry_delay.ToMilliseconds() == int(trailers[PUSHBACK_KEY])
    sample = registry.get_sample_value("tcm_requests_total", {"method": "Match", "code": code.name})
    assert sample == 1.0
