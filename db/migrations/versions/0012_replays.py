"""A replayed POST /v1/jobs answers with the refs its first request rejected.

An ``Idempotency-Key`` exists for the client whose first answer was lost (a timeout, a dropped
connection). The replay used to return the job and its item count only, so with
``skip_invalid`` the refs the first request refused, which are stored nowhere else, were lost to
that client. ``idempotency_keys.rejected`` keeps them, written in the job's own transaction.
NULL for keys recorded before this migration (their replays answer ``rejected: []`` as before).

Revision ID: 0012
Revises: 0011
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("idempotency_keys", sa.Column("rejected", JSONB, nullable=True))


def downgrade() -> None:
    op.drop_column("idempotency_keys", "rejected")
