"""What the serving models did: windows for the reports to the rollout service, totals for ``/metrics``.

The probation watch that judges a freshly swapped-in version lives in ``edge_agent.probation``.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from edge_agent.protocol import LatencyFigures, ReportTelemetry
from edge_agent.runtime import Inference

LATENCY_WINDOW = 2048  # latencies kept per version for the percentiles


def percentile_ms(values: deque[float] | list[float], q: float) -> float:
    return float(np.percentile(np.fromiter(values, dtype=np.float64), q)) if values else 0.0


@dataclass
class _Window:
    model: str
    inferences: int = 0
    errors: int = 0
    detections: int = 0
    confidence_sum: float = 0.0
    latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=LATENCY_WINDOW))

    def add(self, inference: Inference) -> None:
        self.inferences += 1
        if inference.error is not None:
            self.errors += 1
            return
        self.detections += inference.detections
        self.confidence_sum += inference.confidence_sum
        self.latencies_ms.append(inference.latency_ms)

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
