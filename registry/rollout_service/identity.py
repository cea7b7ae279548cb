"""Device identity: enrollment by a key the device holds, and the operator's say over which keys are trusted.

An enrollment carries the device's ed25519 public key and its signature of (id, key, time), checked against the
service's clock and remembered, so that a captured enrollment cannot be sent again. Then, by what the id is:

- **new**: an enrollment token must admit it (``enrollment_tokens.py``); the device is accepted at once when the
  token auto-accepts that id, else it waits as ``pending``;
- **known, same key**: a new device token (the old one stops working), labels and fingerprint updated;
- **known, another key**: never a takeover. With the old key's signature of the change, the new key replaces it;
  without, the request waits for an operator (``accept`` applies it, ``reject`` drops it) and the device that
  holds the current key goes on being served as before;
- **known, enrolled before devices had keys**: the first key is taken when the request also shows the device's
  current token (``Authorization: Bearer``); otherwise it waits like any other change of key;
- **rejected or decommissioned**: refused.

Only an accepted device has a token that works. Every change of standing bumps the state generation, so every
replica drops its cached tokens and fleet within the state-check interval.
"""

from __future__ import annotations

import hmac
import secrets
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from exporters.device_identity import MAX_AGE_S, IdentityError, check_key_change, check_proof
from registry.rollout_service.db import Device, KeyRequest, transaction, utcnow
from registry.rollout_service.devices import DeviceRegistry, token_digest
from registry.rollout_service.enrollment_tokens import EnrollmentTokens
from registry.rollout_service.errors import ConflictError, ForbiddenError, NotAuthenticatedError, NotFoundError
from registry.rollout_service.records import audit, bump_generation, remember_once
from registry.rollout_service.schemas import DeviceEnroll, DeviceStatus

NO_TOKEN = ""  # the token digest of a device that has no working token (never equal to a sha256)


@dataclass(frozen=True)
class EnrollOutcome:
    status: DeviceStatus
    token: str | None  # set when accepted
    reason: str


class DeviceIdentity:
    def __init__(self, sessions: sessionmaker[Session], tokens: EnrollmentTokens, devices: DeviceRegistry) -> None:
        self._sessions = sessions
        self._tokens = tokens
        self._devices = devices

    # -- enrollment ------------------------------------------------------------------------------------------

    def enroll(
        self, body: DeviceEnroll, *, bearer_token: str | None = None, now_s: float | None = None
    ) -> EnrollOutcome:
        """Decide one enrollment (module docstring); 401 for a bad proof or token, 403 for a retired id."""
        _check_statement(body, time.time() if now_s is None else now_s)
        with transaction(self._sessions) as session:
            remember_once(session, "enroll", body.proof, MAX_AGE_S * 2, what="this enrollment proof")
            row = session.get(Device, body.device_id)
            outcome = self._new(session, body) if row is None else self._known(session, row, body, bearer_token)
            if outcome.status is DeviceStatus.accepted:
                bump_generation(session)
        self._devices.changed()
        return outcome

    def _new(self, session: Session, body: DeviceEnroll) -> EnrollOutcome:
        admitted = self._tokens.admit(session, body.enrollment_token)
        status = DeviceStatus.accepted if admitted.accepts(body.device_id) else DeviceStatus.pending
        token = secrets.token_urlsafe(32) if status is DeviceStatus.accepted else None
        now = utcnow()
        session.add(
            Device(
                id=body.device_id, labels=dict(body.labels), fingerprint=body.fingerprint.model_dump(mode="json"),
                token_sha256=token_digest(token) if token else NO_TOKEN, enrolled_at=now, last_seen_at=now,
                public_key=body.public_key, status=status.value, enrolled_via=admitted.name,
            )
        )  # fmt: skip
        reason = f"by enrollment token {admitted.name!r}" + (
            "" if token else f"; waits for an operator (the token auto-accepts {admitted.auto_accept or 'no id'})"
        )
        audit(session, actor=f"device:{body.device_id}", action=f"enrolled_{status.value}", reason=reason)
        return EnrollOutcome(status, token, reason)

    def _known(self, session: Session, row: Device, body: DeviceEnroll, bearer_token: str | None) -> EnrollOutcome:
        if row.status in (DeviceStatus.rejected, DeviceStatus.decommissioned):
            raise ForbiddenError(f"device {row.id!r} is {row.status}; an operator must accept it again")
        same_key = row.public_key is not None and hmac.compare_digest(row.public_key, body.public_key)
        if same_key and row.status == DeviceStatus.pending:
            return EnrollOutcome(DeviceStatus.pending, None, "waits for an operator to accept it")
        if same_key:
            return self._issue(session, row, body, "re-enrolled", "with its own key")
        if row.status == DeviceStatus.pending:
            raise ConflictError(f"device {row.id!r} waits for an operator with another key")
        if row.public_key is not None and body.key_change_signature is not None:
            try:
                check_key_change(row.public_key, row.id, body.public_key, body.signed_at, body.key_change_signature)
            except IdentityError as exc:
                raise NotAuthenticatedError(f"key change refused: {exc}") from None
            return self._issue(session, row, body, "key_changed", "signed by its previous key")
        if (
            row.public_key is None
            and bearer_token
            and hmac.compare_digest(row.token_sha256, token_digest(bearer_token))
        ):
            return self._issue(session, row, body, "key_adopted", "its first key, shown with its current token")
        return self._request_key(session, row, body)

    def _issue(self, session: Session, row: Device, body: DeviceEnroll, action: str, why: str) -> EnrollOutcome:
        token = secrets.token_urlsafe(32)
        row.public_key, row.token_sha256 = body.public_key, token_digest(token)
        row.labels, row.fingerprint = dict(body.labels), body.fingerprint.model_dump(mode="json")
        row.last_seen_at = utcnow()
        session.execute(sa.delete(KeyRequest).where(KeyRequest.device_id == row.id))
        reason = (
            f"{why}; labels {dict(sorted(body.labels.items()))}, torch {body.fingerprint.torch}, "
            f"gpu {body.fingerprint.gpu_name or 'none'}"
        )
        audit(session, actor=f"device:{row.id}", action=action, reason=reason)
        return EnrollOutcome(DeviceStatus.accepted, token, why)

    @staticmethod
    def _request_key(session: Session, row: Device, body: DeviceEnroll) -> EnrollOutcome:
        session.merge(
            KeyRequest(
                device_id=row.id, public_key=body.public_key, labels=dict(body.labels),
                fingerprint=body.fingerprint.model_dump(mode="json"), requested_at=utcnow(),
            )
        )  # fmt: skip
        reason = "another key than this device's: waits for an operator; the device keeps its key until then"
        audit(session, actor=f"device:{row.id}", action="key_change_pending", reason=reason)
        return EnrollOutcome(DeviceStatus.pending, None, reason)

    # -- the operator's decisions ----------------------------------------------------------------------------

    def accept(self, device_id: str, *, actor: str) -> str:
        """Accept a pending id, or the key waiting for a known one (its holder then enrolls for a token)."""
        with transaction(self._sessions) as session:
            row = self._row(session, device_id)
            request = session.get(KeyRequest, device_id)
            if request is not None:
                row.public_key, row.labels, row.fingerprint = request.public_key, request.labels, request.fingerprint
                row.token_sha256, row.status = NO_TOKEN, DeviceStatus.accepted.value
                session.delete(request)
                done = "the key that asked for it; the old key and token no longer work"
            elif row.status != DeviceStatus.accepted:
                row.status = DeviceStatus.accepted.value
                done = "its key"
            else:
                raise ConflictError(f"device {device_id!r} is accepted and no other key waits for it")
            audit(session, actor=actor, action="device_accepted", reason=f"{device_id}: {done}")
            bump_generation(session)
        self._devices.changed()
        return done

    def reject(self, device_id: str, *, actor: str) -> str:
        """Drop the key waiting for a known id (the device keeps its own), or refuse a pending id."""
        with transaction(self._sessions) as session:
            row = self._row(session, device_id)
            request = session.get(KeyRequest, device_id)
            if request is not None:
                session.delete(request)
                done = "the key that asked for it; the device keeps its own"
            elif row.status == DeviceStatus.pending:
                row.status = DeviceStatus.rejected.value
                done = "this id; it can enroll no more"
            else:
                raise ConflictError(f"device {device_id!r} has nothing waiting to reject")
            audit(session, actor=actor, action="device_rejected", reason=f"{device_id}: {done}")
            bump_generation(session)
        return done

    def decommission(self, device_id: str, *, actor: str) -> str:
        """Retire a device: its token stops working on every replica, it enrolls no more, rollouts leave it out."""
        with transaction(self._sessions) as session:
            row = self._row(session, device_id)
            if row.status == DeviceStatus.decommissioned:
                raise ConflictError(f"device {device_id!r} is already decommissioned")
            row.status, row.token_sha256 = DeviceStatus.decommissioned.value, NO_TOKEN
            session.execute(sa.delete(KeyRequest).where(KeyRequest.device_id == device_id))
            audit(session, actor=actor, action="device_decommissioned", reason=device_id)
            bump_generation(session)
        self._devices.changed()
        return "its token no longer works anywhere and it cannot enroll again"

    @staticmethod
    def _row(session: Session, device_id: str) -> Device:
        row = session.get(Device, device_id)
        if row is None:
            raise NotFoundError(f"no device {device_id!r}")
        return row


def _check_statement(body: DeviceEnroll, now_s: float) -> None:
    age_s = abs(now_s - body.signed_at)
    if age_s > MAX_AGE_S:
        raise NotAuthenticatedError(
            f"the enrollment was signed {age_s:.0f} s from this service's clock (max {MAX_AGE_S})"
        )
    try:
        check_proof(body.public_key, body.device_id, body.signed_at, body.nonce, body.proof)
    except IdentityError as exc:
        raise NotAuthenticatedError(f"enrollment proof refused: {exc}") from None
