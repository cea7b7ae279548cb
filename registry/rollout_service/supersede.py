"""At most one active rollout per model and device set, however many requests and replicas start one at once.

The database holds the rule: a partial unique index on rollouts (model, selector_key) over the active states
(``db.Rollout``, migration 0005). A writer (a create, an approval) first ends the active rollouts it read, each by a
compare-and-set on its revision, and only then inserts or starts its own. When another writer got there first,
either a compare-and-set finds the row changed or the index refuses the new active row; ``one_active`` then runs
the writer's whole transaction again, from a fresh read, up to ``ATTEMPTS`` times, and answers 409 after that.
This holds on SQLite (writes take the database lock in turn) as on PostgreSQL (the second writer waits on the
first one's row or index entry, then sees what it committed), without a lock held in any process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from registry.rollout_service.db import Rollout
from registry.rollout_service.errors import ConflictError
from registry.rollout_service.records import audit
from registry.rollout_service.schemas import RolloutState

log = logging.getLogger(__name__)

ATTEMPTS = 10
ACTIVE_INDEX = "ux_rollouts_one_active"
# How each database names the index in the error it raises (SQLite names the columns, not the index).
_CLASH_MARKS = (ACTIVE_INDEX, "rollouts.model, rollouts.selector_key")

T = TypeVar("T")


class _ActiveSetChanged(Exception):
    """An active rollout this writer read was changed by another one before it could end it: read again (control
    flow inside this module, never raised out of it)."""


def one_active(attempt: Callable[[], T], *, what: str) -> T:
    """``attempt()`` (one transaction that ends the active rollouts it read and makes its own active), run again
    while another writer changes the device set's active rollout under it; 409 when that never settles."""
    for tries in range(1, ATTEMPTS + 1):
        try:
            return attempt()
        except _ActiveSetChanged:
            pass
        except IntegrityError as exc:
            if not any(mark in str(exc.orig) for mark in _CLASH_MARKS):
                raise
        log.info("%s: another rollout of the device set became active meanwhile (try %d); reading again", what, tries)
    raise ConflictError(f"{what}: the active rollout of these devices kept changing; try again")


def end_active(session: Session, rows: Sequence[Rollout], *, now: datetime) -> None:
    """End ``rows`` (read in this transaction) as aborted, each only if no one changed it since its read;
    ``_ActiveSetChanged`` otherwise. Audited by ``audit_superseded`` once the rollout that replaces them has its id."""
    for row in rows:
        done = session.execute(
            sa.update(Rollout)
            .where(Rollout.id == row.id, Rollout.revision == row.revision)
            .values(state=RolloutState.aborted.value, revision=row.revision + 1, updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if done.rowcount != 1:  # type: ignore[attr-defined]
            raise _ActiveSetChanged(f"rollout {row.id} changed")


def audit_superseded(session: Session, rows: Sequence[Rollout], *, by: int, actor: str) -> None:
    """One audit record for each rollout ``end_active`` ended, naming the rollout that replaced it."""
    for old in rows:
        audit(
            session, actor=actor, action="superseded", rollout_id=old.id, model=old.model, version=old.version,
            reason=f"superseded by rollout {by}",
        )  # fmt: skip
