"""Real edge-agent processes for the tests: ``yolo-ota agent`` started on a free port, killed or stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from servers import ENROLLMENT_TOKEN, RunningServer, free_port

# Fast loops for tests: seconds, not the minutes a factory would use.
FAST_AGENT_SETTINGS = {
    "POLL_INTERVAL_S": "0.3",
    "POLL_JITTER": "0.2",
    "BACKOFF_MAX_S": "1.5",
    "REPORT_INTERVAL_S": "0.5",
    "HTTP_TIMEOUT_S": "10",
    "PROBATION_S": "1.5",
    "PROBATION_INFERENCES": "40",
    "PROBATION_MIN_INFERENCES": "10",
    "MEMORY_HEADROOM": "0.02",
    "MIN_FREE_BYTES": "0",
}


@dataclass
class RunningAgent(RunningServer):
    data_dir: Path = field(default_factory=Path)
    device_id: str = ""
    command: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)

    def kill(self) -> None:
        """SIGKILL: no clean-up of any kind, as a power cut would do."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def restart(self, *, settings: dict[str, str] | None = None) -> RunningAgent:
        """Start the same agent again (same data dir and port), optionally with other settings."""
        env = dict(self.env)
        env.pop("YOLO_OTA_AGENT_PAUSE_ON_ENTER", None)
        env.update({f"YOLO_OTA_AGENT_{k}": v for k, v in (settings or {}).items()})
        return _launch(self.command, env, self.data_dir, self.url, self.device_id)

    def status(self) -> dict[str, Any]:
        return httpx.get(self.url + "/v1/status", timeout=10).json()

    def detect(self, image: bytes) -> httpx.Response:
        return httpx.post(self.url + "/v1/detect", content=image, timeout=30)

    def wait_for(self, what: str, check: Callable[[dict[str, Any]], bool], timeout_s: float = 60) -> dict[str, Any]:
        """Poll ``/v1/status`` until ``check`` holds; fail with the status and the agent's log otherwise."""
        deadline = time.monotonic() + timeout_s
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"agent exited ({self.process.returncode}) waiting for {what}:\n{self.log_tail()}")
            try:
                status = self.status()
                if check(status):
                    return status
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}; status {json.dumps(status)}\n{self.log_tail(6000)}")

    def wait_serving(self, version: str, timeout_s: float = 90) -> dict[str, Any]:
        return self.wait_for(
            f"serving v{version}, idle",
            lambda s: s["state"] == "idle" and (s["serving"] or {}).get("version") == version,
            timeout_s,
        )


def start_agent(
    data_dir: Path,
    *,
    server_url: str,
    device_id: str,
    labels: dict[str, str] | None = None,
    public_key: Path | None = None,
    settings: dict[str, str] | None = None,
    enrollment_token: str = ENROLLMENT_TOKEN,
    timeout_s: float = 60,
) -> RunningAgent:
    """Start ``yolo-ota agent`` with fast test settings; wait until its local API answers."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("YOLO_OTA_")}
    env.update({f"YOLO_OTA_AGENT_{k}": v for k, v in {**FAST_AGENT_SETTINGS, **(settings or {})}.items()})
    exe = Path(sys.executable).parent / "yolo-ota"
    command = [
        str(exe), "agent", "--server", server_url, "--device-id", device_id, "--enrollment-token", enrollment_token,
        "--data-dir", str(data_dir), "--listen", f"127.0.0.1:{port}",
    ]  # fmt: skip
    for key, value in (labels or {}).items():
        command += ["--label", f"{key}={value}"]
    if public_key is not None:
        command += ["--public-key", str(public_key)]
    return _launch(command, env, data_dir, f"http://127.0.0.1:{port}", device_id, timeout_s)


def _launch(
    command: list[str], env: dict[str, str], data_dir: Path, url: str, device_id: str, timeout_s: float = 60
) -> RunningAgent:
    log_path = data_dir / "agent.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=data_dir, start_new_session=True
        )
    agent = RunningAgent(
        url=url, process=process, log_path=log_path, data_dir=data_dir, device_id=device_id, command=command, env=env
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"agent exited with {process.returncode}:\n{agent.log_tail()}")
        try:
            if httpx.get(url + "/v1/status", timeout=2).status_code == 200:
                return agent
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    agent.kill()
    raise RuntimeError(f"agent at {url} did not answer after {timeout_s:.0f} s:\n{agent.log_tail()}")
