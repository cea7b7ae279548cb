"""Retention: device events, telemetry windows and audit records older than their setting are deleted, and the
replay guard forgets statements that no replica could accept again.

Every replica runs ``Retention.prune`` in its lifespan, every ``retention_interval_s``. Each DELETE takes at most
``retention_batch_rows`` rows, picked in primary-key order after the last batch, in a transaction of its own, so a
table is never locked for long; replicas pruning at the same moment pick the same rows, and the one that comes
second deletes what is left of them (nothing), which is no error. A day setting of 0 keeps that kind forever.

- device events go by ``received_at`` (the service's clock, not the device's);
- telemetry windows go by ``at``, except those of a rollout that is still active: its analysis reads them;
- audit records go by ``at``;
- the replay guard (``seen_statements``): a statement is refused as stale once it is more than 300 s from the
  service's clock (enrollment proofs, MLflow deliveries), and its row holds until ``expires_at``, twice that after
  it was accepted (``records.remember_once``). The row goes ``REPLAY_MARGIN_S`` later still, so that replicas whose
  clocks differ by minutes still refuse a replay. Not a setting: a shorter life would let a captured statement in.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session, sessionmaker

from registry.rollout_service.db import AuditRecord, DeviceEvent, Rollout, SeenStatement, Telemetry, transaction, utcnow
from registry.rollout_service.schemas import ACTIVE_STATES
from registry.rollout_service.settings import ServiceSettings

log = logging.getLogger(__name__)

REPLAY_MARGIN_S = 300


@dataclass(frozen=True)
class Pruned:
    """What one pass deleted of one kind of row, in how many DELETE statements."""

    kind: str
    rows: int
    batches: int


@dataclass(frozen=True)
class _Kind:
    name: str
    keep_s: float  # rows older than this go; 0: kept forever
    table: type[Any]
    key: Sequence[Any]  # the primary key's columns: the order batches are picked in
    age: Any  # the column compared with the cutoff
    also: Any = None  # a further condition an old row must meet to go (None: every old row goes)


class Retention:
    def __init__(self, sessions: sessionmaker[Session], settings: ServiceSettings) -> None:
        self._sessions = sessions
        self._batch_rows = settings.retention_batch_rows
        active = sa.select(Rollout.id).where(Rollout.state.in_([state.value for state in ACTIVE_STATES]))
        day_s = 86400
        self._kinds = [
            _Kind("device events", settings.device_event_retention_days * day_s, DeviceEvent, [DeviceEvent.id],
                  DeviceEvent.received_at),
            _Kind("telemetry windows", settings.telemetry_retention_days * day_s, Telemetry, [Telemetry.id],
                  Telemetry.at, also=sa.or_(Telemetry.rollout_id.is_(None), Telemetry.rollout_id.not_in(active))),
            _Kind("audit records", settings.audit_retention_days * day_s, AuditRecord, [AuditRecord.id],
                  AuditRecord.at),
            _Kind("replay-guard statements", REPLAY_MARGIN_S, SeenStatement,
                  [SeenStatement.kind, SeenStatement.digest], SeenStatement.expires_at),
        ]  # fmt: skip

    def prune(self, *, now: datetime | None = None) -> list[Pruned]:
        """One pass over every kind whose retention is not 0 (forever); what it deleted."""
        now = now or utcnow()
        done = [self._prune(kind, now - timedelta(seconds=kind.keep_s)) for kind in self._kinds if kind.keep_s > 0]
        deleted = [p for p in done if p.rows]
        if deleted:
            log.info("retention: deleted %s", ", ".join(f"{p.rows} {p.kind} ({p.batches} batches)" for p in deleted))
        return done

    def _prune(self, kind: _Kind, cutoff: datetime) -> Pruned:
        """Delete ``kind``'s rows older than ``cutoff``, ``batch_rows`` at a time, each batch its own transaction."""
        key = sa.tuple_(*kind.key) if len(kind.key) > 1 else kind.key[0]
        rows = batches = 0
        after: tuple[Any, ...] | None = None
        while True:
            query = sa.select(*kind.key).where(kind.age < cutoff)
            if kind.also is not None:
                query = query.where(kind.also)
            if after is not None:
                query = query.where(key > (sa.tuple_(*after) if len(after) > 1 else after[0]))
            with transaction(self._sessions) as session:
                picked = [tuple(row) for row in session.execute(query.order_by(*kind.key).limit(self._batch_rows))]
                if not picked:
                    break
                wanted = [p if len(p) > 1 else p[0] for p in picked]
                result = session.execute(
                    sa.delete(kind.table).where(key.in_(wanted)).execution_options(synchronize_session=False)
                )
            rows += result.rowcount  # type: ignore[attr-defined]
            batches += 1
            after = picked[-1]
            if len(picked) < self._batch_rows:
                break
        return Pruned(kind.name, rows, batches)
