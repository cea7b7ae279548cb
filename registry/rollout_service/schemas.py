"""Request and response bodies of the rollout service's REST API (DESIGN.md section 6), named by suffix."""

from __future__ import annotations

import itertools
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from exporters.fingerprint import Fingerprint, major_minor

DeviceId = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=256, pattern=r"^[^\x00-\x1f]+$")]
VersionText = Annotated[str, StringConstraints(min_length=1, max_length=32, pattern=r"^[0-9]+$")]
ShortText = Annotated[str, StringConstraints(max_length=1000)]
LabelText = Annotated[str, StringConstraints(max_length=256)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Strategy(StrEnum):
    immediate = "immediate"
    canary = "canary"
    ab = "ab"


class RolloutState(StrEnum):
    pending = "pending"
    running = "running"
    paused = "paused"
    halted = "halted"
    completed = "completed"
    aborted = "aborted"
    rolled_back = "rolled_back"


ACTIVE_STATES = frozenset({RolloutState.pending, RolloutState.running, RolloutState.paused, RolloutState.halted})


# -- devices -----------------------------------------------------------------------------------------------------


class DeviceEnroll(_Body):
    enrollment_token: Annotated[str, StringConstraints(min_length=1, max_length=512)]
    device_id: DeviceId
    labels: dict[LabelText, LabelText] = Field(default_factory=dict, max_length=64)
    fingerprint: Fingerprint

    @field_validator("fingerprint")
    @classmethod
    def _torch_version(cls, fingerprint: Fingerprint) -> Fingerprint:
        major_minor(fingerprint.torch)  # compatibility is judged on it: refuse what cannot be compared
        return fingerprint


class DeviceEnrolled(BaseModel):
    device_id: str
    device_token: str
    poll_interval_s: int


class DesiredFile(BaseModel):
    path: str
    url: str
    sha256: str
    bytes: int


class DesiredState(BaseModel):
    """What one device should run now; every field but ``etag`` and ``poll_interval_s`` is null when nothing."""

    rollout_id: int | None
    model: str | None
    version: str | None
    variant: str | None
    files: list[DesiredFile]
    manifest_url: str | None
    manifest_sha256: str | None
    signature_url: str | None
    etag: str
    poll_interval_s: int


class EventState(StrEnum):
    idle = "idle"
    downloading = "downloading"
    verifying = "verifying"
    validating = "validating"
    swapping = "swapping"
    probation = "probation"
    committed = "committed"
    rolling_back = "rolling_back"
    rolled_back = "rolled_back"
    failed = "failed"


class DeviceEventIn(_Body):
    state: EventState
    version: VersionText | None = None
    model: ModelName | None = None
    rollout_id: int | None = Field(default=None, ge=1, le=2**62)
    ok: bool = True
    reason: ShortText = ""
    at: datetime | None = None


class LatencyFigures(_Body):
    p50: float = Field(ge=0, le=1e7)
    p99: float = Field(ge=0, le=1e7)


class TelemetryIn(_Body):
    version: VersionText
    model: ModelName | None = None
    inferences: int = Field(ge=0, le=2**40)
    errors: int = Field(ge=0, le=2**40)
    latency_ms: LatencyFigures
    detections_per_image: float = Field(ge=0, le=1e6)
    mean_confidence: float = Field(ge=0, le=1)

    @model_validator(mode="after")
    def _errors_fit(self) -> TelemetryIn:
        if self.errors > self.inferences:
            raise ValueError("errors cannot exceed inferences")
        return self


class DeviceReport(_Body):
    events: list[DeviceEventIn] = Field(default_factory=list, max_length=500)
    telemetry: TelemetryIn | None = None


class ReportAccepted(BaseModel):
    events: int
    telemetry: bool


class DeviceEventPublic(BaseModel):
    state: str
    model: str | None
    version: str | None
    rollout_id: int | None
    ok: bool
    reason: str
    at: datetime


class Compatibility(BaseModel):
    model: str
    version: str
    compatible: bool
    variant: str | None
    reason: str | None


class DevicePublic(BaseModel):
    device_id: str
    labels: dict[str, str]
    fingerprint: dict[str, Any]
    enrolled_at: datetime
    last_seen_at: datetime | None
    model: str | None
    current_version: str | None
    state: str | None


class DeviceDetail(DevicePublic):
    last_events: list[DeviceEventPublic]
    desired_version: str | None
    desired_rollout_id: int | None
    compatibility: Compatibility | None


class DeviceList(BaseModel):
    devices: list[DevicePublic]
    total: int


# -- rollouts ----------------------------------------------------------------------------------------------------


class WaveSpec(_Body):
    percent: float = Field(gt=0, le=100, description="cumulative share of the targeted devices, in percent")
    bake_s: float = Field(default=0, ge=0, le=30 * 86400)
    max_failure_rate: float = Field(default=0.1, ge=0, le=1)
    min_success_rate: float = Field(default=0.9, ge=0, le=1)


def check_waves(waves: list[WaveSpec]) -> None:
    """Waves grow strictly and the last reaches every targeted device."""
    percents = [wave.percent for wave in waves]
    if any(b <= a for a, b in itertools.pairwise(percents)):
        raise ValueError(f"wave percents must increase strictly, got {percents}")
    if percents and percents[-1] != 100:
        raise ValueError(f"the last wave must reach 100 percent of the targeted devices, got {percents[-1]}")


class Selector(_Body):
    labels: dict[LabelText, LabelText] = Field(default_factory=dict, max_length=64)
    fingerprint: dict[Annotated[str, StringConstraints(max_length=64)], LabelText] = Field(
        default_factory=dict, max_length=32, description="exact values of fingerprint fields, e.g. {'arch': 'aarch64'}"
    )

    @field_validator("fingerprint")
    @classmethod
    def _known_fields(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(Fingerprint.model_fields))
        if unknown:
            raise ValueError(f"unknown fingerprint field(s) {unknown}; known: {sorted(Fingerprint.model_fields)}")
        return value


class AbSpec(_Body):
    control_version: VersionText
    split: float = Field(gt=0, lt=1, description="share of the targeted devices that get the treatment version")


class RolloutCreate(_Body):
    model: ModelName
    version: VersionText
    strategy: Strategy = Strategy.canary
    waves: list[WaveSpec] | None = Field(default=None, min_length=1, max_length=20)
    selector: Selector = Field(default_factory=Selector)
    ab: AbSpec | None = None
    previous_version: VersionText | None = Field(
        default=None, description="what rollback returns devices to; default: the version the previous rollout left"
    )
    supersede: bool = Field(default=False, description="end an active rollout of this model for the same devices")
    reason: ShortText = ""

    @model_validator(mode="after")
    def _consistent(self) -> RolloutCreate:
        if self.waves is not None:
            check_waves(self.waves)
        if self.strategy == Strategy.ab:
            if self.ab is None:
                raise ValueError("strategy ab needs ab: {control_version, split}")
            if self.ab.control_version == self.version:
                raise ValueError("an A/B test needs two different versions")
        elif self.ab is not None:
            raise ValueError(f"ab is only for strategy ab, not {self.strategy}")
        if self.strategy == Strategy.immediate and self.waves is not None:
            raise ValueError("strategy immediate has no waves")
        return self


class RolloutAction(_Body):
    reason: ShortText = ""


class WaveProgress(BaseModel):
    index: int
    percent: float
    bake_s: float
    max_failure_rate: float
    min_success_rate: float
    state: str  # waiting | baking | passed | halted
    started_at: datetime | None
    devices: int
    succeeded: int
    failed: int
    pending: int


class ArmTelemetry(BaseModel):
    arm: str
    version: str | None
    devices: int
    succeeded: int
    failed: int
    reports: int
    inferences: int
    errors: int
    error_rate: float | None
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    detections_per_image: float | None
    mean_confidence: float | None


class RolloutPublic(BaseModel):
    id: int
    model: str
    version: str
    previous_version: str | None
    strategy: Strategy
    state: RolloutState
    selector: Selector
    waves: list[WaveSpec]
    ab: AbSpec | None
    current_wave: int
    created_by: str
    reason: str
    created_at: datetime
    updated_at: datetime


class RolloutDetail(RolloutPublic):
    targeted: int
    skipped_incompatible: int
    incompatible_reasons: dict[str, int]
    wave_progress: list[WaveProgress]
    arms: list[ArmTelemetry]


class RolloutList(BaseModel):
    rollouts: list[RolloutPublic]


class TelemetryWindowPublic(BaseModel):
    """One telemetry report of one device: a window of counts and the percentiles measured in it."""

    at: datetime  # when the service received it
    device_id: str
    version: str
    inferences: int
    errors: int
    p50_ms: float
    p99_ms: float
    detections_per_image: float
    mean_confidence: float


class ArmWindowsPublic(BaseModel):
    arm: str  # treatment | control
    version: str
    windows_total: int  # every window stored for this arm; ``windows`` holds the newest of them
    windows: list[TelemetryWindowPublic]  # newest first


class RolloutTelemetryPublic(BaseModel):
    rollout_id: int
    arms: list[ArmWindowsPublic]


class AuditEntry(BaseModel):
    id: int
    at: datetime
    actor: str
    action: str
    rollout_id: int | None
    model: str | None
    version: str | None
    reason: str


class AuditList(BaseModel):
    entries: list[AuditEntry]


class PromotionPublic(BaseModel):
    model: str
    alias: str
    version: str
    outcome: str  # rollout | refused | ignored
    rollout_id: int | None
    reason: str
    at: datetime


class PromotionList(BaseModel):
    promotions: list[PromotionPublic]


class Problem(BaseModel):
    """Every error answer: a readable one-line message and, for validation errors, where."""

    detail: str
    errors: list[dict[str, Any]] | None = None
