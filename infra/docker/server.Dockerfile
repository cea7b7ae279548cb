# syntax=docker/dockerfile:1
# The rollout service (`yolo-ota server`): REST API, wave scheduler, MLflow alias watcher.
#
# Build from the repository root (the context must hold pyproject.toml and uv.lock):
#   docker build -f infra/docker/server.Dockerfile -t yolo-ota-server:0.1.0 .
# Run (settings are YOLO_OTA_* variables, docs/rollout-service.md):
#   docker run -p 8700:8700 -e YOLO_OTA_DATABASE_URL=... -e YOLO_OTA_OPERATOR_TOKENS=... \
#       -e YOLO_OTA_ENROLLMENT_TOKEN=... -e YOLO_OTA_MLFLOW_URI=... yolo-ota-server:0.1.0
#
# Dependencies come from uv.lock (`uv sync --locked`), the `server` extra only. The service reads bundle
# manifests and device fingerprints but never loads a model, and that extra brings no torch (nor the CUDA
# libraries, several GB): tests/test_infra.py checks the locked `server` extra for torch and that the service
# starts with torch unimportable.

ARG PYTHON_IMAGE=python:3.11.13-slim-bookworm
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

FROM ${PYTHON_IMAGE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/opt/yolo-ota
WORKDIR /src
COPY pyproject.toml uv.lock README.md ./
# Dependencies first, in a layer that changes only with uv.lock; then the project itself (not editable).
RUN uv sync --locked --no-dev --extra server --no-install-project
COPY yolo_ota ./yolo_ota
COPY exporters ./exporters
COPY registry ./registry
COPY edge_agent ./edge_agent
RUN uv sync --locked --no-dev --extra server --no-editable

FROM ${PYTHON_IMAGE}
# An unprivileged user with a fixed id, so that Kubernetes' runAsUser and volume ownership can name it.
RUN useradd --system --uid 10001 --user-group --home-dir /var/lib/yolo-ota --create-home --shell /usr/sbin/nologin yolo-ota
COPY --from=build /opt/yolo-ota /opt/yolo-ota
ENV PATH=/opt/yolo-ota/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    YOLO_OTA_DATA_DIR=/var/lib/yolo-ota
USER 10001:10001
WORKDIR /var/lib/yolo-ota
EXPOSE 8700
# The image has no curl: Python's own client asks /healthz (a non-2xx answer or no answer exits 1).
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8700/healthz', timeout=4)"]
ENTRYPOINT ["yolo-ota"]
CMD ["server", "--host", "0.0.0.0", "--port", "8700"]
