"""The tests' servers on loopback: MLflow with a fixed webhook key, the rollout service with fixed test tokens and
fast loops. Processes are started and stopped by the project's launcher (``yolo_ota.processes``,
``yolo_ota.servers``).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Unpack

from yolo_ota.processes import RunningServer
from yolo_ota.servers import MlflowOptions, ServiceTokens, start_service
from yolo_ota.servers import start_mlflow as start_project_mlflow

# MLflow encrypts webhook secrets with this Fernet key (32 url-safe base64 bytes); fixed, test only.
WEBHOOK_KEY = base64.urlsafe_b64encode(b"yolo-ota-test-webhook-key-32byte").decode()

OPERATOR_TOKEN = "test-operator-token"
ENROLLMENT_TOKEN = "test-enrollment-token"
WEBHOOK_SECRET = "test-webhook-secret"
TOKENS = ServiceTokens(
    operator=OPERATOR_TOKEN, enrollment=ENROLLMENT_TOKEN, webhook_secret=WEBHOOK_SECRET, operator_name="tester"
)
FAST_SERVICE_SETTINGS = {
    "SCHEDULER_INTERVAL_S": "0.25",
    "ALIAS_POLL_INTERVAL_S": "1",
    "STATE_CHECK_INTERVAL_S": "0.1",
    "HEARTBEAT_FLUSH_S": "0.5",
    # The session's MLflow also holds other tests' models, some with a production alias: watch only the
    # model the rollout tests promote (the fleet_model fixture's).
    "WATCH_MODELS": "pcb-line",
    # The fleet analysis needs telemetry from real traffic; the tests that judge it switch it on per rollout.
    "ANALYSIS": '{"enabled": false}',
    # Shadow validation needs live traffic too (without it, each swap waits for frames, then runs the golden data in
    # a child process): the tests that exercise it switch it on per rollout.
    "SHADOW": '{"enabled": false}',
}


def start_mlflow(data_dir: Path, *, timeout_s: float = 90, **options: Unpack[MlflowOptions]) -> RunningServer:
    """``mlflow server`` (SQLite in ``data_dir`` unless ``backend_uri``) with the test webhook key.

    A webhook that a test's service registers is called within a second (MLflow caches the list for a while).
    """
    env = {"MLFLOW_WEBHOOK_CACHE_TTL": "1", **(options.pop("env", None) or {})}
    options.setdefault("webhook_key", WEBHOOK_KEY)
    return start_project_mlflow(data_dir, timeout_s=timeout_s, env=env, **options)


def start_rollout_service(
    data_dir: Path,
    *,
    database_url: str | None = None,
    mlflow_url: str | None = None,
    settings: dict[str, str] | None = None,
    port: int | None = None,
    timeout_s: float = 60,
) -> RunningServer:
    """``yolo-ota -v server`` with the test tokens and fast loops.

    ``settings`` are extra ``YOLO_OTA_*`` variables, without the prefix (e.g. ``{"SCHEDULER_INTERVAL_S": "0.2"}``).
    """
    variables = dict(FAST_SERVICE_SETTINGS)
    if database_url:
        variables["DATABASE_URL"] = database_url
    if mlflow_url:
        variables["MLFLOW_URI"] = mlflow_url
    variables.update(settings or {})
    env = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    return start_service(data_dir, TOKENS, variables, port=port, env=env, verbose=True, timeout_s=timeout_s)


def mlflow_client(mlflow_server: RunningServer):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server.url, registry_uri=mlflow_server.url)


def start_webhook_service(data_dir: Path, mlflow_url: str, *, database_url: str | None = None) -> RunningServer:
    """A rollout service that hears of promotions only by MLflow's webhook (the poll all but off), started once
    MLflow has its webhook: it logs the registration."""
    import time

    from yolo_ota.processes import free_port

    port = free_port()
    server = start_rollout_service(
        data_dir,
        database_url=database_url,
        mlflow_url=mlflow_url,
        port=port,
        settings={"PUBLIC_URL": f"http://127.0.0.1:{port}", "ALIAS_POLL_INTERVAL_S": "3600"},
    )
    deadline = time.monotonic() + 30
    while "webhook yolo-ota-rollout-service" not in server.log_tail(20000):
        if time.monotonic() > deadline:
            server.stop()
            raise AssertionError(f"the service registered no webhook in 30 s:\n{server.log_tail(3000)}")
        time.sleep(0.1)
    return server
