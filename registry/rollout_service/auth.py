"""Who is calling: operators by bearer token (stored hashed, scoped, expiring, revocable), devices by the token
they got at enrollment.

Operator tokens live in the database. The ``YOLO_OTA_OPERATOR_TOKENS`` setting only seeds them: at start, each
entry is stored (or updated) and a token that an earlier setting seeded but this one no longer lists is revoked.
Tokens made through the API (``yolo-ota tokens create``) are never touched by the setting. Every replica checks
tokens in memory and re-reads them when the state generation moves, which every creation and revocation bumps:
a revoked token stops working everywhere within the state-check interval.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from registry.rollout_service.db import OperatorToken, transaction, utcnow
from registry.rollout_service.devices import DeviceRegistry, token_digest
from registry.rollout_service.errors import ConflictError, ForbiddenError, NotAuthenticatedError, NotFoundError
from registry.rollout_service.records import audit, bump_generation
from registry.rollout_service.token_entries import Scope, StoredToken, TokenEntry

log = logging.getLogger(__name__)

SETTING, API = "setting", "api"


@dataclass(frozen=True)
class Operator:
    """An operator whose token checked out."""

    name: str  # the token's name
    scope: Scope = Scope.admin

    @property
    def actor(self) -> str:
        """Who the audit log says acted."""
        return f"operator:{self.name}"

    def require(self, scope: Scope) -> Operator:
        """Itself, if its scope includes ``scope``; 403 otherwise."""
        if not self.scope.includes(scope):
            raise ForbiddenError(f"token {self.name!r} has the {self.scope} scope; this needs {scope}")
        return self


@dataclass(frozen=True)
class OperatorTokenView(StoredToken):
    scope: Scope = Scope.read


@dataclass(frozen=True)
class AuthenticatedDevice:
    """A device that presented its own current token."""

    device_id: str


def bearer(authorization: str | None) -> str:
    """The token of an ``Authorization: Bearer <token>`` header; 401 without one."""
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise NotAuthenticatedError("missing bearer token (Authorization: Bearer <token>)")
    return token.strip()


class OperatorTokens:
    """Operator tokens by sha256 digest, checked in memory, re-read when the state generation moves."""

    def __init__(self, sessions: sessionmaker[Session], generation: Callable[[], int]) -> None:
        self._sessions = sessions
        self._generation = generation
        self._known: dict[str, OperatorTokenView] = {}
        self._read_at = -1

    def seed(self, entries: list[TokenEntry]) -> None:
        """Store the setting's tokens; revoke the ones an earlier setting seeded that this one does not list."""
        now = utcnow()
        wanted = {token_digest(e.token): e for e in entries}
        with transaction(self._sessions) as session:
            rows = {r.token_sha256: r for r in session.execute(sa.select(OperatorToken)).scalars()}
            for digest, entry in wanted.items():
                row = rows.get(digest)
                if row is None:
                    row = OperatorToken(token_sha256=digest, created_at=now, source=SETTING)
                    session.add(row)
                row.name, row.scope, row.source, row.revoked_at = entry.name, entry.scope.value, SETTING, None
            for digest, row in rows.items():
                if row.source == SETTING and digest not in wanted and row.revoked_at is None:
                    row.revoked_at = now
                    audit(session, actor="settings", action="token_revoked", reason=f"{row.name}: no longer seeded")
            bump_generation(session)
        self._read_at = -1

    def create(self, name: str, scope: Scope, *, actor: str, expires_in_s: float | None = None) -> str:
        """A new token (returned once; only its digest is kept); 409 while an active token has that name."""
        token = secrets.token_urlsafe(32)
        now = utcnow()
        expires = now + timedelta(seconds=expires_in_s) if expires_in_s else None
        with transaction(self._sessions) as session:
            if any(v.name == name for v in self._active(session)):
                raise ConflictError(f"an active operator token is already named {name!r}; revoke it first")
            session.add(
                OperatorToken(
                    token_sha256=token_digest(token), name=name, scope=scope.value, source=API,
                    created_by=actor, created_at=now, expires_at=expires,
                )
            )  # fmt: skip
            audit(session, actor=actor, action="token_created", reason=f"{name} ({scope})")
            bump_generation(session)
        self._read_at = -1
        return token

    def revoke(self, name: str, *, actor: str) -> int:
        """Revoke every active token named ``name``; 404 when there is none."""
        now = utcnow()
        with transaction(self._sessions) as session:
            done = session.execute(
                sa.update(OperatorToken)
                .where(OperatorToken.name == name, OperatorToken.revoked_at.is_(None))
                .values(revoked_at=now)
            ).rowcount  # type: ignore[attr-defined]
            if not done:
                raise NotFoundError(f"no active operator token named {name!r}")
            audit(session, actor=actor, action="token_revoked", reason=name)
            bump_generation(session)
        self._read_at = -1
        return int(done)

    def views(self) -> list[OperatorTokenView]:
        with self._sessions() as session:
            rows = session.execute(sa.select(OperatorToken).order_by(OperatorToken.created_at)).scalars()
            return [_view(r) for r in rows]

    def authenticate(self, token: str) -> Operator:
        """The operator holding ``token`` (in memory once read); 401 for a token that is not a live operator's."""
        generation = self._generation()
        if generation != self._read_at:
            with self._sessions() as session:
                self._known = {r.token_sha256: _view(r) for r in session.execute(sa.select(OperatorToken)).scalars()}
            self._read_at = generation
        digest = token_digest(token)
        found = next((v for known, v in self._known.items() if hmac.compare_digest(known, digest)), None)
        if found is None:
            raise NotAuthenticatedError("not an operator token")
        if found.revoked_at is not None:
            raise NotAuthenticatedError(f"operator token {found.name!r} was revoked")
        if found.expires_at is not None and found.expires_at <= utcnow():
            raise NotAuthenticatedError(f"operator token {found.name!r} expired")
        return Operator(name=found.name, scope=found.scope)

    @staticmethod
    def _active(session: Session) -> list[OperatorTokenView]:
        rows = session.execute(sa.select(OperatorToken).where(OperatorToken.revoked_at.is_(None))).scalars()
        return [v for v in map(_view, rows) if v.active]


def _view(row: OperatorToken) -> OperatorTokenView:
    return OperatorTokenView(
        name=row.name, scope=Scope(row.scope), source=row.source, created_at=row.created_at,
        created_by=row.created_by, expires_at=row.expires_at, revoked_at=row.revoked_at,
    )  # fmt: skip


def check_device(devices: DeviceRegistry, device_id: str, token: str) -> AuthenticatedDevice:
    """The token must be ``device_id``'s own: another device's token is 403, an unknown one 401."""
    try:
        devices.authenticate(device_id, token)
    except NotAuthenticatedError:
        owner = devices.device_of_token(token)
        if owner is not None and owner != device_id:
            raise ForbiddenError(f"this token belongs to another device; it cannot act for {device_id!r}") from None
        raise
    return AuthenticatedDevice(device_id=device_id)
