"""The fixed histogram buckets of a telemetry window: the contract between the edge agent and the rollout service.

A window's histograms have exactly these bucket counts whatever the traffic, so a report stays a few hundred bytes
and the service can add windows of different devices bucket by bucket. Light (numpy only): the agent builds the
histograms with it, the service checks their shape with it. Changing an edge is a change of the REST contract.

- latency: ``LATENCY_MS_EDGES`` are the upper bounds (exclusive) of the first buckets in milliseconds; the last
  bucket holds everything from the last edge up. ``len(LATENCY_MS_EDGES) + 1`` buckets.
- detections per image: one bucket per count 0 .. ``MAX_DETECTIONS_BUCKET - 1``, the last for that many or more.
- confidence: ``CONFIDENCE_BUCKETS`` equal buckets over [0, 1]; a confidence of exactly 1 falls in the last.
"""

from __future__ import annotations

import numpy as np

LATENCY_MS_EDGES: tuple[float, ...] = (
    1, 2, 3, 5, 7, 10, 15, 20, 30, 50, 70, 100, 150, 200, 300, 500, 700, 1000, 2000, 5000,
)  # fmt: skip
LATENCY_BUCKETS = len(LATENCY_MS_EDGES) + 1
MAX_DETECTIONS_BUCKET = 20
DETECTION_BUCKETS = MAX_DETECTIONS_BUCKET + 1
CONFIDENCE_BUCKETS = 20

HISTOGRAM_BUCKETS: dict[str, int] = {
    "latency_ms": LATENCY_BUCKETS,
    "detections": DETECTION_BUCKETS,
    "confidence": CONFIDENCE_BUCKETS,
}


def latency_bucket(latency_ms: float) -> int:
    return int(np.searchsorted(LATENCY_MS_EDGES, latency_ms, side="right"))


def detections_bucket(count: int) -> int:
    return min(max(count, 0), MAX_DETECTIONS_BUCKET)


def confidence_buckets(scores: np.ndarray) -> np.ndarray:
    """Bucket index of each confidence in ``scores`` (values outside [0, 1] are clipped)."""
    clipped = np.clip(np.asarray(scores, dtype=np.float64), 0.0, 1.0)
    return np.minimum((clipped * CONFIDENCE_BUCKETS).astype(np.int64), CONFIDENCE_BUCKETS - 1)


def bucket_midpoints(name: str) -> np.ndarray:
    """A representative value per bucket of histogram ``name``, for plots and summaries."""
    if name == "latency_ms":
        lower = np.array((0.0, *LATENCY_MS_EDGES))
        upper = np.array((*LATENCY_MS_EDGES, 2 * LATENCY_MS_EDGES[-1]))
        return (lower + upper) / 2
    if name == "detections":
        return np.arange(DETECTION_BUCKETS, dtype=np.float64)
    if name == "confidence":
        return (np.arange(CONFIDENCE_BUCKETS) + 0.5) / CONFIDENCE_BUCKETS
    raise KeyError(f"no histogram {name!r}; known: {', '.join(HISTOGRAM_BUCKETS)}")
