"""What the agent holds of the service's word, and the checks every poll answer goes through before it is acted on.

- **The service's key.** The agent pins the key the service signs desired states with when it enrolls (or, given
  its token out of band or enrolled before states were signed, from its first answer; or takes it from the
  ``service_key`` setting, and then refuses any other). From then on it acts only on answers whose
  statement (``exporters.desired_statement``) that key signed: whoever else answers a poll on the network can
  change URLs, not what the device runs.
- **The statement's checks**, in order: signed by the pinned key, for this device, of a generation no lower than
  the highest accepted before (a replayed answer), not issued in the future, not expired. The fields the
  statement covers (rollout, model, version, variant, manifest digest, shadow thresholds) and the operators'
  orders (downgrade, forced gates) are taken from it, never from the plain answer.
- **Freshness.** The service signs a fresh statement every quarter of its validity; when the latest one accepted
  has expired, answers are being withheld or replayed (an indefinite freeze): ``stale()`` says so, and the agent
  reports it and keeps serving.
- **The revocation list** (``exporters.revocations``) that comes with answers, checked with the release public key;
  the highest sequence is kept.

Everything held is saved in ``trust.json`` in the data dir (written atomically), so that a restart forgets
neither the key, nor the generation floor, nor a revocation.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import BaseModel, ValidationError

from edge_agent.errors import AgentSettingsError, DesiredStateRefused
from edge_agent.protocol import DesiredState, ShadowConfig
from exporters.desired_statement import CLOCK_SKEW_S, DesiredStatement
from exporters.errors import SignedDocumentError
from exporters.files import atomic_write
from exporters.revocations import RevocationList, RevokedRelease
from exporters.signed_documents import SignedDocument, open_document, public_key_from_text

log = logging.getLogger(__name__)

TRUST_FILE = "trust.json"


class SavedTrust(BaseModel):
    """``trust.json``."""

    state_key: str | None = None  # the service's public key, pinned
    generation: int = -1  # the highest generation accepted
    expires_at: int | None = None  # when the latest statement accepted expires (unix seconds)
    revocations: SignedDocument | None = None  # the highest-sequence list that verified


class Trust:
    def __init__(
        self, data_dir: Path, device_id: str, *, release_key: Ed25519PublicKey | None, service_key: str | None
    ) -> None:
        self._path = data_dir / TRUST_FILE
        self._device_id = device_id
        self._release_key = release_key
        self._saved = self._load()
        self._revocations: RevocationList | None = None
        if self._saved.revocations is not None and release_key is not None:
            try:
                self._revocations = open_document(release_key, self._saved.revocations, RevocationList)
            except SignedDocumentError as exc:  # the release key was changed: the next answer brings the list
                log.warning("the revocation list kept in %s no longer verifies: %s", self._path, exc)
        if service_key is not None:
            if self._saved.state_key not in (None, service_key):
                raise AgentSettingsError(
                    f"service_key differs from the key pinned in {self._path}; remove the file to pin the new one"
                )
            try:
                public_key_from_text(service_key)
            except SignedDocumentError as exc:
                raise AgentSettingsError(f"service_key: {exc}") from None
            self._saved.state_key = service_key
        self.last_refusal: str | None = None  # the reason the latest refused answer was refused

    def _load(self) -> SavedTrust:
        if not self._path.is_file():
            return SavedTrust()
        try:
            return SavedTrust.model_validate_json(self._path.read_bytes())
        except ValidationError as exc:
            raise AgentSettingsError(f"{self._path} is not readable: {exc.errors()[0]['msg']}") from None

    def _save(self) -> None:
        atomic_write(self._path, self._saved.model_dump_json(indent=2).encode())

    # -- the service's key -----------------------------------------------------------------------------------

    @property
    def pinned(self) -> str | None:
        return self._saved.state_key

    def pin(self, state_key: str | None) -> None:
        """Pin the key an enrollment answer names; ``DesiredStateRefused`` when it is absent, malformed, or not the
        key pinned before (an answer from another service, or an attacker's)."""
        if state_key is None:
            raise DesiredStateRefused(
                "the service names no key for its desired states: it is older than this agent (update it first)"
            )
        _key(state_key)
        if self._saved.state_key is not None and self._saved.state_key != state_key:
            raise DesiredStateRefused(
                f"the enrollment answer names another state key ({state_key[:12]}...) than the one pinned here "
                f"({self._saved.state_key[:12]}...): not this device's service"
            )
        if self._saved.state_key is None:
            self._saved.state_key = state_key
            self._save()
            log.info("pinned the service's state key %s...", state_key[:12])

    # -- answers ---------------------------------------------------------------------------------------------

    def accept(self, answer: DesiredState, now_s: float | None = None) -> DesiredState:
        """The answer as its signed statement has it; ``DesiredStateRefused`` when it must not be acted on."""
        now = time.time() if now_s is None else now_s
        try:
            statement = self._check(answer, now)
        except DesiredStateRefused as exc:
            self.last_refusal = str(exc)
            raise
        self.last_refusal = None
        self._take_revocations(answer.revocations)
        if statement.generation >= self._saved.generation:
            self._saved.generation = statement.generation
            self._saved.expires_at = max(self._saved.expires_at or 0, statement.expires_at)
            self._save()
        return answer.model_copy(
            update={
                "rollout_id": statement.rollout_id,
                "model": statement.model,
                "version": statement.version,
                "variant": statement.variant,
                "manifest_sha256": statement.manifest_sha256,
                "shadow": ShadowConfig.model_validate(statement.shadow) if statement.shadow is not None else None,
                "downgrade": statement.downgrade,
                "force_gates": statement.force_gates,
            }
        )

    def _check(self, answer: DesiredState, now: float) -> DesiredStatement:
        if self._saved.state_key is None and answer.state_key is not None:
            # A device given its token out of band, or enrolled before states were signed: its first answer, on
            # its own token, names the key (trust on first use, as an enrollment answer would).
            self.pin(answer.state_key)
        if self._saved.state_key is None:
            raise DesiredStateRefused("no service key is pinned here, and the answer names none")
        if answer.statement is None:
            raise DesiredStateRefused("the answer carries no signed statement: not acted on")
        try:
            statement = open_document(_key(self._saved.state_key), answer.statement, DesiredStatement)
        except SignedDocumentError as exc:
            raise DesiredStateRefused(f"the desired state is not signed by the pinned service key: {exc}") from None
        if statement.device_id != self._device_id:
            raise DesiredStateRefused(f"the desired state is for device {statement.device_id!r}, not this one")
        if statement.generation < self._saved.generation:
            raise DesiredStateRefused(
                f"generation {statement.generation} is older than generation {self._saved.generation} accepted "
                "before: a replayed (or a lagging replica's) answer"
            )
        if statement.from_the_future(now):
            raise DesiredStateRefused(
                f"the desired state was issued {_when(statement.issued_at)}, more than {CLOCK_SKEW_S} s after this "
                "device's clock: check the clock"
            )
        if statement.expired(now):
            raise DesiredStateRefused(f"the desired state expired {_when(statement.expires_at)}: a replayed answer")
        return statement

    def stale(self, now_s: float | None = None) -> str | None:
        """Why the latest accepted statement no longer holds (None while it does, or before the first)."""
        expires = self._saved.expires_at
        if expires is None or (time.time() if now_s is None else now_s) < expires:
            return None
        return (
            f"the latest signed desired state expired {_when(expires)} and no fresh one has been accepted since: "
            "the service's answers are withheld, replayed or not reaching this device; serving continues"
        )

    # -- revocations -----------------------------------------------------------------------------------------

    def _take_revocations(self, signed: SignedDocument | None) -> None:
        if signed is None or self._release_key is None:
            return
        try:
            revocations = open_document(self._release_key, signed, RevocationList)
        except SignedDocumentError as exc:
            log.warning("the revocation list that came with the desired state is refused: %s", exc)
            return
        held = self._revocations.sequence if self._revocations is not None else 0
        if revocations.sequence <= held:
            return
        self._revocations = revocations
        self._saved.revocations = signed
        self._save()
        log.warning("revocation list %d taken: %d version(s) revoked", revocations.sequence, len(revocations.revoked))

    def revoked(self, model: str, manifest_sha256: str) -> RevokedRelease | None:
        """The entry of the held revocation list that revokes this bundle, if any."""
        return None if self._revocations is None else self._revocations.entry_for(model, manifest_sha256)

    def status(self) -> dict[str, Any]:
        """The ``trust`` block of ``/v1/status``."""
        return {
            "service_key": self._saved.state_key,
            "generation": self._saved.generation,
            "expires_at": _iso(self._saved.expires_at),
            "stale": self.stale(),
            "revocations_sequence": self._revocations.sequence if self._revocations is not None else 0,
            "last_refused_answer": self.last_refusal,
        }


def _key(text: str) -> Ed25519PublicKey:
    try:
        return public_key_from_text(text)
    except SignedDocumentError as exc:
        raise DesiredStateRefused(f"the service's state key is unusable: {exc}") from None


def _iso(unix_s: int | None) -> str | None:
    return None if unix_s is None else datetime.fromtimestamp(unix_s, UTC).isoformat(timespec="seconds")


def _when(unix_s: int) -> str:
    return f"at {_iso(unix_s)}"
