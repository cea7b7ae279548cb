"""an index for the fleet analysis's latency baselines (a version's windows in a span)

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03 17:40:00
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_telemetry_model_version_at", "telemetry", ["model", "version", "at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_telemetry_model_version_at", table_name="telemetry")
