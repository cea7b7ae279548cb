"""Who is calling: operators by bearer token (stored hashed), devices by the token they got at enrollment."""

from __future__ import annotations

import hmac
import logging
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from registry.rollout_service.db import OperatorToken, transaction, utcnow
from registry.rollout_service.devices import DeviceRegistry, token_digest
from registry.rollout_service.errors import ForbiddenError, NotAuthenticatedError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Operator:
    """An operator whose token checked out."""

    name: str  # as configured (``name=token``), or ``operator-<n>`` for the n-th bare token

    @property
    def actor(self) -> str:
        """Who the audit log says acted."""
        return f"operator:{self.name}"


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
    """Operator tokens from the settings, kept as sha256 digests in the database and in memory."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self._sessions = sessions
        self._names: dict[str, str] = {}

    def install(self, tokens: list[str]) -> None:
        """Store the configured tokens (``name=token`` or a bare token) hashed; forget none that other replicas use."""
        with transaction(self._sessions) as session:
            for index, entry in enumerate(tokens, start=1):
                name, sep, token = entry.partition("=")
                if not sep:
                    name, token = f"operator-{index}", entry
                digest = token_digest(token.strip())
                if session.get(OperatorToken, digest) is None:
                    session.add(OperatorToken(token_sha256=digest, name=name.strip(), created_at=utcnow()))
        self.reload()

    def reload(self) -> None:
        with self._sessions() as session:
            self._names = {row.token_sha256: row.name for row in session.execute(sa.select(OperatorToken)).scalars()}

    def authenticate(self, token: str) -> Operator:
        """The operator holding ``token`` (no database read); 401 for a token that is not an operator's."""
        digest = token_digest(token)
        for known, name in self._names.items():
            if hmac.compare_digest(known, digest):
                return Operator(name=name)
        raise NotAuthenticatedError("not an operator token")


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
