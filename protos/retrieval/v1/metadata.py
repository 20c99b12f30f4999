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
# The retry hint of RESOURCE_EXHAUSTED and UNAVAILABLE, in two trailers: gRPC's own retry
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
