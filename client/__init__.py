"""The Python client of the retrieval.v1 gRPC API and its CLI (``python -m client``).

It speaks only the contract (protos/retrieval/v1: the messages and the metadata keys of
``retrieval.v1.metadata``) and imports nothing of the server.
"""

from client.retrieval import ItemRefusedError, MatchResult, Neighbor, RetrievalClient

__all__ = ["ItemRefusedError", "MatchResult", "Neighbor", "RetrievalClient"]
