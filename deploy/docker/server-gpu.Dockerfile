# GPU serving image: CUDA runtime + cuDNN, onnxruntime-gpu (CUDA execution provider) and a
# faiss GPU build instead of the CPU wheels. Still no torch. Needs the NVIDIA container
# toolkit on the host (`docker run --gpus all`). Build from the repository root:
#   docker build -f deploy/docker/server-gpu.Dockerfile -t tcm-server:gpu .
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-pip python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/tcm

COPY pyproject.toml README.md ./
COPY contracts ./contracts
COPY imagesets ./imagesets
COPY embedding ./embedding
COPY scorenorm ./scorenorm
COPY calibrate ./calibrate
COPY server ./server
COPY protos ./protos
# The base install pulls the CPU wheels; swap them for the GPU builds (same import names:
# onnxruntime, faiss). faiss-gpu-cu12 is the maintained CUDA 12 wheel of faiss on PyPI.
# onnxruntime-gpu on PyPI is built for CUDA 12 up to 1.26 and for CUDA 13 from 1.27 (its
# CUDA provider needs libcublasLt.so.13): on this CUDA 12.4 base a newer one silently
# falls back to the CPU.
RUN pip install ".[milvus]" \
    && pip uninstall -y onnxruntime faiss-cpu \
    && pip install "onnxruntime-gpu>=1.18,<1.27" "faiss-gpu-cu12>=1.8" \
    && python -c "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)" \
    && useradd --system --uid 10001 --home-dir /data tcm \
    && mkdir -p /data && chown tcm /data

USER 10001
VOLUME ["/data"]
EXPOSE 50051 9464
ENTRYPOINT ["python", "-m", "server"]
CMD ["--host", "0.0.0.0", "--port", "50051", "--metrics-port", "9464", "--data-dir", "/data", "--device", "cuda"]
