"""Request and response bodies of the rollout service's REST API (DESIGN.md section 6), named by suffix."""

from __future__ import annotations

import itertools
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from exporters.fingerprint import Fingerprint, major_minor
from exporters.revocations import RevokedRelease
from exporters.signed_documents import SignedDocument
from registry.rollout_service.analysis.public import AnalysisPublic

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
    waiting_for_approval = "waiting_for_approval"  # a promotion that an operator has not approved yet
    rejected = "rejected"  # a promotion an operator refused: it never reached a device


ACTIVE_STATES = frozenset({RolloutState.pending, RolloutState.running, RolloutState.paused, RolloutState.halted})
# States in which a rollout offers nothing to any device.
UNAPPROVED_STATES = frozenset({RolloutState.waiting_for_approval, RolloutState.rejected})


# -- devices -----------------------------------------------------------------------------------------------------


Base64Text = Annotated[str, StringConstraints(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9+/=]+$")]


class DeviceEnroll(_Body):
    """An enrollment, signed by the device's own key (``exporters.device_identity``)."""

    device_id: DeviceId
    labels: dict[LabelText, LabelText] = Field(default_factory=dict, max_length=64)
    fingerprint: Fingerprint
    public_key: Base64Text  # the 32 raw bytes of its ed25519 public key
    signed_at: int = Field(ge=0, le=2**40)  # unix seconds
    nonce: Annotated[str, StringConstraints(min_length=16, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
    proof: Base64Text  # the key's signature of (device id, public key, signed_at)
    enrollment_token: Annotated[str, StringConstraints(min_length=1, max_length=512)] | None = None  # new ids
    key_change_signature: Base64Text | None = None  # the old key's consent to this key

    @field_validator("fingerprint")
    @classmethod
    def _torch_version(cls, fingerprint: Fingerprint) -> Fingerprint:
        major_minor(fingerprint.torch)  # compatibility is judged on it: refuse what cannot be compared
        return fingerprint


class DeviceStatus(StrEnum):
    pending = "pending"  # a new id waiting for an operator
    accepted = "accepted"
    rejected = "rejected"
    decommissioned = "decommissioned"


class DeviceEnrolled(BaseModel):
    """200: accepted, with the device token; 202: waiting for an operator (no token), ``reason`` says why."""

    device_id: str
    status: DeviceStatus
    device_token: str | None
    poll_interval_s: int
    reason: str = ""
    state_key: str | None = Field(
        default=None, description="base64 of the service's ed25519 public key: devices pin it and check every "
        "desired state against it",
    )  # fmt: skip


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
    shadow: dict[str, Any] | None = Field(
        default=None, description="how the device compares the candidate with the serving model on its own frames"
    )
    statement: SignedDocument | None = Field(
        default=None,
        description="the choice above as the service vouches for it (exporters.desired_statement), signed with the "
        "key the device pinned at enrollment; devices act on this, not on the plain fields",
    )
    revocations: SignedDocument | None = Field(
        default=None, description="the latest revocation list, signed with the release key (exporters.revocations)"
    )
    state_key: str | None = Field(default=None, description="the statement's key (base64), if none is pinned yet")


class DeviceEventPublic(BaseModel):
    state: str
    model: str | None
    version: str | None
    rollout_id: int | None
    ok: bool
    reason: str
    at: datetime
    shadow: dict[str, Any] | None = None  # a shadow event's figures (the candidate against the serving model)


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
    status: DeviceStatus = DeviceStatus.accepted
    public_key: str | None = None
    key_change_requested_at: datetime | None = None  # another key asked for this id and waits for an operator


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
    auto_complete: bool = Field(default=False, description="end the test on the winner once the analysis names one")


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
    allow_downgrade: bool = Field(
        default=False,
        description="order devices onto this version even where it is an older release than the one they run "
        "(signed into their desired state; without it they refuse an older release)",
    )
    force_gates: bool = Field(
        default=False,
        description="roll out a version whose gates failed (recorded in the audit log and signed into the desired "
        "state; without it the service refuses such a version and devices refuse its bundle)",
    )
    reason: ShortText = ""
    analysis: dict[str, Any] | None = Field(
        default=None, description="AnalysisSpec fields that replace the server's defaults (docs/analysis.md)"
    )
    shadow: dict[str, Any] | None = Field(
        default=None, description="ShadowSpec fields that replace the server's defaults (docs/edge-agent.md)"
    )

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
    allow_downgrade: bool = False  # an operator ordered devices onto this version where it is an older release
    force_gates: bool = False  # an operator rolled this version out although its gates failed
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
    analysis: AnalysisPublic | None = None  # the latest verdict of the fleet analysis


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


# -- revocations -------------------------------------------------------------------------------------------------


class RevocationsPublic(BaseModel):
    """The latest revocation list (sequence 0 and nothing revoked before the first)."""

    sequence: int
    revoked: list[RevokedRelease]
    signed: SignedDocument | None  # as the release key signed it; what devices are handed
