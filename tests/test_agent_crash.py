"""Crash matrix: SIGKILL the agent while it sits in each update state, start it again, and check that it ends
serving a validated version, as DESIGN.md section 7's table says, with the history reported to the service.

The agent is held in a state with its ``pause_on_enter`` drill setting, which waits right after the state is
saved (the same point a kill between two steps would hit).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agent_stack import AgentStack, lane_agent

pytestmark = pytest.mark.slow  # the SIGKILL matrix: about 40 s per state

PROBATION_WITH_TRAFFIC = {"PROBATION_INFERENCES": "80", "PROBATION_MIN_INFERENCES": "60", "PROBATION_S": "3"}

# state killed in -> (version rolled out, version served in the end, last event the service must get)
MATRIX = {
    "downloading": ("good2", "good2", "committed"),
    "verifying": ("good2", "good2", "committed"),
    "validating": ("good2", "good2", "committed"),
    "swapping": ("good2", "good1", "rolled_back"),
    "probation": ("good2", "good1", "rolled_back"),
    "committed": ("good2", "good2", "committed"),
    "rolling_back": ("nan", "good1", "rolled_back"),
}


@pytest.mark.parametrize("state", list(MATRIX))
def test_sigkill_in_each_state_recovers(agent_stack: AgentStack, tmp_path: Path, bus_jpg: bytes, state: str) -> None:
    stack = agent_stack
    offered, final, last_event = MATRIX[state]
    lane = f"crash-{state}".replace("_", "-")
    agent = lane_agent(stack, tmp_path, lane)
    agent.stop()
    drill = {"PAUSE_ON_ENTER": json.dumps({state: 60}), **PROBATION_WITH_TRAFFIC}
    agent = agent.restart(settings=drill)
    try:
        stack.roll_out(lane, offered)
        agent.wait_for(f"the agent to sit in {state}", lambda s: s["state"] == state)
        agent.kill()
        agent = agent.restart(settings=PROBATION_WITH_TRAFFIC)
        status = agent.wait_serving(stack.versions[final])
        assert status["standby"] is None and status["target"] is None
        version = stack.versions[offered]
        if final == "good1":
            assert any(f":{version}:" in key for key in status["rejected"])

        def reported() -> list[str] | None:
            states = [str(e["state"]) for e in stack.events(agent.device_id) if e["version"] == version]
            return states if state in states and states[-1] == last_event else None

        states = stack.fleet.wait_for(f"{last_event} after the restart to reach the service", reported)
        assert states[0] == "downloading", states
        device = stack.device(agent.device_id)
        assert device["current_version"] == stack.versions[final if last_event == "committed" else "good1"]
        answer = agent.detect(bus_jpg)
        assert answer.status_code == 200 and answer.json()["version"] == stack.versions[final]
    finally:
        agent.kill()
