"""What retrieval.v1 carries outside its messages: metadata keys and the retry hint.

The .proto cannot say these; server (server/api/) and client (client/) both read them
from here, so neither imports the other.
"""

from __future__ import annotations

API_KEY = "x-api-key"  # call metadata: the caller's API key
# Read-after-write across replicas (docs/SCALE.md): Enroll and Remove answer with a write
# token in this trailer; a Match that sends it back in READ_AFTER sees that write on any
# replica. Tokens are opaque decimal integers (Milvus timestamps); absent = none needed.
WRITE_TOKEN = "x-tcm-write-token"
READ_AFTER = "x-tcm-read-after"
# The retry hint of RESOURCE_EXHAUSTED, UNAVAILABLE and DEADLINE_EXCEEDED (a store timeout),
# in two trailers: gRPC's own retry
# machinery (gRFC A6) reads the first when a retry policy is set; the rich error model
# (google.rpc.Status with a RetryInfo detail) is read by grpcio-status clients.
PUSHBACK_KEY = "grpc-retry-pushback-ms"
DETAILS_KEY = "grpc-status-details-bin"


def retry_after_of(error) -> float | None:
    """Client side: the server's retry hint in seconds (of a grpc.RpcError), or None when
    it sent none."""
    trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
    for key, value in trailers or ():
        if key == PUSHBACK_KEY:
            try:
                return int(value) / 1000
            except ValueError:
                return None
    return None


# What a target FAR may be. One rule for everything a person types (python -m client
# --target-far, python -m server --target-far, python -m calibrate --target-far): a number
# in (0, 1). On the wire, MatchRequest.target_far = 0 means "the server's default", so a
# client that sent a typed 0 as is would be silently served at the default instead of
# being told that 0 is no FAR: the client refuses it before sending.
def target_far_error(value: float, *, zero_is_default: bool = False) -> str | None:
    """Why ``value`` is not an acceptable target FAR, or None when it is.

    ``zero_is_default``: the wire rule of MatchRequest/MatchBatchRequest (0 = default),
    which the server applies to every request; without it, the rule for a typed value."""
    if zero_is_default and value == 0:
        return None
    if not 0.0 < value < 1.0:  # NaN fails this comparison too
        return f"target FAR must lie in (0, 1), got {value}; e.g. 0.001"
    return None


def parse_target_far(text: str) -> float:
    """A typed target FAR (a command-line value) -> float; ValueError with the reason."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"target FAR {text!r} is not a number; e.g. 0.001") from None
    why = target_far_error(value)
    if why is not None:
        raise ValueError(why)
    return value
