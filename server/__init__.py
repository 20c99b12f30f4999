"""The gRPC matching server (docs/SERVER.md); no torch on this side.

Modules, one concern each: ``cli`` (``python -m server``), ``app`` (gRPC servicers,
health, reflection), ``service`` (decode -> embed -> search -> decide), ``batcher``
(micro-batching), ``imaging`` (untrusted image bytes), ``model`` (embedder bound to
its calibration), ``gallery`` / ``wal`` / ``ann`` (durable per-tenant faiss
galleries), ``tenants``, ``auth`` (API keys), ``decisions`` (recent decisions for
Feedback), ``observer`` (the monitoring seam), ``metrics`` (Prometheus),
``client`` (Python client and ``python -m server.client``), ``reembed``.
"""
