# syntax=docker/dockerfile:1
# MLflow tracking server with a PostgreSQL backend store and S3 artifacts.
#
# The official image installs plain `mlflow`, without a PostgreSQL driver, boto3 or what MLflow's login app
# needs (Flask-WTF, the `mlflow[auth]` extra). This adds all three, at the versions uv.lock pins (psycopg 3:
# backend URIs are postgresql+psycopg://...), an unprivileged user, and mlflow-login.sh, which starts the server
# with the login on (the Compose and Kubernetes files use it).
# The base image's MLflow version is the one in uv.lock too: tests/test_infra.py checks all three.
#
#   docker build -f infra/docker/mlflow.Dockerfile -t yolo-ota-mlflow:3.17.2 .

ARG MLFLOW_IMAGE=ghcr.io/mlflow/mlflow:v3.17.2

FROM ${MLFLOW_IMAGE}
RUN pip install --no-cache-dir "psycopg[binary]==3.3.9" "boto3==1.44.5" "Flask-WTF==1.3.0" \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/mlflow --create-home --shell /usr/sbin/nologin mlflow
COPY --chmod=0755 infra/docker/mlflow-login.sh /usr/local/bin/mlflow-login.sh
USER 10001:10001
WORKDIR /var/lib/mlflow
EXPOSE 5000
# /health answers without a Host check (MLflow exempts it), so a probe from inside the container works.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:5000/health', timeout=4)"]
CMD ["mlflow", "server", "--host", "0.0.0.0", "--port", "5000"]
