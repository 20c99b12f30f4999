"""gRPC plumbing: servicers for retrieval.v1, health, reflection, and the server options.

The servicers only translate between protobuf messages and
:class:`~server.matching.service.RetrievalService`; auth, rate limits, admission control,
error mapping, metrics and the audit log live in ONE interceptor
(server/api/interceptor.py), the same for the unary RPCs and MatchStream.
"""

# ruff: noqa: N802  (gRPC method names come from the generated base classes)
from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from retrieval.v1 import retrieval_pb2 as pb
from retrieval.v1 import retrieval_pb2_grpc as rpc
from retrieval.v1.metadata import READ_AFTER, WRITE_TOKEN, target_far_error

from server.api.forward import Forwarder, forwarded_methods
from server.api.interceptor import RetrievalInterceptor
from server.matching.service import MatchOutcome, RetrievalService, ServiceError

log = logging.getLogger(__name__)

MAX_MESSAGE = 64 << 20
SERVICES = ("retrieval.v1.Retrieval", "retrieval.v1.Admin")
# Calls that arrived but that the event loop has not picked up yet wait in gRPC core,
# which CANCELs them (the client learns nothing) once this backlog passes its soft limit
# (randomly, more the closer to the hard one). The library default (1000) was reached by
# 2,000 concurrent calls; admission control (server/api/admission.py) is meant to answer
# instead, with RESOURCE_EXHAUSTED and a retry hint, so the backlog limit is raised well
# above what the loop leaves waiting and stays only as a memory backstop: a pending
# call holds its headers and at most one HTTP/2 flow-control window of its message.
MAX_PENDING_CALLS = 10_000  # the default of --max-pending-calls


def read_after(context) -> int:
    """The write token a call carries (0 when none or malformed: it only adds a wait)."""
    for key, value in context.invocation_metadata() or ():
        if key == READ_AFTER:
            try:
                return max(0, int(value))
            except ValueError:
                return 0
    return 0


def similarity_in_domain(similarity: float) -> float:
    """Cosine similarity clamped to [-1, 1]: float32 rounding gives e.g. 1.0000004 for an
    image against itself, and a client must never see a distance below 0."""
    return min(1.0, max(-1.0, similarity))


EMPTY_GALLERY = "the gallery is empty"


def _match_response(outcome: MatchOutcome) -> pb.MatchResponse:
    """The reply to one image. Without a best item (an empty gallery) similarity, distance
    and score stay absent and ``no_match_reason`` says why: a 0.0 there would read as a
    measured similarity, and a distance of 0 as a perfect match."""
    top = outcome.result.top1
    response = pb.MatchResponse(
        decision_id=outcome.decision_id,
        matched=outcome.matched,
        threshold=outcome.threshold,
        target_far=outcome.target_far,
        neighbors=[
            pb.Neighbor(
                item_id=h.item_id,
                label=h.label,
                similarity=similarity_in_domain(h.similarity),
                score=score,
            )
            for h, score in zip(outcome.result.neighbors, outcome.scores, strict=True)
        ],
        gallery_size=outcome.gallery_size,
        raw_threshold=outcome.raw_threshold,
        normalization=outcome.normalization,
        normalization_active=outcome.mapping.active,
    )
    if top is None:
        response.no_match_reason = EMPTY_GALLERY
        return response
    similarity = similarity_in_domain(top.similarity)
    response.label, response.item_id = top.label, top.item_id
    response.similarity = similarity
    response.distance = 1.0 - similarity  # in [0, 2]
    response.score = outcome.scores[0]
    return response


def check_target_far(value: float) -> None:
    """MatchRequest.target_far by the rule the client also applies (retrieval.v1.metadata):
    0 = the server's default, else a number in (0, 1)."""
    why = target_far_error(value, zero_is_default=True)
    if why is not None:
        raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, why)


class RetrievalServicer(rpc.RetrievalServicer):
    def __init__(self, service: RetrievalService) -> None:
        self.service = service

    async def _match_one(self, request: pb.MatchRequest, token: int) -> pb.MatchResponse:
        check_target_far(request.target_far)
        (outcome,) = await self.service.match(
            request.tenant, [request.image], request.top_k, request.target_far, token
        )
        if isinstance(outcome, ServiceError):
            raise outcome
        return _match_response(outcome)

    async def Match(self, request, context):
        return await self._match_one(request, read_after(context))

    async def MatchBatch(self, request, context):
        check_target_far(request.target_far)
        outcomes = await self.service.match(
            request.tenant,
            list(request.images),
            request.top_k,
            request.target_far,
            read_after(context),
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
        token = read_after(context)
        async for request in request_iterator:
            yield await self._match_one(request, token)

    async def Enroll(self, request, context):
        items = [(i.item_id, i.label, i.image) for i in request.items]
        errors, size = await self.service.enroll(request.tenant, items, request.replace)
        _send_write_token(context, self.service.write_token(request.tenant))
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

    async def Remove(self, request, context):
        removed, missing, size = await self.service.remove(request.tenant, list(request.item_ids))
        _send_write_token(context, self.service.write_token(request.tenant))
        return pb.RemoveResponse(removed=len(removed), not_found=missing, gallery_size=size)

    async def Feedback(self, request, context):
        matched = await self.service.feedback(request.tenant, request.decision_id, request.is_same)
        return pb.FeedbackResponse(matched=matched)

    async def GetTenant(self, request, context):
        return pb.TenantInfo(**self.service.tenant_info(request.tenant))


def _send_write_token(context, token: int) -> None:
    if token:
        context.set_trailing_metadata(((WRITE_TOKEN, str(token)),))


class AdminServicer(rpc.AdminServicer):
    def __init__(self, service: RetrievalService, device: str) -> None:
        self.service = service
        self.device = device

    async def CreateTenant(self, request, context):
        key = await self.service.create_tenant(request.tenant)
        return pb.CreateTenantResponse(tenant=request.tenant, api_key=key)

    async def DeleteTenant(self, request, context):
        removed = await self.service.delete_tenant(request.tenant)
        return pb.DeleteTenantResponse(removed_items=removed)

    async def ListTenants(self, request, context):
        return pb.ListTenantsResponse(tenants=self.service.tenants.names())

    async def Reload(self, request, context):
        if self.service.tenants.shared and not self.service.tenants.remote:
            raise ServiceError(  # faiss --workers: the readers would keep the old model
                grpc.StatusCode.FAILED_PRECONDITION,
                "with --workers on the faiss store, reload by sending SIGHUP to the parent "
                "process: every worker then reloads its --model and --calibration",
            )
        done = await self.service.reload(request.model_path, request.calibration_path, self.device)
        return pb.ReloadResponse(**done)


def build_server(
    service: RetrievalService,
    device: str,
    interceptor: RetrievalInterceptor | None = None,
    max_pending_calls: int = MAX_PENDING_CALLS,
    max_streams_per_connection: int = 0,
    reuse_port: bool = False,
    max_concurrent_rpcs: int = 0,
    forwarder: Forwarder | None = None,
) -> tuple[grpc.aio.Server, health.HealthServicer]:
    """A grpc.aio server with retrieval.v1, grpc.health.v1 and reflection (not yet bound).

    ``interceptor`` defaults to auth + admission with default limits and no rate
    limits or audit log (the CLI builds one from its flags).
    ``max_streams_per_connection`` (HTTP/2 MAX_CONCURRENT_STREAMS, 0 = gRPC's default)
    trades call-rate floods for client-visible UNAVAILABLE (docs/RELIABILITY.md).
    ``reuse_port``: SO_REUSEPORT, so ``--workers`` processes share one port (the kernel
    spreads connections over them).
    ``forwarder``: a reader worker's; the calls it forwards are not served here.
    """
    interceptor = interceptor or RetrievalInterceptor(service.keys, service.metrics)
    options = [
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.so_reuseport", int(reuse_port)),
        ("grpc.server.max_pending_requests", max_pending_calls),
        ("grpc.server.max_pending_requests_hard_limit", 2 * max_pending_calls),
    ]
    if max_streams_per_connection:
        options.append(("grpc.max_concurrent_streams", max_streams_per_connection))
    server = grpc.aio.server(options=options, maximum_concurrent_rpcs=max_concurrent_rpcs or None)
    # the interceptor wraps retrieval.v1's handlers once, here, not at every call
    skip = frozenset(forwarded_methods() if forwarder else ())
    interceptor.register(
        rpc.add_RetrievalServicer_to_server, RetrievalServicer(service), server, skip
    )
    if forwarder is None:
        interceptor.register(
            rpc.add_AdminServicer_to_server, AdminServicer(service, device), server
        )
    else:
        server.add_generic_rpc_handlers(forwarder.handlers())
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for name in ("", *SERVICES):
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
    )
    return server, health_servicer
