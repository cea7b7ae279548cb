"""The edge agent as a real process against a real rollout service and MLflow: the happy path and each fault.

Every fault test ends with the agent serving a validated model and the service holding the reason.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
from agent_stack import AgentStack
from agents import RunningAgent, start_agent
from faultproxy import Corrupt, Cut, Rewrite, rewrite_json

SAMPLE = Path(__file__).resolve().parent / "assets"


@pytest.fixture(scope="module")
def bus_jpg() -> bytes:
    import ultralytics

    return (Path(ultralytics.__file__).parent / "assets" / "bus.jpg").read_bytes()


def lane_agent(stack: AgentStack, tmp_path: Path, lane: str, **kwargs: object) -> RunningAgent:
    """An agent labelled ``lane=<lane>`` that verifies signatures, already serving good1."""
    agent = start_agent(
        tmp_path / lane,
        server_url=stack.service_proxy.url,
        device_id=f"dev-{lane}",
        labels={"lane": lane},
        public_key=stack.versions.public_key,
        **kwargs,  # type: ignore[arg-type]
    )
    stack.roll_out(lane, "good1")
    agent.wait_serving(stack.versions["good1"])
    return agent


def refused(stack: AgentStack, agent: RunningAgent, role: str, fragment: str) -> dict[str, object]:
    """Roll out ``role``; wait until the agent refused it, still serving good1; the service has the reason."""
    version = stack.versions[role]
    stack.roll_out(agent.device_id.removeprefix("dev-"), role)
    status = agent.wait_for(
        f"v{version} refused", lambda s: s["state"] == "idle" and any(f":{version}:" in k for k in s["rejected"])
    )
    assert status["serving"]["version"] == stack.versions["good1"]
    events = stack.fleet.wait_for(
        "the refusal to reach the service",
        lambda: [e for e in stack.events(agent.device_id) if e["version"] == version and not e["ok"]],
    )
    assert any(fragment in str(e["reason"]) for e in events), events
    return status


def test_happy_path_promotion_to_detect(agent_stack: AgentStack, tmp_path: Path, bus_jpg: bytes) -> None:
    stack = agent_stack
    agent = start_agent(
        tmp_path / "a", server_url=stack.service_proxy.url, device_id="dev-happy", labels={"lane": "happy"}
    )
    try:
        assert agent.detect(bus_jpg).status_code == 503  # nothing validated yet
        assert httpx.get(agent.url + "/healthz").status_code == 503
        stack.roll_out("happy", "good1")
        status = agent.wait_serving(stack.versions["good1"])
        assert status["serving"]["variant"] == "cpu-fp32"
        answer = agent.detect(bus_jpg)
        assert answer.status_code == 200
        body = answer.json()
        assert body["version"] == stack.versions["good1"] and body["model"] == stack.versions.model
        for d in body["detections"]:
            assert set(d) == {"box", "score", "class_id", "class_name"} and 0 < d["score"] <= 1

        stack.roll_out("happy", "good2")
        agent.wait_serving(stack.versions["good2"])
        assert agent.detect(bus_jpg).json()["version"] == stack.versions["good2"]
        device = stack.fleet.wait_for(
            "the commit to reach the service",
            lambda: (d := stack.device("dev-happy"))["current_version"] == stack.versions["good2"] and d,
        )
        states = [e["state"] for e in stack.events("dev-happy") if e["version"] == stack.versions["good2"]]
        for step in ("downloading", "verifying", "validating", "swapping", "probation", "committed"):
            assert step in states, states
        assert states.index("downloading") < states.index("validating") < states.index("committed")
        assert device["state"] == "committed"
        metrics = httpx.get(agent.url + "/metrics").text
        assert f'yolo_ota_agent_serving{{model="{stack.versions.model}",version="{stack.versions["good2"]}"' in metrics
    finally:
        agent.stop()


def test_digest_mismatch_is_refused(agent_stack: AgentStack, tmp_path: Path) -> None:
    agent = lane_agent(agent_stack, tmp_path, "digest")
    try:
        rule = agent_stack.mlflow_proxy.add_rule(Corrupt("model.torchscript"))
        try:
            refused(agent_stack, agent, "good2", "digest mismatch")
        finally:
            agent_stack.mlflow_proxy.clear_rules()
        assert rule.applied >= 2  # fetched again once before giving up
    finally:
        agent.stop()
