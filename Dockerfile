# The sidecar on a CPU: OpenVINO, ONNX Runtime and torch (CPU build), the `sidecar` extra only.
#
#   docker build -t rerank-sidecar:cpu .
#   docker run -p 50051:50051 -p 8080:8080 -p 9400:9400 -e RERANK_HTTP_PORT=8080 \
#       -v rerank-cache:/var/cache/rerank-sidecar -v "$PWD/models:/models:ro" \
#       -e RERANK_MODEL=/models/ms-marco-MiniLM-L-6-v2 rerank-sidecar:cpu
#
# The model is read from a mounted directory (or downloaded into the cache volume when RERANK_MODEL is
# a Hugging Face id and the hub is reachable); the ONNX export, compiled engines and the remembered
# engine choice live in the cache volume, so a restart on the same machine skips the selection.
# Settings are RERANK_* variables or flags.

ARG PYTHON_IMAGE=python:3.12-slim-bookworm

# Stage 1: the project's wheel, and a virtual environment installed from wheels only. PyPI's Linux
# torch is the CUDA build, several GiB of libraries a CPU never loads; the CPU build comes from
# PyTorch's own index.
FROM ${PYTHON_IMAGE} AS build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
COPY protos ./protos
COPY envflags ./envflags
COPY client ./client
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip wheel --no-deps --wheel-dir /wheels . \
    && /opt/venv/bin/pip install --only-binary=:all: --extra-index-url "${TORCH_INDEX_URL}" \
        "torch==2.13.0+cpu" \
    && /opt/venv/bin/pip install --only-binary=:all: --extra-index-url "${TORCH_INDEX_URL}" \
        "$(find /wheels -name 'rerank_sidecar-*.whl')[sidecar]" \
    && /opt/venv/bin/pip uninstall --yes pip

# Stage 2: the interpreter, the environment and a non-root user; no compilers, sources or tests.
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
COPY --from=build /opt/venv /opt/venv

# A numeric user, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
RUN groupadd --gid 10001 sidecar \
    && useradd --uid 10001 --gid 10001 --no-create-home --home-dir /var/cache/rerank-sidecar \
        --shell /usr/sbin/nologin sidecar \
    && mkdir -p /var/cache/rerank-sidecar /models \
    && chown 10001:10001 /var/cache/rerank-sidecar
USER 10001:10001
WORKDIR /var/cache/rerank-sidecar

# TorchInductor needs a C++ compiler, which this image leaves out: torch serves uncompiled when it is
# the fastest engine (OpenVINO and ONNX Runtime are compiled engines either way).
ENV RERANK_CACHE_DIR=/var/cache/rerank-sidecar \
    HF_HOME=/var/cache/rerank-sidecar/huggingface \
    RERANK_TORCH_COMPILE=off \
    RERANK_LOG_FORMAT=json
VOLUME ["/var/cache/rerank-sidecar"]
# gRPC, HTTP (when RERANK_HTTP_PORT=8080), Prometheus metrics.
EXPOSE 50051 8080 9400

# NOT_SERVING until the engine is chosen, gated and warmed: a cold start selects among every CPU engine.
HEALTHCHECK --interval=30s --timeout=5s --start-period=5m --retries=3 \
    CMD ["rerank-sidecar-healthcheck"]

ENTRYPOINT ["rerank-sidecar"]
