"""The calls a reader worker does not serve itself, passed to the writer untouched.

With ``--workers N`` on the faiss store (server/workers.py) one process writes the data
dir and the others read it (server/storage/faiss/follower.py). The kernel hands each
connection to any of them, so a reader receives Enroll, Remove and Admin calls too. It
forwards them, as bytes, to the writer's private socket with the caller's metadata
and deadline, and hands back the writer's answer: message or status, details and
trailers (the write token, retry hints). It does not run its own interceptor on them:
auth, rate limits, admission, metrics and the audit log happen once, in the writer.

Feedback is not forwarded: a decision id verifies on any worker (the shared decision
secret), and each worker's monitoring counts the feedback it receives, as replicas of
Milvus do.
"""

from __future__ import annotations

import functools

import grpc
from retrieval.v1 import retrieval_pb2 as pb

# (service, method) a reader forwards: every write, and what reads the writer's state
FORWARDED: tuple[tuple[str, str], ...] = (
    ("retrieval.v1.Retrieval", "Enroll"),
    ("retrieval.v1.Retrieval", "Remove"),
    ("retrieval.v1.Retrieval", "GetTenant"),
    *(("retrieval.v1.Admin", m.name) for m in pb.DESCRIPTOR.services_by_name["Admin"].methods),
)
_HOP_BY_HOP = ("user-agent", "grpc-", ":")  # set again by the channel to the writer
FORWARDED_FOR = "tcm-forwarded-for"  # the caller's address, for the writer's audit log


def forwarded_methods() -> set[str]:
    """Full method names (``/service/Method``) a reader forwards."""
    return {f"/{service}/{method}" for service, method in FORWARDED}


class Forwarder:
    """Generic handlers for :data:`FORWARDED` that relay each call to ``target``."""

    def __init__(self, target: str, max_message: int) -> None:
        self.target = target
        self.max_message = max_message  # the server's own limit, both ways
        self._channel: grpc.aio.Channel | None = None

    def handlers(self) -> list[grpc.GenericRpcHandler]:
        by_service: dict[str, dict[str, grpc.RpcMethodHandler]] = {}
        for service, method in FORWARDED:
            relay = functools.partial(self._relay, f"/{service}/{method}")
            by_service.setdefault(service, {})[method] = grpc.unary_unary_rpc_method_handler(relay)
        return [grpc.method_handlers_generic_handler(s, h) for s, h in by_service.items()]

    def _stub(self, method: str):
        if self._channel is None:  # made in the server's event loop, at the first call
            self._channel = grpc.aio.insecure_channel(
                self.target,
                options=[
                    ("grpc.max_receive_message_length", self.max_message),
                    ("grpc.max_send_message_length", self.max_message),
                ],
            )
        return self._channel.unary_unary(method)

    async def _relay(self, method: str, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        passed = [
            (k, v)
            for k, v in context.invocation_metadata() or ()
            if not k.startswith(_HOP_BY_HOP) and k != FORWARDED_FOR
        ]
        metadata = (*passed, (FORWARDED_FOR, context.peer()))
        call = self._stub(method)(raw, metadata=metadata, timeout=context.time_remaining())
        try:
            response = await call
        except grpc.aio.AioRpcError as err:
            context.set_trailing_metadata(tuple(err.trailing_metadata() or ()))
            details = err.details() or ""
            if err.code() == grpc.StatusCode.UNAVAILABLE and "failed to connect" in details:
                # never reached the writer: retrying cannot apply a write twice
                details = f"the writer worker is not reachable ({details}); retry"
            await context.abort(err.code(), details)
        context.set_trailing_metadata(tuple(await call.trailing_metadata() or ()))
        return response

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
