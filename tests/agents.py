"""Real edge-agent processes for the tests: ``yolo-ota agent`` started on a free port, killed or stopped."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from servers import ENROLLMENT_TOKEN

from yolo_ota.processes import RunningServer, started
from yolo_ota.servers import launch_agent

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
    # Without traffic, shadow validation waits this long for live frames before the golden data stands in.
    "SHADOW_TIME_LIMIT_S": "3",
}


@dataclass
class RunningAgent(RunningServer):
    device_id: str = ""

    @property
    def data_dir(self) -> Path:
        return self.cwd

    def restart(self, *, settings: dict[str, str] | None = None, timeout_s: float = 60) -> RunningAgent:
        """Start the same agent again (same data dir and port), optionally with other settings."""
        env = dict(self.env)
        env.pop("YOLO_OTA_AGENT_PAUSE_ON_ENTER", None)
        env.update({f"YOLO_OTA_AGENT_{k}": v for k, v in (settings or {}).items()})
        return started(self.relaunch(env), timeout_s)

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
    settings: dict[str, str] | None = None,
    enrollment_token: str = ENROLLMENT_TOKEN,
    timeout_s: float = 60,
    **options: Any,
) -> RunningAgent:
    """``yolo_ota.servers.launch_agent`` (``server_url``, ``device_id``, ...) with fast test settings and the test
    enrollment token; waits until its local API answers."""
    server = launch_agent(
        data_dir, enrollment_token=enrollment_token, settings={**FAST_AGENT_SETTINGS, **(settings or {})}, **options
    )
    return started(RunningAgent(**vars(server), device_id=options["device_id"]), timeout_s)
