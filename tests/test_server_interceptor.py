"""The server interceptor on a real grpc.aio server on loopback, in front of a scripted servicer.

The servicer stands in for RetrievalService (the interceptor's only neighbour), so each
cross-cutting rule can be driven exactly: auth per call and per stream message,
error mapping (never UNKNOWN), admission with retry hints, per-tenant rate limits,
metrics once per call and the audit log.
"""

# ruff: noqa: N802  (gRPC method names)
from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_status import rpc_status
from prometheus_client import CollectorRegistry
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as rpc
from retrieval.v1.metadata import PUSHBACK_KEY, retry_after_of

from server.api.admission import Admission, AdmissionLimits, OverloadMetrics
from server.api.audit import AuditLog, read_records
from server.api.interceptor import RetrievalInterceptor, cost
from server.api.ratelimit import TenantRateLimiter
from server.auth import KeyRing, Principal, hash_key
from server.errors import StatusError
from server.monitoring.serving import ServerMetrics

ADMIN, KEY_A = "admin-key-0123456789", "tenant-a-key-0123456789"


class Scripted(rpc.RetrievalServicer, rpc.AdminServicer):
    """Behaves by tenant name: 'boom' raises a bug, 'busy' a full queue, 'slow' waits."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = 0

    async def _act(self, tenant: str) -> None:
        if tenant == "boom":
            raise RuntimeError("a bug")
        if tenant == "busy":
            raise StatusError(grpc.StatusCode.RESOURCE_EXHAUSTED, "embedding queue full")
        if tenant == "full":
            raise OSError(errno.ENOSPC, "No space left on device")
        if tenant == "slow":
            self.started += 1
            await self.release.wait()

    async def Match(self, request, context):
        await self._act(request.tenant)
        return pb.MatchResponse(item_id=request.tenant, similarity=1.0)

    async def MatchBatch(self, request, context):
        await self._act(request.tenant)
        return pb.MatchBatchResponse()

    async def MatchStream(self, request_iterator, context) -> AsyncIterator[pb.MatchResponse]:
        async for request in request_iterator:
            await self._act(request.tenant)
            yield pb.MatchResponse(item_id=request.tenant)

    async def CreateTenant(self, request, context):
        if request.tenant == "boom":
            raise StatusError(grpc.StatusCode.ALREADY_EXISTS, "tenant 'boom' already exists")
        return pb.CreateTenantResponse(tenant=request.tenant, api_key="tcm_secret_new_key_xyz")

    async def Reload(self, request, context):
        return pb.ReloadResponse(model_sha256="0" * 64)


class Harness:
    def __init__(self, tmp_path: Path, **parts) -> None:
        keys = KeyRing()
        keys.add(hash_key(ADMIN), Principal(True, None))
        keys.add(hash_key(KEY_A), Principal(False, "a"))
        self.registry = CollectorRegistry()
        self.admission = Admission(
            parts.pop("limits", AdmissionLimits()), OverloadMetrics(self.registry)
        )
        self.audit_path = tmp_path / "audit.log"
        self.audit = AuditLog(self.audit_path)
        self.interceptor = RetrievalInterceptor(
            keys,
            ServerMetrics(self.registry),
            self.admission,
            parts.pop("limiter", None),
            self.audit,
        )
        self.servicer = Scripted()

    async def __aenter__(self) -> Harness:
        self.server = grpc.aio.server(interceptors=[self.interceptor])
        rpc.add_RetrievalServicer_to_server(self.servicer, self.server)
        rpc.add_AdminServicer_to_server(self.servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        await self.server.start()
        self.channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        self.stub = rpc.RetrievalStub(self.channel)
        self.admin = rpc.AdminStub(self.channel)
        return self

    async def __aexit__(self, *exc) -> None:
        self.servicer.release.set()
        await self.channel.close()
        await self.server.stop(None)
        self.audit.close()

    def count(self, method: str, code: str) -> float:
        value = self.registry.get_sample_value(
            "tcm_requests_total", {"method": method, "code": code}
        )
        return value or 0.0

    def rejections(self, reason: str) -> float:
        return self.registry.get_sample_value("tcm_overload_rejections_total", {"reason": reason})


def run(tmp_path: Path, scenario: Callable[[Harness], Awaitable[None]], **parts) -> None:
    async def main() -> None:
        async with Harness(tmp_path, **parts) as h:
            await scenario(h)

    asyncio.run(main())


def key(k: str) -> tuple:
    return (("x-api-key", k),)


async def eventually(check, timeout: float = 5.0) -> bool:
    """True once ``check()`` holds: the server hands a slot back after the client already
    has its status, so an immediate look can race it."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def code_of(awaitable) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await awaitable
    return err.value.code()


def test_a_bug_is_internal_on_unary_and_stream_never_unknown(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.Match(pb.MatchRequest(tenant="boom"), metadata=key(ADMIN))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "see the server log" in err.value.details()
        stream = h.stub.MatchStream(metadata=key(ADMIN))
        await stream.write(pb.MatchRequest(tenant="a"))
        assert (await stream.read()).item_id == "a"
        await stream.write(pb.MatchRequest(tenant="boom"))
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream.read()
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert h.count("Match", "INTERNAL") == 1
        assert h.count("MatchStream", "INTERNAL") == 1  # once per stream, not per message
        assert await eventually(lambda: h.admission.calls == 0)  # every slot handed back

    run(tmp_path, scenario)


def test_auth_is_checked_per_call_and_per_stream_message(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        denied, unauthenticated = grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED
        assert (await h.stub.Match(pb.MatchRequest(tenant="a"), metadata=key(KEY_A))).item_id
        assert await code_of(h.stub.Match(pb.MatchRequest(tenant="b"), metadata=key(KEY_A))) == (
            denied
        )
        assert await code_of(h.stub.Match(pb.MatchRequest(tenant="a"))) == unauthenticated
        assert await code_of(h.admin.Reload(pb.ReloadRequest(), metadata=key(KEY_A))) == denied
        requests = [pb.MatchRequest(tenant=t) for t in ("a", "a", "b", "a")]
        stream = h.stub.MatchStream(iter(requests), metadata=key(KEY_A))
        answered = []
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for reply in stream:
                answered.append(reply.item_id)
        assert answered == ["a", "a"] and err.value.code() == denied
        assert h.count("MatchStream", "PERMISSION_DENIED") == 1

    run(tmp_path, scenario)


def test_admission_answers_resource_exhausted_with_a_retry_hint(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        slow = [
            asyncio.ensure_future(h.stub.Match(pb.MatchRequest(tenant="slow"), metadata=key(ADMIN)))
            for _ in range(2)
        ]
        while h.servicer.started < 2:
            await asyncio.sleep(0.01)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.Match(pb.MatchRequest(tenant="a"), metadata=key(ADMIN))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at capacity" in err.value.details()
        trailers = dict(err.value.trailing_metadata())
        assert 10 <= int(trailers[PUSHBACK_KEY]) <= 5000
        status = rpc_status.from_call(err.value)
        info = error_details_pb2.RetryInfo()
        assert status.details[0].Unpack(info) and info.retry_delay.ToMilliseconds() == int(
            trailers[PUSHBACK_KEY]
        )
        # admin calls and health checks still get through at capacity
        assert (await h.admin.Reload(pb.ReloadRequest(), metadata=key(ADMIN))).model_sha256
        health_stub = health_pb2_grpc.HealthStub(h.channel)
        await health_stub.Check(health_pb2.HealthCheckRequest())
        h.servicer.release.set()
        await asyncio.gather(*slow)
        assert await eventually(lambda: h.admission.calls == 0)
        assert h.rejections("images") == 1
        # a full embedding queue inside the service gets the admission's hint as well
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.Match(pb.MatchRequest(tenant="busy"), metadata=key(ADMIN))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert retry_after_of(err.value) is not None and h.rejections("queue") == 1

    run(tmp_path, scenario, limits=AdmissionLimits(max_images=2))


def test_admission_bounds_request_bytes(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        big = pb.MatchBatchRequest(tenant="slow", images=[b"x" * 3000])
        first = asyncio.ensure_future(h.stub.MatchBatch(big, metadata=key(ADMIN)))
        while h.servicer.started < 1:
            await asyncio.sleep(0.01)
        assert await code_of(h.stub.MatchBatch(big, metadata=key(ADMIN))) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        h.servicer.release.set()
        await first  # alone, a call larger than the budget is admitted
        assert h.rejections("bytes") == 1

    run(tmp_path, scenario, limits=AdmissionLimits(max_bytes=2000))


def test_cancelled_calls_free_their_slot_and_are_counted(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        call = h.stub.Match(pb.MatchRequest(tenant="slow"), metadata=key(ADMIN))
        while h.servicer.started < 1:
            await asyncio.sleep(0.01)
        call.cancel()
        for _ in range(200):
            if h.count("Match", "CANCELLED"):
                break
            await asyncio.sleep(0.01)
        assert h.count("Match", "CANCELLED") == 1
        assert await eventually(lambda: h.admission.calls == 0)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.Match(pb.MatchRequest(tenant="slow"), metadata=key(ADMIN), timeout=0.2)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        for _ in range(200):
            if h.count("Match", "DEADLINE_EXCEEDED"):
                break
            await asyncio.sleep(0.01)
        assert h.count("Match", "DEADLINE_EXCEEDED") == 1

    run(tmp_path, scenario)


def test_rate_limit_per_tenant_does_not_starve_the_others(tmp_path: Path) -> None:
    now = [0.0]
    limiter = TenantRateLimiter(rate=2, burst=3, clock=lambda: now[0])

    async def scenario(h: Harness) -> None:
        outcomes = []
        for _ in range(5):
            try:
                await h.stub.Match(pb.MatchRequest(tenant="a"), metadata=key(KEY_A))
                outcomes.append("OK")
            except grpc.aio.AioRpcError as err:
                outcomes.append(err.code().name)
                wait = retry_after_of(err)
        assert outcomes == ["OK"] * 3 + ["RESOURCE_EXHAUSTED"] * 2
        assert wait == pytest.approx(0.5)  # one token at 2 per second
        for _ in range(3):  # another tenant is untouched by a's exhaustion
            await h.stub.Match(pb.MatchRequest(tenant="b"), metadata=key(ADMIN))
        now[0] += 0.5
        await h.stub.Match(pb.MatchRequest(tenant="a"), metadata=key(KEY_A))
        # a batch costs one token per image; a batch larger than the burst waits for a
        # full bucket, then runs (and leaves the bucket in debt)
        batch = pb.MatchBatchRequest(tenant="a", images=[b"i"] * 10)
        assert await code_of(h.stub.MatchBatch(batch, metadata=key(KEY_A))) == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        now[0] += 1.5
        await h.stub.MatchBatch(batch, metadata=key(KEY_A))
        assert h.rejections("tenant_rate") == 3
        # an unauthenticated caller cannot spend a tenant's tokens
        now[0] += 100
        for _ in range(5):
            await code_of(h.stub.Match(pb.MatchRequest(tenant="a")))
        await h.stub.Match(pb.MatchRequest(tenant="a"), metadata=key(KEY_A))

    run(tmp_path, scenario, limiter=limiter)


def test_audit_log_records_admin_calls_without_secrets(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        admin = key(ADMIN)
        reply = await h.admin.CreateTenant(pb.CreateTenantRequest(tenant="new"), metadata=admin)
        assert reply.api_key == "tcm_secret_new_key_xyz"
        await code_of(h.admin.CreateTenant(pb.CreateTenantRequest(tenant="boom"), metadata=admin))
        await code_of(h.admin.Reload(pb.ReloadRequest(model_path="/m.onnx"), metadata=key(KEY_A)))
        await code_of(h.admin.Reload(pb.ReloadRequest(), metadata=key("wrong")))
        await h.stub.Match(pb.MatchRequest(tenant="a"), metadata=key(KEY_A))  # not an admin call

    run(tmp_path, scenario)
    records = read_records(tmp_path / "audit.log")
    assert [(r["method"], r["code"]) for r in records] == [
        ("CreateTenant", "OK"),
        ("CreateTenant", "ALREADY_EXISTS"),
        ("Reload", "PERMISSION_DENIED"),
        ("Reload", "UNAUTHENTICATED"),
    ]
    assert records[0]["request"] == {"tenant": "new"}
    assert records[0]["caller"] == {"admin": True, "tenant": None, "key_id": hash_key(ADMIN)[:19]}
    assert records[2]["caller"]["tenant"] == "a"
    assert records[2]["request"] == {"model_path": "/m.onnx"}
    assert records[3]["caller"] is None and "unknown API key" in records[3]["error"]
    assert all(r["peer"].startswith("ipv4:127.0.0.1") for r in records)
    text = (tmp_path / "audit.log").read_text()
    for secret in (ADMIN, KEY_A, "tcm_secret_new_key_xyz", hash_key(ADMIN)):
        assert secret not in text
    assert json.loads(text.splitlines()[0])["time"].endswith("Z")
    assert (tmp_path / "audit.log").stat().st_mode & 0o777 == 0o600


def test_cost_counts_images() -> None:
    assert cost(pb.MatchRequest(image=b"x")) == 1
    assert cost(pb.MatchBatchRequest(images=[b"x"] * 7)) == 7
    assert cost(pb.EnrollRequest(items=[pb.EnrollItem()] * 3)) == 3
    assert cost(pb.MatchBatchRequest()) == 1
    assert cost(pb.RemoveRequest(item_ids=["a", "b"])) == 1


def test_a_message_that_does_not_parse_is_invalid_argument(tmp_path: Path) -> None:
    """Bad UTF-8 in a string field: gRPC itself would answer UNKNOWN."""
    bad = b"\x0a\x05\xff\xfe\xfd\xfc\xfb"  # field 1 (tenant), 5 bytes that are not UTF-8

    async def scenario(h: Harness) -> None:
        match = h.channel.unary_unary("/retrieval.v1.Retrieval/Match")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await match(bad, metadata=key(ADMIN))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed request message" in err.value.details()
        stream = h.channel.stream_stream("/retrieval.v1.Retrieval/MatchStream")(metadata=key(ADMIN))
        await stream.write(pb.MatchRequest(tenant="a").SerializeToString())
        assert pb.MatchResponse.FromString(await stream.read()).item_id == "a"
        await stream.write(bad)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stream.read()
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert h.count("Match", "INVALID_ARGUMENT") == 1
        assert await eventually(lambda: h.admission.calls == 0)

    run(tmp_path, scenario)


def test_a_full_disk_is_resource_exhausted_with_a_clear_message(tmp_path: Path) -> None:
    async def scenario(h: Harness) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await h.stub.Match(pb.MatchRequest(tenant="full"), metadata=key(ADMIN))
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "data disk is full" in err.value.details()
        assert retry_after_of(err.value) == 5.0
        assert h.rejections("queue") == 0  # not an overload

    run(tmp_path, scenario)
