"""Count purged dead letters per job, so accounting stays exact after `imgq dlq purge`.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("purged", sa.Integer, server_default="0", nullable=False))


def downgrade() -> None:
    op.drop_column("jobs", "purged")
