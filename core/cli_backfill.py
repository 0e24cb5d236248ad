"""``imgq backfill``: enqueue what an S3 prefix holds that has no result yet; ``imgq beat``: run the
configured backfills (IMGQ_BACKFILLS) on their schedules. See docs/backfill.md."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Annotated, Any

import typer


def _since(raw: str | None) -> dt.datetime | None:
    from imgq.cli import _fail

    if raw is None:
        return None
    try:
        when = dt.datetime.fromisoformat(raw.strip())
    except ValueError:
        _fail("bad_date", f"--since must be an ISO date or time (2026-01-31, 2026-01-31T02:00:00Z), not {raw!r}")
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


def backfill(
    source: Annotated[str, typer.Argument(help="s3://bucket/prefix to list (the bucket must be in "
                                          "IMGQ_ALLOWED_BUCKETS).")],
    kinds: Annotated[str, typer.Option(help="What to compute: caption, embed, or caption,embed.")] = "caption",
    params_json: Annotated[str | None, typer.Option("--params", help="Parameters as one JSON object, as "
                                                    "`imgq enqueue --params`.")] = None,
    since: Annotated[str | None, typer.Option(help="Only objects modified at or after this date or time "
                                              "(ISO 8601; UTC unless it says otherwise).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="List and count what would be enqueued; write "
                                          "nothing.")] = False,
    max_rate: Annotated[float | None, typer.Option(min=0.001, help="Most objects enqueued per second.")] = None,
    name: Annotated[str | None, typer.Option(help="The backfill's name: its cursor, lock and counters "
                                             "(default KINDS:SOURCE). An interrupted run of a name resumes.")] = None,
    tenant: Annotated[str | None, typer.Option(help="Tenant of the job (IMGQ_TENANT).")] = None,
    priority: Annotated[int, typer.Option(help="Priority of the job; the default -10 keeps it behind "
                                          "interactive work.")] = -10,
    page_size: Annotated[int, typer.Option(min=1, max=1000, hidden=True)] = 1000,
) -> None:
    """Enqueue every object under an S3 prefix that has no result yet for the current models and
    parameters; resumable, and safe to run nightly.

    An object is skipped when this backfill already enqueued the same version (ETag, or VersionId
    in a versioned bucket) for the same tasks, or when every kind already has a result for that
    version. A run appends to one job (printed on stdout); the workers' feeder publishes it.

    \b
      imgq backfill s3://photos/2026/ --kinds caption,embed --name photos-nightly
      imgq backfill s3://photos/ --since 2026-11-01 --dry-run
    """
    from tqdm import tqdm

    from imgq import errors
    from imgq.cli import _fail, _params_json, _settings
    from imgq.db.store import make_engine
    from imgq.nightly import default_name
    from imgq.producer.backfill import Progress, define, run_backfill
    from imgq.s3 import make_s3_client

    settings = _settings()
    raw = _params_json(params_json)
    when = _since(since)
    try:
        definition, bucket, prefix = define(settings, name=name or default_name(source, kinds), source=source,
                                            kinds=kinds, params=raw, since=when, tenant=tenant, priority=priority)
    except errors.ImgqError as exc:
        _fail(exc.code, exc.message)
    engine = make_engine(settings.sync_database_url)
    bar = tqdm(desc="dry run" if dry_run else "backfill", unit="obj", file=sys.stderr, disable=None,
               mininterval=0.5)

    def show(progress: Any) -> None:
        rate = progress.enqueued / progress.elapsed_s if progress.elapsed_s > 0 else 0.0
        bar.set_postfix(listed=progress.listed, skipped=progress.skipped, enqueued=progress.enqueued,
                        enq_per_s=f"{rate:.0f}", refresh=False)
        bar.update(progress.listed - bar.n)  # refreshes: the count and the postfix of the same page

    progress = Progress()
    try:
        try:
            report = run_backfill(engine=engine, s3_client=make_s3_client(settings), settings=settings,
                                  definition=definition, bucket=bucket, prefix=prefix, dry_run=dry_run,
                                  max_rate=max_rate, page_size=page_size, on_page=show, progress=progress)
        finally:
            bar.close()
    except KeyboardInterrupt:
        _stopped(definition.name, progress, "interrupted")
        typer.echo("error[interrupted]: aborted; the next run resumes after the last committed page", err=True)
        raise typer.Exit(130) from None
    except errors.BackfillRunning as exc:
        _fail("backfill_running", exc.message, 1)
    except errors.ImgqError as exc:  # also a cancelled job (backfill_cancelled), a lost lock (backfill_lock_lost)
        _stopped(definition.name, progress, "stopped")
        _fail(exc.code, exc.message, 2 if isinstance(exc, errors.InvalidRequest) else 1)
    except Exception as exc:
        _stopped(definition.name, progress, "stopped")
        if not type(exc).__module__.startswith(("botocore", "boto3")):
            raise  # Postgres and the rest: the CLI's one error path (cli_errors.describe)
        _fail("s3_error", f"cannot list {source}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
              "what was committed stays, and the next run resumes from there", 1)
    p = report.progress
    if dry_run:
        typer.echo(f"dry run {definition.name}: listed={p.listed} would_enqueue={p.enqueued} skipped={p.skipped} "
                   f"({_detail(p)}) in {p.elapsed_s:.1f}s; nothing written", err=True)
        engine.dispose()
        return
    typer.echo(_summary(definition.name, p), err=True)
    if report.job is not None:
        _publish(settings, engine, report.job)
        typer.echo(str(report.job))
    engine.dispose()


def _detail(p: Any) -> str:
    return f"{p.up_to_date} up to date, {p.too_old} older than --since, {p.refused} folder markers or refused keys"


def _summary(name: str, p: Any, how: str = "") -> str:
    """The run's line on stderr: this invocation's counts (``p``, a Progress), and what it resumed."""
    rate = p.enqueued / p.elapsed_s if p.elapsed_s > 0 else 0.0
    run = p.run
    resumed = f"; resumed a run interrupted at {run.listed - p.listed} listed" if run and run.resumed else ""
    return (f"backfill {name}{' ' + how if how else ''}: listed={p.listed} skipped={p.skipped} "
            f"enqueued={p.enqueued} ({_detail(p)}) in {p.elapsed_s:.1f}s, {rate:.0f} enqueued/s{resumed}")


def _stopped(name: str, p: Any, how: str) -> None:
    """A run that stopped early (Ctrl-C, a cancelled job, a lost lock, S3): its summary on stderr and,
    if it made a job, the job's id (on stderr, and on stdout as a finished run prints it): what it
    committed is processed."""
    if p.run is None:
        return  # it had not started (the lock was refused, or Postgres failed first)
    job = f"; job {p.job}" if p.job is not None else "; no job (nothing enqueued)"
    typer.echo(_summary(name, p, how) + job, err=True)
    if p.job is not None:
        typer.echo(str(p.job))


def _publish(settings: Any, engine: Any, job: Any) -> None:
    """One feed cycle now, as `imgq enqueue` does, so a small backfill starts at once; the workers'
    feeder publishes the rest. A broker outage only delays it."""
    from imgq.cli import _feeder
    from imgq.db.admin import Admin
    from imgq.worker.feeder import PRODUCER_MESSAGES

    try:
        feeder = _feeder(settings, Admin(engine))
        try:
            feeder.feed(job=job, wait_s=2.0, max_messages=PRODUCER_MESSAGES)
        finally:
            feeder.stop()
    except Exception as exc:
        typer.echo(f"warning[publish_failed]: the backfill's items are committed and wait in Postgres for the "
                   f"workers' feeder ({type(exc).__name__}: {exc})", err=True)


def beat(
    send_only: Annotated[bool, typer.Option("--send-only", help="Only schedule: send the backfill tasks to "
                                            "IMGQ_CONTROL_QUEUE for another `imgq beat --consume-only`.")] = False,
    consume_only: Annotated[bool, typer.Option("--consume-only", help="Only run the backfill tasks that "
                                               "arrive on IMGQ_CONTROL_QUEUE.")] = False,
    schedule_file: Annotated[Path, typer.Option(help="Celery beat's record of the last runs.")] =
    Path(".imgq/celerybeat-schedule"),
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
) -> None:
    """Run the backfills configured in IMGQ_BACKFILLS on their crontab schedules (Celery beat).

    By default one process both schedules and runs them: beat sends an `imgq.backfill` task (JSON)
    to IMGQ_CONTROL_QUEUE at each due time, and this process consumes it, one backfill at a time.
    Run one scheduler only; several consumers are safe (a backfill's lock refuses a second run)."""
    from imgq.cli import _fail, _require_schema, _settings
    from imgq.producer.beat import make_control_app

    if send_only and consume_only:
        _fail("bad_request", "--send-only and --consume-only exclude each other")
    settings = _settings()
    if not settings.backfills and not consume_only:
        _fail("config_error", "IMGQ_BACKFILLS is empty: nothing to schedule (docs/backfill.md)")
    from imgq.producer.backfill import check_configured

    problems = check_configured(settings)  # as each run will define it: refused now, not every night
    if problems:
        _fail("config_error", "; ".join(problems) + " (docs/backfill.md)")
    if not send_only:  # the runs write jobs; the scheduler alone only sends tasks
        _require_schema(settings)
    app = make_control_app(settings)
    schedule_file.parent.mkdir(parents=True, exist_ok=True)
    if send_only:
        app.Beat(loglevel=loglevel, schedule=str(schedule_file)).run()
        return
    node = app.Worker(queues=[settings.control_queue], pool="solo", concurrency=1, loglevel=loglevel,
                      beat=not consume_only, schedule_filename=str(schedule_file), without_mingle=True,
                      without_gossip=True)
    node.start()
    raise typer.Exit(node.exitcode or 0)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("backfill")(backfill)
    app.command("beat")(beat)
