"""What the serving models did: windows for the reports to the rollout service, totals for ``/metrics``.

A window holds counts, never lists that grow with traffic: fixed histograms (``exporters.telemetry_buckets``) of
latency, detections per image and confidence, detections per class (at most the model's class count), and the
newest ``LATENCY_WINDOW`` latencies for the exact p50/p99. So a window stays a few hundred bytes whatever the
traffic, and its invariants hold by construction: each answered frame adds one to the latency and detections
histograms, each detection one to the confidence histogram and to its class.

The probation watch that judges a freshly swapped-in version lives in ``edge_agent.probation``.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edge_agent.protocol import Histograms, LatencyFigures, ReportTelemetry
from edge_agent.runtime import Inference
from exporters.telemetry_buckets import (
    CONFIDENCE_BUCKETS,
    DETECTION_BUCKETS,
    LATENCY_BUCKETS,
    confidence_buckets,
    detections_bucket,
    latency_bucket,
)

LATENCY_WINDOW = 2048  # latencies kept per version for the percentiles


def percentile_ms(values: deque[float] | list[float], q: float) -> float:
    return float(np.percentile(np.fromiter(values, dtype=np.float64), q)) if values else 0.0


def _zeros(buckets: int) -> np.ndarray:
    return np.zeros(buckets, dtype=np.int64)


@dataclass
class _Window:
    model: str
    inferences: int = 0
    errors: int = 0
    nonfinite: int = 0
    detections: int = 0
    confidence_sum: float = 0.0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))
    latency_hist: np.ndarray = field(default_factory=lambda: _zeros(LATENCY_BUCKETS))
    detections_hist: np.ndarray = field(default_factory=lambda: _zeros(DETECTION_BUCKETS))
    confidence_hist: np.ndarray = field(default_factory=lambda: _zeros(CONFIDENCE_BUCKETS))
    class_counts: np.ndarray = field(default_factory=lambda: _zeros(0))  # grows to the highest class id seen

    def add(self, inference: Inference) -> None:
        self.inferences += 1
        if inference.error is not None:
            self.errors += 1
            self.nonfinite += int(inference.nonfinite)
            return
        self.detections += inference.detections
        self.confidence_sum += inference.confidence_sum
        self.latencies_ms.append(inference.latency_ms)
        self.latency_hist[latency_bucket(inference.latency_ms)] += 1
        self.detections_hist[detections_bucket(inference.detections)] += 1
        if inference.detections:
            np.add.at(self.confidence_hist, confidence_buckets(inference.scores), 1)
            ids = np.asarray(inference.class_ids, dtype=np.int64)
            if int(ids.max()) >= len(self.class_counts):
                grown = _zeros(int(ids.max()) + 1)
                grown[: len(self.class_counts)] = self.class_counts
                self.class_counts = grown
            np.add.at(self.class_counts, ids, 1)

    def report(self, version: str) -> ReportTelemetry:
        ok = self.inferences - self.errors
        return ReportTelemetry(
            version=version,
            model=self.model,
            inferences=self.inferences,
            errors=self.errors,
            latency_ms=LatencyFigures(
                p50=percentile_ms(self.latencies_ms, 50), p99=percentile_ms(self.latencies_ms, 99)
            ),
            detections_per_image=self.detections / ok if ok else 0.0,
            mean_confidence=min(1.0, self.confidence_sum / self.detections) if self.detections else 0.0,
            frames=ok,
            empty_frames=int(self.detections_hist[0]),
            nonfinite=self.nonfinite,
            histograms=Histograms(
                latency_ms=self.latency_hist.tolist(),
                detections=self.detections_hist.tolist(),
                confidence=self.confidence_hist.tolist(),
            ),
            class_counts={str(c): int(n) for c, n in enumerate(self.class_counts.tolist()) if n},
        )


class Telemetry:
    """Per-version windows since the last report, and totals since the agent started."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}
        self._totals: dict[str, _Window] = {}

    def observe(self, inference: Inference) -> None:
        version = inference.model.version
        with self._lock:
            for table in (self._windows, self._totals):
                window = table.get(version)
                if window is None:
                    window = table[version] = _Window(model=inference.model.model)
                window.add(inference)

    def take(self) -> list[ReportTelemetry]:
        """The windows since the last call, one per version that served; they start again empty."""
        with self._lock:
            windows, self._windows = self._windows, {}
        return [window.report(version) for version, window in windows.items() if window.inferences]

    def totals(self) -> dict[str, ReportTelemetry]:
        with self._lock:
            return {version: window.report(version) for version, window in self._totals.items()}

    def p99_ms(self, version: str) -> float | None:
        """Recent p99 of ``version`` since the agent started, or None when it has served nothing."""
        with self._lock:
            window = self._totals.get(version)
            return percentile_ms(window.latencies_ms, 99) if window and window.latencies_ms else None
