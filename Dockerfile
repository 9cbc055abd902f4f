# Squeeze: one Dockerfile, two roles (docs/architecture.md#components).
#   docker build --target api    -t squeeze-api .     # HTTP API + migrations; no torch
#   docker build --target worker -t squeeze-worker .  # Celery worker with torch/onnx
# For a CUDA worker pass --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/<cuda tag>.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- shared runtime base
FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SQUEEZE_DATA_DIR=/data
# One uid/gid for both roles. /data is setgid and group-writable so that files the worker
# writes into the shared volume stay writable for the API user (named volumes copy this on first mount).
RUN groupadd --system --gid 10001 squeeze \
 && useradd --system --uid 10001 --gid squeeze --home-dir /home/squeeze --create-home --shell /usr/sbin/nologin squeeze \
 && mkdir -p /data/blobs \
 && chown -R squeeze:squeeze /data \
 && chmod -R 2775 /data
WORKDIR /srv/squeeze

# ---------------------------------------------------------------- build stages (venvs only)
FROM base AS api-build
RUN python -m venv /opt/venv
COPY pyproject.toml ./
COPY app ./app
COPY worker ./worker
# The API role: the project's base dependencies only, never the `worker` extra (no torch).
RUN pip install --no-cache-dir .

FROM base AS worker-build
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# torch first, from its own index, at the exact version pyproject.toml pins.
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.13.0
COPY pyproject.toml ./
COPY app ./app
COPY worker ./worker
RUN pip install --no-cache-dir "./[worker]"

# ---------------------------------------------------------------- api: uvicorn + alembic (migrate uses this image)
FROM base AS api
COPY --from=api-build /opt/venv /opt/venv
COPY alembic.ini ./
COPY migrations ./migrations
USER 10001:10001
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
CMD ["uvicorn", "--factory", "app.main:create_app", "--host", "0.0.0.0", "--port", "8000"]

# ---------------------------------------------------------------- worker: celery + sandbox
FROM base AS worker
# bubblewrap is the sandbox (docs/security.md): without it the worker refuses to run model code.
# Unpinned on purpose: the base image's Debian release decides the version, and its security updates.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends bubblewrap \
 && rm -rf /var/lib/apt/lists/*
COPY --from=worker-build /opt/venv /opt/venv
# No USER here on purpose: the supervisor starts as root only so that each job's sandbox gets a
# uid of its own (SQUEEZE_SANDBOX_UID_FIRST..+COUNT) before bubblewrap puts it in its own
# namespaces (docs/security.md); the model code itself never runs as root. The worker makes its
# own files 0600 (blobs live in the bucket; its /data is scratch space of its own).
HEALTHCHECK NONE
CMD ["sh", "-c", "exec celery -A worker.celery_app worker -Q cpu,gpu --loglevel INFO"]
