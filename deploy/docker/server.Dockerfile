# CPU serving image: the base install (onnxruntime + faiss-cpu + grpc + prometheus-client) and
# the Milvus client (--gallery milvus://...), no torch. Build from the repository root:
#   docker build -f deploy/docker/server.Dockerfile -t tcm-server .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/tcm

# Only what serving imports; train/, demo/, client/ and testing/ stay out of the image.
COPY pyproject.toml README.md ./
COPY contracts ./contracts
COPY imagesets ./imagesets
COPY embedding ./embedding
COPY scorenorm ./scorenorm
COPY calibrate ./calibrate
COPY server ./server
COPY protos ./protos
RUN pip install ".[milvus]" \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
    && useradd --system --uid 10001 --home-dir /data tcm \
    && mkdir -p /data && chown tcm /data

USER 10001
VOLUME ["/data"]
# 50051: gRPC (Retrieval, grpc.health.v1, reflection); 9464: Prometheus /metrics.
EXPOSE 50051 9464
ENTRYPOINT ["python", "-m", "server"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464", "--data-dir", "/data"]
