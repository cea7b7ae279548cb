"""The service's online key: it signs each device's desired state (``exporters.desired_statement``).

Devices pin the public half when they enroll (``DeviceEnrolled.state_key``) and from then on act only on answers
it signed, so that whoever can answer a device's poll on the network cannot tell it what to run. Every replica
must sign with the same key, or a device would refuse every replica but the one it enrolled with; so the key is
made once, by the first replica to start, and kept in the database (``service_keys``), where every replica reads it.
``YOLO_OTA_STATE_KEY_FILE`` names a PEM file to use instead (a mounted secret, kept out of database backups).

Signed statements expire (``desired_state_validity_s``). A new one is signed at the start of every quarter of the
validity (a *window*), which is part of the poll's ETag: each device gets a fresh statement about every quarter
of the validity even while nothing changes, and a device that gets none for a whole validity knows its answers are
being withheld or replayed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from exporters.desired_statement import DesiredStatement
from exporters.errors import KeyFileError
from exporters.signed_documents import SignedDocument, public_key_text, sign_document
from exporters.signing import load_or_create_private_key
from registry.rollout_service.db import ServiceKey, transaction, utcnow
from registry.rollout_service.errors import ServiceSettingsError
from registry.rollout_service.settings import ServiceSettings

log = logging.getLogger(__name__)

STATE_KEY_NAME = "state"


@dataclass(frozen=True)
class StateOrder:
    """What one device is told to run, before it is signed: the choice and the operator's orders with it."""

    rollout_id: int | None
    model: str | None
    version: str | None
    variant: str | None
    manifest_sha256: str | None
    generation: int
    downgrade: bool = False
    force_gates: bool = False
    shadow: dict[str, Any] | None = None


class StateSigner:
    def __init__(self, sessions: sessionmaker[Session], settings: ServiceSettings) -> None:
        if settings.state_key_file is not None:
            try:
                self._key = load_or_create_private_key(settings.state_key_file)
            except KeyFileError as exc:
                raise ServiceSettingsError(f"state_key_file: {exc}") from None
            where = str(settings.state_key_file)
        else:
            self._key, where = _database_key(sessions), "the key kept in the database"
        self.public_key = public_key_text(self._key.public_key())
        self.validity_s = settings.desired_state_validity_s
        self._window_s = max(1, self.validity_s // 4)
        log.info("desired states are signed with %s (public key %s...)", where, self.public_key[:12])

    def window(self, now_s: float | None = None) -> int:
        """The number of the signing window ``now_s`` falls in (part of every poll's ETag)."""
        return int((time.time() if now_s is None else now_s) // self._window_s)

    def sign(self, device_id: str, order: StateOrder, *, now_s: float | None = None) -> SignedDocument:
        """The signed statement of ``order`` for ``device_id``, valid for ``validity_s`` from now."""
        issued = int(time.time() if now_s is None else now_s)
        statement = DesiredStatement(
            device_id=device_id,
            rollout_id=order.rollout_id,
            model=order.model,
            version=order.version,
            variant=order.variant,
            manifest_sha256=order.manifest_sha256,
            generation=order.generation,
            issued_at=issued,
            expires_at=issued + self.validity_s,
            downgrade=order.downgrade,
            force_gates=order.force_gates,
            shadow=order.shadow,
        )
        return sign_document(self._key, statement)


def _database_key(sessions: sessionmaker[Session]) -> Ed25519PrivateKey:
    """The ``state`` key of ``service_keys``, made and stored first if none is there (the first replica's wins)."""
    with sessions() as session:
        row = session.get(ServiceKey, STATE_KEY_NAME)
    if row is None:
        made = Ed25519PrivateKey.generate()
        pem = made.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        try:
            with transaction(sessions) as session:
                session.add(ServiceKey(name=STATE_KEY_NAME, private_pem=pem, created_at=utcnow()))
            log.warning("made the service's desired-state key and kept it in the database")
        except IntegrityError:
            pass  # another replica stored its key first: that one is the key
        with sessions() as session:
            row = session.get(ServiceKey, STATE_KEY_NAME)
    assert row is not None
    key = serialization.load_pem_private_key(row.private_pem.encode(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ServiceSettingsError("the service key kept in the database is not an ed25519 key")
    return key
