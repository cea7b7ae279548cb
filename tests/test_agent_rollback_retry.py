"""A rollback that fails is tried again, with backoff, in the same process, until the last known good version
serves again (DESIGN.md section 7; the (rolling_back, failed) -> rolling_back row of ``TRANSITIONS``).

The fault is real: the last known good version's model files are moved out of its installed folder, so loading
it for serving raises; the agent is brought into rolling_back by a SIGKILL in probation and a restart.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agent_stack import AgentStack, lane_agent

from edge_agent.store import VersionStore

pytestmark = pytest.mark.slow  # waits through several backoff periods


def test_a_failed_rollback_is_retried_until_the_last_known_good_serves(
    agent_stack: AgentStack, tmp_path: Path, bus_jpg: bytes
) -> None:
    stack = agent_stack
    lane = "rollback-retry"
    good1, good2 = stack.versions["good1"], stack.versions["good2"]
    agent = lane_agent(stack, tmp_path, lane)
    agent.stop()
    agent = agent.restart(settings={"PAUSE_ON_ENTER": json.dumps({"probation": 60})})
    try:
        stack.roll_out(lane, "good2")
        agent.wait_for("the agent to sit in probation", lambda s: s["state"] == "probation")
        agent.kill()
        variants = VersionStore(agent.data_dir).installed_dir(stack.versions.model, good1) / "variants"
        away = variants.with_name("variants.away")
        variants.rename(away)  # good1's manifest stays; every model file it names is gone
        agent = agent.restart()

        status = agent.wait_for(
            "two failed rollback attempts",
            lambda s: s["state"] == "rolling_back" and ((s["retrying"] or {}).get("failed_attempts") or 0) >= 2,
        )
        assert status["serving"] is None and status["last_known_good"]["version"] == good1  # good2 is not served
        assert status["retrying"]["error"]
        assert agent.detect(bus_jpg).status_code == 503  # the local API answers while the rollback waits
        log = agent.log_tail(50_000)
        assert f"rollback to {stack.versions.model} v{good1} failed (attempt 1)" in log, log
        assert "failed (attempt 2)" in log, log
        stack.fleet.wait_for(
            "the failed attempts to reach the service",
            lambda: [
                e for e in stack.events(agent.device_id)
                if e["version"] == good2 and e["state"] == "rolling_back" and not e["ok"]
                and "rollback attempt" in str(e["reason"])
            ],
        )  # fmt: skip
        pid = agent.process.pid

        away.rename(variants)  # the files are back: the next attempt loads good1
        status = agent.wait_serving(good1, timeout_s=60)
        assert agent.process.pid == pid and agent.process.poll() is None, "the rollback finished without a restart"
        assert status["retrying"] is None and status["target"] is None
        assert any(f":{good2}:" in key for key in status["rejected"])
        answer = agent.detect(bus_jpg)
        assert answer.status_code == 200 and answer.json()["version"] == good1
        assert "rolled back to" in agent.log_tail(50_000)

        def last_state() -> str | None:
            states = [str(e["state"]) for e in stack.events(agent.device_id) if e["version"] == good2]
            return states[-1] if states and states[-1] == "rolled_back" else None

        stack.fleet.wait_for("rolled_back to reach the service", last_state)
    finally:
        agent.kill()
