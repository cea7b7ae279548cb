"""bundle release numbers, operators' downgrade and force orders on rollouts, revocation lists, the service's key

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 20:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("bundles", schema=None) as batch_op:
        batch_op.add_column(sa.Column("release", sa.BigInteger(), nullable=True))
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("allow_downgrade", sa.Boolean(), server_default=sa.false(), nullable=False))
        batch_op.add_column(sa.Column("force_gates", sa.Boolean(), server_default=sa.false(), nullable=False))
    op.create_table(
        "revocation_lists",
        sa.Column("sequence", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("document", sa.Text(), nullable=False),
        sa.Column("signature", sa.String(length=128), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("sequence"),
    )
    op.create_table(
        "service_keys",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("private_pem", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    op.drop_table("service_keys")
    op.drop_table("revocation_lists")
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_column("force_gates")
        batch_op.drop_column("allow_downgrade")
    with op.batch_alter_table("bundles", schema=None) as batch_op:
        batch_op.drop_column("release")
