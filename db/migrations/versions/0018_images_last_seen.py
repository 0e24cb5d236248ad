"""``images.last_seen``: when a worker last fetched this version of the object.

"The newest version" of an object (what search finds, what ``/v1/images`` and "more like this"
read) was the one with the latest ``first_seen``; but an object changed and then changed back (a
file reverted, identical bytes uploaded again to an unversioned bucket) meets its old row again, so
the content it has now ranked as old and search showed the intermediate content's vector instead.
Every write of a fetched object now sets ``last_seen``; NULL (rows from before this migration)
reads as ``first_seen``. Adding a nullable column without a default rewrites nothing.

Revision ID: 0018
Revises: 0017
"""

import sqlalchemy as sa
from alembic import op

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("images", sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True))
    # For rows inserted from now on; existing rows keep NULL (no rewrite of the table).
    op.alter_column("images", "last_seen", server_default=sa.text("now()"))


def downgrade() -> None:
    op.drop_column("images", "last_seen")
