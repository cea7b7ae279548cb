"""The project's servers on loopback, as child processes: an MLflow tracking server, the rollout service, edge agents.

What the demo, the benchmarks and the tests start. Each ``launch_*`` returns at once with a ``RunningServer``
whose health path says when it is up; ``start_*`` (or ``processes.started``) also waits for it. Every child gets
this process's environment without its ``YOLO_OTA_*`` settings, plus the ones it is given.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict, Unpack

from yolo_ota.processes import RunningServer, clean_env, console_command, free_port, launch, started

MLFLOW_HEALTH_PATH = "/health"
SERVICE_HEALTH_PATH = "/healthz"
# The agent's /healthz answers 503 until a model serves; its local API is up once /v1/status answers.
AGENT_READY_PATH = "/v1/status"


def _token() -> str:
    return secrets.token_urlsafe(24)


@dataclass(frozen=True)
class ServiceTokens:
    """The secrets a rollout service is started with: one operator token, the enrollment token, the webhook secret."""

    operator: str = field(default_factory=_token)
    enrollment: str = field(default_factory=_token)
    webhook_secret: str = field(default_factory=_token)
    operator_name: str = "operator"  # the audit log's actor: operator:<name>

    def settings(self) -> dict[str, str]:
        return {
            "OPERATOR_TOKENS": f"{self.operator_name}={self.operator}",
            "ENROLLMENT_TOKEN": self.enrollment,
            "WEBHOOK_SECRET": self.webhook_secret,
        }


def mlflow_env(webhook_key: str | None = None, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for an MLflow server that may call webhooks on loopback (DESIGN.md section 5).

    ``webhook_key`` is the Fernet key MLflow encrypts webhook secrets with (32 url-safe base64 bytes); a new one
    is drawn when it is not given.
    """
    key = webhook_key or base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
    return clean_env(
        {
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
            "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
            "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": key,
            **(extra or {}),
        }
    )


class MlflowOptions(TypedDict, total=False):
    backend_uri: str | None  # default: SQLite in the data folder
    artifacts_destination: str | None  # default: the data folder's artifacts/
    serve_artifacts: bool  # default: True (the artifact proxy)
    default_artifact_root: str | None
    webhook_key: str | None
    env: Mapping[str, str] | None  # more variables for the server


def launch_mlflow(data_dir: Path, **options: Unpack[MlflowOptions]) -> RunningServer:
    """``mlflow server`` on a free loopback port, one worker, its log in ``data_dir/server.log``."""
    port = free_port()
    command = [
        *console_command("mlflow"), "server",
        "--backend-store-uri", options.get("backend_uri") or f"sqlite:///{data_dir / 'mlflow.db'}",
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    if options.get("serve_artifacts", True):
        destination = options.get("artifacts_destination") or str(data_dir / "artifacts")
        command += ["--serve-artifacts", "--artifacts-destination", destination]
    else:
        command += ["--no-serve-artifacts"]
    if root := options.get("default_artifact_root"):
        command += ["--default-artifact-root", root]
    env = mlflow_env(options.get("webhook_key"), options.get("env"))
    return launch(
        "MLflow server", command, port=port, health_path=MLFLOW_HEALTH_PATH, env=env,
        log_path=data_dir / "server.log", cwd=data_dir,
    )  # fmt: skip


def start_mlflow(data_dir: Path, *, timeout_s: float = 120, **options: Unpack[MlflowOptions]) -> RunningServer:
    """``launch_mlflow``, then wait until it answers (stopped again if it does not)."""
    return started(launch_mlflow(data_dir, **options), timeout_s)


def own_config(data_dir: Path) -> str:
    """An empty config file in the child's data dir, named to the child: it reads only the settings it is given,
    never a ``yolo-ota.toml`` or user config file that happens to be where it runs."""
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "launcher-config.toml"
    if not path.exists():
        path.write_text("# Empty: this process takes its settings from the flags and variables it was started with.\n")
    return str(path)


def start_service(
    data_dir: Path,
    tokens: ServiceTokens,
    settings: Mapping[str, str] | None = None,
    *,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    verbose: bool = False,
    timeout_s: float = 60,
) -> RunningServer:
    """``yolo-ota server`` on a loopback port (free unless given); waits until ``/healthz`` answers.

    ``settings`` are ``YOLO_OTA_*`` variables without the prefix (e.g. ``{"MLFLOW_URI": ...}``); ``DATA_DIR`` is
    ``data_dir`` unless they say otherwise. MLflow calls are retried once unless ``env`` says otherwise.
    """
    port = port or free_port()
    variables = {"DATA_DIR": str(data_dir), "CONFIG": own_config(data_dir), **tokens.settings(), **(settings or {})}
    child_env = clean_env(
        {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", **(env or {}), **{f"YOLO_OTA_{k}": v for k, v in variables.items()}}
    )
    command = [*console_command("yolo-ota"), *(["-v"] if verbose else []), "server"]
    command += ["--host", "127.0.0.1", "--port", str(port)]
    service = launch(
        "rollout service", command, port=port, health_path=SERVICE_HEALTH_PATH, env=child_env,
        log_path=data_dir / "service.log", cwd=data_dir,
    )  # fmt: skip
    return started(service, timeout_s)


def launch_agent(
    data_dir: Path,
    *,
    server_url: str,
    device_id: str,
    enrollment_token: str,
    labels: Mapping[str, str] | None = None,
    public_key: Path | None = None,
    settings: Mapping[str, str] | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> RunningServer:
    """``yolo-ota agent`` with its local API on a free loopback port, without waiting for it.

    ``settings`` are ``YOLO_OTA_AGENT_*`` variables without the prefix; its log is ``data_dir/agent.log``. Without a
    ``public_key`` the agent runs with ``--allow-unsigned`` (and says so in its log and status).
    """
    port = free_port()
    command = [
        *console_command("yolo-ota"), "agent", "--server", server_url, "--device-id", device_id,
        "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}",
    ]  # fmt: skip
    for key, value in (labels or {}).items():
        command += ["--label", f"{key}={value}"]
    command += ["--public-key", str(public_key)] if public_key is not None else ["--allow-unsigned"]
    command += extra_args
    # The enrollment token goes in the environment, not on the command line where `ps` shows it.
    variables = {"CONFIG": own_config(data_dir), "ENROLLMENT_TOKEN": enrollment_token, **(settings or {})}
    child_env = clean_env({**(env or {}), **{f"YOLO_OTA_AGENT_{k}": v for k, v in variables.items()}})
    return launch(
        f"agent {device_id}", command, port=port, health_path=AGENT_READY_PATH, env=child_env,
        log_path=data_dir / "agent.log", cwd=data_dir,
    )  # fmt: skip
