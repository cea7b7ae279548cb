"""Enrollment tokens: what a device shows to enroll a *new* id. Several, named, optionally expiring, revocable.

A token admits new ids only: an id that is already enrolled is decided by its key (``identity.py``), never by a
token. A token may auto-accept the ids that match its shell pattern (``line3-*``); the other ids it admits wait
as ``pending`` until an operator accepts them. The ``YOLO_OTA_ENROLLMENT_TOKEN`` setting seeds tokens that
auto-accept every id (as enrolling did before tokens had names); a token it seeded and no longer lists is revoked
at start. Only sha256 digests are stored.
"""

from __future__ import annotations

import fnmatch
import hmac
import secrets
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from registry.rollout_service.db import EnrollmentToken, transaction, utcnow
from registry.rollout_service.devices import token_digest
from registry.rollout_service.errors import ConflictError, NotAuthenticatedError, NotFoundError
from registry.rollout_service.records import audit
from registry.rollout_service.token_entries import StoredToken, TokenEntry

SETTING, API = "setting", "api"
ANY_ID = "*"


@dataclass(frozen=True)
class EnrollmentTokenView(StoredToken):
    auto_accept: str | None = None

    def accepts(self, device_id: str) -> bool:
        """Whether an id this token admits is accepted at once (else it waits for an operator)."""
        return self.auto_accept is not None and fnmatch.fnmatchcase(device_id, self.auto_accept)


class EnrollmentTokens:
    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions

    def seed(self, entries: list[TokenEntry]) -> None:
        now = utcnow()
        wanted = {e.name: e for e in entries}
        with transaction(self._sessions) as session:
            rows = {r.name: r for r in session.execute(sa.select(EnrollmentToken)).scalars()}
            for name, entry in wanted.items():
                row = rows.get(name)
                if row is not None and row.source != SETTING:
                    raise ConflictError(f"YOLO_OTA_ENROLLMENT_TOKEN: {name!r} names a token made through the API")
                if row is None:
                    row = EnrollmentToken(name=name, source=SETTING, created_at=now)
                    session.add(row)
                row.token_sha256, row.auto_accept, row.revoked_at = token_digest(entry.token), ANY_ID, None
            for name, row in rows.items():
                if row.source == SETTING and name not in wanted and row.revoked_at is None:
                    row.revoked_at = now
                    audit(session, actor="settings", action="enrollment_token_revoked", reason=f"{name}: not seeded")

    def create(
        self, name: str, *, actor: str, auto_accept: str | None = None, expires_in_s: float | None = None
    ) -> str:
        """A new token (returned once); 409 when the name is taken."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        with transaction(self._sessions) as session:
            if session.get(EnrollmentToken, name) is not None:
                raise ConflictError(f"an enrollment token is already named {name!r}")
            session.add(
                EnrollmentToken(
                    name=name, token_sha256=token_digest(token), auto_accept=auto_accept, source=API,
                    created_by=actor, created_at=now,
                    expires_at=now + timedelta(seconds=expires_in_s) if expires_in_s else None,
                )
            )  # fmt: skip
            accepting = f", auto-accepting {auto_accept}" if auto_accept else ""
            audit(session, actor=actor, action="enrollment_token_created", reason=f"{name}{accepting}")
        return token

    def revoke(self, name: str, *, actor: str) -> None:
        with transaction(self._sessions) as session:
            row = session.get(EnrollmentToken, name)
            if row is None or row.revoked_at is not None:
                raise NotFoundError(f"no active enrollment token named {name!r}")
            row.revoked_at = utcnow()
            audit(session, actor=actor, action="enrollment_token_revoked", reason=name)

    def views(self) -> list[EnrollmentTokenView]:
        with self._sessions() as session:
            rows = session.execute(sa.select(EnrollmentToken).order_by(EnrollmentToken.created_at)).scalars()
            return [_view(r) for r in rows]

    def admit(self, session: Session, token: str | None) -> EnrollmentTokenView:
        """The live token ``token`` is (read in the enrollment's own transaction); 401 otherwise."""
        if not token:
            raise NotAuthenticatedError("a new device id needs an enrollment token")
        digest = token_digest(token)
        row = session.execute(sa.select(EnrollmentToken).where(EnrollmentToken.token_sha256 == digest)).scalar()
        if row is None or not hmac.compare_digest(row.token_sha256, digest):
            raise NotAuthenticatedError("wrong enrollment token")
        if row.revoked_at is not None:
            raise NotAuthenticatedError(f"enrollment token {row.name!r} was revoked")
        if row.expires_at is not None and row.expires_at <= utcnow():
            raise NotAuthenticatedError(f"enrollment token {row.name!r} expired")
        return _view(row)


def _view(row: EnrollmentToken) -> EnrollmentTokenView:
    return EnrollmentTokenView(
        name=row.name, auto_accept=row.auto_accept, source=row.source, created_at=row.created_at,
        created_by=row.created_by, expires_at=row.expires_at, revoked_at=row.revoked_at,
    )  # fmt: skip
