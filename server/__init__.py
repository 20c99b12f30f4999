"""The gRPC matching server (docs/SERVER.md); no torch on this side.

Modules, one concern each: ``cli`` (``python -m server``), ``app`` (gRPC servicers,
health, reflection), ``service`` (decode -> embed -> search -> decide), ``batcher``
(micro-batching), ``imaging`` (untrusted image bytes), ``model`` (embedder bound to
its calibration), ``gallery_store`` (the boundary to where galleries live),
``gallery`` / ``item_table`` / ``segments`` / ``wal`` / ``ann`` (the in-process faiss
backend: store, table, segments, log, indexes), ``milvus_store`` (the Milvus backend),
``workers`` (``--workers N`` on one port), ``tenants``, ``auth`` (API keys),
``decisions`` (recent decisions for Feedback), ``observer`` (the monitoring seam),
``metrics`` (Prometheus), ``client`` (Python client and ``python -m server.client``), ``reembed``.
"""
