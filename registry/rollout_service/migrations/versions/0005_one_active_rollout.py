"""at most one active rollout per model and device set: a partial unique index

Two creates (or approvals) that superseded the same rollout at the same moment could both commit, leaving two
rollouts running for one device set. The index makes the database refuse the second; the service then reads
again and supersedes what is active now (``rollouts.RolloutManager.create``).

A database that already holds such pairs keeps the newest rollout of each device set active and ends the older
ones as superseded, with an audit record each, before the index is made.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07 12:00:00
"""

from __future__ import annotations

from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

INDEX = "ux_rollouts_one_active"
ACTIVE = "state IN ('pending', 'running', 'paused', 'halted')"  # schemas.ACTIVE_STATES, as db.Rollout declares it


def upgrade() -> None:
    _supersede_duplicates()
    op.create_index(
        INDEX,
        "rollouts",
        ["model", "selector_key"],
        unique=True,
        sqlite_where=sa.text(ACTIVE),
        postgresql_where=sa.text(ACTIVE),
    )


def downgrade() -> None:
    op.drop_index(INDEX, table_name="rollouts")


_rollouts = sa.table(
    "rollouts",
    sa.column("id", sa.Integer),
    sa.column("state", sa.String),
    sa.column("revision", sa.Integer),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)
_audit = sa.table(
    "audit_log",
    sa.column("at", sa.DateTime(timezone=True)),
    sa.column("actor", sa.String),
    sa.column("action", sa.String),
    sa.column("rollout_id", sa.Integer),
    sa.column("model", sa.String),
    sa.column("version", sa.String),
    sa.column("reason", sa.Text),
)


def _supersede_duplicates() -> None:
    """End every active rollout that a newer active rollout of the same model and device set outranks."""
    connection = op.get_bind()
    outranked = connection.execute(
        sa.text(
            f"SELECT r.id, r.model, r.version, MAX(newer.id) FROM rollouts r JOIN rollouts newer "
            f"ON newer.model = r.model AND newer.selector_key = r.selector_key AND newer.id > r.id "
            f"AND newer.{ACTIVE} WHERE r.{ACTIVE} GROUP BY r.id, r.model, r.version ORDER BY r.id"
        )
    ).all()
    now = datetime.now(UTC)
    for rollout_id, model, version, newest_id in outranked:
        connection.execute(
            sa.update(_rollouts)
            .where(_rollouts.c.id == rollout_id)
            .values(state="aborted", revision=_rollouts.c.revision + 1, updated_at=now)
        )
        connection.execute(
            sa.insert(_audit).values(
                at=now, actor="migration", action="superseded", rollout_id=rollout_id, model=model, version=version,
                reason=f"superseded by rollout {newest_id}: two rollouts were active for one device set",
            )
        )  # fmt: skip
