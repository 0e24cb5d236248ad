"""A backfill's row records the digest of the definition its current run was started with.

An interrupted run is resumed only by a run of the same definition (source, tasks with their models,
parameters and pinned revisions, --since, tenant, priority, queue). The resume check used to compare
the interrupted run's job's tasks, so a run that had created no job yet (everything it had listed
was up to date), or one whose pinned revision changed, was resumed by a run with other tasks, which
then never listed the objects before the cursor for them. NULL (rows of runs started before this
migration): the next run starts over.

Revision ID: 0014
Revises: 0013
"""

import sqlalchemy as sa
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("backfills", sa.Column("definition_sha256", sa.Text, nullable=True))


def downgrade() -> None:
    op.drop_column("backfills", "definition_sha256")
