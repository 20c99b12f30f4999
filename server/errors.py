"""The one error hierarchy of the server: every refusal carries the gRPC status it means.

Handlers, auth, admission control and rate limits raise a :class:`StatusError`; the
server interceptor (server/api/interceptor.py) is the only place that turns one into a
gRPC status, so a call can never end UNKNOWN because some layer forgot to translate.
``retry_after`` (seconds) is the hint sent with RESOURCE_EXHAUSTED, UNAVAILABLE and
DEADLINE_EXCEEDED (a store timeout):
when the caller should try again, in the two forms gRPC clients read (see
:func:`retry_trailers`).
"""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from retrieval.v1.metadata import DETAILS_KEY, PUSHBACK_KEY


class StatusError(Exception):
    """A refused call: ``code`` is the gRPC status, ``message`` says why and what to do."""

    def __init__(
        self, code: grpc.StatusCode, message: str, retry_after: float | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


def retry_trailers(code: grpc.StatusCode, message: str, retry_after: float) -> tuple:
    """Trailing metadata telling a client to retry after ``retry_after`` seconds.

    Both forms: ``grpc-retry-pushback-ms`` (honoured by gRPC's built-in retries) and a
    ``google.rpc.RetryInfo`` in ``grpc-status-details-bin`` (``grpc_status.rpc_status``).
    """
    millis = max(1, round(retry_after * 1000))
    seconds, nanos = divmod(millis * 1_000_000, 1_000_000_000)
    info = error_details_pb2.RetryInfo(
        retry_delay=duration_pb2.Duration(seconds=seconds, nanos=nanos)
    )
    detail = any_pb2.Any()
    detail.Pack(info)
    status = status_pb2.Status(code=code.value[0], message=message, details=[detail])
    return ((PUSHBACK_KEY, str(millis)), (DETAILS_KEY, status.SerializeToString()))
