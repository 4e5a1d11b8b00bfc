"""Model versions and their promotions: ``model_versions`` (one row per checkpoint folder jobs may name, with
its manifest) and ``model_promotions`` (which version new jobs get, when and by whom; a rollback marks the
latest promotion reverted).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "model_versions",
        sa.Column("ref", sa.String(200), primary_key=True),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("version", sa.String(100), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("created_at", _ts, nullable=False),
    )
    op.create_table(
        "model_promotions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("ref", sa.String(200), sa.ForeignKey("model_versions.ref"), nullable=False),
        sa.Column("promoted_by", sa.String(200), nullable=False),
        sa.Column("promoted_at", _ts, nullable=False),
        sa.Column("reverted_by", sa.String(200), nullable=True),
        sa.Column("reverted_at", _ts, nullable=True),
    )
    op.create_index("ix_model_promotions_reverted", "model_promotions", ["reverted_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_model_promotions_reverted", table_name="model_promotions")
    op.drop_table("model_promotions")
    op.drop_table("model_versions")
