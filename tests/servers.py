"""Real servers on loopback for the tests: MLflow tracking servers (and, later, the rollout service).

Each server is a subprocess with its own data folder, started on a free port and waited for on its health
endpoint; ``stop`` ends it and its children.
"""

from __future__ import annotations

import base64
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

# MLflow encrypts webhook secrets with this Fernet key (32 url-safe base64 bytes); fixed, test only.
WEBHOOK_KEY = base64.urlsafe_b64encode(b"yolo-ota-test-webhook-key-32byte").decode()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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
