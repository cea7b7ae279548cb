"""How a rollout is judged: the ``analysis`` and ``shadow`` blocks of ``POST /v1/rollouts``.

Defaults live in the server settings (``[server.analysis]`` / ``[server.shadow]`` in the config file, or
``YOLO_OTA_ANALYSIS`` / ``YOLO_OTA_SHADOW`` as JSON); a rollout's own block replaces them field by field.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Verdict(StrEnum):
    passed = "pass"
    marginal = "marginal"
    failed = "fail"
    inconclusive = "inconclusive"


class OnFail(StrEnum):
    halt = "halt"  # stop; devices keep what they run until a person decides
    rollback = "rollback"  # stop and send the wave's devices back to the previous version


class OnInconclusive(StrEnum):
    pause = "pause"  # a person decides
    halt = "halt"
    rollback = "rollback"
    advance = "advance"  # the device-success thresholds alone decide, as without analysis


Direction = Literal["increase", "decrease", "both"]

# Metric names; a class's rate is "class_rate:<class name>".
LATENCY_P99 = "latency_p99"
DETECTIONS_PER_IMAGE = "detections_per_image"
CLASS_RATE = "class_rate"
CONFIDENCE = "confidence"
ERROR_RATE = "error_rate"
NAN_RATE = "nan_rate"
METRIC_FAMILIES = (LATENCY_P99, DETECTIONS_PER_IMAGE, CLASS_RATE, CONFIDENCE, ERROR_RATE, NAN_RATE)


class Bands(_Body):
    """Effect-size bands, relative to the control (0.1 = 10 %): a significant change inside its band passes."""

    latency_p99: float = Field(
        default=0.10, gt=0, le=10, description="allowed increase of the p99 latency (on each device's own scale)"
    )
    detections_per_image: float = Field(default=0.10, gt=0, le=10, description="allowed change, either way")
    class_rate: float = Field(default=0.12, gt=0, le=10, description="allowed change of each class's rate, either way")


class AnalysisSpec(_Body):
    """Canary analysis of one rollout (see docs/analysis.md)."""

    enabled: bool = True
    confidence: float = Field(default=0.98, gt=0.5, lt=1, description="of the Mann-Whitney U tests (two-sided)")
    min_windows: int = Field(default=50, ge=2, le=100_000, description="per arm; fewer gives inconclusive")
    max_windows: int = Field(default=5000, ge=10, le=1_000_000, description="per arm; the newest are used")
    min_window_frames: int = Field(
        default=20, ge=1, le=100_000,
        description="a device's consecutive windows are joined until each holds this many inferences (a sample)",
    )  # fmt: skip
    bands: Bands = Field(default_factory=Bands)
    latency_baseline_s: float = Field(
        default=900, ge=0, le=7 * 86400,
        description="each device's p99 on the previous version in this span before the rollout is its own scale "
        "for latency; 0: compare raw p99s",
    )  # fmt: skip
    directions: dict[str, Direction] = Field(
        default_factory=dict,
        description="the change that is bad, per metric family, over the defaults (detections_per_image and "
        "class_rate: both; latency_p99, error_rate, nan_rate: increase; confidence: decrease)",
    )
    confidence_psi_marginal: float = Field(default=0.10, gt=0, description="PSI of the confidence histogram")
    confidence_psi_fail: float = Field(default=0.25, gt=0)
    max_error_rate_increase: float = Field(default=0.005, ge=0, le=1, description="absolute, over the control's")
    min_class_detections: int = Field(
        default=20, ge=1, description="a class seen less often than this in both arms is inconclusive, not scored"
    )
    critical: list[str] = Field(
        default_factory=lambda: [ERROR_RATE, NAN_RATE, LATENCY_P99, CLASS_RATE],
        description="metric families whose fail fails the whole analysis",
    )
    pass_score: float = Field(default=90, ge=0, le=100)
    marginal_score: float = Field(default=75, ge=0, le=100)
    on_fail: OnFail = OnFail.halt
    on_inconclusive: OnInconclusive = OnInconclusive.pause
    inconclusive_timeout_s: float = Field(default=1800, ge=0, le=30 * 86400, description="after the bake time")
    interval_s: float = Field(default=30, ge=0, le=86400, description="between evaluations of a running wave")

    @model_validator(mode="after")
    def _consistent(self) -> AnalysisSpec:
        unknown = sorted((set(self.critical) | set(self.directions)) - set(METRIC_FAMILIES))
        if unknown:
            kind = "family" if len(unknown) == 1 else "families"
            raise ValueError(f"unknown metric {kind} {unknown}; known: {', '.join(METRIC_FAMILIES)}")
        if self.marginal_score > self.pass_score:
            raise ValueError("marginal_score cannot exceed pass_score")
        if self.confidence_psi_marginal > self.confidence_psi_fail:
            raise ValueError("confidence_psi_marginal cannot exceed confidence_psi_fail")
        if self.min_windows > self.max_windows:
            raise ValueError("min_windows cannot exceed max_windows")
        return self


class ShadowSpec(_Body):
    """Shadow validation on a device's own live frames before a swap; sent to devices with the desired state."""

    enabled: bool = True
    min_matched: float = Field(
        default=0.8, ge=0, le=1, description="share of the serving model's detections the candidate must match"
    )
    iou: float = Field(default=0.5, gt=0, le=1, description="same class and at least this IoU is a match")
    min_class_samples: int = Field(default=20, ge=1, description="a class is judged once it has this many detections")
    sample_frames: int = Field(default=64, ge=1, le=10_000, description="live frames to run the candidate on")
    time_limit_s: float = Field(default=120, ge=0, le=86400, description="to collect them; then golden data stands in")


class AnalysisDefaults(_Body):
    """The server's defaults for both blocks."""

    analysis: AnalysisSpec = Field(default_factory=AnalysisSpec)
    shadow: ShadowSpec = Field(default_factory=ShadowSpec)


def merged(default: BaseModel, override: dict[str, Any] | None) -> Any:
    """``default`` with the fields ``override`` sets (nested blocks merged too), validated again."""
    if not override:
        return default
    data = default.model_dump()
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return type(default).model_validate(data)
