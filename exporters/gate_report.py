"""The gate report: thresholds and results of every gate, as stored in manifest.json (DESIGN.md section 3).

Pydantic only (no torch), so that readers of manifests (the registry, the rollout service) stay light;
``exporters.gates`` measures what these models hold.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DeviceKind = Literal["cpu", "cuda"]


class _Report(BaseModel):
    model_config = ConfigDict(extra="forbid")


class GateThresholds(_Report):
    """Limits the gates judge by; stored in the manifest so a device judges exactly as the exporter did."""

    raw_mse_max: float = 1e-5
    det_iou_min: float = 0.9
    det_match_min: float = 0.99
    conf: float = 0.25
    nms_iou: float = 0.7
    max_det: int = 300
    warmup_iters: int = 10
    timed_iters: int = 50
    memory_max_batch: int = 64
    memory_time_limit_s: float = 60.0


class RawParity(_Report):
    reference: Literal["cpu", "cuda"] = Field(description="device of the eager outputs compared with")
    mse: float
    max_abs: float
    cosine: float
    judged: bool = Field(description="False for fp16, which is judged by detection parity only")
    passed: bool


class DetectionParity(_Report):
    reference_detections: int
    candidate_detections: int
    matched: int
    matched_fraction_reference: float
    matched_fraction_candidate: float
    passed: bool


class LatencyStats(_Report):
    batch: int
    iterations: int
    timer: Literal["cuda-events", "perf_counter"]
    cpu_threads: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    fps: float


class LatencyGate(_Report):
    budget_ms: float | None
    stats: list[LatencyStats]
    passed: bool


class MemoryPoint(_Report):
    batch: int
    peak_bytes: int = Field(description="peak CUDA memory of the variant: weights, input and activations")
    fps: float


class MemoryGate(_Report):
    points: list[MemoryPoint]
    stopped_because: str
    passed: bool


class VariantGates(_Report):
    """All gate results of one variant on one machine."""

    variant: str
    device: DeviceKind
    dtype: Literal["float32", "float16"]
    measured_on: str
    raw_parity: RawParity
    detection_parity: DetectionParity
    latency: LatencyGate
    memory: MemoryGate | None
    passed: bool

    def failures(self) -> list[str]:
        """Names of the gates that failed."""
        gates = {
            "raw_parity": self.raw_parity.passed,
            "detection_parity": self.detection_parity.passed,
            "latency": self.latency.passed,
            "memory": self.memory.passed if self.memory else True,
        }
        return [name for name, ok in gates.items() if not ok]
