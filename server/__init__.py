"""The gRPC matching server (docs/SERVER.md); no torch on this side.

Rooms, one concern each (docs/ARCHITECTURE.md):

- ``api/``: the transport: gRPC servicers, health and reflection (``app``), the one
  interceptor (auth, rate limits, admission control, audit, errors to statuses), the
  API keys of a running server (``keys``, ``python -m server.api.keys``);
- ``matching/``: what a Match does: decode, embed, search, decide (``service``);
- ``storage/``: where galleries live, behind one protocol: in process (``faiss/``) or
  in Milvus (``milvus``);
- ``monitoring/``: the Prometheus metrics of serving and the live per-tenant FAR;
- here: the process (``cli``: ``python -m server``, ``workers``: ``--workers N``), the
  offline re-embedding command (``reembed``) and the two things every room shares:
  ``errors`` (the StatusError hierarchy) and ``auth`` (API keys and who may call what).

The Python client is the top-level package ``client/`` (``python -m client``).
"""
