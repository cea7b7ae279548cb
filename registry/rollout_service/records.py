"""Small shared steps on the database: the audit log, the state generation, the replay guard, and rows as plain
views."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from exporters.fingerprint import Fingerprint
from registry.rollout_service.db import AuditRecord, Device, Rollout, SeenStatement, StateGeneration, utcnow
from registry.rollout_service.errors import NotAuthenticatedError

log = logging.getLogger(__name__)


def audit(
    session: Session,
    *,
    actor: str,
    action: str,
    reason: str = "",
    rollout_id: int | None = None,
    model: str | None = None,
    version: str | None = None,
) -> None:
    """Record one transition (who, what, why) in the same transaction as the change itself."""
    session.add(
        AuditRecord(
            at=utcnow(), actor=actor, action=action, rollout_id=rollout_id, model=model, version=version, reason=reason
        )
    )
    log.info("audit: %s %s rollout=%s model=%s version=%s: %s", actor, action, rollout_id, model, version, reason)


def bump_generation(session: Session) -> None:
    """Tell every replica that some device's desired state may have changed."""
    session.execute(
        sa.update(StateGeneration).where(StateGeneration.id == 1).values(generation=StateGeneration.generation + 1)
    )


def read_generation(session: Session) -> int:
    return int(session.execute(sa.select(StateGeneration.generation).where(StateGeneration.id == 1)).scalar_one())


def remember_once(session: Session, kind: str, statement: str, keep_s: float, *, what: str) -> None:
    """Record ``statement`` as used (kept ``keep_s``, then pruned by ``retention.py``); 401 when it was used
    before: a replay."""
    digest = hashlib.sha256(statement.encode()).hexdigest()
    now = utcnow()
    if session.get(SeenStatement, (kind, digest)) is not None:
        raise NotAuthenticatedError(f"{what} was used before; a replay is refused")
    session.add(SeenStatement(kind=kind, digest=digest, expires_at=now + timedelta(seconds=keep_s)))
    try:
        session.flush()
    except IntegrityError:  # another replica recorded it at the same moment
        raise NotAuthenticatedError(f"{what} was used before; a replay is refused") from None


@dataclass(frozen=True)
class DeviceView:
    """A device as targeting sees it."""

    id: str
    labels: dict[str, str]
    fingerprint_fields: dict[str, Any]
    fingerprint: Fingerprint
    enrolled_at: datetime  # the first enrollment; enrolling again does not move it

    @classmethod
    def of(cls, row: Device) -> DeviceView:
        return cls(
            id=row.id,
            labels={str(k): str(v) for k, v in row.labels.items()},
            fingerprint_fields=dict(row.fingerprint),
            fingerprint=Fingerprint.model_validate(row.fingerprint),
            enrolled_at=row.enrolled_at,
        )


@dataclass(frozen=True)
class RolloutView:
    """A rollout row, detached from its session."""

    id: int
    model: str
    version: str
    previous_version: str | None
    strategy: str
    state: str
    selector: dict[str, Any]
    selector_key: str
    waves: list[dict[str, Any]]
    ab: dict[str, Any] | None
    analysis: dict[str, Any] | None
    shadow: dict[str, Any] | None
    allow_downgrade: bool
    force_gates: bool
    current_wave: int
    wave_started_at: datetime | None
    revision: int
    created_by: str
    reason: str
    created_at: datetime
    updated_at: datetime

    @classmethod
    def of(cls, row: Rollout) -> RolloutView:
        return cls(
            id=row.id,
            model=row.model,
            version=row.version,
            previous_version=row.previous_version,
            strategy=row.strategy,
            state=row.state,
            selector=dict(row.selector),
            selector_key=row.selector_key,
            waves=[dict(w) for w in row.waves],
            ab=dict(row.ab) if row.ab else None,
            analysis=dict(row.analysis) if row.analysis else None,
            shadow=dict(row.shadow) if row.shadow else None,
            allow_downgrade=bool(row.allow_downgrade),
            force_gates=bool(row.force_gates),
            current_wave=row.current_wave,
            wave_started_at=row.wave_started_at,
            revision=row.revision,
            created_by=row.created_by,
            reason=row.reason,
            created_at=row.created_at,
            updated_at=row.updated_at,
        )

    @property
    def percents(self) -> list[float]:
        return [float(w["percent"]) for w in self.waves]

    @property
    def control_version(self) -> str | None:
        """What devices outside the new version get: the A/B control, or the version before this rollout."""
        if self.ab:
            return str(self.ab["control_version"])
        return self.previous_version
