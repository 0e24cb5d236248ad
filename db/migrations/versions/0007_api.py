"""Work over HTTP: tenants and their API keys, idempotency keys, callbacks, cancelled items, jobs-page
sessions, and resumable backfills.

Revision ID: 0007
Revises: 0006
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

NOW = sa.text("now()")


def _ts(name: str, nullable: bool = True, default: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable, server_default=NOW if default else None)


def upgrade() -> None:
    op.drop_constraint("job_items_state", "job_items", type_="check")
    op.create_check_constraint(
        "job_items_state", "job_items", "state in ('queued', 'running', 'done', 'dead', 'cancelled')")

    op.add_column("jobs", sa.Column("source", sa.Text, server_default="cli", nullable=False))
    op.add_column("jobs", sa.Column("callback_url", sa.Text, nullable=True))
    op.add_column("jobs", sa.Column("callback_state", sa.Text, nullable=True))
    op.create_check_constraint(
        "jobs_callback_state", "jobs", "callback_state in ('pending', 'delivered', 'failed')")
    op.add_column("jobs", _ts("callback_next_at"))
    op.add_column("jobs", _ts("cancelled_at"))
    op.create_index("jobs_callback_due", "jobs", ["callback_next_at"],
                    postgresql_where=sa.text("callback_state = 'pending'"))
    op.create_index("jobs_tenant_created", "jobs", ["tenant", "created_at"])

    op.create_table(
        "tenants",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("buckets", ARRAY(sa.Text), server_default=sa.text("'{}'::text[]"), nullable=False),
        sa.Column("roots", ARRAY(sa.Text), server_default=sa.text("'{}'::text[]"), nullable=False),
        sa.Column("limits", JSONB, server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("callback_secret", sa.Text, nullable=False),
        _ts("created_at", nullable=False, default=True),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("tenant", sa.Text, sa.ForeignKey("tenants.name"), nullable=False),
        sa.Column("secret_sha256", sa.LargeBinary, nullable=False),
        sa.Column("label", sa.Text, server_default="", nullable=False),
        _ts("created_at", nullable=False, default=True),
        _ts("revoked_at"),
        _ts("last_used_at"),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("tenant", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("request_sha256", sa.Text, nullable=False),
        sa.Column("job_id", UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        _ts("created_at", nullable=False, default=True),
    )
    op.create_table(
        "ui_sessions",
        sa.Column("token_sha256", sa.LargeBinary, primary_key=True),
        sa.Column("api_key_id", sa.Text, sa.ForeignKey("api_keys.id", ondelete="CASCADE"), nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        _ts("expires_at", nullable=False),
        sa.CheckConstraint("kind in ('login', 'session')", name="ui_sessions_kind"),
    )
    op.create_table(
        "callback_attempts",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("job_id", UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("attempt", sa.Integer, nullable=False),
        _ts("at", nullable=False, default=True),
        sa.Column("status", sa.Integer, nullable=True),
        sa.Column("error", sa.Text, nullable=True),
        sa.Column("ms", sa.Integer, nullable=True),
    )
    op.create_index("ix_callback_attempts_job_id", "callback_attempts", ["job_id"])
    op.create_table(
        "backfills",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("source", sa.Text, nullable=False),
        sa.Column("kinds", sa.Text, nullable=False),
        sa.Column("params", JSONB, server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("tenant", sa.Text, server_default="default", nullable=False),
        sa.Column("priority", sa.Integer, server_default="-10", nullable=False),
        _ts("since"),
        sa.Column("cursor", sa.Text, nullable=True),
        sa.Column("state", sa.Text, server_default="idle", nullable=False),
        sa.Column("listed", sa.BigInteger, server_default="0", nullable=False),
        sa.Column("skipped", sa.BigInteger, server_default="0", nullable=False),
        sa.Column("enqueued", sa.BigInteger, server_default="0", nullable=False),
        sa.Column("job_id", UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        _ts("run_started_at"),
        _ts("run_finished_at"),
        _ts("updated_at", nullable=False, default=True),
        sa.CheckConstraint("state in ('idle', 'running', 'done', 'failed')", name="backfills_state"),
    )
    op.create_table(
        "backfill_objects",
        sa.Column("bucket", sa.Text, primary_key=True),
        sa.Column("key", sa.Text, primary_key=True),
        sa.Column("tasks_sha256", sa.Text, primary_key=True),
        sa.Column("version", sa.Text, nullable=False),
        sa.Column("job_id", UUID(as_uuid=True), sa.ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True),
        _ts("seen_at", nullable=False, default=True),
    )
    # Analysts read results, never the keys' hashes, the sessions or the callback secrets
    # (deploy/postgres/10-roles.sh grants imgq_reader SELECT on every table by default).
    op.execute("""
        DO $$ BEGIN
          IF EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'imgq_reader') THEN
            REVOKE ALL ON tenants, api_keys, ui_sessions, idempotency_keys FROM imgq_reader;
          END IF;
        END $$""")


def downgrade() -> None:
    for table in ("backfill_objects", "backfills", "callback_attempts", "ui_sessions", "idempotency_keys",
                  "api_keys", "tenants"):
        op.drop_table(table)
    op.drop_index("jobs_tenant_created", "jobs")
    op.drop_index("jobs_callback_due", "jobs")
    for column in ("cancelled_at", "callback_next_at", "callback_state", "callback_url", "source"):
        op.drop_column("jobs", column)
    op.execute("DELETE FROM job_items WHERE state = 'cancelled'")
    op.drop_constraint("job_items_state", "job_items", type_="check")
    op.create_check_constraint("job_items_state", "job_items", "state in ('queued', 'running', 'done', 'dead')")
