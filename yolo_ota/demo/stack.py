"""The demo's processes: an MLflow server, the rollout service and a fleet of agents, on loopback ports.

Everything lives under one data folder (logs, databases, artifacts, each agent's data dir). Tokens and the webhook
secret are drawn at random for each run; ``stack.json`` in the data folder records the URLs and the operator
token, so a person (or a test) can reach the running stack.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from yolo_ota.demo.processes import Child, DemoError, free_port, spawn, wait_healthy

LINES = ("line-a", "line-b")

# Seconds, not the minutes a factory would use, so that a whole canary fits in the demo.
SERVICE_SETTINGS = {
    "SCHEDULER_INTERVAL_S": "0.5",
    "ALIAS_POLL_INTERVAL_S": "5",  # the webhook is the fast path; the poll is its fallback
    "STATE_CHECK_INTERVAL_S": "0.2",
    "HEARTBEAT_FLUSH_S": "1",
    "POLL_INTERVAL_S": "1",
}
AGENT_SETTINGS = {
    "POLL_JITTER": "0.2",
    "BACKOFF_MAX_S": "3",
    "REPORT_INTERVAL_S": "2",
    "PROBATION_S": "4",
    "PROBATION_INFERENCES": "30",
    "PROBATION_MIN_INFERENCES": "8",
    # Four agents and their validations share the demo machine's cores: latency jitters far more than on a
    # device of its own, so probation judges p99 against 5x the previous version's instead of 1.5x.
    "PROBATION_P99_FACTOR": "5",
}


@dataclass(frozen=True)
class DeviceSpec:
    device_id: str
    line: str


def fleet_specs(count: int) -> list[DeviceSpec]:
    """``count`` devices spread over the lines in turn: line-a-1, line-b-1, line-a-2, ..."""
    return [DeviceSpec(f"{LINES[i % 2]}-{i // 2 + 1}", LINES[i % 2]) for i in range(count)]


def _command(tool: str) -> list[str]:
    """A console script of this environment (``mlflow``, ``yolo-ota``), or its module when the script is absent."""
    exe = Path(sys.executable).parent / tool
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", {"mlflow": "mlflow", "yolo-ota": "yolo_ota.cli"}[tool]]


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_OTA_")}
    env.update(extra)
    return env


@dataclass
class Stack:
    """Start with ``start_*``, always ``stop()`` (it stops whatever was started, agents first)."""

    data_dir: Path
    model: str
    say: Callable[[str], None]
    operator_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    enrollment_token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    webhook_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    mlflow: Child | None = None
    service: Child | None = None
    agents: dict[str, Child] = field(default_factory=dict)

    @property
    def mlflow_url(self) -> str:
        return self._need(self.mlflow).url

    @property
    def service_url(self) -> str:
        return self._need(self.service).url

    @staticmethod
    def _need(child: Child | None) -> Child:
        if child is None:
            raise DemoError("that part of the stack is not started")
        return child

    def launch_mlflow(self) -> None:
        """Start the MLflow server without waiting for it (``wait_mlflow``): the first export runs meanwhile."""
        port = free_port()
        folder = self.data_dir / "mlflow"
        folder.mkdir(parents=True, exist_ok=True)
        command = [
            *_command("mlflow"), "server", "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
            "--serve-artifacts", "--artifacts-destination", str(folder / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ]  # fmt: skip
        env = _clean_env(
            MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
            # the rollout service's webhook is on loopback: allow it (DESIGN.md section 5)
            MLFLOW_WEBHOOK_ALLOWED_SCHEMES="http,https",
            MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS="true",
            MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=base64.urlsafe_b64encode(secrets.token_bytes(32)).decode(),
        )
        self.mlflow = spawn(
            "MLflow server", command, url=f"http://127.0.0.1:{port}", env=env, log_path=folder / "server.log",
            cwd=folder,
        )  # fmt: skip

    def wait_mlflow(self) -> None:
        wait_healthy(self._need(self.mlflow), "/health", timeout_s=120)

    def start_service(self, default_waves: list[dict[str, float]]) -> None:
        port = free_port()
        folder = self.data_dir / "service"
        url = f"http://127.0.0.1:{port}"
        settings = {
            **SERVICE_SETTINGS,
            "DATA_DIR": str(folder),
            "MLFLOW_URI": self.mlflow_url,
            "OPERATOR_TOKENS": f"demo={self.operator_token}",
            "ENROLLMENT_TOKEN": self.enrollment_token,
            "PUBLIC_URL": url,
            "WEBHOOK_SECRET": self.webhook_secret,
            "WATCH_MODELS": self.model,
            "DEFAULT_WAVES": json.dumps(default_waves),
        }
        env = _clean_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="1", **{f"YOLO_OTA_{k}": v for k, v in settings.items()})
        command = [*_command("yolo-ota"), "server", "--host", "127.0.0.1", "--port", str(port)]
        folder.mkdir(parents=True, exist_ok=True)
        self.service = spawn("rollout service", command, url=url, env=env, log_path=folder / "service.log", cwd=folder)
        wait_healthy(self.service, "/healthz", timeout_s=60)

    def launch_agents(self, devices: list[DeviceSpec], public_key: Path) -> None:
        """Start every agent without waiting (``wait_agents``): they import torch side by side."""
        for spec in devices:
            port = free_port()
            folder = self.data_dir / "devices" / spec.device_id
            folder.mkdir(parents=True, exist_ok=True)
            command = [
                *_command("yolo-ota"), "agent", "--server", self.service_url, "--device-id", spec.device_id,
                "--enrollment-token", self.enrollment_token, "--data-dir", str(folder),
                "--listen", f"127.0.0.1:{port}", "--public-key", str(public_key), "--device", "cpu",
                "--label", f"line={spec.line}",
            ]  # fmt: skip
            # One intra-op thread per agent: four agents on a two-core machine would otherwise fight over them.
            env = _clean_env(OMP_NUM_THREADS="1", **{f"YOLO_OTA_AGENT_{k}": v for k, v in AGENT_SETTINGS.items()})
            self.agents[spec.device_id] = spawn(
                f"agent {spec.device_id}", command, url=f"http://127.0.0.1:{port}", env=env,
                log_path=folder / "agent.log", cwd=folder,
            )  # fmt: skip

    def wait_agents(self) -> None:
        for child in self.agents.values():
            wait_healthy(child, "/v1/status", timeout_s=180)

    def write_info(self) -> Path:
        """``stack.json``: URLs, the operator token and the devices' local APIs (mode 0600: it holds a token)."""
        info = {
            "model": self.model,
            "mlflow_url": self.mlflow_url,
            "service_url": self.service_url,
            "dashboard_url": f"{self.service_url}/ui#token={self.operator_token}",
            "operator_token": self.operator_token,
            "devices": {device_id: child.url for device_id, child in self.agents.items()},
            "pids": [c.process.pid for c in self.children()],
        }
        path = self.data_dir / "stack.json"
        path.write_text(json.dumps(info, indent=2) + "\n")
        path.chmod(0o600)
        return path

    def children(self) -> list[Child]:
        return [c for c in (self.mlflow, self.service, *self.agents.values()) if c is not None]

    def check_running(self) -> None:
        """``DemoError`` naming the first child that exited (with its log's tail)."""
        for child in self.children():
            if not child.running:
                raise DemoError(f"{child.name} exited with status {child.process.returncode}:\n{child.log_tail()}")

    def stop(self) -> None:
        """Agents first, all at once (each sends its last reports), then the service, then MLflow."""
        agents = list(self.agents.values())
        if any(child.running for child in agents):
            self.say(f"stopping {len(agents)} agents")
        for child in agents:
            child.terminate()
        for child in agents:
            child.stop()
        for last in (self.service, self.mlflow):
            if last is None:
                continue
            if last.running:
                self.say(f"stopping the {last.name}")
            last.stop()
