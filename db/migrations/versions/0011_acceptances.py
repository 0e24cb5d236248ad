"""Acceptances in progress: what a producer that died mid-acceptance left behind can be found.

A job loaded by several COPY streams (``IMGQ_COPY_STREAMS``) commits its side streams' items just
before its own transaction. A producer that dies between those commits used to leave committed
items whose job never was: unread, but stored for ever. Now the first side stream records the job
here, in its own committed statement, and the job's own transaction deletes that row as it
commits. The job's transaction holds an advisory lock on the job from its first statement, so a
row whose lock is free and whose job does not exist is an acceptance nobody will finish: the
feeder's sweep (and ``imgq reconcile``) deletes its items and the row (``Admin.drop_abandoned``).

Revision ID: 0011
Revises: 0010
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import UUID

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "acceptances",
        sa.Column("job_id", UUID(as_uuid=True), primary_key=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
    )
    # deploy/postgres/10-roles.sh gives producers no DELETE by default, but a producer deletes its
    # acceptance record as its job commits and its side items after a commit that failed, and the
    # producer's CLI is the operators' (`imgq dlq retry` and `dlq purge` delete dead letters, and
    # purge deletes their items; both were refused in a compose deployment until now).
    op.execute("""
        DO $$ BEGIN
          IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgq_producer') THEN
            GRANT DELETE ON acceptances, job_items, dead_letters TO imgq_producer;
          END IF;
        END $$""")


def downgrade() -> None:
    op.drop_table("acceptances")
