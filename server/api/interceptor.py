"""The one grpc.aio server interceptor for what every retrieval.v1 call shares.

For each call (and each message of MatchStream) and in this order:

1. **auth**: the ``x-api-key`` may act on ``request.tenant`` / the Admin service
   (server/auth.py);
2. **per-tenant rate limit** (server/api/ratelimit.py), when configured;
3. **admission control** (server/api/admission.py): images and request bytes in
   progress are bounded, the rest is refused at once;
4. the servicer runs;
5. **error mapping**: a :class:`~server.errors.StatusError` becomes its status
   (RESOURCE_EXHAUSTED, UNAVAILABLE and DEADLINE_EXCEEDED with a retry hint in the
   trailers), anything
   else INTERNAL with the traceback in the log, never UNKNOWN;
6. **metrics**: ``tcm_requests_total{method,code}`` and
   ``tcm_request_duration_seconds{method}`` once per call, streams included;
7. **audit**: Admin calls, refused ones too (server/api/audit.py).

Servicers (server/api/app.py) therefore hold no cross-cutting code, and the stream RPC
cannot drift from the unary ones. build_server wraps the handlers once at registration
(:meth:`RetrievalInterceptor.register`) rather than passing ``interceptors=[...]``, which
has gRPC ask the interceptor at every call; the steps are the same either way. Health
and reflection pass through untouched, so they answer even when the server is at
capacity.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
from retrieval.v1 import retrieval_pb2 as pb

from server.api.admission import Admission, OverloadedError, Ticket
from server.api.audit import AuditLog, request_summary
from server.api.forward import FORWARDED_FOR
from server.api.ratelimit import RateLimitedError, TenantRateLimiter
from server.auth import AuthError, KeyRing, Principal
from server.errors import StatusError, retry_trailers
from server.monitoring.serving import ServerMetrics

log = logging.getLogger(__name__)

Code = grpc.StatusCode
# The statuses sent with a retry hint. DEADLINE_EXCEEDED is the server's own (a store that
# did not answer in time, docs/SCALE.md); a caller's expired deadline sends no status.
_RETRYABLE = (Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED)
DISK_FULL_RETRY_AFTER = 5.0  # seconds: space comes back by an operator, not by itself


class DiskFullError(StatusError):
    """The data disk is full: the write was refused and nothing changed."""

    def __init__(self, err: OSError) -> None:
        super().__init__(
            Code.RESOURCE_EXHAUSTED,
            f"the server's data disk is full ({err.strerror}); nothing was written. "
            "Retry once the operator has freed space",
            DISK_FULL_RETRY_AFTER,
        )


def peer_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's address; for a call a reader worker relayed over the writer's Unix
    socket, the address the reader saw (server/api/forward.py). The relayed value is
    believed only from the socket: a client over TCP cannot set its own."""
    peer = context.peer()
    if peer.startswith("unix:"):
        for key, value in context.invocation_metadata() or ():
            if key == FORWARDED_FOR:
                return f"{value} (via a reader worker)"
    return peer


@dataclass(frozen=True)
class Route:
    """What the interceptor needs to know about one RPC."""

    method: str  # short name, the ``method`` label of the metrics
    admin: bool  # Admin service: admin key, audited, not held back by admission


def routes() -> dict[str, Route]:
    """Every RPC of retrieval.v1, read from the proto (a new RPC is covered at once)."""
    out = {}
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            out[f"/{service.full_name}/{method.name}"] = Route(method.name, service.name == "Admin")
    return out


def cost(request: Any) -> int:
    """The work a request asks for, in images: one per image it carries, at least one.
    The unit of both the tenant's rate limit and admission control."""
    for name in ("images", "items"):
        if request.DESCRIPTOR.fields_by_name.get(name) is not None:
            return max(1, len(getattr(request, name)))
    return 1


def _parse(deserialize: Callable[[bytes], Any] | None, raw: bytes) -> Any:
    """The request message, or INVALID_ARGUMENT when the bytes are not one."""
    if deserialize is None:
        return raw
    try:
        return deserialize(raw)
    except Exception as err:  # DecodeError, or whatever a parser raises on hostile bytes
        message = f"malformed request message ({type(err).__name__}: {err})"
        raise StatusError(Code.INVALID_ARGUMENT, message[:300]) from err


@dataclass
class _Call:
    route: Route
    context: grpc.aio.ServicerContext
    started: float = field(default_factory=time.perf_counter)
    code: grpc.StatusCode = Code.OK
    message: str = ""
    principal: Principal | None = None
    request: Any = None
    finished: bool = False


class RetrievalInterceptor(grpc.aio.ServerInterceptor):
    """Auth, rate limits, admission, error mapping, metrics and audit for retrieval.v1."""

    def __init__(
        self,
        keys: KeyRing,
        metrics: ServerMetrics,
        admission: Admission | None = None,
        limiter: TenantRateLimiter | None = None,
        audit: AuditLog | None = None,
        follow: Callable[[str], Awaitable[bool]] | None = None,
    ) -> None:
        """``follow(tenant)``: a reader worker's look at a tenant as stored now, awaited
        once when a key is not (yet) known to grant it (server/workers.py)."""
        self.keys = keys
        self.follow = follow
        self.metrics = metrics
        self.admission = admission or Admission()
        self.limiter = limiter
        self.audit = audit
        self._routes = routes()
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}
        self._children: dict[tuple[str, grpc.StatusCode], tuple[Any, Any]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Any],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        method = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        wrapped = self.wrap(method, handler)
        if wrapped is not handler:
            self._wrapped[method] = wrapped
        return wrapped

    def register(
        self,
        add_to_server: Callable[[Any, Any], None],
        servicer,
        server,
        skip: frozenset[str] = frozenset(),
    ) -> None:
        """``add_to_server(servicer, server)`` (a generated ``add_XServicer_to_server``)
        with every method wrapped here, once: the same steps as ``interceptors=[self]``
        without gRPC asking the interceptor at every call (docs/SERVER.md, "Per-call
        cost": bench/grpc_floor.py measured that lookup at about a fifth of a bare
        grpc.aio call). Methods in ``skip`` (``/service/Method``) are left out: another
        handler serves them (a reader worker's forwarding, server/api/forward.py)."""
        registering = _Registering(server, self, skip)
        add_to_server(servicer, registering)
        if not registering.services:
            raise RuntimeError(f"{add_to_server.__name__} registered no method handlers")

    def wrap(
        self, method: str, handler: grpc.RpcMethodHandler | None
    ) -> grpc.RpcMethodHandler | None:
        """``handler`` of ``method`` inside this interceptor; health, reflection and
        unknown methods unchanged (gRPC answers them itself)."""
        route = self._routes.get(method)
        if handler is None or route is None:
            return handler
        # Requests arrive as raw bytes and are parsed here: gRPC would answer UNKNOWN for a
        # message that does not parse (e.g. bad UTF-8 in a string), this says INVALID_ARGUMENT.
        parse = functools.partial(_parse, handler.request_deserializer)
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                functools.partial(self._unary, route, parse, handler.unary_unary),
                response_serializer=handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                functools.partial(self._stream, route, parse, handler.stream_stream),
                response_serializer=handler.response_serializer,
            )
        # retrieval.v1 has no client- or server-streaming-only RPC
        raise TypeError(f"{method}: unsupported RPC shape for the interceptor")

    # ----------------------------------------------------------------- shapes
    async def _unary(self, route: Route, parse, behaviour, raw: bytes, context):
        call = _Call(route, context)
        try:
            request = call.request = parse(raw)
            ticket = await self._admit(call, request, len(raw))
            try:
                return await behaviour(request, context)
            finally:
                self._release(ticket)
        except BaseException as err:  # mapped (and re-raised) by _fail
            await self._fail(call, err)
        finally:
            await self._finish(call)

    async def _stream(self, route: Route, parse, behaviour, raw_iterator, context) -> AsyncIterator:
        """Each request message is parsed, checked and admitted as the servicer reads it;
        its slot is held until the servicer yields its answer (MatchStream answers in order)."""
        call = _Call(route, context)
        held: list[Ticket] = []

        async def admitted():
            async for raw in raw_iterator:
                self._release_all(held)
                request = parse(raw)
                held.append(await self._admit(call, request, len(raw)))
                yield request

        try:
            async for response in behaviour(admitted(), context):
                self._release_all(held)
                yield response
        except BaseException as err:  # mapped (and re-raised) by _fail
            await self._fail(call, err)
        finally:
            self._release_all(held)
            await self._finish(call)

    # ------------------------------------------------------------------ steps
    async def _admit(self, call: _Call, request, size: int) -> Ticket | None:
        """Auth, then the tenant's rate limit, then admission; raises StatusError."""
        admin = call.route.admin
        tenant = None if admin else request.tenant
        metadata = call.context.invocation_metadata()
        try:
            call.principal = self.keys.authorize(metadata, tenant, admin)
        except AuthError:
            if self.follow is None or tenant is None or not await self.follow(tenant):
                raise
            call.principal = self.keys.authorize(metadata, tenant, admin)
        if admin:
            return None  # rare, trusted and how an operator fixes an overloaded server
        units = cost(request)
        if self.limiter is not None:
            try:
                self.limiter.acquire(tenant, units)
            except RateLimitedError:
                self.admission.rejected("tenant_rate")
                raise
        try:
            return self.admission.admit(units, size)
        except StatusError:
            if self.limiter is not None:
                self.limiter.refund(tenant, units)
            raise

    def _release(self, ticket: Ticket | None) -> None:
        if ticket is not None:
            self.admission.release(ticket)

    def _release_all(self, held: list[Ticket]) -> None:
        while held:
            self._release(held.pop())

    async def _fail(self, call: _Call, err: BaseException) -> None:
        """Record how the call ended and send its status; always raises."""
        context = call.context
        if isinstance(err, Exception) and context.cancelled():
            # The client is gone (deadline, cancel): nobody to send a status to, and
            # trying makes gRPC log an ExecuteBatchError with a traceback.
            err = asyncio.CancelledError()
        if isinstance(err, (asyncio.CancelledError, GeneratorExit)):
            remaining = context.time_remaining()
            expired = remaining is not None and remaining <= 0
            call.code = Code.DEADLINE_EXCEEDED if expired else Code.CANCELLED
            raise err
        if isinstance(err, grpc.aio.AbortError):  # a servicer aborted by itself
            call.code = context.code() or Code.UNKNOWN
            raise err
        if not isinstance(err, Exception):  # KeyboardInterrupt, SystemExit
            raise err
        status = self._status_of(call, err)
        call.code, call.message = status.code, status.message
        trailers: tuple = ()
        if status.code in _RETRYABLE:
            wait = status.retry_after
            if wait is None:
                wait = self.admission.retry_after()
            trailers = retry_trailers(status.code, status.message, wait)
        await self._finish(call)  # before the status goes out: abort() sends it at once
        await context.abort(status.code, status.message, trailers)

    def _status_of(self, call: _Call, err: Exception) -> StatusError:
        """The status an exception means; anything unforeseen is INTERNAL, and logged."""
        if isinstance(err, StatusError):
            if isinstance(err, AuthError) and err.principal is not None:
                call.principal = err.principal
            if err.code == Code.RESOURCE_EXHAUSTED and not isinstance(
                err, (OverloadedError, RateLimitedError, DiskFullError)
            ):
                self.admission.rejected("queue")  # from inside the service: embedding queue
            return err
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            # gRPC's own definition of RESOURCE_EXHAUSTED names a full file system. The
            # write-ahead log cut the refused write off again: nothing changed.
            log.error("%s refused: the data disk is full (%s)", call.route.method, err)
            return DiskFullError(err)
        log.error("%s failed", call.route.method, exc_info=err)
        return StatusError(
            Code.INTERNAL, f"internal error in {call.route.method}; see the server log"
        )

    async def _finish(self, call: _Call) -> None:
        """Count, time and audit the call, once."""
        if call.finished:
            return
        call.finished = True
        key = (call.route.method, call.code)
        children = self._children.get(key)
        if children is None:  # the labelled series, looked up once per method and code
            method = call.route.method
            children = self._children[key] = (
                self.metrics.requests.labels(method, call.code.name),
                self.metrics.request_seconds.labels(method),
            )
        children[0].inc()
        children[1].observe(time.perf_counter() - call.started)
        if call.route.admin and self.audit is not None:
            await self._audit(call)

    async def _audit(self, call: _Call) -> None:
        principal = call.principal
        caller = (
            {"admin": principal.admin, "tenant": principal.tenant, "key_id": principal.key_id}
            if principal is not None
            else None
        )
        fields = {
            "caller": caller,
            "peer": peer_of(call.context),
            "request": request_summary(call.request) if call.request is not None else {},
            "seconds": round(time.perf_counter() - call.started, 6),
        }
        if call.code != Code.OK:
            fields["error"] = call.message
        try:
            await asyncio.to_thread(self.audit.record, call.route.method, call.code.name, **fields)
        except Exception:  # the call's outcome stands; a broken audit disk must be seen
            log.exception("audit log write failed for %s", call.route.method)


class _Registering:
    """Stands in for the server while a generated ``add_XServicer_to_server`` runs: the
    service's method handlers reach the server wrapped by the interceptor."""

    def __init__(self, server, interceptor: RetrievalInterceptor, skip: frozenset[str]) -> None:
        self.server = server
        self.interceptor = interceptor
        self.skip = skip
        self.services: list[str] = []

    def add_generic_rpc_handlers(self, handlers) -> None:
        """Ignored: the same handlers arrive by name in add_registered_method_handlers."""

    def add_registered_method_handlers(self, service: str, handlers: dict) -> None:
        wrap = self.interceptor.wrap
        wrapped = {
            name: wrap(f"/{service}/{name}", h)
            for name, h in handlers.items()
            if f"/{service}/{name}" not in self.skip
        }
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(service, wrapped),)
        )
        self.server.add_registered_method_handlers(service, wrapped)
        self.services.append(service)
