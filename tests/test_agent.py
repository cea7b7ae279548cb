"""The edge agent as a real process against a real rollout service and MLflow: the happy path and each fault.

Every fault test ends with the agent serving a validated model and the service holding the reason.
"""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest
from agent_stack import AgentStack, AgentVersions, lane_agent, refused
from agents import start_agent
from faultproxy import Corrupt, Cut, Rewrite, rewrite_json
from fleet import Fleet
from prometheus_client.parser import text_string_to_metric_families
from servers import ENROLLMENT_TOKEN, start_rollout_service

from yolo_ota.processes import RunningServer

pytestmark = pytest.mark.slow  # agent processes through whole updates: 20-30 s each


def test_happy_path_rollout_to_detect(agent_stack: AgentStack, tmp_path: Path, bus_jpg: bytes) -> None:
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

        rollout = stack.roll_out("happy", "good2")
        agent.wait_serving(stack.versions["good2"])
        for _ in range(5):
            assert agent.detect(bus_jpg).json()["version"] == stack.versions["good2"]
        # Telemetry of the new version reaches the service and is counted in the rollout's treatment arm.
        arm = stack.fleet.wait_for(
            "telemetry in the rollout",
            lambda: next((a for a in stack.fleet.rollout(rollout["id"])["arms"] if a["inferences"] >= 5), None),
        )
        assert arm["version"] == stack.versions["good2"] and arm["errors"] == 0 and arm["latency_p99_ms"] > 0
        device = stack.fleet.wait_for(
            "the commit to reach the service",
            lambda: (d := stack.device("dev-happy"))["current_version"] == stack.versions["good2"] and d,
        )
        states = [e["state"] for e in stack.events("dev-happy") if e["version"] == stack.versions["good2"]]
        for step in ("downloading", "verifying", "validating", "swapping", "probation", "committed"):
            assert step in states, states
        assert states.index("downloading") < states.index("validating") < states.index("committed")
        assert device["state"] == "committed"
        metrics = {f.name: f for f in text_string_to_metric_families(httpx.get(agent.url + "/metrics").text)}
        (serving,) = metrics["yolo_ota_agent_serving"].samples
        assert (serving.labels["model"], serving.labels["version"]) == (stack.versions.model, stack.versions["good2"])
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


@pytest.mark.parametrize(
    ("role", "fragment"),
    [
        ("badsig", "does not match"),  # signed by another key
        ("unsigned", "unsigned"),  # no signature while the agent has a public key
        ("shifted", "detection_parity"),  # boxes moved: fails detection parity on the device
        ("slow", "latency"),  # a budget this device cannot meet
    ],
)
def test_refused_before_the_swap(agent_stack: AgentStack, tmp_path: Path, role: str, fragment: str) -> None:
    agent = lane_agent(agent_stack, tmp_path, role)
    try:
        refused(agent_stack, agent, role, fragment)
        assert not list(agent.data_dir.glob("staging/*/*/variants")), "a refused offer's staging is discarded"
        assert [i.endswith(f"v{agent_stack.versions['good1']}") for i in agent.status()["installed"]] == [True]
    finally:
        agent.stop()


def test_incompatible_fingerprint_is_refused(agent_stack: AgentStack, tmp_path: Path) -> None:
    """The service judged by the fingerprint the device enrolled with (torch 99.9); the agent judges by its own."""
    stack = agent_stack
    device = stack.fleet.enroll("dev-newer", labels={"lane": "newer"}, torch="99.9")
    data_dir = tmp_path / "newer"
    data_dir.mkdir()
    (data_dir / "device-token").write_text(device.token)  # provisioned out of band: the agent uses it as is
    agent = start_agent(
        data_dir, server_url=stack.service_proxy.url, device_id="dev-newer", public_key=stack.versions.public_key
    )
    try:
        stack.roll_out("newer", "good1")
        agent.wait_serving(stack.versions["good1"])
        refused(stack, agent, "newer_torch", "incompatible fingerprint")
    finally:
        agent.stop()


def test_failing_after_the_swap_rolls_back_without_failing_requests(
    agent_stack: AgentStack, tmp_path: Path, bus_jpg: bytes
) -> None:
    """The nan version passes validation, then returns NaN in probation: the agent rolls back to good1, and
    requests that hit the bad model are answered by the standby, so the client sees no failure."""
    settings = {"PROBATION_INFERENCES": "80", "PROBATION_MIN_INFERENCES": "60", "PROBATION_S": "3"}
    agent = lane_agent(agent_stack, tmp_path, "probation", settings=settings)
    stop = threading.Event()
    answers: list[tuple[int, str | None]] = []

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                response = http.post(agent.url + "/v1/detect", content=bus_jpg)
                answers.append((response.status_code, response.json().get("version")))

    thread = threading.Thread(target=client)
    thread.start()
    try:
        status = refused(agent_stack, agent, "nan", "NaN")
        assert status["standby"] is None
        stop.set()
        thread.join()
        assert answers and all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200][:3]
        events = agent_stack.events(agent.device_id)
        nan_states = [e["state"] for e in events if e["version"] == agent_stack.versions["nan"]]
        assert "probation" in nan_states and "rolled_back" in nan_states and "committed" not in nan_states
    finally:
        stop.set()
        thread.join()
        agent.stop()


def test_cut_download_resumes_with_a_range_request(agent_stack: AgentStack, tmp_path: Path) -> None:
    agent = lane_agent(agent_stack, tmp_path, "cut")
    proxy = agent_stack.mlflow_proxy
    try:
        rule = proxy.add_rule(Cut("model.torchscript", after_bytes=1_000_000, times=1))
        before = len(proxy.seen)
        agent_stack.roll_out("cut", "good2")
        agent.wait_serving(agent_stack.versions["good2"])
        assert rule.applied == 1
        ranged = [s for s in proxy.seen[before:] if "model.torchscript" in s.path and s.range]
        assert ranged and ranged[0].status == 206, proxy.seen[before:]
        offset = int(ranged[0].range.removeprefix("bytes=").removesuffix("-"))  # type: ignore[union-attr]
        assert 0 < offset <= 1_000_000  # what reached the disk before the cut, in whole chunks
        assert f"resuming at byte {offset} of" in agent.log_tail(20000)
    finally:
        proxy.clear_rules()
        agent.stop()


def test_service_outage_keeps_serving_and_delivers_reports_later(
    agent_stack: AgentStack, tmp_path: Path, bus_jpg: bytes
) -> None:
    stack = agent_stack
    agent = lane_agent(stack, tmp_path, "outage", settings={"PAUSE_ON_ENTER": '{"downloading": 1.5}'})
    good2 = stack.versions["good2"]
    try:
        stack.roll_out("outage", "good2")
        agent.wait_for("the download to start", lambda s: s["state"] == "downloading")
        stack.service_proxy.down = True
        # The update goes on (files come from MLflow), and so does serving.
        status = agent.wait_serving(good2)
        assert agent.detect(bus_jpg).json()["version"] == good2
        status = agent.wait_for("a failed poll", lambda s: s["last_poll"]["ok"] is False)
        assert status["reports_queued"] > 0
        assert stack.device("dev-outage")["current_version"] == stack.versions["good1"]  # nothing arrived yet
    finally:
        stack.service_proxy.down = False
    try:
        stack.fleet.wait_for("the queued reports", lambda: stack.device("dev-outage")["current_version"] == good2)
        states = [e["state"] for e in stack.events("dev-outage") if e["version"] == good2]
        assert {"validating", "swapping", "probation", "committed"} <= set(states), states
        agent.wait_for("an empty outbox", lambda s: s["reports_queued"] == 0)
    finally:
        agent.stop()


def test_path_traversal_entry_is_refused(agent_stack: AgentStack, tmp_path: Path) -> None:
    """A desired state (as a compromised or buggy service could send) naming a file outside the staging folder."""
    stack = agent_stack
    agent = lane_agent(stack, tmp_path, "traversal")
    good2 = stack.versions["good2"]

    def add_escape(desired: dict[str, object]) -> dict[str, object]:
        if desired.get("version") == good2:
            files = list(desired["files"])  # type: ignore[call-overload]
            files.append({**files[0], "path": "../../../escaped.bin"})
            desired["files"] = files
        return desired

    stack.service_proxy.add_rule(Rewrite("dev-traversal/desired", rewrite_json(add_escape)))
    try:
        refused(stack, agent, "good2", "leaves the bundle directory")
        assert not list(tmp_path.rglob("escaped.bin"))
    finally:
        stack.service_proxy.clear_rules()
        agent.stop()


def test_python_api_in_process(agent_stack: AgentStack, tmp_path: Path, bus_jpg: bytes) -> None:
    """The same agent embedded in a program: no HTTP server, detections from a numpy image."""
    from edge_agent import Agent, AgentSettings
    from exporters.preprocess import decode_image_bytes

    stack = agent_stack
    settings = AgentSettings(
        server=stack.service.url,
        device_id="dev-inproc",
        data_dir=tmp_path / "inproc",
        enrollment_token=ENROLLMENT_TOKEN,
        allow_unsigned=True,
        listen=None,
        labels={"lane": "inproc"},
        poll_interval_s=0.3,
        report_interval_s=0.5,
        probation_s=1.0,
        probation_min_inferences=5,
        memory_headroom=0.02,
        min_free_bytes=0,
    )
    agent = Agent(settings).start()
    try:
        stack.roll_out("inproc", "good1")
        stack.fleet.wait_for("the in-process agent to serve", lambda: agent.status()["state"] == "idle" and
                             agent.runtime.serving is not None, timeout_s=90)  # fmt: skip
        result = agent.detect(decode_image_bytes(bus_jpg))
        assert result.version == stack.versions["good1"] and result.model == stack.versions.model
        assert result.detections == agent.detect(bus_jpg).detections  # array and bytes take the same path
    finally:
        agent.stop()


def test_promotion_in_mlflow_reaches_the_agent(
    agent_versions: AgentVersions, mlflow_server: RunningServer, tmp_path: Path, bus_jpg: bytes
) -> None:
    """The whole loop from a person's promotion: alias ``production`` set in MLflow -> the service's canary ->
    the agent downloads, validates, swaps, commits and reports -> ``POST /v1/detect`` answers from it."""
    from mlflow import MlflowClient

    from registry.mlflow_gateway import MlflowGateway

    service = start_rollout_service(
        tmp_path / "service",
        mlflow_url=mlflow_server.url,
        settings={
            "WATCH_MODELS": agent_versions.model,
            "POLL_INTERVAL_S": "1",
            "DEFAULT_WAVES": '[{"percent": 100, "bake_s": 0, "max_failure_rate": 0.5, "min_success_rate": 0.5}]',
        },
    )
    agent = start_agent(tmp_path / "agent", server_url=service.url, device_id="dev-promoted")
    fleet = Fleet(service.url)
    version = agent_versions["good2"]
    try:
        MlflowGateway(mlflow_server.url).promote(agent_versions.model, version)
        agent.wait_serving(version, timeout_s=120)
        answer = agent.detect(bus_jpg)
        assert answer.status_code == 200 and answer.json()["version"] == version
        rollouts = fleet.op("GET", "/v1/rollouts")["rollouts"]
        assert [(r["version"], r["created_by"]) for r in rollouts] == [(version, "mlflow-alias")], rollouts
        rollout = fleet.wait_state(rollouts[0]["id"], "completed")
        assert rollout["arms"][0]["succeeded"] == 1
        events = fleet.op("GET", "/v1/devices/dev-promoted")["last_events"]
        assert {"downloading", "validating", "committed"} <= {e["state"] for e in events if e["version"] == version}
    finally:
        MlflowClient(mlflow_server.url).delete_registered_model_alias(agent_versions.model, "production")
        fleet.close()
        agent.stop()
        service.stop()


def test_an_agent_waits_for_its_key_to_be_accepted_and_no_other_key_displaces_it(
    agent_stack: AgentStack, tmp_path: Path
) -> None:
    """A real agent enrolls with its own key through a token that auto-accepts nobody: it waits, serving nothing
    new, until an operator accepts it; then another key for its id changes nothing for it."""
    import stat

    from exporters.device_identity import KEY_FILE, DeviceKey, enrollment_body
    from exporters.fingerprint import collect

    stack = agent_stack
    token = stack.fleet.op("POST", "/v1/enrollment-tokens", json={"name": "agent-wait"}, expect=201)["token"]
    agent = start_agent(
        tmp_path / "w", server_url=stack.service_proxy.url, device_id="dev-waits", labels={"lane": "waits"},
        enrollment_token=token,
    )  # fmt: skip
    try:
        agent.wait_for("the pending enrollment", lambda s: "waits for an operator" in str(s["last_poll"]["error"]))
        key_file = tmp_path / "w" / KEY_FILE
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        assert stack.device("dev-waits")["status"] == "pending"
        stack.roll_out("waits", "good1")
        assert agent.status()["serving"] is None

        stack.fleet.op("POST", "/v1/devices/dev-waits/accept")
        agent.wait_serving(stack.versions["good1"])

        other = enrollment_body(
            DeviceKey.generate(), "dev-waits", fingerprint=collect().model_dump(mode="json"), enrollment_token=token
        )
        assert stack.fleet.http.post("/v1/devices/enroll", json=other).status_code == 202
        polls = agent.status()["last_poll"]["at"]
        status = agent.wait_for(
            "two more good polls", lambda s: s["last_poll"]["ok"] and s["last_poll"]["at"] > polls + 0.5
        )
        assert status["serving"]["version"] == stack.versions["good1"]
        assert stack.device("dev-waits")["public_key"] == DeviceKey.load_or_create(tmp_path / "w").public_key
    finally:
        agent.stop()
