"""What devices send: ``POST /v1/devices/{id}/reports`` (events, and one telemetry window per report).

A telemetry window comes in two forms. The old one carries counts, two latency percentiles and two means; the one
agents send now adds bounded histograms with fixed buckets (``exporters.telemetry_buckets``) and per-class counts,
so the canary analysis can compare versions metric by metric. Either form is checked whole before anything of the
report is stored: a wrong bucket count, a negative count, a NaN or counts that do not add up is a 422 naming the
field. Class indices are checked against the model version's class names where the report is stored.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from exporters.telemetry_buckets import HISTOGRAM_BUCKETS
from registry.rollout_service.schemas import ModelName, ShortText, VersionText

_COUNT = Field(ge=0, le=2**40)


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EventState(StrEnum):
    idle = "idle"
    downloading = "downloading"
    verifying = "verifying"
    validating = "validating"
    shadow = "shadow"  # the result of shadow validation on the device's own frames
    swapping = "swapping"
    probation = "probation"
    committed = "committed"
    rolling_back = "rolling_back"
    rolled_back = "rolled_back"
    failed = "failed"
    stale = "stale"  # the device's latest signed desired state expired: answers withheld or replayed; it serves on


class ShadowClassIn(_Body):
    class_id: int = Field(ge=0, le=10_000)
    class_name: str = Field(max_length=256)
    serving: int = _COUNT
    candidate: int = _COUNT
    matched_serving: float | None = Field(default=None, ge=0, le=1)
    matched_candidate: float | None = Field(default=None, ge=0, le=1)
    judged: bool
    passed: bool


class ShadowIn(_Body):
    """Shadow validation's figures: the candidate against the serving model on the same frames."""

    source: Literal["live", "golden", "skipped"]
    frames: int = _COUNT
    serving_detections: int = _COUNT
    candidate_detections: int = _COUNT
    matched_serving: float | None = Field(default=None, ge=0, le=1)
    matched_candidate: float | None = Field(default=None, ge=0, le=1)
    count_delta: float | None = Field(default=None, ge=-1e6, le=1e6)
    confidence_shift: float | None = Field(default=None, ge=-1, le=1)
    classes: list[ShadowClassIn] = Field(default_factory=list, max_length=1000)
    passed: bool


class DeviceEventIn(_Body):
    state: EventState
    version: VersionText | None = None
    model: ModelName | None = None
    rollout_id: int | None = Field(default=None, ge=1, le=2**62)
    ok: bool = True
    reason: ShortText = ""
    at: datetime | None = None
    shadow: ShadowIn | None = None


class LatencyFigures(_Body):
    p50: float = Field(ge=0, le=1e7)
    p99: float = Field(ge=0, le=1e7)


class Histograms(_Body):
    latency_ms: list[int] = Field(description=f"{HISTOGRAM_BUCKETS['latency_ms']} buckets")
    detections: list[int] = Field(description=f"{HISTOGRAM_BUCKETS['detections']} buckets")
    confidence: list[int] = Field(description=f"{HISTOGRAM_BUCKETS['confidence']} buckets")

    @model_validator(mode="after")
    def _shape(self) -> Histograms:
        for name, buckets in HISTOGRAM_BUCKETS.items():
            counts = getattr(self, name)
            if len(counts) != buckets:
                raise ValueError(f"{name}: {len(counts)} buckets, the contract has {buckets}")
            if any(c < 0 or c > 2**40 for c in counts):
                raise ValueError(f"{name}: counts must be between 0 and 2**40")
        return self


class TelemetryIn(_Body):
    version: VersionText
    model: ModelName | None = None
    inferences: int = _COUNT
    errors: int = _COUNT
    latency_ms: LatencyFigures
    detections_per_image: float = Field(ge=0, le=1e6)
    mean_confidence: float = Field(ge=0, le=1)
    # The bounded form: all of these, or none (an older agent).
    frames: int | None = Field(default=None, ge=0, le=2**40)
    empty_frames: int | None = Field(default=None, ge=0, le=2**40)
    nonfinite: int | None = Field(default=None, ge=0, le=2**40)
    histograms: Histograms | None = None
    class_counts: dict[int, int] | None = Field(default=None, max_length=10_000)

    @model_validator(mode="after")
    def _consistent(self) -> TelemetryIn:
        if self.errors > self.inferences:
            raise ValueError("errors cannot exceed inferences")
        bounded = (self.frames, self.empty_frames, self.nonfinite, self.histograms, self.class_counts)
        if all(part is None for part in bounded):
            return self
        if any(part is None for part in bounded):
            raise ValueError("frames, empty_frames, nonfinite, histograms and class_counts come together")
        self._check_counts()
        return self

    def _check_counts(self) -> None:
        assert self.histograms is not None and self.class_counts is not None and self.frames is not None
        h = self.histograms
        if self.frames != self.inferences - self.errors:
            raise ValueError(f"frames: {self.frames}, but inferences - errors is {self.inferences - self.errors}")
        if self.nonfinite is not None and self.nonfinite > self.errors:
            raise ValueError("nonfinite: cannot exceed errors")
        if sum(h.latency_ms) != self.frames or sum(h.detections) != self.frames:
            raise ValueError("histograms: latency_ms and detections must each count every frame once")
        if h.detections[0] != self.empty_frames:
            raise ValueError("empty_frames: must equal the first bucket of histograms.detections")
        bad = sorted(k for k, v in self.class_counts.items() if k < 0 or v < 0 or v > 2**40)
        if bad:
            raise ValueError(f"class_counts: negative class index or count at {bad[:5]}")
        if sum(h.confidence) != sum(self.class_counts.values()):
            raise ValueError("histograms.confidence: must count every detection of class_counts once")

    @property
    def bounded(self) -> bool:
        return self.histograms is not None


class DeviceReport(_Body):
    events: list[DeviceEventIn] = Field(default_factory=list, max_length=500)
    telemetry: TelemetryIn | None = None


class ReportAccepted(BaseModel):
    events: int
    telemetry: bool
