"""Request and response bodies of the API (they make the OpenAPI document at /openapi.json)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from imgq.feeding import PRIORITY_MAX, PRIORITY_MIN


class PairRef(BaseModel):
    """One image and its text, for ``validate`` jobs."""

    model_config = ConfigDict(extra="forbid")

    ref: str = Field(min_length=1, max_length=2048)
    # No min_length: an empty text is the job's bad_pairs (refs[i]: empty text for ...), not a
    # validation_error that also reads the object as a failed plain string ref.
    text: str


class JobRequest(BaseModel):
    """A job: every image gets every kind. Name the images with ``refs`` or with one ``prefix``."""

    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"kinds": ["caption", "embed"], "refs": ["s3://photos/2026/0001.jpg"], "params": {"num_beams": 3}},
        {"kinds": ["caption"], "prefix": "s3://photos/2026/", "callback_url": "https://cms.example.com/hook"},
        {"kinds": ["caption", "translate"], "refs": ["s3://photos/2026/0001.jpg"], "params": {"langs": ["de", "fr"]}},
        {"kinds": ["caption"], "refs": ["s3://photos/2026/0001.jpg"], "params": {"adapter": "de-news"}},
    ]})

    kinds: list[str] | str = Field(description="caption, embed, validate, or several (a list, or joined by commas); "
                                   "caption,translate with params.langs also stores each caption in those "
                                   "languages.")
    refs: list[str | PairRef] | None = Field(
        None, description="s3://bucket/key, s3://bucket/prefix/, or a local file or folder within the tenant's "
        "sources; validate takes {ref, text} objects.")
    prefix: str | None = Field(None, max_length=2048, description="Instead of refs: every object under "
                               "s3://bucket/prefix (or a local folder).")
    params: dict[str, Any] = Field(default_factory=dict, description="Per-kind parameters, by their JSON names "
                                   "(num_beams, max_new_tokens, do_sample, prompt, resize, explain, adapter, "
                                   "langs, ...).")
    priority: int | None = Field(None, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="Higher is fed to the "
                                 "workers first (default IMGQ_API_PRIORITY, also the highest allowed; a tenant "
                                 "whose max_priority is lower gets that as its default).")
    callback_url: str | None = Field(None, max_length=2048, description="POSTed a signed summary when the job "
                                     "finishes (host must be on IMGQ_CALLBACK_HOSTS).")
    skip_invalid: bool = Field(False, description="Accept the valid refs and list the refused ones in "
                               "`rejected` (default: refuse the whole job).")

    @model_validator(mode="after")
    def _one_source(self) -> JobRequest:
        if (self.refs is None) == (self.prefix is None):
            raise ValueError("give refs or prefix (one of them)")
        if self.refs is not None and not self.refs:
            raise ValueError("refs is empty")
        return self


class Rejected(BaseModel):
    ref: str
    reason: str


class JobAccepted(BaseModel):
    job: uuid.UUID
    items: int = Field(description="Items committed.")
    messages: int = Field(0, description="Broker messages published now; the workers' feeder publishes the rest.")
    published: int = Field(0, description="Items in those messages.")
    rejected: list[Rejected] = Field(default_factory=list)
    replayed: bool = Field(False, description="True: an earlier request with this Idempotency-Key made the job.")
    publish_error: str | None = Field(None, description="The job is committed, but the broker refused its "
                                      "messages: its items wait in Postgres for the feeder.")


class Counts(BaseModel):
    queued: int
    running: int
    done: int
    dead: int
    cancelled: int
    purged: int


class Callback(BaseModel):
    state: str


class JobStatus(BaseModel):
    job: uuid.UUID
    kinds: list[str]
    source: str
    priority: int
    created_at: dt.datetime
    cancelled_at: dt.datetime | None
    total: int
    counts: Counts
    waiting: int = Field(description="Queued items the feeder has not yet published to the broker.")
    progress: float = Field(description="Final items (done, dead, cancelled, purged) / total.")
    finished: bool
    dead_letters: dict[str, int] = Field(description="Dead items by error code.")
    rate_per_s: float | None = Field(description="Items finished per second over the last minute (unfinished jobs), "
                                     "from this API process's earlier looks: null at its first.")
    callback: Callback | None


class JobListItem(BaseModel):
    job: uuid.UUID
    kinds: list[str]
    source: str
    priority: int
    total: int
    created_at: dt.datetime
    cancelled_at: dt.datetime | None
    callback_state: str | None


class JobList(BaseModel):
    jobs: list[JobListItem]
    next_cursor: str | None


class ResultsPage(BaseModel):
    items: list[dict[str, Any]] = Field(description="seq, ref, state, attempts, a column per kind "
                                        "(caption, embedding_revision, embedding_dim, itm_score, ...), "
                                        "width, height, error_code, error.")
    next_cursor: str | None


class Cancelled(BaseModel):
    job: uuid.UUID
    cancelled: int = Field(description="Queued items cancelled by this request (0 when repeated).")
    status: JobStatus


class Requeued(BaseModel):
    job: uuid.UUID
    requeued: int
    published: int
    outside_sources: int = Field(0, description="Dead letters left as they are: their refs are no longer within "
                                 "this key's sources.")


class ImageCaption(BaseModel):
    text: str
    lang: str = Field(description="ISO 639-1: en for BLIP's own caption, else a translation's language.")
    method: str = Field(description="native (BLIP's own) or translated.")
    model: str
    model_revision: str
    params: dict[str, Any]
    created_at: dt.datetime
    version: str
    width: int
    height: int


class ImageEmbedding(BaseModel):
    model: str
    model_revision: str
    dim: int
    created_at: dt.datetime
    version: str
    vector: list[float] | None = None


class ImageResult(BaseModel):
    ref: str
    caption: ImageCaption | None
    embedding: ImageEmbedding | None


class SearchRequest(BaseModel):
    """Text or an image (a stored embedding), nearest images first, within the tenant's sources."""

    model_config = ConfigDict(extra="forbid")

    text: str | None = Field(None, max_length=2000)
    image: str | None = Field(None, max_length=2048, description="A ref whose stored embedding is the query.")
    limit: int = Field(20, ge=1, le=1000)
    bucket: str | None = None
    prefix: str | None = Field(None, max_length=2048, description="Keys (or local paths) starting with this.")

    @model_validator(mode="after")
    def _one_query(self) -> SearchRequest:
        if (self.text is None) == (self.image is None):
            raise ValueError("give text or image (one of them)")
        return self


class SearchHit(BaseModel):
    ref: str
    similarity: float
    caption: str | None
    model_revision: str
    width: int
    height: int


class SearchResult(BaseModel):
    hits: list[SearchHit]


class UiSession(BaseModel):
    """A one-time link that opens the jobs page (/ui) as the key that asked for it."""

    login_url: str = Field(description="The link, on the host and scheme the request reached (https behind a "
                           "proxy that says X-Forwarded-Proto: https).")
    login_path: str = Field(description="The same link without scheme and host: /ui/login?token=...")
    expires_at: dt.datetime = Field(description="When the link stops working (5 minutes on); it works once.")
