"""``imgq status``, ``imgq wait``, ``imgq results`` and ``imgq cancel``: a job's progress, read as the
jobs page and the API read it, its results, and its end."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import stat
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from imgq import errors
from imgq.cli_common import JOB_HELP, _fail, _job_id, _n, _settings, _store
from imgq.config import Settings

# A job's tenant: the jobs page's summary query is per tenant, and the CLI serves every tenant.
_JOB_TENANT = "SELECT tenant FROM jobs WHERE id = :job"

# `imgq wait` reads a job's progress at most once a second, and waits at least 20 times as long as
# the last read took: one waiter keeps Postgres at most ~5% busy, however big the job.
_POLL_MIN_S = 1.0
_POLL_MAX_S = 10.0
_POLL_COST_RATIO = 20.0


def _job_tenant(engine: Any, raw_job: str) -> tuple[uuid.UUID, str]:
    """The job id and its tenant, or error[not_found] (exit 1)."""
    from sqlalchemy import text

    job = _job_id(raw_job)
    with engine.connect() as conn:
        tenant = conn.execute(text(_JOB_TENANT), {"job": job}).scalar_one_or_none()
    if tenant is None:
        _fail("not_found", f"no job {raw_job}", 1)
    return job, tenant


def _progress(engine: Any, tenant: str, job: uuid.UUID) -> Any:
    """The job's counts as the jobs page and the API read them: pending items from the partial
    indexes that hold only them, dead ones from dead_letters, done from ``jobs.total``; never a
    GROUP BY state over every item (0.4-0.8 s on a 1M-item job)."""
    from imgq.db.jobs_page import job_summary

    summary = job_summary(engine, tenant, job)
    if summary is None:  # deleted since it was found
        _fail("not_found", f"no job {job}", 1)
    return summary


def _counts(summary: Any) -> dict[str, int]:
    """By state, in the order the commands print them; cancelled only for a cancelled job (0 when
    every item had been claimed before the cancel: the line still says it was cancelled)."""
    counts = {"queued": summary.queued, "running": summary.running, "done": summary.done, "dead": summary.dead}
    if summary.cancelled or summary.cancelled_at is not None:
        counts["cancelled"] = summary.cancelled
    return {**counts, "purged": summary.purged}


def _counts_line(counts: dict[str, int]) -> str:
    return "  ".join(f"{k}={v}" for k, v in counts.items())


def _poll_interval(read_s: float) -> float:
    return min(max(_POLL_MIN_S, _POLL_COST_RATIO * read_s), _POLL_MAX_S)


# `status --json` and `cancel --json`: what their one line holds.
_STATUS_JSON_HELP = ('Print one JSON object: the job id ("job") and its counts ("queued", "running", "done", '
                     '"dead", "cancelled" if any, "purged", "waiting").')
_CANCEL_JSON_HELP = ('Print one JSON object: the job id ("job"), the items this run cancelled ("cancelled_now") '
                     'and the job\'s counts ("queued", "running", "done", "dead", "cancelled", "purged").')


def status(
    job: Annotated[str, typer.Argument(help=JOB_HELP, show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help=_STATUS_JSON_HELP)] = False,
) -> None:
    """Counts of a job's items by state (queued, running, done, dead), and dead letters purged.

    `waiting` is the part of `queued` still in Postgres, which the workers' feeder has not yet
    published to the broker window (IMGQ_BROKER_WINDOW)."""
    from imgq.db.store import make_engine

    engine = make_engine(_settings().sync_database_url)
    try:
        job_id, tenant = _job_tenant(engine, job)
        summary = _progress(engine, tenant, job_id)
    finally:
        engine.dispose()
    counts = _counts(summary)
    if as_json:
        typer.echo(json.dumps({"job": str(job_id), **counts, "waiting": summary.waiting}))
    else:
        typer.echo(_counts_line(counts).replace(f"queued={counts['queued']}",
                                                 f"queued={counts['queued']} (waiting={summary.waiting})", 1))


def wait(
    job: Annotated[str, typer.Argument(help=JOB_HELP, show_default=False)],
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds: then exits 1 with "
                                           "error[timeout], counting the items unfinished.")] = 3600,
    as_json: Annotated[bool, typer.Option("--json", help='Print the final counts as one JSON object, with the '
                                          'job id ("job"), as status --json does.')] = False,
) -> None:
    """Block until every item of a job is done, dead or cancelled, with a progress bar; then print
    its counts.

    If --timeout passes first, it exits 1 with error[timeout] (the job goes on)."""
    from tqdm import tqdm

    from imgq.db.store import make_engine

    engine = make_engine(_settings().sync_database_url)
    try:
        job_id, tenant = _job_tenant(engine, job)
        deadline = time.monotonic() + timeout
        # disable=None: no bar when stderr is not a terminal (cron, CI logs); the final line still prints.
        with tqdm(unit="img", desc="finished", file=sys.stderr, disable=None) as bar:
            summary = _wait_loop(engine, tenant, job_id, bar, deadline, timeout)
    finally:
        engine.dispose()
    counts = _counts(summary)
    typer.echo(json.dumps({"job": str(job_id), **counts}) if as_json else _counts_line(counts))


def _wait_loop(engine: Any, tenant: str, job: uuid.UUID, bar: Any, deadline: float, timeout: float) -> Any:
    """Read the job's progress until nothing is pending (its final summary) or the deadline passes."""
    while True:
        started = time.monotonic()
        summary = _progress(engine, tenant, job)
        read_s = time.monotonic() - started
        # Purged items were dead and are gone from job_items; they count as finished. A backfill's
        # job grows while it runs: the bar's total follows it.
        bar.total = summary.total
        bar.update(summary.total - summary.pending - bar.n)
        bar.set_postfix(dead=summary.dead, purged=summary.purged)
        if not summary.pending:
            return summary
        left = deadline - time.monotonic()
        if left <= 0:
            bar.close()  # ends the bar's line: the error gets its own
            _fail("timeout", f"{summary.pending} items unfinished after {timeout:.0f}s", 1)
        time.sleep(min(_poll_interval(read_s), left + 0.01))


def results(
    job: Annotated[str, typer.Argument(help=JOB_HELP, show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default stdout), "
                                           "with a progress bar on a terminal. It is replaced only once the export "
                                           "is complete: an interrupted one leaves an existing file as "
                                           "it was.")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="Instead: each captioned item's explanation (job "
                                          "enqueued with --explain): where its overlays are, and each word's "
                                          "top patch with its box on the original.")] = False,
    lang: Annotated[str | None, typer.Option(help="Instead: each item's caption in this language (translated "
                                             "or by an adapter; en: BLIP's own), with how it was made.")] = None,
) -> None:
    """Export a job's items with their results (a column per kind) or dead-letter codes."""
    if fmt not in ("jsonl", "csv"):
        _fail("bad_format", f"--format must be jsonl or csv, not {fmt!r}")
    if explain and lang is not None:
        _fail("bad_request", "--explain and --lang are separate exports: choose one")
    settings = _settings()
    store = _store(settings)
    job_id = _job_id(job, settings)
    rows: Any = store.results(job_id)
    if lang is not None:
        from imgq.languages import language

        try:
            code = language(lang).code
        except errors.ImgqError as exc:
            _fail(exc.code, exc.message)
        asked = store.languages(job_id)
        if code not in asked:
            _fail("bad_request", f"job {job_id} has no {code} captions (it asked for: {', '.join(asked) or 'none'}); "
                  f"`imgq enqueue translate --job` adds a language as a new job: read that job's results")
        rows = store.results_in(job_id, code)
    if explain:
        _require_explained(store, job_id)
        rows = _explanations(settings, job_id)
    if output is None:
        _write_rows(rows, sys.stdout, fmt, explain)
    else:
        from tqdm import tqdm

        with _replacing(output) as out, tqdm(unit="row", desc="writing", file=sys.stderr, disable=None) as bar:
            # disable=None: no bar when stderr is not a terminal (cron, CI logs), as `imgq wait`.
            _write_rows(rows, out, fmt, explain, bar.update)
    # Their rows are gone: say so, or the export looks short (--explain exports captioned items only).
    if not explain and (purged := store.purged(job_id)):
        items = "item" if purged == 1 else "items"
        typer.echo(f"note: this export leaves out {purged:,} dead-lettered {items} of this job, deleted by "
                   "`imgq dlq purge`", err=True)


def _write_rows(rows: Any, out: TextIO, fmt: str, explain: bool, written: Callable[[int], Any] | None = None) -> None:
    writer: csv.DictWriter[str] | None = None
    for row in rows:
        if fmt == "csv":
            if explain:
                row = {**row, "words": json.dumps(row["words"])}
            if writer is None:  # the columns depend on the job's kinds
                writer = csv.DictWriter(out, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
        else:
            out.write(json.dumps(row, default=str) + "\n")
        if written is not None:
            written(1)


@contextmanager
def _replacing(output: Path) -> Iterator[TextIO]:
    """A file that becomes ``output`` only once everything is written: a temporary file in the same
    folder, moved over ``output`` (os.replace) at the end, and removed on any failure or Ctrl-C, so an
    existing ``output`` stays whole unless the export completes. Something that is not a regular file
    (/dev/stdout, a FIFO), or a writable file in a folder this user cannot write, is written in place;
    a folder that refuses the rename gets the finished export copied over the file. Replaced, the file
    is a new one: hard links to the old one keep the old contents."""
    try:
        existing: os.stat_result | None = os.stat(output)
    except FileNotFoundError:
        existing = None
    except OSError as exc:
        _fail("bad_file", f"cannot write {output}: {exc.strerror or exc}")
    if existing is not None and stat.S_ISDIR(existing.st_mode):
        _fail("bad_file", f"cannot write {output}: {os.strerror(errno.EISDIR)}")
    if existing is not None and not stat.S_ISREG(existing.st_mode):
        try:
            out = open(output, "w", encoding="utf-8", newline="")  # noqa: SIM115
        except OSError as exc:
            _fail("bad_file", f"cannot write {output}: {exc.strerror or exc}")
        with out:
            yield out
        return
    target = Path(os.path.realpath(output))  # a symlink's file is replaced, not the link
    if existing is not None and not os.access(target, os.W_OK):  # as open(output, "w") would refuse it
        _fail("bad_file", f"cannot write {output}: {os.strerror(errno.EACCES)}")
    temporary = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # 0o666 less the umask, as open() gives a new file; an existing file's mode is kept below.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as exc:
        if existing is None or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            _fail("bad_file", f"cannot write {output}: {exc.strerror or exc}")
        # A writable file in a folder this user cannot write: in place, as before (not atomic).
        typer.echo(f"warning: cannot create a file beside {output} ({exc.strerror}): writing it in place; "
                   "an interrupted export leaves it partial", err=True)
        with _written(output, output, None) as out:
            yield out
        return
    try:
        with _written(fd, output, temporary) as out:
            if existing is not None:
                os.fchmod(fd, stat.S_IMODE(existing.st_mode))
                with contextlib.suppress(OSError):  # only root may give the file back to its owner
                    os.fchown(fd, existing.st_uid, existing.st_gid)
            yield out
            out.flush()
            os.fsync(out.fileno())
        try:
            os.replace(temporary, target)
        except OSError:
            # The folder refuses a rename over the file (a sticky folder, another owner's file):
            # the finished export is copied into it instead.
            try:
                shutil.copyfile(temporary, target)
            except OSError as exc:
                _fail("bad_file", f"cannot write {output}: {exc.strerror or exc}")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(temporary)


@contextmanager
def _written(file: Any, output: Path, temporary: Path | None) -> Iterator[TextIO]:
    """``file`` opened for the export; a write that fails (a full disk) is error[bad_file], saying
    whether ``output`` is unchanged (written through ``temporary``) or partial."""
    try:
        out = open(file, "w", encoding="utf-8", newline="")  # noqa: SIM115
    except OSError as exc:
        _fail("bad_file", f"cannot write {output}: {exc.strerror or exc}")
    try:
        with out:
            yield out
    except OSError as exc:
        state = "unchanged" if temporary is not None else "partial"
        _fail("bad_file", f"cannot write {output}: {exc.strerror or exc} ({output} is {state})")


def cancel(
    job: Annotated[str, typer.Argument(help=JOB_HELP, show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help=_CANCEL_JSON_HELP)] = False,
) -> None:
    """Cancel a job: its queued items become `cancelled` (never run); running items finish.

    As DELETE /v1/jobs/{id}, for any tenant's job: the job is closed at once (nothing more of it
    is published or claimed, a backfill appending to it stops), then its queued items are
    cancelled 10,000 at a time, with a progress bar. Repeating it is harmless; a job that has
    finished is left as it is, so its dead letters can still be retried (a backfill's is closed all
    the same: its next run then enqueues again what it did not finish). Prints the job's counts;
    stderr says how many items this run cancelled."""
    from tqdm import tqdm

    from imgq.db.cancelling import cancel_job
    from imgq.db.store import make_engine

    engine = make_engine(_settings().sync_database_url)
    try:
        job_id, tenant = _job_tenant(engine, job)
        with tqdm(unit="item", desc="cancelling", file=sys.stderr, disable=None) as bar:
            def swept(cancelled: int, seqs: int, total: int) -> None:
                bar.total = total
                bar.update(seqs - bar.n)

            cancelled = cancel_job(engine, tenant, job_id, progress=swept)
        if cancelled is None:  # deleted since it was found
            _fail("not_found", f"no job {job}", 1)
        summary = _progress(engine, tenant, job_id)
    finally:
        engine.dispose()
    counts = _counts(summary)
    running = summary.running
    if summary.cancelled_at is None:
        typer.echo("nothing to cancel: the job has finished (its dead letters can still be retried)", err=True)
    else:
        typer.echo(f"{_n(cancelled, 'queued item')} cancelled"
                   + (f"; {_n(running, 'running item')} {'finishes' if running == 1 else 'finish'}" if running else ""),
                   err=True)
    typer.echo(json.dumps({"job": str(job_id), "cancelled_now": cancelled, **counts}) if as_json
               else _counts_line(counts))


def _require_explained(store: Any, job: uuid.UUID) -> None:
    """``results --explain`` of a job that has no explanations is refused: it printed rows of nulls,
    or nothing at all, and exited 0."""
    tasks = store.job_tasks(job) or []
    captions = [t for t in tasks if t["kind"] == "caption"]
    if not captions:
        kinds = ",".join(t["kind"] for t in tasks)
        _fail("bad_request", f"job {job} has no captions to explain (its kinds: {kinds})")
    if not captions[0]["params"].get("explain"):
        _fail("bad_request", f"job {job} was not enqueued with --explain, so it has no explanations; "
              "`imgq explain REF --out DIR` explains one image now")


def _explanations(settings: Settings, job: uuid.UUID) -> Any:
    from imgq.db.results.caption import explanations
    from imgq.db.store import make_engine

    engine = make_engine(settings.sync_database_url)
    with engine.connect() as conn:
        yield from explanations(conn, job)
    engine.dispose()


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("status")(status)
    app.command("wait")(wait)
    app.command("results")(results)
    app.command("cancel")(cancel)
