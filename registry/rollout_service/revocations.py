"""Revocation lists the service is given (``exporters.revocations``) and hands to devices with their desired state.

The service cannot make or alter a list: each is signed by the offline release key, and the service checks that
signature (``YOLO_OTA_RELEASE_PUBLIC_KEY``) before it stores one, so that what it hands devices is what they will
accept. A new list must have a higher sequence than the latest and keep every entry of it (a revocation is not
undone). Storing one bumps the state generation: every replica hands it out within the state-check interval, and
refuses rollouts of a revoked version from then on.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from exporters.errors import ExportError
from exporters.revocations import RevocationList, RevokedRelease, empty_list
from exporters.signed_documents import SignedDocument, open_document
from exporters.signing import load_public_key
from registry.rollout_service.db import RevocationListRecord, transaction, utcnow
from registry.rollout_service.errors import ConflictError, InvalidRequestError, ServiceSettingsError
from registry.rollout_service.records import audit, bump_generation
from registry.rollout_service.settings import ServiceSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CurrentRevocations:
    """The latest list, parsed, and as it was signed (None before the first list)."""

    revocations: RevocationList
    signed: SignedDocument | None


NONE_YET = CurrentRevocations(empty_list(), None)


class RevocationStore:
    def __init__(
        self, sessions: sessionmaker[Session], settings: ServiceSettings, on_change: Callable[[], None]
    ) -> None:
        self._sessions = sessions
        self._on_change = on_change
        self._release_key = None
        if settings.release_public_key is not None:
            try:
                self._release_key = load_public_key(settings.release_public_key)
            except ExportError as exc:
                raise ServiceSettingsError(f"release_public_key: {exc}") from None

    @staticmethod
    def read(session: Session) -> CurrentRevocations:
        """The latest list in the database (the signature was checked when it was stored)."""
        row = session.execute(
            sa.select(RevocationListRecord).order_by(RevocationListRecord.sequence.desc()).limit(1)
        ).scalar_one_or_none()
        if row is None:
            return NONE_YET
        signed = SignedDocument(document=row.document, signature=row.signature)
        return CurrentRevocations(RevocationList.model_validate_json(_raw(signed)), signed)

    def current(self) -> CurrentRevocations:
        with self._sessions() as session:
            return self.read(session)

    def publish(self, signed: SignedDocument, *, actor: str) -> RevocationList:
        """Store a new list once its signature, sequence and entries are right; 422 or 409 otherwise."""
        if self._release_key is None:
            raise ConflictError(
                "this service has no release public key (YOLO_OTA_RELEASE_PUBLIC_KEY) to check revocation lists with"
            )
        try:
            revocations = open_document(self._release_key, signed, RevocationList)
        except ExportError as exc:
            raise InvalidRequestError(f"revocation list refused: {exc}") from None
        try:
            with transaction(self._sessions) as session:
                latest = self.read(session).revocations
                _check_successor(latest, revocations)
                session.add(
                    RevocationListRecord(
                        sequence=revocations.sequence, document=signed.document, signature=signed.signature,
                        created_by=actor, created_at=utcnow(),
                    )
                )  # fmt: skip
                session.flush()
                added = [e for e in revocations.revoked if latest.entry_for(e.model, e.manifest_sha256) is None]
                audit(
                    session, actor=actor, action="revocations_published",
                    reason=f"list {revocations.sequence}: " + (", ".join(_label(e) for e in added) or "no new entry"),
                )  # fmt: skip
                bump_generation(session)
        except IntegrityError:  # another replica stored this sequence first
            raise ConflictError(f"revocation list {revocations.sequence} was stored meanwhile") from None
        self._on_change()
        log.warning("revocation list %d stored by %s", revocations.sequence, actor)
        return revocations


def _check_successor(latest: RevocationList, new: RevocationList) -> None:
    if new.sequence <= latest.sequence:
        raise ConflictError(f"revocation list {new.sequence} is not newer than the list held ({latest.sequence})")
    dropped = [e for e in latest.revoked if new.entry_for(e.model, e.manifest_sha256) is None]
    if dropped:
        raise ConflictError(
            "a revocation is not undone: the new list leaves out " + ", ".join(_label(e) for e in dropped)
        )


def _label(entry: RevokedRelease) -> str:
    return f"{entry.model} v{entry.version}"


def _raw(signed: SignedDocument) -> bytes:
    return base64.b64decode(signed.document)
