"""The desired state as the rollout service vouches for it: one device's orders, signed with the service's key.

The poll answer (``GET /v1/devices/{id}/desired``) carries file URLs and other conveniences that anybody on the
path could change; what decides what a device runs is this statement, signed with the service's online key
(``registry.rollout_service.state_signing``), whose public half the device pinned when it enrolled. It binds:

- ``device_id``: a statement for another device is refused;
- ``rollout_id``, ``model``, ``version``, ``variant``, ``manifest_sha256``: the bundle, by its manifest digest;
  the manifest lists every file's digest, so no file of another version can pass (mix-and-match);
- ``generation``: the service's state generation, which only grows; a device refuses one below the highest it has
  accepted (a replayed answer);
- ``issued_at``/``expires_at`` (unix seconds): a device whose latest statement has expired keeps serving and
  reports ``stale`` (answers withheld or replayed: an indefinite freeze);
- ``downgrade``: an operator ordered this device onto an older release (a rollback, an A/B control arm, a rollout
  created with ``allow_downgrade``); without it a device refuses a bundle older than the one it runs;
- ``force_gates``: an operator rolled out a version whose gates failed, and the force is recorded; without it a device
  refuses such a bundle;
- ``shadow``: the shadow-validation thresholds, which an attacker would otherwise loosen.
"""

from __future__ import annotations

from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field

PURPOSE: Final = "yolo-ota desired state v1"
# A device accepts a statement issued up to this far in its own future (clocks on a line drift).
CLOCK_SKEW_S = 300


class DesiredStatement(BaseModel):
    """What the service's signature covers (module docstring). ``version`` None: no opinion on this device."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    purpose: Literal["yolo-ota desired state v1"] = "yolo-ota desired state v1"
    device_id: str = Field(max_length=128)
    rollout_id: int | None = None
    model: str | None = Field(default=None, max_length=256)
    version: str | None = Field(default=None, max_length=64)
    variant: str | None = Field(default=None, max_length=64)
    manifest_sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    generation: int = Field(ge=0)
    issued_at: int = Field(ge=0)
    expires_at: int = Field(ge=0)
    downgrade: bool = False
    force_gates: bool = False
    shadow: dict[str, Any] | None = None

    def expired(self, now_s: float) -> bool:
        return now_s >= self.expires_at

    def from_the_future(self, now_s: float) -> bool:
        return self.issued_at > now_s + CLOCK_SKEW_S
