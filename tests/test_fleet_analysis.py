"""The fleet analysis end to end: real agents serve real bundles of the trained detector to real traffic, and the
rollout service judges the telemetry they report (contract sections C and D).

One MLflow, one rollout service (SQLite) and four agent subprocesses (labelled ``lane=analysis``) serve the whole
module; a background thread per agent posts held-out synthetic scenes to its ``/v1/detect`` all along. Every
rollout names its previous (control) version, so a scenario does not depend on where the one before left the
devices: the control devices are sent back to it. A first wave of 50 % holds exactly two of the four devices
(the cohort is spread by rank).
"""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from agents import RunningAgent, start_agent
from fleet import Fleet
from servers import start_rollout_service

from exporters.bundle import read_manifest, write_manifest
from exporters.drills import set_latency_budget, set_product_line
from yolo_ota.processes import RunningServer

pytestmark = pytest.mark.slow  # four agents under traffic, five rollouts

MODEL = "analysis-line"
LANE = "analysis"
DEVICES = 4
SIZE = 160
SCENES_SEED = 4242  # not the training seed (0), nor the golden scenes' (1234)
DROPPED = 2  # solder_bridge: the variant tests show the detector finds it on most scenes
DROPPED_METRIC = "class_rate:solder_bridge"
EXTRA_MS = 60.0  # the slowed copy's extra time per forward pass (calibrated on one thread)
FIRST_WAVE = 50  # two of the four ranked devices
ANALYSIS = {"enabled": True, "min_windows": 15, "interval_s": 1}
NO_SHADOW = {"enabled": False}
AGENT_SETTINGS = {"REPORT_INTERVAL_S": "0.3", "POLL_INTERVAL_S": "0.3", "PROBATION_S": "1"}


def _export(weights: Path, out: Path, scenes: list[Path], budget_ms: float, release: int | None) -> Path:
    """A bundle of ``MODEL``, of the same release as the base: the versions are alternatives, not successors."""
    from exporters.export import ExportRequest, export_bundle

    result = export_bundle(
        ExportRequest(
            model=str(weights), out_dir=out, imgsz=(SIZE, SIZE), variants=("cpu-fp32",), golden_images=tuple(scenes),
            name=MODEL, release=release,
        )
    )  # fmt: skip
    assert result.passed, result.manifest.gates
    return _prepared(out, budget_ms)


def _prepared(bundle: Path, budget_ms: float) -> Path:
    """A generous budget (and so a distinct manifest per version); few timed runs in the device's validation."""
    set_latency_budget(bundle, budget_ms)
    manifest = read_manifest(bundle)
    thresholds = manifest.thresholds.model_copy(update={"warmup_iters": 2, "timed_iters": 5})
    write_manifest(bundle, manifest.model_copy(update={"thresholds": thresholds}))
    return bundle


@pytest.fixture(scope="module")
def versions(
    trained_detector: Path,
    trained_bundle: Path,
    scene_images: list[Path],
    mlflow_server: RunningServer,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:
    """base: the trained detector's bundle; same: it exported again; dropped: never reports DROPPED; slow: slower."""
    from exporters.yolo_variants import drop_class, slow_down
    from registry.mlflow_gateway import MlflowGateway

    root = tmp_path_factory.mktemp("analysis-versions")
    base = root / "base"
    shutil.copytree(trained_bundle, base)
    set_product_line(base, MODEL)
    release = read_manifest(base).release
    built = {
        "base": _prepared(base, 10_000),
        "same": _export(trained_detector, root / "same", scene_images, 20_000, release),
        "dropped": _export(drop_class(trained_detector, DROPPED, root / "dropped.pt"), root / "dropped",
                           scene_images, 30_000, release),
        "slow": _export(slow_down(trained_detector, EXTRA_MS, root / "slow.pt"), root / "slow", scene_images, 40_000,
                        release),
    }  # fmt: skip
    gateway = MlflowGateway(mlflow_server.url)
    return {role: gateway.register_bundle(path, MODEL).version.version for role, path in built.items()}


def _scene_bytes(count: int) -> list[bytes]:
    import cv2

    from exporters.synthetic import make_scene

    rng = np.random.default_rng(SCENES_SEED)
    return [cv2.imencode(".png", make_scene(rng, SIZE)[0])[1].tobytes() for _ in range(count)]


@dataclass
class AnalysisFleet:
    service: RunningServer
    fleet: Fleet
    agents: list[RunningAgent]
    versions: dict[str, str]
    mlflow_url: str
    stop: threading.Event = field(default_factory=threading.Event)
    answered: list[int] = field(default_factory=list)  # per agent

    def canary(self, role: str, previous: str, analysis: dict[str, Any], bake_s: float = 5) -> dict[str, Any]:
        return self.fleet.create_rollout(
            model=MODEL,
            version=self.versions[role],
            previous_version=self.versions[previous],
            strategy="canary",
            selector={"labels": {"lane": LANE}},
            waves=[{"percent": FIRST_WAVE, "bake_s": bake_s}, {"percent": 100, "bake_s": 0}],
            analysis={**ANALYSIS, **analysis},
            shadow=NO_SHADOW,
            supersede=True,
        )

    def serving(self) -> list[str | None]:
        return [(agent.status()["serving"] or {}).get("version") for agent in self.agents]

    def report(self, rollout_id: int) -> dict[str, Any]:
        return self.fleet.op("GET", f"/v1/rollouts/{rollout_id}/analysis")

    def tags(self, role: str) -> dict[str, str]:
        from mlflow import MlflowClient

        return dict(MlflowClient(tracking_uri=self.mlflow_url).get_model_version(MODEL, self.versions[role]).tags)

    def wait_end(self, rollout_id: int, states: set[str], timeout_s: float = 240) -> dict[str, Any]:
        def ended() -> dict[str, Any] | None:
            rollout = self.fleet.rollout(rollout_id)
            return rollout if rollout["state"] in states else None

        try:
            return self.fleet.wait_for(f"rollout {rollout_id} to be one of {sorted(states)}", ended, timeout_s)
        except AssertionError as exc:
            state = self.fleet.rollout(rollout_id)
            raise AssertionError(f"{exc}; rollout {state}; {figures(self.report(rollout_id))}") from None

    def wait_serving(self, expected: list[str], timeout_s: float = 180) -> None:
        self.fleet.wait_for(f"the agents to serve {expected}", lambda: sorted(map(str, self.serving())) == sorted(
            expected), timeout_s)  # fmt: skip


def figures(report: dict[str, Any]) -> str:
    """The latest verdict and each metric's figures, for failure messages."""
    latest = report["latest"]
    if latest is None:
        return "no verdict yet"
    lines = [f"{latest['verdict']} ({latest['action']}, {latest['treatment_windows']}/{latest['control_windows']} "
             f"windows): {latest['reason']}"]  # fmt: skip
    lines += [f"  {m['name']}: {m['verdict']} {m['reason']}" for m in latest["metrics"]]
    return "\n".join(lines)


def _traffic(agent: RunningAgent, scenes: list[bytes], seed: int, stop: threading.Event, counts: list[int],
             index: int) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    with httpx.Client(timeout=30) as http:
        while not stop.is_set():
            try:
                if http.post(agent.url + "/v1/detect", content=scenes[rng.integers(len(scenes))]).status_code == 200:
                    counts[index] += 1
            except httpx.HTTPError:
                time.sleep(0.1)
            time.sleep(0.01)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, mlflow_server: RunningServer, versions: dict[str, str]
) -> Iterator[AnalysisFleet]:
    service = start_rollout_service(
        tmp_path_factory.mktemp("analysis-service"),
        mlflow_url=mlflow_server.url,
        settings={"WATCH_MODELS": MODEL, "ALIAS_POLL_INTERVAL_S": "3600", "POLL_INTERVAL_S": "1"},
    )
    fleet = Fleet(service.url)
    root = tmp_path_factory.mktemp("analysis-agents")
    agents: list[RunningAgent] = []
    threads: list[threading.Thread] = []
    run = AnalysisFleet(service, fleet, agents, versions, mlflow_server.url)
    try:
        for index in range(DEVICES):
            agents.append(start_agent(root / f"a{index}", server_url=service.url, device_id=f"fa-{index}",
                                      labels={"lane": LANE}, settings=AGENT_SETTINGS))  # fmt: skip
        fleet.create_rollout(model=MODEL, version=versions["base"], strategy="immediate",
                             selector={"labels": {"lane": LANE}}, shadow=NO_SHADOW, supersede=True)  # fmt: skip
        for agent in agents:
            agent.wait_serving(versions["base"], timeout_s=300)
        scenes = _scene_bytes(48)
        run.answered.extend([0] * DEVICES)
        for index, agent in enumerate(agents):
            thread = threading.Thread(target=_traffic, args=(agent, scenes, index, run.stop, run.answered, index))
            thread.start()
            threads.append(thread)
        yield run
    finally:
        run.stop.set()
        for thread in threads:
            thread.join()
        for agent in agents:
            agent.stop()
        fleet.close()
        service.stop()


def _metric(entry: dict[str, Any], name: str) -> dict[str, Any]:
    found = [m for m in entry["metrics"] if m["name"] == name]
    assert len(found) == 1, [m["name"] for m in entry["metrics"]]
    return found[0]


def test_too_few_windows_is_inconclusive_and_pauses(stack: AnalysisFleet) -> None:
    analysis = {"min_windows": 5000, "inconclusive_timeout_s": 0, "on_inconclusive": "pause"}
    # Judged when the bake is over and the device has committed; the bake runs from the wave's start, so a device
    # that validates for longer than it may commit with no sample yet: fewer than the minimum all the same.
    rollout = stack.canary("same", "base", analysis, bake_s=2)
    rid = rollout["id"]
    ended = stack.wait_end(rid, {"paused", "halted", "completed", "rolled_back"})
    report = stack.report(rid)
    print(figures(report))
    assert ended["state"] == "paused", figures(report)
    assert ended["current_wave"] == 0
    latest = report["latest"]
    assert (latest["verdict"], latest["action"], latest["wave"]) == ("inconclusive", "pause", 0), figures(report)
    assert "inconclusive" in latest["reason"] and "of 5000 windows" in latest["reason"]
    assert latest["treatment_windows"] < 5000 and 0 < latest["control_windows"] < 5000
    assert all(m["verdict"] == "inconclusive" for m in latest["metrics"]), figures(report)
    assert {h["verdict"] for h in report["history"]} == {"inconclusive"}
    assert ended["analysis"]["id"] == latest["id"]
    actions = [e["action"] for e in stack.fleet.audit(rid)]
    assert "pause" in actions and "advance" not in actions and "complete" not in actions, actions
    assert sorted(map(str, stack.serving())).count(stack.versions["same"]) == 2  # the first wave only
    assert stack.tags("same")["ota.fleet.verdict"] == "inconclusive"


def test_equivalent_model_passes_and_the_rollout_completes(stack: AnalysisFleet) -> None:
    # The agents report every 0.3 s, a few frames a window: the analysis joins each device's windows into samples
    # of 20 frames (min_window_frames) and waits, up to the timeout, for 15 of them per arm.
    analysis = {"inconclusive_timeout_s": 240, "on_inconclusive": "halt"}
    rollout = stack.canary("same", "base", analysis, bake_s=4)
    rid = rollout["id"]
    ended = stack.wait_end(rid, {"completed", "halted", "paused", "rolled_back"}, timeout_s=300)
    report = stack.report(rid)
    history = report["history"]
    assert ended["state"] == "completed", figures(report)
    first = [h for h in history if h["wave"] == 0]
    decisive = [h for h in first if h["action"] == "advance"]
    assert len(decisive) == 1 and decisive[0]["verdict"] == "pass", [(h["verdict"], h["action"]) for h in first]
    assert all(h["verdict"] in ("pass", "inconclusive") for h in history), [h["reason"] for h in history]
    assert decisive[0]["treatment_windows"] >= 15 and decisive[0]["control_windows"] >= 15
    judged = [m for m in decisive[0]["metrics"] if m["verdict"] != "inconclusive"]
    assert {m["name"] for m in judged} >= {"latency_p99", "error_rate", "detections_per_image", DROPPED_METRIC}
    assert all(m["verdict"] == "pass" for m in judged), judged
    actions = [e["action"] for e in stack.fleet.audit(rid)]
    assert "advance" in actions and actions[-1] == "complete", actions
    stack.wait_serving([stack.versions["same"]] * DEVICES)
    assert stack.tags("same")["ota.fleet.verdict"] == history[0]["verdict"]
    print(figures({"latest": decisive[0]}))


def test_slower_model_fails_latency_only(stack: AnalysisFleet) -> None:
    rollout = stack.canary("slow", "same", {"on_fail": "halt"}, bake_s=60)
    rid = rollout["id"]
    ended = stack.wait_end(rid, {"halted", "completed", "paused", "rolled_back"})
    report = stack.report(rid)
    print(figures(report))
    latest = report["latest"]
    assert ended["state"] == "halted" and ended["current_wave"] == 0, figures(report)
    assert (latest["verdict"], latest["action"]) == ("fail", "halt"), figures(report)
    latency = _metric(latest, "latency_p99")
    assert latency["verdict"] == "fail" and latency["effect"] > 0.25, figures(report)
    others = [m for m in latest["metrics"] if m["name"] != "latency_p99" and m["verdict"] != "inconclusive"]
    assert {m["name"] for m in others} >= {"error_rate", "detections_per_image", DROPPED_METRIC}, figures(report)
    assert all(m["verdict"] == "pass" for m in others), figures(report)
    assert latest["reason"].startswith("fail: latency_p99 ")
    halts = [e for e in stack.fleet.audit(rid) if e["action"] == "halt"]
    assert len(halts) == 1 and "latency_p99" in halts[0]["reason"], halts
    tags = stack.tags("slow")
    assert tags["ota.fleet.verdict"] == "fail" and tags["ota.fleet.metric.latency_p99"] == "fail"
    assert tags["ota.fleet.rollout"] == str(rid)


def test_dropped_class_halts_the_canary_naming_the_class(stack: AnalysisFleet) -> None:
    rollout = stack.canary("dropped", "same", {"on_fail": "halt"}, bake_s=60)
    rid = rollout["id"]
    ended = stack.wait_end(rid, {"halted", "completed", "paused", "rolled_back"})
    report = stack.report(rid)
    print(figures(report))
    latest = report["latest"]
    assert ended["state"] == "halted" and ended["current_wave"] == 0, figures(report)
    assert (latest["verdict"], latest["action"]) == ("fail", "halt"), figures(report)
    dropped = _metric(latest, DROPPED_METRIC)
    assert dropped["verdict"] == "fail" and dropped["treatment"] == 0 and dropped["control"] > 0, figures(report)
    assert DROPPED_METRIC in latest["reason"]
    audit = stack.fleet.audit(rid)
    verdicts = [e for e in audit if e["action"] == "analysis" and e["reason"].startswith("wave 1: fail")]
    halts = [e for e in audit if e["action"] == "halt"]
    assert verdicts and DROPPED_METRIC in verdicts[-1]["reason"], audit
    assert len(halts) == 1 and DROPPED_METRIC in halts[0]["reason"] and halts[0]["actor"] == "scheduler", halts
    tags = stack.tags("dropped")
    assert tags["ota.fleet.verdict"] == "fail" and tags[f"ota.fleet.metric.{DROPPED_METRIC}"] == "fail", tags
    assert tags["ota.fleet.rollout"] == str(rid)
    # halted: the devices keep what they run, two on the dropped copy
    assert sorted(map(str, stack.serving())).count(stack.versions["dropped"]) == 2


def test_ab_picks_the_better_detector_and_ends_the_fleet_on_it(stack: AnalysisFleet) -> None:
    rollout = stack.fleet.create_rollout(
        model=MODEL,
        version=stack.versions["base"],
        strategy="ab",
        selector={"labels": {"lane": LANE}},
        ab={"control_version": stack.versions["dropped"], "split": 0.5, "auto_complete": True},
        analysis=ANALYSIS,
        shadow=NO_SHADOW,
        supersede=True,
    )
    rid = rollout["id"]
    ended = stack.wait_end(rid, {"completed", "rolled_back", "halted", "paused"})
    report = stack.report(rid)
    print(figures(report))
    latest = report["latest"]
    assert ended["state"] == "completed", figures(report)
    assert (latest["kind"], latest["winner"], latest["action"]) == ("ab", "treatment", "complete"), figures(report)
    assert _metric(latest, DROPPED_METRIC)["better"] == "treatment", figures(report)
    # The dropped copy may look better on mean confidence (it lost a class detected with lower confidence), never
    # on a critical metric: that is what makes the better detector the winner.
    assert not [m for m in latest["metrics"] if m.get("better") == "control" and m["critical"]], figures(report)
    assert stack.tags("base")["ota.fleet.winner"] == stack.versions["base"]
    stack.wait_serving([stack.versions["base"]] * DEVICES)
