# syntax=docker/dockerfile:1
# The adapter service, CPU by default. For a GPU image, pass a CUDA base and a CUDA torch wheel index, e.g.
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t adapter-service:cuda .
# and run it with `docker run --gpus all ...`. (An empty TORCH_INDEX_URL installs torch from the default index.)
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

# TORCH_SPEC / TORCH_INDEX_URL are read by scripts/install.sh; the default index holds CPU-only wheels, which
# keeps the CPU image small (the default index's Linux torch wheels bundle CUDA libraries).
ARG TORCH_SPEC=torch==2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# python:*-slim has python3 with venv; CUDA runtime images (Ubuntu) may need python3 and python3-venv first.
RUN if ! python3 -c "import venv, ensurepip" >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# A C++ compiler for the owned forward's fused CPU kernels: they are compiled for the CPU they run on (cached per
# CPU feature set under TORCH_EXTENSIONS_DIR), at build time for the build host and at first start on another one.
RUN if ! command -v g++ >/dev/null 2>&1; then \
        apt-get update \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends g++ \
        && rm -rf /var/lib/apt/lists/*; \
    fi
ENV TORCH_EXTENSIONS_DIR=/app/.cache/torch_extensions

WORKDIR /app
COPY . /app

# The same install as the README's, from the committed lock (requirements/runtime.lock); it creates /app/.venv.
RUN TORCH_SPEC="${TORCH_SPEC}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" bash scripts/install.sh

# Convert the embedded model once at build time, so a container start loads a ready HF folder in seconds.
ENV SERVICE_CACHE_DIR=/app/.cache
RUN .venv/bin/python -c "from service.model.loading import embedded_model_folder; from pathlib import Path; embedded_model_folder(Path('/app/.cache'))"

# The adapter store lives on a volume, seeded from the repo's adapters_store (demo adapters) on first use.
# Everything under /data/adapters must be in place before the VOLUME line: later changes to it are dropped.
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /data/adapters /app/.cache/torch_extensions && chown -R app:app /app/.cache/torch_extensions \
    && cp -a /app/adapters_store/. /data/adapters/ \
    && chown -R app:app /data/adapters
ENV SERVICE_ADAPTERS_DIR=/data/adapters
VOLUME ["/data/adapters"]

USER app
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/app/.venv/bin/python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status == 200 else 1)"]

# The same start command as the README's.
CMD [".venv/bin/python", "-m", "service", "--host", "0.0.0.0", "--port", "8000"]
