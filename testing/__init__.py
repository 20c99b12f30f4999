"""The harness shared by tests/, bench/, reliability/ and scripts/: real processes and
tiny models, never mocks.

``onnx_models`` (a tiny linear embedder with full metadata), ``server_fixtures`` (that
model with a measured calibration, served by a real ``python -m server`` subprocess),
``milvus_fixtures`` (a Milvus standalone started and stopped by PID) and
``prometheus_harness`` (a real Prometheus with the project's rules). Repository-only,
like bench/ and reliability/: not part of the installed package.
"""
