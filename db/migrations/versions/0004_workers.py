"""Worker heartbeats: a worker whose heartbeat stops has its running items re-published in seconds.

Revision ID: 0004
Revises: 0003
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "workers",
        sa.Column("name", sa.Text, primary_key=True),  # host:pid, as job_items.worker
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
    )
    op.create_index("job_items_running_worker", "job_items", ["worker"], postgresql_where=sa.text("state = 'running'"))


def downgrade() -> None:
    op.drop_index("job_items_running_worker", "job_items")
    op.drop_table("workers")
