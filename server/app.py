"""gRPC plumbing: servicers for retrieval.v1, health, reflection, auth and call metrics.

Each handler authorises the call (server/auth.py), delegates to
:class:`~server.service.RetrievalService` and turns a :class:`ServiceError` into the
status code it carries. Every finished call is counted in ``tcm_requests_total`` and
timed in ``tcm_request_duration_seconds``.
"""

# ruff: noqa: N802  (gRPC method names come from the generated base classes)
from __future__ import annotations

import functools
import logging
import time
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as rpc

from server.auth import AuthError
from server.service import MatchOutcome, RetrievalService, ServiceError

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 << 20
SERVICES = ("retrieval.v1.Retrieval", "retrieval.v1.Admin")


def _handler(method: str, admin: bool = False):
    """Auth + error translation + metrics around a unary handler ``(self, request, ctx)``."""

    def wrap(fn):
        @functools.wraps(fn)
        async def handle(self, request, context: grpc.aio.ServicerContext):
            started = time.perf_counter()
            code = grpc.StatusCode.OK
            try:
                tenant = None if admin else request.tenant
                self.service.keys.authorize(context.invocation_metadata(), tenant, admin)
                return await fn(self, request, context)
            except (ServiceError, AuthError) as err:
                code = err.code
                await context.abort(err.code, str(err))
            except Exception:
                code = grpc.StatusCode.INTERNAL
                log.exception("%s failed", method)
                await context.abort(code, f"internal error in {method}; see the server log")
            finally:
                metrics = self.service.metrics
                metrics.requests.labels(method, code.name).inc()
                metrics.request_seconds.labels(method).observe(time.perf_counter() - started)

        return handle

    return wrap


def _match_response(outcome: MatchOutcome) -> pb.MatchResponse:
    top = outcome.result.top1
    return pb.MatchResponse(
        decision_id=outcome.decision_id,
        matched=outcome.matched,
        label=top.label if top else "",
        item_id=top.item_id if top else "",
        similarity=top.similarity if top else 0.0,
        distance=1.0 - top.similarity if top else 0.0,
        threshold=outcome.threshold,
        target_far=outcome.target_far,
        neighbors=[
            pb.Neighbor(
                item_id=h.item_id,
                label=h.label,
                similarity=h.similarity,
                score=outcome.score(h.similarity),
            )
            for h in outcome.result.neighbors
        ],
        gallery_size=outcome.gallery_size,
        score=outcome.score(top.similarity) if top else 0.0,
        raw_threshold=outcome.raw_threshold,
        normalization=outcome.normalization,
        normalization_active=outcome.mapping.active,
    )


class RetrievalServicer(rpc.RetrievalServicer):
    def __init__(self, service: RetrievalService) -> None:
        self.service = service

    @_handler("Match")
    async def Match(self, request, context):
        (outcome,) = await self.service.match(
            request.tenant, [request.image], request.top_k, request.target_far
        )
        if isinstance(outcome, ServiceError):
            raise outcome
        return _match_response(outcome)

    @_handler("MatchBatch")
    async def MatchBatch(self, request, context):
        outcomes = await self.service.match(
            request.tenant, list(request.images), request.top_k, request.target_far
        )
        results = [
            pb.MatchBatchResult(error=pb.ItemError(code=o.code.name, message=o.message))
            if isinstance(o, ServiceError)
            else pb.MatchBatchResult(match=_match_response(o))
            for o in outcomes
        ]
        return pb.MatchBatchResponse(results=results)

    async def MatchStream(
        self, request_iterator, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.MatchResponse]:
        """One response per request, in order; the first error ends the stream."""
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        metrics = self.service.metrics
        try:
            async for request in request_iterator:
                self.service.keys.authorize(context.invocation_metadata(), request.tenant)
                (outcome,) = await self.service.match(
                    request.tenant, [request.image], request.top_k, request.target_far
                )
                if isinstance(outcome, ServiceError):
                    raise outcome
                yield _match_response(outcome)
        except (ServiceError, AuthError) as err:
            code = err.code
            await context.abort(err.code, str(err))
        finally:
            metrics.requests.labels("MatchStream", code.name).inc()
            metrics.request_seconds.labels("MatchStream").observe(time.perf_counter() - started)

    @_handler("Enroll")
    async def Enroll(self, request, context):
        items = [(i.item_id, i.label, i.image) for i in request.items]
        errors, size = await self.service.enroll(request.tenant, items, request.replace)
        results = [
            pb.EnrollResult(item_id=item[0], ok=True)
            if err is None
            else pb.EnrollResult(
                item_id=item[0],
                ok=False,
                error=pb.ItemError(code=err.code.name, message=err.message),
            )
            for item, err in zip(items, errors, strict=True)
        ]
        return pb.EnrollResponse(results=results, gallery_size=size)

    @_handler("Remove")
    async def Remove(self, request, context):
        removed, missing, size = await self.service.remove(request.tenant, list(request.item_ids))
        return pb.RemoveResponse(removed=len(removed), not_found=missing, gallery_size=size)

    @_handler("Feedback")
    async def Feedback(self, request, context):
        matched = await self.service.feedback(request.tenant, request.decision_id, request.is_same)
        return pb.FeedbackResponse(matched=matched)

    @_handler("GetTenant")
    async def GetTenant(self, request, context):
        return pb.TenantInfo(**self.service.tenant_info(request.tenant))


class AdminServicer(rpc.AdminServicer):
    def __init__(self, service: RetrievalService, device: str) -> None:
        self.service = service
        self.device = device

    @_handler("CreateTenant", admin=True)
    async def CreateTenant(self, request, context):
        key = await self.service.create_tenant(request.tenant)
        return pb.CreateTenantResponse(tenant=request.tenant, api_key=key)

    @_handler("DeleteTenant", admin=True)
    async def DeleteTenant(self, request, context):
        removed = await self.service.delete_tenant(request.tenant)
        return pb.DeleteTenantResponse(removed_items=removed)

    @_handler("ListTenants", admin=True)
    async def ListTenants(self, request, context):
        return pb.ListTenantsResponse(tenants=self.service.tenants.names())

    @_handler("Reload", admin=True)
    async def Reload(self, request, context):
        done = await self.service.reload(request.model_path, request.calibration_path, self.device)
        return pb.ReloadResponse(**done)


def build_server(
    service: RetrievalService, device: str
) -> tuple[grpc.aio.Server, health.HealthServicer]:
    """A grpc.aio server with retrieval.v1, grpc.health.v1 and reflection (not yet bound)."""
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.so_reuseport", 0),
        ]
    )
    rpc.add_RetrievalServicer_to_server(RetrievalServicer(service), server)
    rpc.add_AdminServicer_to_server(AdminServicer(service, device), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return server, health_servicer
