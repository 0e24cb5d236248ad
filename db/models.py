"""SQLAlchemy 2 models. The Alembic migrations in ``migrations/versions`` create exactly these."""

from __future__ import annotations

import datetime as dt
import uuid

from pgvector.sqlalchemy import Vector
from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Identity,
    Index,
    Integer,
    LargeBinary,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# cancelled: a queued item of a cancelled job (DELETE /v1/jobs/{id}); final, with no record.
ITEM_STATES = ("queued", "running", "done", "dead", "cancelled")


class Base(DeclarativeBase):
    pass


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    kind: Mapped[str] = mapped_column(Text)
    model: Mapped[str] = mapped_column(Text)
    params: Mapped[dict] = mapped_column(JSONB)
    params_hash: Mapped[str] = mapped_column(Text)
    # [{kind, model, params, params_hash}, ...]: what every item of the job gets. kind, model and
    # params above are those of a single-kind job (kind is "caption,embed" for a combined one).
    tasks: Mapped[list] = mapped_column(JSONB, server_default=text("'[]'::jsonb"))
    total: Mapped[int] = mapped_column(Integer)
    purged: Mapped[int] = mapped_column(Integer, server_default="0")  # dead letters removed by `dlq purge`
    # The feeder's order (core/feeding.py): higher priority first, then fair shares per tenant.
    priority: Mapped[int] = mapped_column(Integer, server_default="0")
    tenant: Mapped[str] = mapped_column(Text, server_default="default")
    queue: Mapped[str] = mapped_column(Text, server_default="imgq")  # the broker queue its items go to
    refs_per_message: Mapped[int | None] = mapped_column(Integer)  # NULL: the publisher's IMGQ_REFS_PER_MESSAGE
    source: Mapped[str] = mapped_column(Text, server_default="cli")  # cli | api | backfill
    # POSTed a signed summary when the job finishes (worker/notifier.py); NULL: no callback.
    callback_url: Mapped[str | None] = mapped_column(Text)
    callback_state: Mapped[str | None] = mapped_column(
        Text, CheckConstraint("callback_state in ('pending', 'delivered', 'failed')", name="jobs_callback_state"))
    callback_next_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    cancelled_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Kept by the statements that cancel items (migration 0015): the pages read it, never count.
    cancelled_items: Mapped[int] = mapped_column(Integer, server_default="0")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


    __table_args__ = (
        Index("jobs_callback_due", "callback_next_at", postgresql_where=text("callback_state = 'pending'")),
        Index("jobs_tenant_created", "tenant", "created_at"),
    )


class Image(Base):
    """One version of one stored object. A changed object (new ETag/content) is a new row."""

    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("source", "bucket", "key", "version", name="images_object_version"),
        # Key prefixes (search filters) whatever the collation: migration 0017.
        Index("images_bucket_key_prefix", "bucket", "key", postgresql_ops={"key": "text_pattern_ops"}),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    source: Mapped[str] = mapped_column(Text, CheckConstraint("source in ('s3', 'local')"))
    bucket: Mapped[str] = mapped_column(Text, server_default="")  # '' for local files
    key: Mapped[str] = mapped_column(Text)  # S3 key, or absolute path for local files
    version: Mapped[str] = mapped_column(Text)  # S3 VersionId or ETag; sha256 prefix for files
    bytes: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    first_seen: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # Set by every write of a fetched object (migration 0018); NULL for older rows: read
    # coalesce(last_seen, first_seen). An object's current version is the one seen last.
    last_seen: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Caption(Base):
    __tablename__ = "captions"
    __table_args__ = (
        UniqueConstraint("image_id", "model", "model_revision", "params_hash", "lang", "method", "via", "via_revision",
                         name="captions_identity"),
        CheckConstraint("method in ('native', 'translated', 'adapter')", name="captions_method"),
        Index("captions_source", "source_id", postgresql_where=text("source_id IS NOT NULL")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    # model, revision and params are always BLIP's (a translation keeps its source caption's); ``via``
    # names what made it another language: the translation model, or the adapter, with its revision.
    model: Mapped[str] = mapped_column(Text)
    model_revision: Mapped[str] = mapped_column(Text)
    params_hash: Mapped[str] = mapped_column(Text)
    params: Mapped[dict] = mapped_column(JSONB)
    text: Mapped[str] = mapped_column(Text)
    lang: Mapped[str] = mapped_column(Text, server_default="en")  # ISO 639-1
    method: Mapped[str] = mapped_column(Text, server_default="native")  # native | translated | adapter
    via: Mapped[str] = mapped_column(Text, server_default="")
    via_revision: Mapped[str] = mapped_column(Text, server_default="")
    source_id: Mapped[int | None] = mapped_column(ForeignKey("captions.id"))  # a translation's English caption
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Embedding(Base):
    """The L2-normalised image projection of a retrieval model. Spaces never mix: a new model or
    revision gives new rows."""

    __tablename__ = "embeddings"
    __table_args__ = (
        UniqueConstraint("image_id", "model", "model_revision", "params_hash", name="embeddings_identity"),
        CheckConstraint("vector_dims(embedding) = dim", name="embeddings_dim"),
        Index("embeddings_model", "model", "model_revision", "dim"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    model: Mapped[str] = mapped_column(Text)
    model_revision: Mapped[str] = mapped_column(Text)
    params_hash: Mapped[str] = mapped_column(Text)
    params: Mapped[dict] = mapped_column(JSONB)
    dim: Mapped[int] = mapped_column(Integer)
    embedding: Mapped[list] = mapped_column(Vector())
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Match(Base):
    """An image-text pair's ITM match probability and the cosine of their projections."""

    __tablename__ = "matches"
    __table_args__ = (
        UniqueConstraint("image_id", "model", "model_revision", "params_hash", "text_hash", name="matches_identity"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    image_id: Mapped[int] = mapped_column(ForeignKey("images.id"))
    model: Mapped[str] = mapped_column(Text)
    model_revision: Mapped[str] = mapped_column(Text)
    params_hash: Mapped[str] = mapped_column(Text)
    params: Mapped[dict] = mapped_column(JSONB)
    text_hash: Mapped[str] = mapped_column(Text)
    text: Mapped[str] = mapped_column(Text)
    itm_score: Mapped[float] = mapped_column(Float)
    cosine: Mapped[float] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class JobItem(Base):
    """One accepted reference. Its state is the system of record; Redis is only transport."""

    __tablename__ = "job_items"
    __table_args__ = (
        CheckConstraint(f"state in {ITEM_STATES!r}", name="job_items_state"),
        Index("job_items_running_worker", "worker", postgresql_where=text("state = 'running'")),
        # The backlog waiting in Postgres, in the order the feeder takes it (one probe per job).
        Index("job_items_unpublished", "job_id", "seq",
              postgresql_where=text("state = 'queued' AND published_at IS NULL")),
        # Published and not final: bounded by the window plus what workers hold, so counting it per
        # job each feed cycle, and the lost sweep, stay cheap however deep the backlog is. Nothing
        # indexes every pending item: a new item enters only the key and job_items_unpublished.
        Index("job_items_in_flight", "job_id",
              postgresql_where=text("state IN ('queued', 'running') AND published_at IS NOT NULL")),
    )

    # The job's id, without a foreign key: its per-row check was half of a big COPY's server time.
    # Items are inserted only with their job (Store.create_job); deleting a job deletes its items
    # (trigger jobs_delete_items, migration 0009).
    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    ref: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(Text, server_default="queued")
    attempts: Mapped[int] = mapped_column(Integer, server_default="0")
    worker: Mapped[str | None] = mapped_column(Text)
    # The result links have no foreign keys (migration 0010): an insert queues a check per key even
    # when it is NULL, a third of a big COPY's server time. Only the result writer sets a link, to a
    # row it inserted in the same transaction; `imgq check` follows every link of a done item.
    image_id: Mapped[int | None] = mapped_column(BigInteger)  # images.id
    text: Mapped[str | None] = mapped_column(Text)  # the pair's text, for validate jobs
    # One link per kind: a kind's result writer sets its column, and `imgq check` follows it.
    caption_id: Mapped[int | None] = mapped_column(BigInteger)  # captions.id
    embedding_id: Mapped[int | None] = mapped_column(BigInteger)  # embeddings.id
    match_id: Mapped[int | None] = mapped_column(BigInteger)  # matches.id
    # NULL: waiting in Postgres for the feeder. Set when its message goes to Redis; cleared again
    # when the message is found lost or the item is retried from the dead-letter store.
    published_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Acceptance(Base):
    """A job being loaded by side COPY streams (migration 0011). Its own transaction deletes the row
    as it commits; a row whose job does not exist and whose advisory lock is free is an acceptance
    its producer died in, and the feeder's sweep deletes its items (``Admin.drop_abandoned``)."""

    __tablename__ = "acceptances"

    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ItemTranslation(Base):
    """A translated caption an item asked for (``imgq enqueue caption --lang``): one per language."""

    __tablename__ = "item_translations"
    __table_args__ = (
        ForeignKeyConstraint(["job_id", "seq"], ["job_items.job_id", "job_items.seq"], ondelete="CASCADE"),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    lang: Mapped[str] = mapped_column(Text, primary_key=True)
    caption_id: Mapped[int] = mapped_column(ForeignKey("captions.id"))


class Adapter(Base):
    """A per-language LoRA adapter on the caption model's text decoder (``imgq finetune`` registers
    them; ``imgq enqueue caption --adapter NAME`` uses one). ``location`` is a local folder or an
    ``s3://bucket/prefix``; ``revision`` is the SHA-256 of its weights, part of each caption's identity;
    ``config_sha256`` that of its ``adapter_config.json`` (migration 0016; NULL for older registrations,
    whose config is not checked)."""

    __tablename__ = "adapters"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    lang: Mapped[str] = mapped_column(Text)
    base_model: Mapped[str] = mapped_column(Text)
    base_revision: Mapped[str] = mapped_column(Text)
    location: Mapped[str] = mapped_column(Text)
    revision: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    config_sha256: Mapped[str | None] = mapped_column(Text)


class DeadLetter(Base):
    __tablename__ = "dead_letters"
    __table_args__ = (
        ForeignKeyConstraint(["job_id", "seq"], ["job_items.job_id", "job_items.seq"], ondelete="CASCADE"),
        Index("dead_letters_code", "code"),
    )

    job_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    ref: Mapped[str] = mapped_column(Text)
    code: Mapped[str] = mapped_column(Text)
    message: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Worker(Base):
    """A live worker process: its heartbeat tells the others whether its running items are orphans."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(Text, primary_key=True)  # host:pid, as job_items.worker
    host: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class CaptionExplanation(Base):
    """Where the decoder looked for each token of an explained caption (``imgq enqueue --explain``):
    per token its role, word, top patch and map (``maps``: one uint8 grid per mapped token, scaled to
    the token's ``scale``; ``imgq.explain.pack``), per word its tokens and top patch, and where the
    overlays were written. One row per caption; the first stored wins."""

    __tablename__ = "caption_explanations"

    caption_id: Mapped[int] = mapped_column(ForeignKey("captions.id", ondelete="CASCADE"), primary_key=True)
    grid_rows: Mapped[int] = mapped_column(Integer)
    grid_cols: Mapped[int] = mapped_column(Integer)
    input_size: Mapped[int] = mapped_column(Integer)  # the model's square input, for boxes on the original
    heads: Mapped[str] = mapped_column(Text)  # mean | max
    layers: Mapped[str] = mapped_column(Text)  # mean, or one layer's index
    tokens: Mapped[list] = mapped_column(JSONB)
    words: Mapped[list] = mapped_column(JSONB)
    maps: Mapped[bytes] = mapped_column(LargeBinary)
    overlays: Mapped[str | None] = mapped_column(Text)  # folder or s3:// prefix; NULL: none written
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class Tenant(Base):
    """Who may submit over HTTP, and what: its sources (a subset of IMGQ_ALLOWED_BUCKETS and
    IMGQ_LOCAL_ROOTS), its limits, and the secret its callbacks are signed with."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    buckets: Mapped[list] = mapped_column(ARRAY(Text), server_default=text("'{}'::text[]"))
    roots: Mapped[list] = mapped_column(ARRAY(Text), server_default=text("'{}'::text[]"))
    # {"requests_per_minute": .., "max_refs": .., "num_beams": .., "max_new_tokens": ..}; absent = the default
    limits: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    callback_secret: Mapped[str] = mapped_column(Text)  # HMAC-SHA256 key; must be readable to sign
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class ApiKey(Base):
    """An API key: ``imgq_<id>_<secret>``. Only the secret's SHA-256 is stored; the secret is 32 random
    bytes, so a fast hash is enough (no password stretching needed for a key nobody chose)."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(Text, primary_key=True)  # public, shown in listings
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name"))
    secret_sha256: Mapped[bytes] = mapped_column(LargeBinary)
    label: Mapped[str] = mapped_column(Text, server_default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))


class IdempotencyKey(Base):
    """``Idempotency-Key`` of a POST /v1/jobs: the same key returns the same job; another body, 409.
    Inserted in the transaction that creates the job, so concurrent repeats serialise on the key."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    request_sha256: Mapped[str] = mapped_column(Text)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    # [{ref, reason}] the first request skipped (skip_invalid), for its replays (migration 0012).
    rejected: Mapped[list | None] = mapped_column(JSONB)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class UiSession(Base):
    """A jobs-page (/ui) session: a cookie whose SHA-256 is stored, bound to the key that opened it."""

    __tablename__ = "ui_sessions"

    token_sha256: Mapped[bytes] = mapped_column(LargeBinary, primary_key=True)
    api_key_id: Mapped[str] = mapped_column(ForeignKey("api_keys.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(Text, CheckConstraint("kind in ('login', 'session')", name="ui_sessions_kind"))
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))


class CallbackAttempt(Base):
    """Each POST of a job's callback: when, and what came back (status or error)."""

    __tablename__ = "callback_attempts"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    status: Mapped[int | None] = mapped_column(Integer)  # HTTP status; NULL: no response
    error: Mapped[str | None] = mapped_column(Text)
    ms: Mapped[int | None] = mapped_column(Integer)


class Backfill(Base):
    """A named backfill (``imgq backfill``): its source, what it enqueues, and its listing cursor, so an
    interrupted run continues where it stopped."""

    __tablename__ = "backfills"

    name: Mapped[str] = mapped_column(Text, primary_key=True)
    source: Mapped[str] = mapped_column(Text)  # s3://bucket/prefix
    kinds: Mapped[str] = mapped_column(Text)  # caption,embed
    params: Mapped[dict] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    tenant: Mapped[str] = mapped_column(Text, server_default="default")
    priority: Mapped[int] = mapped_column(Integer, server_default="-10")
    since: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    # Of the definition the current run started with (source, tasks, since, tenant, priority,
    # queue): only a run of the same definition resumes it; NULL starts over.
    definition_sha256: Mapped[str | None] = mapped_column(Text)
    cursor: Mapped[str | None] = mapped_column(Text)  # the last key listed and enqueued; NULL: from the start
    state: Mapped[str] = mapped_column(
        Text, CheckConstraint("state in ('idle', 'running', 'done', 'failed')", name="backfills_state"),
        server_default="idle")
    listed: Mapped[int] = mapped_column(BigInteger, server_default="0")
    skipped: Mapped[int] = mapped_column(BigInteger, server_default="0")
    enqueued: Mapped[int] = mapped_column(BigInteger, server_default="0")
    # The job this run appends its items to (one job per run, created at its first enqueued page).
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    run_started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    run_finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class BackfillObject(Base):
    """The object version a backfill last enqueued for one set of tasks: listing it again with the same
    ETag/VersionId skips it, a changed one is enqueued again."""

    __tablename__ = "backfill_objects"

    bucket: Mapped[str] = mapped_column(Text, primary_key=True)
    key: Mapped[str] = mapped_column(Text, primary_key=True)
    tasks_sha256: Mapped[str] = mapped_column(Text, primary_key=True)
    version: Mapped[str] = mapped_column(Text)
    job_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"))
    seen_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
