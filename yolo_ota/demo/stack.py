"""The demo's processes: an MLflow server, the rollout service and a fleet of agents, on loopback ports.

Everything lives under one data folder (logs, databases, artifacts, each agent's data dir). Tokens and the webhook
secret are drawn at random for each run; ``stack.json`` in the data folder records the URLs and the operator
token, so a person (or a test) can reach the running stack.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from yolo_ota.errors import ChildError, DemoError
from yolo_ota.processes import RunningServer, free_port, wait_healthy
from yolo_ota.servers import ServiceTokens, launch_agent, launch_mlflow, start_service

LINES = ("line-a", "line-b")

# The server's default analysis block, which the canary that a promotion in MLflow starts gets (v2's): samples
# of 8 frames (two one-second windows of a device), six per arm, evaluated every second, so that a wave is judged
# within seconds of traffic. v2 is v1 trained further: it finds parts v1 does not yet see, so a rise of a class's
# rate is what this retrain is for and only a drop counts as bad (``directions``); a class that vanishes still fails.
DEMO_ANALYSIS = {
    "min_windows": 6,
    "min_window_frames": 8,
    "interval_s": 1,
    "directions": {"class_rate": "decrease", "detections_per_image": "decrease"},
    "inconclusive_timeout_s": 120,
}
# Shadow validation of the regressions (v3, v4, against v2) decides on 48 sampled live frames, judging a class from
# 10 detections; half of the serving model's detections of each class must be matched: a class the candidate lost
# matches 0 %.
DEMO_SHADOW = {"min_matched": 0.5, "min_class_samples": 10, "sample_frames": 48, "time_limit_s": 30}
# The canary a promotion starts (v2's, against v1) is judged by the fleet analysis alone. v1 is a model still
# learning: matching v2's boxes one by one against v1's measures v1's mistakes as much as v2's, and how many of them
# a 9-epoch model makes depends on the CPU that trained it (AVX-512 and AVX2 kernels train different weights from
# the same seed: v1 found 27 boxes on the demo's 48 frames on one machine, 76 on the other).
PROMOTION_SHADOW = {"enabled": False}

# Seconds, not the minutes a factory would use, so that a whole canary fits in the demo.
SERVICE_SETTINGS = {
    "SCHEDULER_INTERVAL_S": "0.5",
    "ALIAS_POLL_INTERVAL_S": "5",  # the webhook is the fast path; the poll is its fallback
    "STATE_CHECK_INTERVAL_S": "0.2",
    "HEARTBEAT_FLUSH_S": "1",
    "POLL_INTERVAL_S": "1",
    "ANALYSIS": json.dumps(DEMO_ANALYSIS),
    "SHADOW": json.dumps(PROMOTION_SHADOW),
}
AGENT_SETTINGS = {
    "POLL_JITTER": "0.2",
    "BACKOFF_MAX_S": "3",
    "REPORT_INTERVAL_S": "1",  # one telemetry window a second: the analysis's minimum sample in seconds
    "PROBATION_S": "4",
    "PROBATION_INFERENCES": "30",
    "PROBATION_MIN_INFERENCES": "8",
    # Four agents and their validations share the demo machine's cores: latency jitters far more than on a
    # device of its own, so probation judges p99 against 5x the previous version's instead of 1.5x.
    "PROBATION_P99_FACTOR": "5",
    # Keep every answered frame (the default keeps every second): at the demo's 4 frames a second, a shadow sample
    # of 48 frames is in the ring by the time a device's validation ends, instead of 12 s later.
    "SHADOW_SAMPLE_EVERY": "1",
}


@dataclass(frozen=True)
class DeviceSpec:
    device_id: str
    line: str


def fleet_specs(count: int) -> list[DeviceSpec]:
    """``count`` devices spread over the lines in turn: line-a-1, line-b-1, line-a-2, ..."""
    return [DeviceSpec(f"{LINES[i % 2]}-{i // 2 + 1}", LINES[i % 2]) for i in range(count)]


@contextlib.contextmanager
def _as_demo_error() -> Iterator[None]:
    """A child that does not come up healthy ends the demo with a ``DemoError``, which the command reports."""
    try:
        yield
    except ChildError as exc:
        raise DemoError(str(exc)) from exc


@dataclass
class Stack:
    """Start with ``start_*``, always ``stop()`` (it stops whatever was started, agents first)."""

    data_dir: Path
    model: str
    say: Callable[[str], None]
    tokens: ServiceTokens = field(default_factory=lambda: ServiceTokens(operator_name="demo"))
    mlflow: RunningServer | None = None
    service: RunningServer | None = None
    agents: dict[str, RunningServer] = field(default_factory=dict)

    @property
    def operator_token(self) -> str:
        return self.tokens.operator

    @property
    def mlflow_url(self) -> str:
        return self._need(self.mlflow).url

    @property
    def service_url(self) -> str:
        return self._need(self.service).url

    @staticmethod
    def _need(child: RunningServer | None) -> RunningServer:
        if child is None:
            raise DemoError("that part of the stack is not started")
        return child

    def launch_mlflow(self) -> None:
        """Start the MLflow server without waiting for it (``wait_mlflow``): the first export runs meanwhile."""
        self.mlflow = launch_mlflow(self.data_dir / "mlflow")

    def wait_mlflow(self) -> None:
        with _as_demo_error():
            wait_healthy(self._need(self.mlflow), timeout_s=120)

    def start_service(self, default_waves: list[dict[str, float]]) -> None:
        port = free_port()
        settings = {
            **SERVICE_SETTINGS,
            "MLFLOW_URI": self.mlflow_url,
            "PUBLIC_URL": f"http://127.0.0.1:{port}",
            "WATCH_MODELS": self.model,
            "DEFAULT_WAVES": json.dumps(default_waves),
        }
        with _as_demo_error():
            self.service = start_service(self.data_dir / "service", self.tokens, settings, port=port)

    def launch_agents(self, devices: list[DeviceSpec], public_key: Path) -> None:
        """Start every agent without waiting (``wait_agents``): they import torch side by side."""
        for spec in devices:
            self.agents[spec.device_id] = launch_agent(
                self.data_dir / "devices" / spec.device_id, server_url=self.service_url, device_id=spec.device_id,
                enrollment_token=self.tokens.enrollment, labels={"line": spec.line}, public_key=public_key,
                settings=AGENT_SETTINGS, extra_args=("--device", "cpu"),
                # One intra-op thread per agent: four agents on a two-core machine would otherwise fight over them.
                env={"OMP_NUM_THREADS": "1"},
            )  # fmt: skip

    def wait_agents(self) -> None:
        with _as_demo_error():
            for agent in self.agents.values():
                wait_healthy(agent, timeout_s=180)

    def bring_up(self, default_waves: list[dict[str, float]], devices: list[DeviceSpec], public_key: Path) -> None:
        """After ``launch_mlflow``: wait for MLflow, start the service, then the agents, and wait for them."""
        self.wait_mlflow()
        self.say(f"MLflow server up at {self.mlflow_url} (SQLite, artifacts served from the data dir)")
        self.start_service(default_waves)
        self.say(f"rollout service up at {self.service_url} (SQLite; MLflow calls its alias webhook)")
        self.launch_agents(devices, public_key)
        self.wait_agents()
        self.say(f"{len(devices)} agents up")

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

    def children(self) -> list[RunningServer]:
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
