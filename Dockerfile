# syntax=docker/dockerfile:1
# One image for every role of the feed backend:
#   docker run IMAGE gateway   (default)   HTTP + WebSocket on FEED_GATEWAY_PORT (8080)
#   docker run IMAGE fanout                fan-out worker; /metrics /healthz /readyz on 9100
#   docker run IMAGE migrate               topics + Cassandra schema (idempotent, one-shot)
#   docker run IMAGE lag --json            consumer lag of the fan-out group
# Build from the repository root:  docker build -t feed-backend .

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# --- builder: the locked runtime dependencies (with the tracing extra: OpenTelemetry, off until
# OTEL_EXPORTER_OTLP_ENDPOINT is set), then the wheel (without the dev/local/bench
# extras), into a venv. requirements/runtime.lock is made by `make lock` from pyproject.toml, with
# hashes: the image gets exactly the versions the tests ran on. ---
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
# A compiler only in case a dependency has no wheel for this platform; it stays in this stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY requirements/runtime.lock ./requirements/runtime.lock
RUN pip install --require-hashes --no-deps -r requirements/runtime.lock
COPY pyproject.toml README.md ./
COPY schemas ./schemas
COPY feed ./feed
COPY fanout ./fanout
COPY gateway ./gateway
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && pip install --no-deps /wheels/*.whl \
 && pip check \
 && pip uninstall -y pip setuptools wheel \
 && find /opt/venv -name '__pycache__' -type d -prune -exec rm -rf {} +

# --- runtime: python + the venv, nothing else ------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="feed-backend" \
      org.opencontainers.image.description="Real-time activity feed: Kafka fan-out into Redis and Cassandra timelines, pushed over WebSocket." \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    FEED_GATEWAY_HOST=0.0.0.0 \
    FEED_WORKER_METRICS_HOST=0.0.0.0 \
    FEED_LOG_FORMAT=json
RUN groupadd --system --gid 10001 feed \
 && useradd --system --uid 10001 --gid feed --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin feed
COPY --from=builder /opt/venv /opt/venv
WORKDIR /tmp
# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
EXPOSE 8080 9100
# Role-agnostic: probe the gateway port if something listens there, else the worker's metrics
# port (each container runs one role). Only real FEED_* settings are read; HTTP errors,
# refused connections and timeouts all exit non-zero.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os,socket,urllib.request as r;g=int(os.environ.get('FEED_GATEWAY_PORT','8080'));w=int(os.environ.get('FEED_WORKER_METRICS_PORT','9100'));p=g if socket.socket().connect_ex(('127.0.0.1',g))==0 else w;r.urlopen(f'http://127.0.0.1:{p}/healthz',timeout=3)"]
# Every role is a `feed` subcommand; SIGTERM goes straight to it (exec form, PID 1).
ENTRYPOINT ["feed"]
CMD ["gateway"]
