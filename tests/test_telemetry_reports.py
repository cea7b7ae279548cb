"""Telemetry windows in their bounded form: accepted whole, or refused whole with a 422 naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fleet import Fleet

from exporters.telemetry_buckets import CONFIDENCE_BUCKETS, DETECTION_BUCKETS, LATENCY_BUCKETS
from yolo_ota.processes import RunningServer


@pytest.fixture(scope="module")
def fleet(module_service: RunningServer, fleet_model: dict[str, str]) -> Iterator[Fleet]:
    fleet = Fleet(module_service.url)
    yield fleet
    fleet.close()


def window(**changes: Any) -> dict[str, Any]:
    """A consistent window of 10 frames: 2 empty, 8 with one chip (class 0) each."""
    latency = [0] * LATENCY_BUCKETS
    latency[8] = 10
    detections = [0] * DETECTION_BUCKETS
    detections[0], detections[1] = 2, 8
    confidence = [0] * CONFIDENCE_BUCKETS
    confidence[17] = 8
    base: dict[str, Any] = {
        "version": "1",
        "model": "pcb-line",
        "inferences": 11,
        "errors": 1,
        "latency_ms": {"p50": 25.0, "p99": 31.0},
        "detections_per_image": 0.8,
        "mean_confidence": 0.87,
        "frames": 10,
        "empty_frames": 2,
        "nonfinite": 1,
        "histograms": {"latency_ms": latency, "detections": detections, "confidence": confidence},
        "class_counts": {"0": 8},
    }
    return {**base, **changes}


def post(fleet: Fleet, device_id: str, token: str, body: dict[str, Any] | str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    content = body if isinstance(body, str) else httpx.Request("POST", "/", json=body).content.decode()
    return fleet.http.post(f"/v1/devices/{device_id}/reports", content=content, headers=headers)


def test_a_bounded_window_and_the_old_form_are_both_accepted(fleet: Fleet) -> None:
    device = fleet.enroll("telemetry-ok")
    assert post(fleet, device.device_id, device.token, {"telemetry": window()}).status_code == 200
    old = {k: v for k, v in window().items() if k not in ("frames", "empty_frames", "nonfinite", "histograms",
                                                           "class_counts")}  # fmt: skip
    assert post(fleet, device.device_id, device.token, {"telemetry": old}).status_code == 200


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"histograms": {**window()["histograms"], "confidence": [0] * (CONFIDENCE_BUCKETS - 1)}}, "histograms"),
        ({"class_counts": {"0": -8}}, "class_counts"),
        ({"frames": 9}, "frames"),
        ({"empty_frames": 3}, "empty_frames"),
        ({"nonfinite": 2}, "nonfinite"),
        ({"histograms": None}, "come together"),
    ],
    ids=["bucket-count", "negative-count", "frames", "empty-frames", "nonfinite", "partial-form"],
)
def test_inconsistent_windows_get_422_naming_the_field(fleet: Fleet, changes: dict[str, Any], field: str) -> None:
    device = fleet.enroll(f"telemetry-bad-{field.replace(' ', '-')}")
    answer = post(fleet, device.device_id, device.token, {"telemetry": window(**changes)})
    assert answer.status_code == 422, answer.text
    assert field in answer.text


def test_nan_is_refused(fleet: Fleet) -> None:
    device = fleet.enroll("telemetry-nan")
    body = httpx.Request("POST", "/", json={"telemetry": window(mean_confidence=0.5)}).content.decode()
    body = body.replace('"mean_confidence":0.5', '"mean_confidence":NaN').replace(
        '"mean_confidence": 0.5', '"mean_confidence": NaN'
    )
    assert "NaN" in body
    answer = post(fleet, device.device_id, device.token, body)
    assert answer.status_code == 422, answer.text
    assert "mean_confidence" in answer.text


def test_an_unknown_class_is_refused_and_nothing_of_the_report_is_stored(fleet: Fleet) -> None:
    """The model has 80 classes (0..79): index 80 is refused, and the event sent with it is not kept either."""
    device = fleet.enroll("telemetry-class")
    bad = window(class_counts={"80": 8})
    event = {"state": "idle", "version": "1", "model": "pcb-line", "reason": "sent with a bad window"}
    answer = post(fleet, device.device_id, device.token, {"events": [event], "telemetry": bad})
    assert answer.status_code == 422, answer.text
    assert "telemetry.class_counts.80" in answer.text
    detail = fleet.op("GET", f"/v1/devices/{device.device_id}")
    assert all(e["reason"] != "sent with a bad window" for e in detail["last_events"])
    good = window(class_counts={"79": 8})
    assert post(fleet, device.device_id, device.token, {"events": [event], "telemetry": good}).status_code == 200
    detail = fleet.op("GET", f"/v1/devices/{device.device_id}")
    assert any(e["reason"] == "sent with a bad window" for e in detail["last_events"])
