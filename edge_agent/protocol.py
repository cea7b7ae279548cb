"""The agent's side of the rollout service's REST contract (DESIGN.md section 6).

Kept here rather than imported from the service: the agent never loads the service's code. Answers are parsed
leniently (unknown fields ignored) so that a newer service does not break older agents; what the agent sends is
strict.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from exporters.signed_documents import SignedDocument


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sent(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Enrolled(_Answer):
    # Bounded: an answer beyond these is refused whole (``edge_agent.bounds`` has the bounds that are not fields).
    device_id: str = Field(max_length=128)
    status: str = Field(default="accepted", max_length=32)  # accepted | pending
    device_token: str | None = Field(max_length=4096)
    poll_interval_s: int
    reason: str = Field(default="", max_length=2000)
    state_key: str | None = Field(default=None, max_length=64)  # the key the service signs desired states with


class DesiredFile(_Answer):
    path: str = Field(min_length=1, max_length=1024)
    url: str = Field(max_length=8192, pattern=r"^https?://")  # presigned S3 URLs run to a few KB
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0, le=1 << 50)  # the real bound is the max_bundle_bytes setting (edge_agent.bounds)


class ShadowConfig(_Answer):
    """The desired state's ``shadow`` block: how the candidate is compared with the serving model on live frames.

    The defaults are the rollout service's (``ShadowSpec``), repeated here because the agent never imports the
    service; a desired state without the block gets them.
    """

    enabled: bool = True
    min_matched: float = Field(default=0.8, ge=0, le=1)  # share of serving detections the candidate must match
    iou: float = Field(default=0.5, gt=0, le=1)  # same class and at least this IoU is a match
    min_class_samples: int = Field(default=20, ge=1)  # a class is judged once it has this many serving detections
    sample_frames: int = Field(default=64, ge=1, le=10_000)  # live frames to run the candidate on
    time_limit_s: float = Field(default=120, ge=0, le=86400)  # to collect them; then the golden data stands in


class DesiredState(_Answer):
    """What the service wants this device to run; ``version`` is None when it has no opinion."""

    rollout_id: int | None = None
    model: str | None = None
    version: str | None = None
    variant: str | None = None
    files: list[DesiredFile] = Field(default_factory=list)
    manifest_url: str | None = None
    manifest_sha256: str | None = None
    signature_url: str | None = None
    etag: str = ""
    poll_interval_s: int = 30
    shadow: ShadowConfig | None = None  # None: the defaults (``ShadowConfig()``)
    # What the service signed (``exporters.desired_statement``); ``edge_agent.trust`` checks it and takes the fields
    # above that it covers from it, and sets the two orders below from it alone.
    statement: SignedDocument | None = None
    revocations: SignedDocument | None = None  # the latest revocation list, signed with the release key
    state_key: str | None = Field(default=None, max_length=64)  # pinned from here only when none is pinned yet
    downgrade: bool = False  # an operator ordered this version even where it is an older release than the one here
    force_gates: bool = False  # an operator rolled this version out although its gates failed

    @property
    def shadow_config(self) -> ShadowConfig:
        return self.shadow if self.shadow is not None else ShadowConfig()

    @property
    def key(self) -> str | None:
        """Identifies one offered bundle: a version re-registered with other content is another offer."""
        if self.model is None or self.version is None:
            return None
        return f"{self.model}:{self.version}:{self.manifest_sha256}"


class ShadowClass(_Sent):
    """One class of a shadow comparison."""

    class_id: int
    class_name: str
    serving: int  # detections of the serving model
    candidate: int
    matched_serving: float | None  # None when the serving model found none of this class
    matched_candidate: float | None
    judged: bool  # serving found at least min_class_samples: the class counts for the gate
    passed: bool


class ShadowReport(_Sent):
    """What shadow validation found: the ``shadow`` field of its event (contract in docs/edge-agent.md)."""

    source: Literal["live", "golden", "skipped"]
    frames: int
    serving_detections: int
    candidate_detections: int
    matched_serving: float | None  # share of the serving model's detections the candidate matched
    matched_candidate: float | None  # share of the candidate's detections the serving model matched
    count_delta: float | None  # (candidate - serving) / max(serving, 1)
    confidence_shift: float | None  # mean confidence of the matched candidate minus serving detections
    classes: list[ShadowClass] = Field(default_factory=list)
    passed: bool


class ReportEvent(_Sent):
    state: str
    version: str | None = None
    model: str | None = None
    rollout_id: int | None = None
    ok: bool = True
    reason: str = Field(default="", max_length=1000)
    at: datetime
    shadow: ShadowReport | None = None  # only on "shadow" events


class LatencyFigures(_Sent):
    p50: float
    p99: float


class Histograms(_Sent):
    """Fixed buckets (``exporters.telemetry_buckets``): 21 latency, 21 detections-per-image, 20 confidence."""

    latency_ms: list[int]
    detections: list[int]
    confidence: list[int]


class ReportTelemetry(_Sent):
    """One window of one version. The counts after ``mean_confidence`` are the bounded form; the service also
    accepts windows without them, from older agents."""

    version: str
    model: str | None = None
    inferences: int
    errors: int
    latency_ms: LatencyFigures
    detections_per_image: float
    mean_confidence: float
    frames: int  # answered without error (inferences - errors)
    empty_frames: int  # of those, with no detection
    nonfinite: int  # NaN/inf outputs (counted in errors too)
    histograms: Histograms
    class_counts: dict[str, int]  # detections per class index; zero counts left out


class Report(_Sent):
    events: list[ReportEvent] = Field(default_factory=list)
    telemetry: ReportTelemetry | None = None
