"""A bounded broker window: items wait in Postgres until the feeder publishes them, in priority order.

Revision ID: 0005
Revises: 0004
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("priority", sa.Integer, server_default="0", nullable=False))
    op.add_column("jobs", sa.Column("tenant", sa.Text, server_default="default", nullable=False))
    op.add_column("jobs", sa.Column("queue", sa.Text, server_default="imgq", nullable=False))
    op.add_column("jobs", sa.Column("refs_per_message", sa.Integer, nullable=True))
    op.add_column("job_items", sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
    # Before this revision every accepted item was published at enqueue: pending items are in
    # Redis already, and publishing them again would only duplicate work.
    op.execute("UPDATE job_items SET published_at = updated_at WHERE state IN ('queued', 'running')")
    op.create_index("job_items_unpublished", "job_items", ["job_id", "seq"],
                    postgresql_where=sa.text("state = 'queued' AND published_at IS NULL"))
    op.create_index("job_items_in_flight", "job_items", ["job_id"],
                    postgresql_where=sa.text("state IN ('queued', 'running') AND published_at IS NOT NULL"))


def downgrade() -> None:
    op.drop_index("job_items_in_flight", "job_items")
    op.drop_index("job_items_unpublished", "job_items")
    op.drop_column("job_items", "published_at")
    op.drop_column("jobs", "refs_per_message")
    op.drop_column("jobs", "queue")
    op.drop_column("jobs", "tenant")
    op.drop_column("jobs", "priority")
