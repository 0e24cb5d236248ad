"""Acceptance, second step (issue 14): ``job_items``' result links lose their foreign keys.

``image_id``, ``caption_id``, ``embedding_id`` and ``match_id`` are NULL when an item is accepted,
yet Postgres queues each insert's four foreign-key checks and runs them at the end of the COPY
(it skips a check with a NULL key only after fetching the row again): about a third of a
1M-item COPY's server time. A link is only ever set by the result writer, in the transaction
that inserted the row it names, and ``imgq check`` now follows every link of a done item to its
row, so a link that dangled would be reported as missing. The result tables keep theirs
(``captions.image_id`` and the others), which an analyst's joins rest on.

Revision ID: 0010
Revises: 0009
"""

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

LINKS = {"image_id": "images", "caption_id": "captions", "embedding_id": "embeddings", "match_id": "matches"}


def upgrade() -> None:
    for column in LINKS:
        op.drop_constraint(f"job_items_{column}_fkey", "job_items", type_="foreignkey")


def downgrade() -> None:
    for column, table in LINKS.items():
        # Rows deleted since (by hand: imgq never deletes results) would refuse the key.
        op.execute(f"UPDATE job_items i SET {column} = NULL WHERE {column} IS NOT NULL "
                   f"AND NOT EXISTS (SELECT 1 FROM {table} r WHERE r.id = i.{column})")
        op.create_foreign_key(f"job_items_{column}_fkey", "job_items", table, [column], ["id"])
