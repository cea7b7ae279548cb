"""The agent's ``GET /metrics``: Prometheus exposition from its own registry, label values escaped.

A model name and a version are whatever an offer or an installed record says; one with quotes, backslashes and
a newline must come back from a Prometheus parser exactly as it went in.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from edge_agent.state import AgentState, StateStore
from edge_agent.store import Installed, VersionStore

HOSTILE_MODEL = 'line "A" \\ cam\nx'
HOSTILE_VERSION = '7"\\\n}'


@pytest.fixture
def closed_port() -> Iterator[int]:
    """A loopback port held bound but not listening: the rollout service there refuses every connection."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


def _install(data_dir: Path, bundle: Path, model: str, version: str) -> None:
    """Put ``bundle`` on disk as an installed, last-known-good version, as a finished update leaves it."""
    store = VersionStore(data_dir)
    shutil.copytree(bundle, store.staging(model, version))
    store.install(model, version, Installed(model=model, version=version, key=f"{model}:{version}:x",
                                            variant="cpu-fp32"))  # fmt: skip
    StateStore(data_dir).save(AgentState(serving_model=model, serving_version=version))


def test_hostile_label_values_survive_the_exposition(trained_bundle: Path, tmp_path: Path, closed_port: int) -> None:
    from edge_agent import Agent, AgentSettings

    _install(tmp_path / "agent", trained_bundle, HOSTILE_MODEL, HOSTILE_VERSION)
    settings = AgentSettings(
        server=f"http://127.0.0.1:{closed_port}", device_id="metrics-cam", data_dir=tmp_path / "agent",
        enrollment_token="unused", listen="127.0.0.1:0", device="cpu", poll_interval_s=60, allow_unsigned=True,
    )  # fmt: skip
    agent = Agent(settings).start()
    try:
        assert agent.detect(np.full((120, 160, 3), 90, dtype=np.uint8)).version == HOSTILE_VERSION
        assert agent.api is not None
        host, port = agent.api.address
        answer = httpx.get(f"http://{host}:{port}/metrics", timeout=10)
    finally:
        agent.stop()
    assert answer.status_code == 200 and answer.headers["content-type"] == CONTENT_TYPE_LATEST
    families = {f.name: f for f in text_string_to_metric_families(answer.text)}
    assert set(families) == {
        "yolo_ota_agent_inferences", "yolo_ota_agent_errors", "yolo_ota_agent_latency_ms", "yolo_ota_agent_serving",
        "yolo_ota_agent_reports_queued", "yolo_ota_agent_state",
    }  # fmt: skip
    (serving,) = families["yolo_ota_agent_serving"].samples
    assert serving.labels == {"model": HOSTILE_MODEL, "version": HOSTILE_VERSION, "variant": "cpu-fp32",
                              "device": "cpu"} and serving.value == 1  # fmt: skip
    (inferences,) = families["yolo_ota_agent_inferences"].samples
    assert inferences.name == "yolo_ota_agent_inferences_total"
    assert inferences.labels == {"version": HOSTILE_VERSION} and inferences.value == 1
    quantiles = {s.labels["quantile"]: s for s in families["yolo_ota_agent_latency_ms"].samples}
    assert set(quantiles) == {"0.5", "0.99"} and all(s.labels["version"] == HOSTILE_VERSION for s in quantiles.values())
    (state,) = families["yolo_ota_agent_state"].samples
    assert state.labels == {"state": "idle"} and state.value == 1


def test_each_agent_has_its_own_registry(tmp_path: Path, closed_port: int) -> None:
    """Two agents in one process expose only their own figures (not the process-wide default registry)."""
    from prometheus_client import REGISTRY

    from edge_agent import Agent, AgentSettings
    from edge_agent.metrics import exposition

    agents = [
        Agent(
            AgentSettings(
                server=f"http://127.0.0.1:{closed_port}",
                device_id=f"cam-{i}",
                data_dir=tmp_path / str(i),
                enrollment_token="unused",
                listen=None,
                allow_unsigned=True,
            )
        )
        for i in range(2)
    ]
    assert agents[0].metrics is not agents[1].metrics
    for agent in agents:
        text = exposition(agent.metrics).decode()
        assert 'yolo_ota_agent_state{state="idle"} 1.0' in text
        assert "yolo_ota_agent_serving" in text and "yolo_ota_agent_serving{" not in text  # nothing serves yet
    assert not [name for name in REGISTRY._names_to_collectors if name.startswith("yolo_ota_agent")]
