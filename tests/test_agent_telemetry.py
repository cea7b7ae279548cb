"""Telemetry windows: the invariants of the report contract hold, and a window stays small whatever the traffic."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import pytest

from edge_agent.protocol import ReportTelemetry
from edge_agent.runtime import Inference, LoadedModel
from edge_agent.telemetry import Telemetry
from exporters.telemetry_buckets import HISTOGRAM_BUCKETS, LATENCY_MS_EDGES

NUM_CLASSES = 3


@dataclass
class _Model:  # what telemetry reads of a LoadedModel
    model: str
    version: str


def _inference(version: str, latency_ms: float, classes: list[int], scores: list[float], **kw: Any) -> Inference:
    model = cast(LoadedModel, _Model("line", version))
    return Inference(
        model, latency_ms, class_ids=np.array(classes, np.int64), scores=np.array(scores, np.float32), **kw
    )


def _failure(version: str, *, nonfinite: bool) -> Inference:
    return Inference(cast(LoadedModel, _Model("line", version)), 3.0, error="boom", nonfinite=nonfinite)


def _check_invariants(window: ReportTelemetry) -> None:
    """What the service checks (contract A); a failure here would be a 422 there."""
    h = window.histograms
    assert [len(h.latency_ms), len(h.detections), len(h.confidence)] == list(HISTOGRAM_BUCKETS.values())
    assert window.frames == window.inferences - window.errors
    assert sum(h.latency_ms) == window.frames and sum(h.detections) == window.frames
    assert h.detections[0] == window.empty_frames
    assert sum(h.confidence) == sum(window.class_counts.values())
    assert window.nonfinite <= window.errors
    counts = [*h.latency_ms, *h.detections, *h.confidence, *window.class_counts.values()]
    assert min(counts) >= 0 and all(int(k) < NUM_CLASSES for k in window.class_counts)
    assert np.isfinite([window.latency_ms.p50, window.latency_ms.p99, window.mean_confidence]).all()


def test_window_counts_frames_classes_and_failures() -> None:
    telemetry = Telemetry()
    telemetry.observe(_inference("1", 4.0, [0, 0, 2], [0.925, 0.575, 1.0]))
    telemetry.observe(_inference("1", 12.0, [], []))
    telemetry.observe(_failure("1", nonfinite=True))
    telemetry.observe(_failure("1", nonfinite=False))
    telemetry.observe(_inference("2", 6000.0, [1], [0.0]))
    windows = {w.version: w for w in telemetry.take()}
    one, two = windows["1"], windows["2"]
    assert (one.inferences, one.errors, one.nonfinite, one.frames, one.empty_frames) == (4, 2, 1, 2, 1)
    assert one.class_counts == {"0": 2, "2": 1}  # zero entries left out
    assert one.histograms.detections[:4] == [1, 0, 0, 1]
    assert one.histograms.latency_ms[LATENCY_MS_EDGES.index(5)] == 1  # 4 ms: in [3, 5), upper edge 5
    assert one.histograms.latency_ms[LATENCY_MS_EDGES.index(15)] == 1  # 12 ms: in [10, 15)
    assert one.histograms.confidence[18] == 1 and one.histograms.confidence[11] == 1
    assert one.histograms.confidence[19] == 1  # a score of exactly 1 falls in the last bucket
    assert two.histograms.latency_ms[-1] == 1 and two.histograms.confidence[0] == 1
    for window in (one, two):
        _check_invariants(window)
    assert telemetry.take() == []  # windows start again empty


def test_window_without_answered_frames() -> None:
    telemetry = Telemetry()
    telemetry.observe(_failure("1", nonfinite=True))
    (window,) = telemetry.take()
    _check_invariants(window)
    assert window.frames == 0 and window.class_counts == {} and window.latency_ms.p99 == 0.0


@pytest.mark.parametrize("seed", [0, 1])
def test_window_stays_small_after_100k_observations(seed: int) -> None:
    rng = np.random.default_rng(seed)
    telemetry = Telemetry()
    sizes = []
    for step in range(100_000):
        if step % 997 == 0:
            telemetry.observe(_failure("7", nonfinite=step % 2 == 0))
            continue
        count = int(rng.integers(0, 40))  # past the last detections bucket too
        classes = rng.integers(0, NUM_CLASSES, count).tolist()
        telemetry.observe(_inference("7", float(rng.lognormal(2.5, 1.2)), classes, rng.random(count).tolist()))
        if step in (999, 99_999):
            window = telemetry.totals()["7"]
            _check_invariants(window)
            sizes.append(len(window.model_dump_json()))
    (window,) = telemetry.take()
    _check_invariants(window)
    assert window.inferences == 100_000 and window.histograms.detections[-1] > 0
    assert sizes[1] <= sizes[0] + 200 and sizes[1] < 1500, sizes  # counts grow in digits, not in entries
