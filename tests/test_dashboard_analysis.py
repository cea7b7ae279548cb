"""The dashboard's fleet-analysis view in headless Chromium: a canary judged by the service's analysis from telemetry
windows that simulated devices post over the real REST API, the treatment's windows missing one class.

The page must show the verdict the API stored (``GET /v1/rollouts/{id}/analysis``) and the failing metric's row
with its figures. ``YOLO_OTA_SAVE_SCREENSHOTS=1`` copies the picture to ``docs/images/analysis-dashboard.png``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from browser import VIRTUAL_TIME_MS, chromium, load, needs_chromium
from fleet import Fleet, SimDevice
from servers import OPERATOR_TOKEN, start_rollout_service

from exporters.telemetry_buckets import CONFIDENCE_BUCKETS, HISTOGRAM_BUCKETS, detections_bucket, latency_bucket
from yolo_ota.processes import RunningServer

REPO = Path(__file__).resolve().parents[1]
MODEL = "pcb-line"
WINDOW = (1400, 1500)
WINDOWS_PER_DEVICE = 5  # three devices per arm: 15 windows each, over min_windows
MISSING_CLASS = 1  # the treatment never detects it
SETTINGS = {"PROMOTION_ALIAS": "never-set-by-the-dashboard-tests", "ALIAS_POLL_INTERVAL_S": "3600"}


def window(version: str, device: int, index: int, *, missing: int | None) -> dict[str, Any]:
    """One bounded telemetry window (contract A) whose counts add up; class ``missing`` is never detected."""
    inferences, errors = 200, (device + index) % 2
    frames, empty = inferences - errors, 12
    counts = {0: 260 + 7 * ((device + index) % 3), 1: 140 + 5 * ((device * 2 + index) % 3), 2: 60 + (index % 2)}
    if missing is not None:
        counts.pop(missing)
    detections = sum(counts.values())
    per_image = detections_bucket(round(detections / (frames - empty)))
    detections_hist = [0] * HISTOGRAM_BUCKETS["detections"]
    detections_hist[0], detections_hist[per_image] = empty, frames - empty
    latency_hist = [0] * HISTOGRAM_BUCKETS["latency_ms"]
    latency_hist[latency_bucket(8.0)] = frames - 4
    latency_hist[latency_bucket(22.0)] = 4
    confidence = [0] * CONFIDENCE_BUCKETS
    confidence[15], confidence[17] = detections // 2, detections - detections // 2
    return {
        "version": version,
        "inferences": inferences,
        "errors": errors,
        "latency_ms": {"p50": 8.0 + 0.2 * device, "p99": 20.0 + (device * 3 + index) % 5},
        "detections_per_image": detections / frames,
        "mean_confidence": 0.82,
        "frames": frames,
        "empty_frames": empty,
        "nonfinite": 0,
        "histograms": {"latency_ms": latency_hist, "detections": detections_hist, "confidence": confidence},
        "class_counts": {str(k): v for k, v in counts.items()},
    }


@pytest.fixture(scope="module")
def service(
    tmp_path_factory: pytest.TempPathFactory, mlflow_server: RunningServer, fleet_model: dict[str, str]
) -> Iterator[RunningServer]:
    server = start_rollout_service(tmp_path_factory.mktemp("analysis-ui"), mlflow_url=mlflow_server.url,
                                   settings=SETTINGS)  # fmt: skip
    yield server
    server.stop()


@pytest.fixture(scope="module")
def judged(service: RunningServer, fleet_model: dict[str, str]) -> Iterator[dict[str, Any]]:
    """A canary whose first wave (half of line D) reports windows without one class; the rest stays on the old."""
    good, better = fleet_model["good"], fleet_model["better"]
    fleet = Fleet(service.url)
    devices = [fleet.enroll(f"press-d-{i:02d}", {"line": "line-d"}) for i in range(6)]
    rollout_id = fleet.create_rollout(
        model=MODEL,
        version=better,
        previous_version=good,
        strategy="canary",
        selector={"labels": {"line": "line-d"}},
        waves=[
            {"percent": 50, "bake_s": 3600, "max_failure_rate": 0.5, "min_success_rate": 0.5},
            {"percent": 100, "bake_s": 0, "max_failure_rate": 0.5, "min_success_rate": 0.9},
        ],
        analysis={"enabled": True, "min_windows": 10, "interval_s": 0},
        reason="new lighting on line D",
    )["id"]
    versions = fleet.follow(devices)
    arms: dict[str, list[SimDevice]] = {"treatment": [], "control": []}
    for device in devices:
        arms["treatment" if versions[device.device_id] == better else "control"].append(device)
    assert len(arms["treatment"]) == 3, versions
    for index in range(WINDOWS_PER_DEVICE):
        for number, device in enumerate(devices):
            treated = device in arms["treatment"]
            version = better if treated else good
            fleet.report(device, **window(version, number, index, missing=MISSING_CLASS if treated else None))

    def verdict() -> dict[str, Any] | None:
        latest = fleet.op("GET", f"/v1/rollouts/{rollout_id}/analysis")["latest"]
        return latest if latest and latest["verdict"] != "inconclusive" else None

    latest = fleet.wait_for("the analysis verdict", verdict, timeout_s=60)
    fleet.wait_state(rollout_id, "halted")
    report = fleet.op("GET", f"/v1/rollouts/{rollout_id}/analysis")
    yield {"fleet": fleet, "rollout": rollout_id, "latest": latest, "report": report}
    fleet.close()


def _ui(service: RunningServer) -> str:
    return f"{service.url}/ui#token={OPERATOR_TOKEN}"


@needs_chromium
def test_the_page_shows_the_verdict_and_the_failing_metric(
    service: RunningServer, judged: dict[str, Any], tmp_path: Path
) -> None:
    latest = judged["report"]["latest"]
    assert latest["verdict"] == "fail" and latest["action"] == "halt", latest
    failing = [m for m in latest["metrics"] if m["verdict"] == "fail"]
    names = {m["name"] for m in failing}
    missing = next(m for m in failing if m["family"] == "class_rate")
    assert missing["treatment"] == 0 and missing["control"] > 0 and missing["name"] in latest["reason"]

    dom = load(tmp_path, _ui(service), until="ready")

    section = dom.one("section", id="analysis")
    assert section.one("p", class_="analysis-title").attrs["data-rollout"] == str(judged["rollout"])
    summary = section.one("dl", class_="verdict-summary")
    shown = {field.attrs["data-field"]: field.one("dd") for field in summary.find_all("div", data_field=None)}
    assert shown["verdict"].one(class_="verdict").text() == "fail"
    assert shown["score"].text() == f"{latest['score']:.1f} / 100"
    assert shown["action"].text() == "halt"
    assert "winner" not in shown  # a canary has none
    for arm in ("treatment", "control"):
        assert summary.one("span", data_arm=arm).attrs["data-windows"] == str(latest[f"{arm}_windows"])
    assert section.one("p", class_="analysis-reason").text() == " ".join(latest["reason"].split())

    rows = {row.attrs["data-metric"]: row for row in section.find_all("tr", data_metric=None)}
    assert names <= set(rows)
    row = rows[missing["name"]]
    assert row.attrs["data-verdict"] == "fail" and "critical" in row.one("td", class_="id").text()
    assert row.one(class_="verdict").has_class("tone-bad")
    assert row.one(data_field="treatment").text() == "0.000 / image"
    assert row.one(data_field="control").text() == f"{missing['control']:.3f} / image"
    assert row.one(data_field="effect").text() == "-100 %"
    assert row.one(data_field="band").text() == f"±{missing['band'] * 100:.0f} %"
    assert row.one(data_field="p-value").text() not in ("", "–")
    for arm in ("treatment", "control"):
        bars = [float(r.attrs["data-value"]) for r in row.find_all("rect", data_arm=arm)]
        assert bars == pytest.approx(missing[f"{arm}_hist"])
    latency = rows["latency_p99"]
    assert latency.attrs["data-verdict"] == "pass" and latency.one(class_="verdict").has_class("tone-good")
    rollout_row = dom.one("tr", data_rollout=str(judged["rollout"]))
    assert rollout_row.one("div", data_analysis="fail")


@needs_chromium
def test_screenshot_of_the_analysis(service: RunningServer, judged: dict[str, Any], tmp_path: Path) -> None:
    from PIL import Image

    load(tmp_path, _ui(service), until="ready")
    path = tmp_path / "analysis.png"
    chromium(tmp_path, _ui(service), f"--screenshot={path}", f"--window-size={WINDOW[0]},{WINDOW[1]}",
             f"--virtual-time-budget={VIRTUAL_TIME_MS}")  # fmt: skip
    with Image.open(path) as image:
        assert image.size == WINDOW
    print(f"analysis screenshot: {path}")
    if os.environ.get("YOLO_OTA_SAVE_SCREENSHOTS"):
        target = REPO / "docs" / "images" / "analysis-dashboard.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
        print(f"copied to {target}")
