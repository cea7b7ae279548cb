"""The agent's side of the rollout service's REST contract (DESIGN.md section 6).

Kept here rather than imported from the service: the agent never loads the service's code. Answers are parsed
leniently (unknown fields ignored) so that a newer service does not break older agents; what the agent sends is
strict.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class _Answer(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Sent(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Enrolled(_Answer):
    device_id: str
    device_token: str
    poll_interval_s: int


class DesiredFile(_Answer):
    path: str
    url: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


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

    @property
    def key(self) -> str | None:
        """Identifies one offered bundle: a version re-registered with other content is another offer."""
        if self.model is None or self.version is None:
            return None
        return f"{self.model}:{self.version}:{self.manifest_sha256}"


class ReportEvent(_Sent):
    state: str
    version: str | None = None
    model: str | None = None
    rollout_id: int | None = None
    ok: bool = True
    reason: str = Field(default="", max_length=1000)
    at: datetime


class LatencyFigures(_Sent):
    p50: float
    p99: float


class ReportTelemetry(_Sent):
    version: str
    model: str | None = None
    inferences: int
    errors: int
    latency_ms: LatencyFigures
    detections_per_image: float
    mean_confidence: float


class Report(_Sent):
    events: list[ReportEvent] = Field(default_factory=list)
    telemetry: ReportTelemetry | None = None
