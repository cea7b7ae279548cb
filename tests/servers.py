"""Real servers on loopback for the tests: MLflow tracking servers, the rollout service, PostgreSQL databases.

Each server is a subprocess with its own data folder, started on a free port and waited for on its health
endpoint; ``stop`` ends it and its children.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from yolo_ota.demo.processes import free_port

# MLflow encrypts webhook secrets with this Fernet key (32 url-safe base64 bytes); fixed, test only.
WEBHOOK_KEY = base64.urlsafe_b64encode(b"yolo-ota-test-webhook-key-32byte").decode()


@dataclass
class RunningServer:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)

    def log_tail(self, chars: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-chars:] if self.log_path.exists() else ""


def _wait_healthy(server: RunningServer, path: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited with {server.process.returncode}:\n{server.log_tail()}")
        try:
            if httpx.get(server.url + path, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"server at {server.url} not healthy after {timeout_s:.0f} s:\n{server.log_tail()}")


def mlflow_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for an MLflow server that may call webhooks on loopback (DESIGN.md section 5)."""
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
        "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
        "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": WEBHOOK_KEY,
        "MLFLOW_WEBHOOK_CACHE_TTL": "1",  # a webhook registered by a test's service is called within a second
    }
    env.update(extra or {})
    return env


def start_mlflow(
    data_dir: Path,
    *,
    backend_uri: str | None = None,
    artifacts_destination: str | None = None,
    serve_artifacts: bool = True,
    default_artifact_root: str | None = None,
    env: dict[str, str] | None = None,
    timeout_s: float = 90,
) -> RunningServer:
    """Start ``mlflow server`` on a free loopback port (SQLite in ``data_dir`` unless ``backend_uri``)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    mlflow = Path(sys.executable).parent / "mlflow"
    command = [
        str(mlflow),
        "server",
        "--backend-store-uri",
        backend_uri or f"sqlite:///{data_dir / 'mlflow.db'}",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    if serve_artifacts:
        command += ["--serve-artifacts", "--artifacts-destination", artifacts_destination or str(data_dir / "art")]
    else:
        command += ["--no-serve-artifacts"]
    if default_artifact_root:
        command += ["--default-artifact-root", default_artifact_root]
    log_path = data_dir / "server.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=mlflow_env(env), cwd=data_dir, start_new_session=True
        )
    server = RunningServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    _wait_healthy(server, "/health", timeout_s)
    return server


OPERATOR_TOKEN = "test-operator-token"
ENROLLMENT_TOKEN = "test-enrollment-token"
WEBHOOK_SECRET = "test-webhook-secret"


def start_rollout_service(
    data_dir: Path,
    *,
    database_url: str | None = None,
    mlflow_url: str | None = None,
    settings: dict[str, str] | None = None,
    port: int | None = None,
    timeout_s: float = 60,
) -> RunningServer:
    """Start ``yolo-ota server`` (uvicorn) on a free loopback port with test tokens and fast loops.

    ``settings`` are extra ``YOLO_OTA_*`` variables, without the prefix (e.g. ``{"SCHEDULER_INTERVAL_S": "0.2"}``).
    """
    data_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_OTA_")}
    env.update(
        {
            "YOLO_OTA_DATA_DIR": str(data_dir),
            "YOLO_OTA_OPERATOR_TOKENS": f"tester={OPERATOR_TOKEN}",
            "YOLO_OTA_ENROLLMENT_TOKEN": ENROLLMENT_TOKEN,
            "YOLO_OTA_WEBHOOK_SECRET": WEBHOOK_SECRET,
            "YOLO_OTA_SCHEDULER_INTERVAL_S": "0.25",
            "YOLO_OTA_ALIAS_POLL_INTERVAL_S": "1",
            "YOLO_OTA_STATE_CHECK_INTERVAL_S": "0.1",
            "YOLO_OTA_HEARTBEAT_FLUSH_S": "0.5",
            # The session's MLflow also holds other tests' models, some with a production alias: watch only the
            # model the rollout tests promote (the fleet_model fixture's).
            "YOLO_OTA_WATCH_MODELS": "pcb-line",
        }
    )
    if database_url:
        env["YOLO_OTA_DATABASE_URL"] = database_url
    if mlflow_url:
        env["YOLO_OTA_MLFLOW_URI"] = mlflow_url
        env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    env.update({f"YOLO_OTA_{k}": v for k, v in (settings or {}).items()})
    exe = Path(sys.executable).parent / "yolo-ota"
    command = [str(exe), "-v", "server", "--host", "127.0.0.1", "--port", str(port)]
    log_path = data_dir / f"service-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data_dir, start_new_session=True
        )
    server = RunningServer(url=f"http://127.0.0.1:{port}", process=process, log_path=log_path)
    _wait_healthy(server, "/healthz", timeout_s)
    return server


POSTGRES_ADMIN_URL = os.environ.get("YOLO_OTA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def postgres_reachable() -> bool:
    try:
        import psycopg

        with psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3):
            return True
    except Exception:
        return False


def create_postgres_database(name: str) -> str:
    """A new, empty PostgreSQL database; returns its SQLAlchemy URL."""
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    return f"{base}/{name}"


def drop_postgres_database(name: str) -> None:
    import psycopg

    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
