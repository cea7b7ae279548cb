#!/bin/sh
# Run once by the postgres image's entrypoint, when the data volume is first initialised: one database and one
# owner role per service, so that MLflow and the rollout service cannot touch each other's tables.
# Kubernetes runs the same script (infra/k8s/postgres.yaml holds a copy; tests/test_infra.py keeps them equal).
set -eu
: "${MLFLOW_DB_PASSWORD:?is empty}" "${ROLLOUT_DB_PASSWORD:?is empty}"
psql --set=ON_ERROR_STOP=1 --username="$POSTGRES_USER" --dbname=postgres \
    --set=mlflow_password="$MLFLOW_DB_PASSWORD" --set=rollout_password="$ROLLOUT_DB_PASSWORD" <<'SQL'
CREATE ROLE mlflow LOGIN PASSWORD :'mlflow_password';
CREATE DATABASE mlflow OWNER mlflow;
REVOKE CONNECT ON DATABASE mlflow FROM PUBLIC;
CREATE ROLE yolo_ota LOGIN PASSWORD :'rollout_password';
CREATE DATABASE yolo_ota OWNER yolo_ota;
REVOKE CONNECT ON DATABASE yolo_ota FROM PUBLIC;
SQL
