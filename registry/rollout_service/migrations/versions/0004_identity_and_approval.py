"""device keys and standing, key requests, enrollment tokens, scoped operator tokens, replay guard, approval

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-04 17:40:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("public_key", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("status", sa.String(length=16), server_default="accepted", nullable=False))
        batch_op.add_column(sa.Column("enrolled_via", sa.String(length=128), nullable=True))
    with op.batch_alter_table("operator_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("scope", sa.String(length=16), server_default="admin", nullable=False))
        batch_op.add_column(sa.Column("source", sa.String(length=16), server_default="setting", nullable=False))
        batch_op.add_column(sa.Column("created_by", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.alter_column("state", existing_type=sa.String(length=16), type_=sa.String(length=32))
    op.create_table(
        "device_key_requests",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("public_key", sa.String(length=64), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("fingerprint", sa.JSON(), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["devices.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_table(
        "enrollment_tokens",
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("auto_accept", sa.String(length=256), nullable=True),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("name"),
        sa.UniqueConstraint("token_sha256"),
    )
    op.create_table(
        "seen_statements",
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("kind", "digest"),
    )
    op.create_index("ix_seen_statements_expires_at", "seen_statements", ["expires_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_seen_statements_expires_at", table_name="seen_statements")
    op.drop_table("seen_statements")
    op.drop_table("enrollment_tokens")
    op.drop_table("device_key_requests")
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.alter_column("state", existing_type=sa.String(length=32), type_=sa.String(length=16))
    with op.batch_alter_table("operator_tokens", schema=None) as batch_op:
        for column in ("revoked_at", "expires_at", "created_by", "source", "scope"):
            batch_op.drop_column(column)
    with op.batch_alter_table("devices", schema=None) as batch_op:
        for column in ("enrolled_via", "status", "public_key"):
            batch_op.drop_column(column)
