"""Acceptance at 100k refs/s (issue 14): a new item enters only the key and the backlog's index.

* The foreign key job_items.job_id -> jobs goes. Its per-row check (one ``SELECT ... FOR KEY SHARE``
  on ``jobs`` per item) was half the server's time of a 1M-item COPY. Items are only ever inserted
  in the transaction that inserts their job (``Store.create_job``), so the key cannot dangle from
  imgq's side; what the key's ON DELETE CASCADE did, a trigger on ``jobs`` still does.
* ``job_items_pending`` (every queued or running item) goes. The lost sweep was its one reader, and
  it looks only at items published and not final, which ``job_items_in_flight`` holds (bounded by
  the broker window plus what workers hold): a queued item waiting in Postgres is never lost.
  Running items are always published (a claim marks them); legacy rows that were not are marked.

Revision ID: 0009
Revises: 0008
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.drop_constraint("job_items_job_id_fkey", "job_items", type_="foreignkey")
    op.execute("""
CREATE FUNCTION imgq_delete_job_items() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  DELETE FROM job_items WHERE job_id = OLD.id;
  RETURN OLD;
END $$""")
    op.execute("CREATE TRIGGER jobs_delete_items AFTER DELETE ON jobs "
               "FOR EACH ROW EXECUTE FUNCTION imgq_delete_job_items()")
    op.execute("UPDATE job_items SET published_at = updated_at WHERE state = 'running' AND published_at IS NULL")
    op.drop_index("job_items_pending", "job_items")


def downgrade() -> None:
    op.create_index("job_items_pending", "job_items", ["state", "updated_at"],
                    postgresql_where=sa.text("state in ('queued', 'running')"))
    op.execute("DROP TRIGGER jobs_delete_items ON jobs")
    op.execute("DROP FUNCTION imgq_delete_job_items()")
    op.execute("DELETE FROM job_items i WHERE NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = i.job_id)")
    op.create_foreign_key("job_items_job_id_fkey", "job_items", "jobs", ["job_id"], ["id"], ondelete="CASCADE")
