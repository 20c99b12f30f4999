# Training image: the train extra (torch CPU wheel, pytorch-metric-learning, onnx export).
# Build from the repository root:
#   docker build -f deploy/docker/train.Dockerfile -t tcm-train .
#   docker run --rm -v $PWD/runs:/runs tcm-train --help
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TCM_CACHE_DIR=/cache
WORKDIR /opt/tcm

COPY pyproject.toml README.md ./
COPY contracts ./contracts
COPY imagesets ./imagesets
COPY embedding ./embedding
COPY scorenorm ./scorenorm
COPY calibrate ./calibrate
COPY train ./train
COPY protos ./protos
# The CPU index keeps pip from pulling the multi-GB CUDA build of torch.
RUN pip install --extra-index-url https://download.pytorch.org/whl/cpu ".[train]" \
    && useradd --system --uid 10001 tcm \
    && mkdir -p /runs /cache && chown tcm /runs /cache

USER 10001
VOLUME ["/runs", "/cache"]
ENTRYPOINT ["python", "-m", "train"]
