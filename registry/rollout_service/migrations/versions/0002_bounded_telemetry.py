"""bounded telemetry windows and shadow figures

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03 09:20:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "analysis_verdicts",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("rollout_id", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("verdict", sa.String(length=16), nullable=False),
        sa.Column("score", sa.Double(), nullable=True),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("action", sa.String(length=16), nullable=False),
        sa.Column("winner", sa.String(length=16), nullable=True),
        sa.Column("treatment_version", sa.String(length=32), nullable=False),
        sa.Column("control_version", sa.String(length=32), nullable=True),
        sa.Column("treatment_windows", sa.Integer(), nullable=False),
        sa.Column("control_windows", sa.Integer(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_analysis_verdicts_rollout", "analysis_verdicts", ["rollout_id", "id"], unique=False)
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        batch_op.add_column(sa.Column("frames", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("empty_frames", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("nonfinite", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("histograms", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("class_counts", sa.JSON(), nullable=True))
    with op.batch_alter_table("device_events", schema=None) as batch_op:
        batch_op.add_column(sa.Column("details", sa.JSON(), nullable=True))
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("analysis", sa.JSON(), nullable=True))
        batch_op.add_column(sa.Column("shadow", sa.JSON(), nullable=True))
    with op.batch_alter_table("bundles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("class_names", sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_index("ix_analysis_verdicts_rollout", table_name="analysis_verdicts")
    op.drop_table("analysis_verdicts")
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_column("shadow")
        batch_op.drop_column("analysis")
    with op.batch_alter_table("bundles", schema=None) as batch_op:
        batch_op.drop_column("class_names")
    with op.batch_alter_table("device_events", schema=None) as batch_op:
        batch_op.drop_column("details")
    with op.batch_alter_table("telemetry", schema=None) as batch_op:
        for column in ("class_counts", "histograms", "nonfinite", "empty_frames", "frames"):
            batch_op.drop_column(column)
