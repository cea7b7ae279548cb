"""What may run on a device, tried as an attacker on the factory network would, against real agent processes, the
real rollout service and a real MLflow (DESIGN.md section 9).

The attacker sits on the path between an agent and the service (the fault proxy the agents poll through): it can
replay answers it captured (it reads a device's token off the device, as a sniffer of plain HTTP would), hand one
device's answer to another, alter answers, or freeze a device on one answer. Releases and revocation lists are
signed by the release key; desired states by the service's key, which the agents pinned when they enrolled.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest
from agent_stack import AgentStack, lane_agent, refused
from agents import RunningAgent, start_agent
from faultproxy import FaultProxy, Rewrite, Status, rewrite_json
from servers import start_rollout_service

from exporters.bundle import MANIFEST_NAME
from yolo_ota.processes import RunningServer

pytestmark = pytest.mark.slow  # agent processes through whole updates


def _captured_answer(stack_url: str, agent: RunningAgent) -> bytes:
    """A desired-state answer exactly as the service sends it to ``agent``, taken with its token (a sniffer's
    copy of plain HTTP traffic)."""
    token = (agent.data_dir / "device-token").read_text().strip()
    answer = httpx.get(
        f"{stack_url}/v1/devices/{agent.device_id}/desired", headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    assert answer.status_code == 200, answer.text
    return answer.content


def _statement(answer: bytes) -> dict[str, Any]:
    document = json.loads(answer)["statement"]["document"]
    return dict(json.loads(base64.b64decode(document)))


def _refused_answer(agent: RunningAgent, fragment: str) -> dict[str, Any]:
    return agent.wait_for(
        f"an answer refused ({fragment})", lambda s: fragment in str((s.get("trust") or {}).get("last_refused_answer"))
    )


def test_a_replayed_answer_of_an_older_generation_is_refused_even_after_a_restart(
    agent_stack: AgentStack, tmp_path: Path, bus_jpg: bytes
) -> None:
    stack = agent_stack
    agent = lane_agent(stack, tmp_path, "replay")
    path = f"/v1/devices/{agent.device_id}/desired"
    try:
        old = _captured_answer(stack.service.url, agent)
        assert _statement(old)["version"] == stack.versions["good1"]
        stack.roll_out("replay", "good2")
        agent.wait_serving(stack.versions["good2"])
        agent.stop()
        agent = agent.restart()  # the generation it accepted is kept on disk
        agent.wait_serving(stack.versions["good2"])
        stack.service_proxy.add_rule(Status(path, 200, body=old))
        status = _refused_answer(agent, "older than generation")
        assert status["serving"]["version"] == stack.versions["good2"] and status["state"] == "idle"
        assert agent.detect(bus_jpg).json()["version"] == stack.versions["good2"]
    finally:
        stack.service_proxy.clear_rules()
        agent.stop()


def test_another_devices_answer_and_an_altered_answer_are_refused(agent_stack: AgentStack, tmp_path: Path) -> None:
    stack = agent_stack
    victim = lane_agent(stack, tmp_path, "victim")
    other = start_agent(
        tmp_path / "other", server_url=stack.service_proxy.url, device_id="dev-other", labels={"lane": "other"},
        public_key=stack.versions.public_key,
    )  # fmt: skip
    path = f"/v1/devices/{victim.device_id}/desired"
    try:
        stack.roll_out("other", "good2")
        other.wait_serving(stack.versions["good2"])
        foreign = _captured_answer(stack.service.url, other)
        stack.service_proxy.add_rule(Status(path, 200, body=foreign))
        _refused_answer(victim, "for device 'dev-other'")
        stack.service_proxy.clear_rules()

        # The plain fields say good2; the statement, which is what a device acts on, still says good1.
        real = json.loads(_captured_answer(stack.service.url, victim))
        forged = {**real, "version": stack.versions["good2"], "etag": '"f"', "downgrade": True, "force_gates": True}
        rule = stack.service_proxy.add_rule(Status(path, 200, body=json.dumps(forged).encode()))
        victim.wait_for("three forged answers taken", lambda s: rule.applied >= 3 and s["last_poll"]["ok"] is True)
        stack.service_proxy.clear_rules()

        # The statement itself altered to good2: its signature no longer holds.
        document = json.loads(base64.b64decode(real["statement"]["document"]))
        document["version"] = stack.versions["good2"]
        real["statement"]["document"] = base64.b64encode(json.dumps(document).encode()).decode()
        stack.service_proxy.add_rule(Status(path, 200, body=json.dumps(real).encode()))
        status = _refused_answer(victim, "not signed by the pinned service key")
        assert status["serving"]["version"] == stack.versions["good1"]
        assert not any(f":{stack.versions['good2']}:" in k for k in status["rejected"])  # never even tried
        assert stack.versions["good2"] not in {e["version"] for e in stack.events(victim.device_id)}
    finally:
        stack.service_proxy.clear_rules()
        victim.stop()
        other.stop()


def test_one_versions_manifest_with_anothers_answer_is_refused(agent_stack: AgentStack, tmp_path: Path) -> None:
    """Mix-and-match: good2's answer, with good1's manifest served at good2's manifest URL and the plain answer's
    digest changed to match it. The signed statement names good2's manifest digest."""
    stack = agent_stack
    agent = lane_agent(stack, tmp_path, "mix")
    try:
        good1 = json.loads(_captured_answer(stack.service.url, agent))
        good1_manifest = httpx.get(good1["manifest_url"], timeout=10).content
        good1_digest = good1["manifest_sha256"]

        def good1_digest_in_plain_field(answer: dict[str, Any]) -> None:
            answer["manifest_sha256"] = good1_digest

        plain = Rewrite(f"/v1/devices/{agent.device_id}/desired", rewrite_json(good1_digest_in_plain_field))
        stack.service_proxy.add_rule(plain)
        # The service has read good2's manifest (the check below resolves it): the rule then reaches the device only.
        good2 = stack.versions["good2"]
        stack.fleet.op(
            "GET", f"/v1/devices/{agent.device_id}", params={"model": stack.versions.model, "version": good2}
        )
        stack.mlflow_proxy.add_rule(Rewrite(MANIFEST_NAME, lambda _body: good1_manifest))
        refused(stack, agent, "good2", "the service vouches for")
    finally:
        stack.service_proxy.clear_rules()
        stack.mlflow_proxy.clear_rules()
        agent.stop()


def test_an_older_release_needs_an_operators_order(agent_stack: AgentStack, tmp_path: Path) -> None:
    stack = agent_stack
    agent = lane_agent(stack, tmp_path, "older")
    older = stack.versions["older"]
    try:
        # The service refuses a rollout that would take the lane's devices back to an older release...
        answer = stack.fleet.http.post(
            "/v1/rollouts", headers=stack.fleet._operator,
            json={"model": stack.versions.model, "version": older, "strategy": "immediate",
                  "selector": {"labels": {"lane": "older"}}, "supersede": True},
        )  # fmt: skip
        assert answer.status_code == 409 and "downgrade" in answer.json()["detail"], answer.text
        # ... and where it cannot know what a device runs (another device set, no rollout of it completed), the
        # device itself refuses the older signed release: no operator ordered the downgrade.
        site = start_agent(
            tmp_path / "site", server_url=stack.service_proxy.url, device_id="dev-older-site",
            labels={"lane": "older-site-lane", "site": "older-site"}, public_key=stack.versions.public_key,
        )  # fmt: skip
        try:
            stack.roll_out("older-site-lane", "good1")
            site.wait_serving(stack.versions["good1"])
            stack.fleet.create_rollout(
                model=stack.versions.model, version=older, strategy="immediate",
                selector={"labels": {"site": "older-site"}},
            )  # fmt: skip
            status = site.wait_for(
                "the older release refused", lambda s: any(f":{older}:" in k for k in s["rejected"]), timeout_s=90
            )
            assert status["serving"]["version"] == stack.versions["good1"]
            events = stack.fleet.wait_for(
                "the refusal at the service",
                lambda: [e for e in stack.events(site.device_id) if e["version"] == older and not e["ok"]],
            )
            assert any("no operator's order to downgrade" in str(e["reason"]) for e in events), events
        finally:
            site.stop()
        # With the order, signed into the desired state, the device takes it.
        ordered = stack.roll_out("older", "older", allow_downgrade=True)
        agent.wait_serving(older)
        assert "downgrade ordered by operator:tester" in stack.fleet.audit(ordered["id"])[0]["reason"]
    finally:
        agent.stop()


def test_a_version_whose_gates_failed_runs_only_on_a_recorded_force(agent_stack: AgentStack, tmp_path: Path) -> None:
    stack = agent_stack
    agent = lane_agent(stack, tmp_path, "forced")
    try:
        refused_rollout = stack.fleet.http.post(
            "/v1/rollouts", headers=stack.fleet._operator,
            json={"model": stack.versions.model, "version": stack.versions["failed_gates"], "strategy": "immediate",
                  "selector": {"labels": {"lane": "forced"}}, "supersede": True},
        )  # fmt: skip
        assert refused_rollout.status_code == 422 and "did not pass its gates" in refused_rollout.text
        rollout = stack.roll_out("forced", "failed_gates", force_gates=True, reason="the export machine is slow")
        agent.wait_serving(stack.versions["failed_gates"])
        created = stack.fleet.audit(rollout["id"])[0]
        assert "gates forced by operator:tester" in created["reason"]
    finally:
        agent.stop()


def test_a_revoked_version_is_refused_by_the_service_and_by_devices(
    agent_stack: AgentStack, mlflow_server: RunningServer, tmp_path: Path
) -> None:
    from servers import OPERATOR_TOKEN

    stack = agent_stack
    good3 = stack.versions["good3"]
    # A rollout of good3 waits for a device that has not started yet.
    stack.roll_out("revoked", "good3")
    signing_key = stack.versions.public_key.with_name("signing-key.pem")
    env = {**os.environ, "COLUMNS": "200"}
    done = subprocess.run(
        [sys.executable, "-m", "yolo_ota.cli", "revoke", stack.versions.model, good3, "--reason", "misses bridges",
         "--signing-key", str(signing_key), "--mlflow-uri", mlflow_server.url, "--server", stack.service.url,
         "--token", OPERATOR_TOKEN],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"version {good3} revoked" in done.stderr
    listed = stack.fleet.op("GET", "/v1/revocations")
    assert [(e["version"], e["reason"]) for e in listed["revoked"]] == [(good3, "misses bridges")]

    again = stack.fleet.http.post(
        "/v1/rollouts", headers=stack.fleet._operator,
        json={"model": stack.versions.model, "version": good3, "strategy": "immediate",
              "selector": {"labels": {"lane": "revoked-2"}}},
    )  # fmt: skip
    assert again.status_code == 422 and "revoked" in again.json()["detail"], again.text

    agent = start_agent(
        tmp_path / "revoked", server_url=stack.service_proxy.url, device_id="dev-revoked", labels={"lane": "revoked"},
        public_key=stack.versions.public_key,
    )  # fmt: skip
    try:
        status = agent.wait_for("good3 refused", lambda s: any(f":{good3}:" in k for k in s["rejected"]), 90)
        assert status["serving"] is None and status["trust"]["revocations_sequence"] == listed["sequence"]
        events = [e for e in stack.events(agent.device_id) if e["version"] == good3 and not e["ok"]]
        assert any("revocation list: misses bridges" in str(e["reason"]) for e in events), events
    finally:
        agent.stop()

    # A list the release key did not sign, or one that drops an entry, is refused by the service.
    from exporters.revocations import RevocationList
    from exporters.signed_documents import sign_document
    from exporters.signing import generate_keypair, load_private_key

    stranger, _ = generate_keypair(tmp_path / "stranger")
    forged = sign_document(load_private_key(stranger), RevocationList(sequence=99, issued_at=0))
    answer = stack.fleet.http.put("/v1/revocations", headers=stack.fleet._operator, json=forged.model_dump())
    assert answer.status_code == 422 and "does not verify" in answer.text, answer.text
    emptied = sign_document(load_private_key(signing_key), RevocationList(sequence=99, issued_at=0))
    answer = stack.fleet.http.put("/v1/revocations", headers=stack.fleet._operator, json=emptied.model_dump())
    assert answer.status_code == 409 and "not undone" in answer.text, answer.text


def test_a_device_frozen_on_one_answer_reports_stale_and_keeps_serving(
    agent_stack: AgentStack, mlflow_server: RunningServer, tmp_path: Path, bus_jpg: bytes
) -> None:
    """The attacker answers every poll with the last real answer (an indefinite freeze). Statements hold 8 s
    here; once the last one expires, the device refuses the replayed answer, reports ``stale`` and serves on."""
    stack = agent_stack
    service = start_rollout_service(
        tmp_path / "service", mlflow_url=mlflow_server.url,
        settings={"WATCH_MODELS": stack.versions.model, "ALIAS_POLL_INTERVAL_S": "3600", "POLL_INTERVAL_S": "1",
                  "DESIRED_STATE_VALIDITY_S": "8"},
    )  # fmt: skip
    proxy = FaultProxy(service.url).start()
    agent = start_agent(
        tmp_path / "frozen", server_url=proxy.url, device_id="dev-frozen", labels={"lane": "frozen"},
        public_key=stack.versions.public_key,
    )  # fmt: skip
    try:
        from fleet import Fleet

        fleet = Fleet(service.url)
        fleet.create_rollout(model=stack.versions.model, version=stack.versions["good1"], strategy="immediate")
        agent.wait_serving(stack.versions["good1"])
        proxy.add_rule(Status("/desired", 200, body=_captured_answer(service.url, agent)))
        agent.wait_for(
            "stale, and the replayed answer refused as expired",
            lambda s: bool(s["trust"]["stale"]) and "expired" in str(s["trust"]["last_refused_answer"]),
            timeout_s=40,
        )
        assert agent.detect(bus_jpg).json()["version"] == stack.versions["good1"]
        stale = fleet.wait_for(
            "the stale event at the service",
            lambda: [e for e in fleet.op("GET", "/v1/devices/dev-frozen")["last_events"] if e["state"] == "stale"],
        )
        assert not stale[0]["ok"] and "withheld, replayed" in stale[0]["reason"]
        proxy.clear_rules()
        agent.wait_for("fresh again", lambda s: s["trust"]["stale"] is None and s["last_poll"]["ok"] is True)
        fleet.close()
    finally:
        agent.stop()
        proxy.stop()
        service.stop()


def test_an_agent_without_a_release_key_refuses_to_start_unless_told(tmp_path: Path) -> None:
    base = [sys.executable, "-m", "yolo_ota.cli", "agent", "--server", "http://127.0.0.1:9", "--device-id", "cam-9",
            "--data-dir", str(tmp_path / "agent"), "--listen", "off"]  # fmt: skip
    done = subprocess.run(base, capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "no release public key" in lines[0] and "--allow-unsigned" in lines[0], done.stderr

    told = start_agent(tmp_path / "told", server_url="http://127.0.0.1:9", device_id="cam-10")  # --allow-unsigned
    try:
        assert told.status()["release_signatures"].startswith("UNSIGNED (--allow-unsigned)")
        assert "UNSIGNED (--allow-unsigned)" in told.log_tail()
    finally:
        told.stop()
