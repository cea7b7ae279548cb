"""Shadow validation: the matching on hand-made boxes, then real agents with live traffic offered a model that lost
a class (refused by the shadow gate) and an equivalent re-export (accepted), with request latency measured while
the shadow run overlaps the requests."""

from __future__ import annotations

import itertools
import logging
import shutil
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from agent_stack import AgentStack, AgentVersions
from agents import RunningAgent, start_agent

from edge_agent.frames import FrameRing
from edge_agent.protocol import ShadowConfig
from edge_agent.shadow import compare, match_pairs, summary
from exporters.postprocess import Detections
from yolo_ota.processes import RunningServer

log = logging.getLogger(__name__)
SCENE_SIZE = 160  # the trained detector's input size
NAMES = {0: "chip", 1: "capacitor", 2: "solder_bridge"}


def _dets(rows: list[tuple[float, float, float, float, float, int]]) -> Detections:
    table = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return Detections(
        boxes=table[:, :4].astype(np.float32), scores=table[:, 4].astype(np.float32), class_ids=table[:, 5].astype(int)
    )


def _scene(index: int) -> Detections:
    """Two chips, one capacitor and (every other frame) a solder bridge, shifted a little per frame."""
    x = 5.0 * index
    rows = [(x, 0, x + 20, 20, 0.9, 0), (x + 40, 0, x + 60, 20, 0.8, 0), (x, 40, x + 10, 50, 0.7, 1)]
    if index % 2 == 0:
        rows.append((x + 80, 80, x + 90, 90, 0.6, 2))
    return _dets(rows)


def _without(found: Detections, class_id: int) -> Detections:
    keep = found.class_ids != class_id
    return Detections(boxes=found.boxes[keep], scores=found.scores[keep], class_ids=found.class_ids[keep])


CONFIG = ShadowConfig(min_matched=0.8, iou=0.5, min_class_samples=5)


def test_identical_detections_match_fully() -> None:
    frames = [(_scene(i), _scene(i)) for i in range(10)]
    report = compare(frames, CONFIG, NAMES, source="live")
    assert report.passed and report.matched_serving == 1.0 and report.matched_candidate == 1.0
    assert report.count_delta == 0.0 and report.confidence_shift == 0.0
    assert [(c.class_name, c.matched_serving, c.judged) for c in report.classes] == [
        ("chip", 1.0, True), ("capacitor", 1.0, True), ("solder_bridge", 1.0, True),
    ]  # fmt: skip


def test_a_missing_class_fails_on_that_class() -> None:
    frames = [(_scene(i), _without(_scene(i), 2)) for i in range(10)]
    report = compare(frames, CONFIG, NAMES, source="live")
    by_name = {c.class_name: c for c in report.classes}
    bridge = by_name["solder_bridge"]
    assert bridge.judged and bridge.matched_serving == 0.0 and not bridge.passed
    assert bridge.candidate == 0 and bridge.matched_candidate is None
    assert by_name["chip"].passed and by_name["chip"].matched_serving == 1.0
    assert report.matched_serving == pytest.approx(30 / 35) and report.matched_candidate == 1.0
    assert report.count_delta == pytest.approx(-5 / 35)
    assert not report.passed  # overall 86 % would pass; the class does not
    line = summary(report, CONFIG, "line v1")
    assert "failed on solder_bridge (matched 0% of 5)" in line and "10 live frames" in line


def test_a_rare_class_is_reported_not_judged() -> None:
    frames = [(_scene(i), _without(_scene(i), 2)) for i in range(8)]  # 4 solder bridges < min_class_samples 5
    report = compare(frames, CONFIG, NAMES, source="golden")
    bridge = next(c for c in report.classes if c.class_name == "solder_bridge")
    assert not bridge.judged and bridge.passed and bridge.matched_serving == 0.0
    assert report.passed and report.source == "golden"


def test_iou_just_under_the_threshold_is_not_a_match() -> None:
    serving = _dets([(0, 0, 10, 10, 0.9, 0)])
    # Same height; width chosen so that IoU = 10 / w with the serving box inside: 10 / 20.02 < 0.5 <= 10 / 20.
    assert match_pairs(serving, _dets([(0, 0, 20.0, 10, 0.9, 0)]), 0.5) == [(0, 0)]
    assert match_pairs(serving, _dets([(0, 0, 20.02, 10, 0.9, 0)]), 0.5) == []
    assert match_pairs(serving, _dets([(0, 0, 10, 10, 0.9, 1)]), 0.5) == []  # other class: never a match
    report = compare([(serving, _dets([(0, 0, 20.02, 10, 0.9, 0)]))], CONFIG, NAMES, source="live")
    assert report.matched_serving == 0.0 and report.count_delta == 0.0 and not report.passed


def test_matching_is_one_to_one() -> None:
    serving = _dets([(0, 0, 10, 10, 0.9, 0), (0, 0, 10, 10, 0.8, 0)])
    candidate = _dets([(0, 0, 10, 10, 0.5, 0)])
    report = compare([(serving, candidate)], CONFIG, NAMES, source="live")
    assert report.matched_serving == 0.5 and report.matched_candidate == 1.0
    assert report.count_delta == -0.5 and report.confidence_shift == pytest.approx(-0.4)


def test_frame_ring_is_bounded_and_samples() -> None:
    ring = FrameRing(capacity=4, max_bytes=100, every=2)
    empty = _dets([])
    for index in range(20):
        ring.offer(bytes([index]) * 10, "1" if index < 15 else "2", empty)
    assert len(ring) == 4  # every other one kept (1, 3, ..., 19), the newest 4 of those
    assert [f.data[0] for f in ring.after(0, "1")] == [13]
    newest = ring.after(0, "2")
    assert [f.data[0] for f in newest] == [15, 17, 19] and ring.after(newest[-1].seq, "2") == []
    ring.offer(b"x" * 101, "2", empty)  # larger than the whole ring: never kept
    big = FrameRing(capacity=10, max_bytes=25, every=1)
    for index in range(5):
        big.offer(bytes([index]) * 10, "1", empty)
    assert [f.data[0] for f in big.after(0, "1")] == [3, 4]  # bounded by bytes too


# -- real agents with live traffic ---------------------------------------------------------------------------------

DROPPED_CLASS = 1  # capacitor
# Request latency while the shadow child runs, against the seconds just before the rollout: the median may grow
# to at most 1.5 x + 10 ms (two CPU cores shared by the serving agent, the child, the service, MLflow and the
# test's own client; the child runs at nice 10 on one thread).
LATENCY_FACTOR, LATENCY_SLACK_MS = 1.5, 10.0
SHADOW_AGENT = {"SHADOW_TIME_LIMIT_S": "30", "SHADOW_SAMPLE_EVERY": "2"}
SHADOW = {"enabled": True, "sample_frames": 48, "time_limit_s": 30}  # the rollouts' shadow block


@pytest.fixture(scope="module")
def shadow_versions(
    trained_detector: Path, trained_bundle: Path, scene_images: list[Path], agent_versions: AgentVersions,
    mlflow_server: RunningServer, tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, str]:  # fmt: skip
    """Versions of ``agent-line`` for the shadow tests: base (the trained detector), reexport (the same weights
    exported again: equivalent), dropped (the same weights with the capacitor class silenced)."""
    from exporters.bundle import read_manifest
    from exporters.drills import set_latency_budget, set_product_line
    from exporters.export import ExportRequest, export_bundle
    from exporters.yolo_variants import drop_class
    from registry.mlflow_gateway import MlflowGateway

    root = tmp_path_factory.mktemp("shadow-versions")
    base = root / "base"
    shutil.copytree(trained_bundle, base)
    set_product_line(base, agent_versions.model)
    set_latency_budget(base, 61_000)  # a distinct manifest: the registry refuses duplicates
    built = {"base": base}
    weights = {"reexport": trained_detector, "dropped": drop_class(trained_detector, DROPPED_CLASS, root / "d.pt")}
    for index, (role, source) in enumerate(weights.items()):
        request = ExportRequest(
            model=str(source), out_dir=root / role, imgsz=(SCENE_SIZE, SCENE_SIZE), variants=("cpu-fp32",),
            name=agent_versions.model, release=read_manifest(base).release, golden_images=tuple(scene_images),
            latency_budget_ms=62_000 + index,
        )  # fmt: skip
        assert export_bundle(request).passed, role  # export gates compare a model with itself: both pass
        built[role] = root / role
    gateway = MlflowGateway(mlflow_server.url)
    return {role: gateway.register_bundle(path, agent_versions.model).version.version for role, path in built.items()}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> list[bytes]:
    from exporters.synthetic import write_scenes

    paths = write_scenes(tmp_path_factory.mktemp("live"), count=48, size=SCENE_SIZE, seed=99)
    return [path.read_bytes() for path in paths]


FRAME_INTERVAL_S = 0.1  # the camera's pace: 10 frames a second
RING_FULL = 2 * SHADOW["sample_frames"] + 10  # answers after which the ring holds a full sample (every 2nd kept)
UPDATE_TIMEOUT_S = 300  # validation and the shadow run yield the CPU to serving: slow on a busy 2-core machine


class Traffic:
    """A line camera: one client posting a scene every ``FRAME_INTERVAL_S`` (or as fast as answered), timed."""

    def __init__(self, url: str, scenes: list[bytes]) -> None:
        self.url, self.scenes = url, scenes
        self.answers: list[tuple[float, float, int, str | None]] = []  # start, end (monotonic), status, version
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        with httpx.Client(timeout=30) as http:
            for image in itertools.cycle(self.scenes):
                if self._stop.is_set():
                    return
                started = time.monotonic()
                answer = http.post(self.url + "/v1/detect", content=image)
                self.answers.append((started, time.monotonic(), answer.status_code, answer.json().get("version")))
                self._stop.wait(max(0.0, started + FRAME_INTERVAL_S - time.monotonic()))

    def latencies_ms(self, start: float, end: float) -> list[float]:
        """Client-side latencies of the requests that ran entirely within [start, end]."""
        return [(b - a) * 1000 for a, b, _, _ in list(self.answers) if a >= start and b <= end]


def _shadow_agent(stack: AgentStack, tmp_path: Path, lane: str, base: str) -> RunningAgent:
    agent = start_agent(tmp_path / lane, server_url=stack.service_proxy.url, device_id=f"dev-{lane}",
                        labels={"lane": lane}, settings=SHADOW_AGENT)  # fmt: skip
    _roll_out(stack, lane, base)
    status = agent.wait_serving(base, timeout_s=UPDATE_TIMEOUT_S)
    assert status["shadow"]["source"] == "skipped" and "first version" in status["shadow"]["reason"]
    return agent


def _roll_out(stack: AgentStack, lane: str, version: str) -> None:
    stack.fleet.create_rollout(model=stack.versions.model, version=version, strategy="immediate",
                               selector={"labels": {"lane": lane}}, supersede=True, shadow=SHADOW)  # fmt: skip


@pytest.mark.slow
def test_a_model_that_lost_a_class_is_refused_by_the_shadow_gate(
    agent_stack: AgentStack, shadow_versions: dict[str, str], scenes: list[bytes], tmp_path: Path
) -> None:
    stack, base, dropped = agent_stack, shadow_versions["base"], shadow_versions["dropped"]
    agent = _shadow_agent(stack, tmp_path, "shadow-drop", base)
    try:
        with Traffic(agent.url, scenes) as traffic:
            agent.wait_for("frames in the ring", lambda s: len(traffic.answers) > RING_FULL)
            _roll_out(stack, "shadow-drop", dropped)
            status = agent.wait_for(
                f"v{dropped} refused",
                lambda s: s["state"] == "idle" and any(f":{dropped}:" in k for k in s["rejected"]),
                timeout_s=UPDATE_TIMEOUT_S,
            )
        assert status["serving"]["version"] == base
        shadow = status["shadow"]
        assert shadow["version"] == dropped and shadow["source"] == "live" and not shadow["passed"]
        assert shadow["frames"] == SHADOW["sample_frames"]
        capacitor = next(c for c in shadow["classes"] if c["class_name"] == "capacitor")
        assert capacitor["judged"] and capacitor["matched_serving"] == 0.0 and capacitor["candidate"] == 0
        assert all(c["passed"] for c in shadow["classes"] if c["class_id"] != DROPPED_CLASS), shadow["classes"]
        assert all(code == 200 for _, _, code, _ in traffic.answers)
        assert {v for _, _, _, v in traffic.answers} == {base}  # the dropped model never answered a request
        events = stack.fleet.wait_for(  # needs the service to take "shadow" events
            "the shadow refusal to reach the service",
            lambda: [e for e in stack.events(agent.device_id) if e["version"] == dropped and not e["ok"]],
        )
        assert [e["state"] for e in events] == ["shadow", "failed"], events
        assert all("capacitor (matched 0%" in str(e["reason"]) for e in events), events
    finally:
        agent.stop()


@pytest.mark.slow
def test_an_equivalent_reexport_passes_shadow_without_slowing_requests(
    agent_stack: AgentStack, shadow_versions: dict[str, str], scenes: list[bytes], tmp_path: Path
) -> None:
    stack, base, reexport = agent_stack, shadow_versions["base"], shadow_versions["reexport"]
    agent = _shadow_agent(stack, tmp_path, "shadow-same", base)
    shadow_log = agent.data_dir / "shadow" / "shadow.log"
    try:
        with Traffic(agent.url, scenes) as traffic:
            agent.wait_for("frames in the ring", lambda s: len(traffic.answers) > RING_FULL)
            rolled_out_at = time.monotonic()
            _roll_out(stack, "shadow-same", reexport)
            seen: list[float] = []  # moments the shadow child's log was there: it was running
            deadline = rolled_out_at + UPDATE_TIMEOUT_S
            while time.monotonic() < deadline and not (seen and not shadow_log.exists()):
                if shadow_log.exists():
                    seen.append(time.monotonic())
                time.sleep(0.01)
            status = agent.wait_serving(reexport, timeout_s=UPDATE_TIMEOUT_S)
        assert seen, "the shadow child was never seen running"
        child = (seen[0], seen[-1])
        before = traffic.latencies_ms(rolled_out_at - 5, rolled_out_at)
        during = traffic.latencies_ms(child[0], child[1])
        assert len(during) >= 20 and len(before) >= 20, (len(before), len(during))  # really overlapped
        median_before, median_during = float(np.median(before)), float(np.median(during))
        log.info(
            "request latency: before median %.1f ms p90 %.1f ms (%d); during shadow (%.1f s) median %.1f ms "
            "p90 %.1f ms (%d)", median_before, np.percentile(before, 90), len(before), child[1] - child[0],
            median_during, np.percentile(during, 90), len(during),
        )  # fmt: skip
        assert median_during <= LATENCY_FACTOR * median_before + LATENCY_SLACK_MS, (median_before, median_during)
        shadow = status["shadow"]
        assert shadow["version"] == reexport and shadow["source"] == "live" and shadow["passed"]
        assert shadow["matched_serving"] >= 0.95 and abs(shadow["count_delta"]) <= 0.05, shadow
        assert all(code == 200 for _, _, code, _ in traffic.answers)
        events = stack.fleet.wait_for(  # needs the service to take "shadow" events
            "the shadow event to reach the service",
            lambda: [e for e in stack.events(agent.device_id) if e["version"] == reexport and e["state"] == "shadow"],
        )
        assert events[0]["ok"] and "shadow passed" in str(events[0]["reason"]), events
    finally:
        agent.stop()


@pytest.mark.slow
def test_without_traffic_the_golden_data_stands_in_and_a_version_that_served_here_is_not_compared_again(
    agent_stack: AgentStack, shadow_versions: dict[str, str], tmp_path: Path
) -> None:
    stack, base, reexport = agent_stack, shadow_versions["base"], shadow_versions["reexport"]
    agent = _shadow_agent(stack, tmp_path, "shadow-idle", base)
    try:
        # No request reaches this device: after the block's time limit (1 s), both bundles run on the golden data.
        stack.fleet.create_rollout(model=stack.versions.model, version=reexport, strategy="immediate",
                                   selector={"labels": {"lane": "shadow-idle"}}, supersede=True,
                                   shadow={**SHADOW, "time_limit_s": 1})  # fmt: skip
        status = agent.wait_serving(reexport, timeout_s=UPDATE_TIMEOUT_S)
        shadow = status["shadow"]
        assert shadow["version"] == reexport and shadow["source"] == "golden" and shadow["passed"], shadow
        assert shadow["frames"] > 0 and shadow["matched_serving"] >= 0.95, shadow
        events = stack.fleet.wait_for(
            "the shadow event to reach the service",
            lambda: [e for e in stack.events(agent.device_id) if e["version"] == reexport and e["state"] == "shadow"],
        )
        assert events[0]["ok"] and "only 0 live frames" in str(events[0]["reason"]), events
        # Back to the base version, which served here and passed its probation: neither validated nor compared
        # again (the comparison would wait 30 s for frames, then run the golden data).
        _roll_out(stack, "shadow-idle", base)
        status = agent.wait_serving(base, timeout_s=UPDATE_TIMEOUT_S)
        shadow = status["shadow"]
        assert shadow["version"] == base and shadow["source"] == "skipped", shadow
        assert "served here and passed its probation before" in shadow["reason"], shadow
    finally:
        agent.stop()
