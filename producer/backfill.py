"""``imgq backfill``: enqueue what an S3 prefix holds that has no result yet, resumably.

A run lists the prefix page by page (``list_objects_v2`` with ``StartAfter`` = the stored cursor;
``list_object_versions`` with ``KeyMarker`` on a versioned bucket, so that the version compared is
the VersionId the worker stores), decides per object with the skip rule (``db/backfills.py``),
waits for the rate limit, and commits the page: items appended to the run's one job, objects
recorded, cursor advanced, in one transaction (under ``--max-rate``, a page whose new objects
exceed one second's worth is committed in several parts, each after its wait). The items then
wait in Postgres like any backlog; the workers' feeder publishes them (in priority order:
backfills default to -10, behind interactive work).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine

from imgq.config import Settings
from imgq.contract import TaskSpec, make_task, tasks_conflict
from imgq.db.adapters import Adapters
from imgq.db.backfills import BackfillCancelled, BackfillLockLost, Backfills, Definition, Listed, RunState
from imgq.errors import BadParams, ImgqError, RefRefused
from imgq.kinds import parse_kinds, spec
from imgq.pacing import TokenBucket, commit_size_for
from imgq.refs import parse_ref, split_s3

log = logging.getLogger(__name__)

PAGE_SIZE = 1000  # S3's largest listing page
KEY_SHOWN = 200  # characters of a refused key's repr (and of the reason) in its warning


@dataclass(slots=True)
class Progress:
    """This invocation's counts (``run`` has the whole run's, across resumptions)."""

    listed: int = 0
    skipped: int = 0  # up to date, older than --since, folder markers and refused keys
    enqueued: int = 0
    up_to_date: int = 0
    too_old: int = 0
    refused: int = 0
    pages: int = 0  # commits (a page under --max-rate may take several)
    started: float = field(default_factory=time.monotonic)
    run: RunState | None = None  # the whole run's, once started: its job, and what it resumed

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    @property
    def job(self) -> uuid.UUID | None:
        return self.run.job if self.run is not None else None


@dataclass(frozen=True, slots=True)
class Report:
    name: str
    job: uuid.UUID | None  # the run's job (None: nothing enqueued, or a dry run)
    progress: Progress
    run: RunState | None  # None for a dry run
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        p = self.progress
        return {"name": self.name, "job": str(self.job) if self.job else None, "listed": p.listed,
                "skipped": p.skipped, "enqueued": p.enqueued, "seconds": round(p.elapsed_s, 3),
                "resumed": bool(self.run and self.run.resumed), "dry_run": self.dry_run}


def make_tasks(settings: Settings, kinds: str, params: dict[str, Any]) -> list[TaskSpec]:
    """One task per kind, each taking the parameters its kind declares (as ``imgq enqueue``)."""
    names = parse_kinds(kinds)
    paired = [k for k in names if spec(k).input == "pair"]
    if paired:
        raise BadParams(f"{','.join(paired)} scores image-text pairs; a backfill lists images only")
    fields = {k: spec(k).params.model_fields for k in names}
    unknown = sorted(set(params) - {f for names_ in fields.values() for f in names_})
    if unknown:
        raise BadParams(f"invalid parameters: {', '.join(unknown)} apply to none of the kinds {','.join(names)}")
    tasks = [make_task(k, settings.model_for(k), spec(k).parse({p: v for p, v in params.items() if p in fields[k]}))
             for k in names]
    conflict = tasks_conflict(tasks)
    if conflict is not None:
        raise BadParams(conflict)
    return tasks


def task_records(tasks: list[TaskSpec]) -> list[dict[str, Any]]:
    """``jobs.tasks`` records, exactly as ``imgq enqueue`` writes them."""
    return [{"kind": t.kind, "model": t.model, "params": t.params.canonical(), "params_hash": t.params.digest()}
            for t in tasks]


def tasks_sha256(records: list[dict[str, Any]], revisions: dict[str, str | None]) -> str:
    """What "the same tasks" means to the skip rule: each kind's model, params hash and pinned revision."""
    canonical = sorted([r["kind"], r["model"], r["params_hash"], revisions.get(r["kind"])] for r in records)
    return hashlib.sha256(json.dumps(canonical, separators=(",", ":")).encode()).hexdigest()


def define(
    settings: Settings, *, name: str, source: str, kinds: str, params: dict[str, Any],
    since: dt.datetime | None = None, tenant: str | None = None, priority: int = -10,
) -> tuple[Definition, str, str]:
    """Check a backfill's arguments; returns (definition, bucket, prefix). Refuses (RefRefused,
    BadParams) a source that is not an allowed ``s3://bucket/prefix``, and pair kinds."""
    if not source.lower().startswith("s3://"):
        raise RefRefused(f"a backfill lists an S3 prefix (s3://bucket/prefix), not {source!r}")
    bucket, prefix = split_s3(source, settings.allowed_buckets)
    records = task_records(make_tasks(settings, kinds, params))
    revisions = {r["kind"]: settings.revision_for(r["kind"]) for r in records}
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.UTC)
    d = Definition(name=name, source=source, kinds=",".join(r["kind"] for r in records), params=params,
                   tenant=tenant or settings.tenant, priority=priority, since=since, queue=settings.queue,
                   tasks=records, tasks_sha256=tasks_sha256(records, revisions), revisions=revisions)
    return d, bucket, prefix


def check_configured(settings: Settings) -> list[str]:
    """Define each IMGQ_BACKFILLS entry as its run will (:func:`define`): one problem per entry that
    would fail every night (a pair kind, bad or unknown parameters, a bucket not allowed)."""
    problems = []
    for s in settings.backfills:
        try:
            define(settings, name=s.name, source=s.source, kinds=s.kinds, params=s.params, since=s.since,
                   tenant=s.tenant, priority=s.priority)
        except ImgqError as exc:
            problems.append(f"IMGQ_BACKFILLS entry {s.name!r}: {exc.message}")
    return problems


def _etag(raw: Any) -> str:
    return str(raw or "").strip('"')


def versioned(client: Any, bucket: str) -> bool:
    """Whether the bucket keeps versions (then GetObject returns a VersionId, which the worker stores)."""
    try:
        return client.get_bucket_versioning(Bucket=bucket).get("Status") in ("Enabled", "Suspended")
    except Exception as exc:
        code = getattr(exc, "response", {}).get("Error", {}).get("Code")
        if code not in ("AccessDenied", "NotImplemented", "MethodNotAllowed"):
            raise
        # No s3:GetBucketVersioning permission (or a store without versioning): judge by ETag.
        log.warning("cannot read bucket versioning; judging objects by ETag",
                    extra={"action": "backfill_versioning", "bucket": bucket, "error": str(exc)})
        return False


def list_pages(
    client: Any, bucket: str, prefix: str, *, start_after: str | None, page_size: int, by_version: bool,
) -> Iterator[tuple[list[Listed], str | None]]:
    """Pages of (current objects, last key listed). The last key is the page's cursor: the next
    listing starts after it, whatever the page held (folder markers, old versions)."""
    if by_version:
        kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix}
        if start_after:
            kwargs["KeyMarker"] = start_after
        pages = client.get_paginator("list_object_versions").paginate(
            **kwargs, PaginationConfig={"PageSize": page_size})
        for page in pages:
            entries = page.get("Versions", [])
            objects = [Listed(v["Key"], v["VersionId"] if v.get("VersionId") not in (None, "null")
                              else _etag(v.get("ETag")), _etag(v.get("ETag")), v.get("LastModified"))
                       for v in entries if v.get("IsLatest")]
            keys = [v["Key"] for v in entries] + [m["Key"] for m in page.get("DeleteMarkers", [])]
            yield objects, max(keys) if keys else None
        return
    kwargs = {"Bucket": bucket, "Prefix": prefix}
    if start_after:
        kwargs["StartAfter"] = start_after
    for page in client.get_paginator("list_objects_v2").paginate(**kwargs, PaginationConfig={"PageSize": page_size}):
        contents = page.get("Contents", [])
        objects = [Listed(o["Key"], _etag(o.get("ETag")), _etag(o.get("ETag")), o.get("LastModified"))
                   for o in contents]
        yield objects, contents[-1]["Key"] if contents else None


def run_backfill(
    *,
    engine: Engine,
    s3_client: Any,
    settings: Settings,
    definition: Definition,
    bucket: str,
    prefix: str,
    dry_run: bool = False,
    max_rate: float | None = None,
    page_size: int = PAGE_SIZE,
    on_page: Callable[[Progress], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    progress: Progress | None = None,
) -> Report:
    """Run (or, with ``dry_run``, count without writing) one backfill under its lock.

    ``on_page`` is called after each commit (the progress bar; tests raise from it to interrupt a
    run). ``progress`` (optional) is filled as the run goes, so that a caller still has it when the
    run raises. ``max_rate`` paces the enqueued objects only: pages are listed whole, a page's new
    objects are committed in parts of about one second's worth, each after its wait. Raises
    :class:`imgq.errors.BackfillRunning` if the backfill runs elsewhere,
    :class:`imgq.db.backfills.BackfillCancelled` if its job is cancelled, and
    :class:`imgq.db.backfills.BackfillLockLost` if the session holding its lock ends."""
    store = Backfills(engine)
    d = definition
    for record in d.tasks:  # an unknown adapter fails the run now, not every item it would enqueue
        if record["params"].get("adapter") is not None:
            Adapters(engine).require(record["params"]["adapter"], record["model"])
    progress = progress if progress is not None else Progress()
    bucket_for = TokenBucket(max_rate, clock=clock) if max_rate else None
    per_commit = commit_size_for(max_rate)
    size = min(page_size, PAGE_SIZE)
    by_version = versioned(s3_client, bucket)
    if dry_run:
        for objects, last in list_pages(s3_client, bucket, prefix, start_after=None, page_size=size,
                                        by_version=by_version):
            enqueue, _ = _page(store, d, bucket, objects, progress)
            progress.enqueued += len(enqueue)
            progress.skipped += len(objects) - len(enqueue)
            progress.pages += 1
            if on_page is not None and last is not None:
                on_page(progress)
        return Report(d.name, None, progress, None, dry_run=True)
    with store.lock(d.name) as held:
        run = store.start(d, held)
        progress.run = run
        log.info("backfill started", extra={"action": "backfill_start", "backfill": d.name,
                                            "resumed": run.resumed, "cursor": run.cursor})
        try:
            for objects, last in list_pages(s3_client, bucket, prefix, start_after=run.cursor, page_size=size,
                                            by_version=by_version):
                if last is None:
                    continue
                enqueue, done = _page(store, d, bucket, objects, progress)
                for part, found, listed, cursor in commits(objects, enqueue, done, last, per_commit):
                    if bucket_for is not None and part:
                        wait = bucket_for.reserve(len(part))
                        if wait > 0:
                            sleep(wait)
                    store.commit_page(d, run, bucket, enqueue=part, done=found, cursor=cursor, listed=listed,
                                      skipped=listed - len(part), held=held)
                    progress.enqueued += len(part)
                    progress.skipped += listed - len(part)
                    progress.pages += 1
                    if on_page is not None:
                        on_page(progress)
        except BackfillLockLost as exc:  # the row is another run's now (or the next one's): leave it
            log.warning("backfill lost its lock; stopped", extra={"action": "backfill_lock_lost", "backfill": d.name,
                                                                  "job": str(run.job), "error": exc.message})
            raise
        except BaseException as exc:
            try:
                store.finish(d.name, "failed", held)
            except Exception as error:  # Postgres gone too: the row stays 'running', which resumes the same
                log.warning("cannot mark the backfill failed", extra={"action": "backfill_failed",
                                                                      "backfill": d.name, "error": str(error)})
            if isinstance(exc, BackfillCancelled):
                log.warning("backfill stopped: its job was cancelled; the next run starts over",
                            extra={"action": "backfill_cancelled", "backfill": d.name, "job": str(run.job)})
            else:
                log.warning("backfill stopped; the next run resumes after the last committed page",
                            extra={"action": "backfill_failed", "backfill": d.name, "cursor": run.cursor})
            raise
        store.finish(d.name, "done", held)
    log.info("backfill done", extra={"action": "backfill_done", "backfill": d.name, "job": str(run.job),
                                     "listed": progress.listed, "enqueued": progress.enqueued})
    return Report(d.name, run.job, progress, run)


def commits(
    objects: Sequence[Listed], enqueue: Sequence[Listed], done: Sequence[Listed], last: str, size: int | None,
) -> Iterator[tuple[list[Listed], list[Listed], int, str]]:
    """One listed page as commits of at most ``size`` enqueued objects each (all of it in one when
    ``size`` is None): (to enqueue, found done, objects listed, cursor). A commit ends just before
    the object that would exceed ``size``, and its cursor is the last key it covers (a listing
    after it starts with that object); the last commit takes the page's own cursor, which may lie
    past its last object (folder markers, old versions, delete markers)."""
    if size is None or len(enqueue) <= size:
        yield list(enqueue), list(done), len(objects), last
        return
    queued, finished = {o.key for o in enqueue}, {o.key for o in done}
    part: list[Listed] = []
    found: list[Listed] = []
    start = 0
    for i, o in enumerate(objects):
        if o.key in queued:
            if len(part) == size:
                yield part, found, i - start, objects[i - 1].key
                part, found, start = [], [], i
            part.append(o)
        elif o.key in finished:
            found.append(o)
    yield part, found, len(objects) - start, last


def _cut(text: str) -> str:
    """At most KEY_SHOWN characters of ``text`` (a key's repr, a reason quoting it) for a log line."""
    return text if len(text) <= KEY_SHOWN else text[:KEY_SHOWN] + "..."


def _page(store: Backfills, d: Definition, bucket: str, objects: list[Listed],
          progress: Progress) -> tuple[list[Listed], list[Listed]]:
    """Filter one page (folder markers, refused keys, --since), then apply the skip rule."""
    progress.listed += len(objects)
    eligible = []
    for o in objects:
        if o.key.endswith("/"):
            progress.refused += 1
            continue
        try:
            parse_ref(f"s3://{bucket}/{o.key}", allowed_buckets=[bucket], local_roots=[])
        except RefRefused as exc:
            progress.refused += 1
            log.warning("key refused: %s: %s", _cut(repr(o.key)), _cut(exc.message),
                        extra={"action": "backfill_refused", "key": o.key, "reason": exc.message})
            continue
        if d.since is not None and o.last_modified is not None and o.last_modified < d.since:
            progress.too_old += 1
            continue
        eligible.append(o)
    enqueue, done = store.decide(d, bucket, eligible)
    progress.up_to_date += len(eligible) - len(enqueue)
    return enqueue, done
