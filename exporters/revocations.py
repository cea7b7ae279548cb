"""The revocation list: versions no device may install, signed with the offline release key.

``yolo-ota revoke MODEL VERSION`` adds an entry (the version's product line, number, release and manifest digest)
to the latest list, raises its ``sequence`` and signs it with the same key that signs bundles; the rollout service
stores it (and refuses rollouts of a revoked version) and hands it to devices with their desired state. A device
verifies it with the release public key it already holds, keeps the highest sequence it has seen (an older list
sent again changes nothing) and refuses to install any bundle whose manifest digest is on it. Since the service
cannot sign such a list, a compromised service can withhold a revocation from a device that has not seen it, but
cannot undo one a device holds.
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field

PURPOSE: Final = "yolo-ota revocations v1"


class RevokedRelease(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(max_length=256)
    version: str = Field(max_length=64)
    release: int | None = None  # None: a bundle exported before releases were numbered
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    reason: str = Field(default="", max_length=500)
    revoked_at: int = Field(ge=0)  # unix seconds


class RevocationList(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    purpose: Literal["yolo-ota revocations v1"] = "yolo-ota revocations v1"
    sequence: int = Field(ge=1)  # grows with every new list
    issued_at: int = Field(ge=0)
    revoked: tuple[RevokedRelease, ...] = Field(default=(), max_length=10_000)

    def entry_for(self, model: str, manifest_sha256: str) -> RevokedRelease | None:
        """The entry that revokes this bundle of ``model``, if any."""
        for entry in self.revoked:
            if entry.model == model and entry.manifest_sha256 == manifest_sha256:
                return entry
        return None

    def with_entry(self, entry: RevokedRelease, *, issued_at: int) -> RevocationList:
        """The next list: this one with ``entry`` added (replacing an entry for the same bundle)."""
        kept = tuple(e for e in self.revoked if (e.model, e.manifest_sha256) != (entry.model, entry.manifest_sha256))
        return RevocationList(sequence=self.sequence + 1, issued_at=issued_at, revoked=(*kept, entry))


def empty_list() -> RevocationList:
    """The list before the first revocation (sequence 0 is never signed: the first real list is 1)."""
    return RevocationList.model_construct(purpose=PURPOSE, sequence=0, issued_at=0, revoked=())
