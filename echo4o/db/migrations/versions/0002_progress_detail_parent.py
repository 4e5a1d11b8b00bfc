"""Jobs gain ``progress_detail`` (what a long job reports beside its step: a training run's loss, lr,
samples/s and ETA; a benchmark's generated and judged counts) and ``parent_id`` (the job that submitted this
one: a benchmark run's image jobs point at the run).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("progress_detail", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("parent_id", sa.String(32), nullable=True))
    op.create_index("ix_jobs_parent", "jobs", ["parent_id"])


def downgrade() -> None:
    op.drop_index("ix_jobs_parent", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("parent_id")
        batch.drop_column("progress_detail")
