#!/bin/sh
# `mlflow server` with MLflow's own login on (--app-name basic-auth), its config written from the environment.
#
# The config file names the database of users and grants, whose URI holds a password: it is written here, mode
# 0600, instead of living in the image or a ConfigMap. The users and grants themselves are kept in MLflow's
# backend database (their own tables) unless MLFLOW_AUTH_DATABASE_URI names another. The first admin comes from
# MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD, read by MLflow at its first start only. Everyone
# signed in reads (default_permission READ); editing a model, and so moving its aliases, takes a grant.
#
#   mlflow-login.sh --host 0.0.0.0 --port 5000 ...    (every argument goes to `mlflow server`)
set -eu
database="${MLFLOW_AUTH_DATABASE_URI:-${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI or MLFLOW_AUTH_DATABASE_URI}}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (the first admin password)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (signs the login app sessions)}"
config="${MLFLOW_LOGIN_CONFIG_DIR:-${TMPDIR:-/tmp}}/basic_auth.ini"
umask 077
# configparser reads % as interpolation: a password holding one is written as %%.
cat > "$config" <<INI
[mlflow]
default_permission = READ
database_uri = $(printf '%s' "$database" | sed 's/%/%%/g')
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$config"
exec mlflow server --app-name basic-auth "$@"
