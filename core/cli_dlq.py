"""``imgq dlq``: the dead-letter store: list, retry, purge."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from imgq.cli_common import _admin, _fail, _feeder, _job_id, _json_default, _n, _settings, _warn_publish_failed
from imgq.cli_errors import first_line

dlq_app = typer.Typer(help="The dead-letter store: list, retry, purge.", no_args_is_help=True)


def _code_filter(code: str | None) -> str | None:
    from imgq.cli_errors import dead_letter_codes

    known = dead_letter_codes()
    if code is not None and code not in known:
        _fail("bad_filter", f"unknown error code {code!r}; known codes: {', '.join(sorted(known))}")
    return code


# `dlq list --limit`'s ceiling: far above any dead-letter store, and within Postgres' LIMIT.
_LIST_MAX = 1_000_000_000


@dlq_app.command("list")
def dlq_list(
    code: Annotated[str | None, typer.Option(help="Only this error code (e.g. truncated).")] = None,
    job: Annotated[str | None, typer.Option(help="Only this job.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=_LIST_MAX, help="Newest N.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Dead-lettered items, newest first, with code, message, attempts and last worker."""
    settings = _settings()
    # One more than shown: whether the list is cut is told, not left to guess.
    rows = _admin(settings).dead_letters(code=_code_filter(code), job=_job_id(job, settings) if job else None,
                                         limit=limit + 1)
    more, rows = len(rows) > limit, rows[:limit]
    if not rows and not as_json:
        typer.echo("no dead letters", err=True)
    elif as_json:
        for row in rows:
            typer.echo(json.dumps(row, default=_json_default))
    else:
        _dead_letter_table(rows)
    if more:
        typer.echo(f"{_n(limit, 'dead letter')} shown; more exist: --limit N shows more, --code or --job "
                   "narrows them", err=True)


def _dead_letter_table(rows: list[dict[str, Any]]) -> None:
    import datetime as dt

    table = [("ITEM", "CODE", "ATTEMPTS", "WORKER", "WHEN (UTC)", "REF", "MESSAGE")]
    table += [(f"{r['job_id']}:{r['seq']}", r["code"], str(r["attempts"]), r["worker"] or "-",
               f"{r['created_at'].astimezone(dt.UTC):%Y-%m-%d %H:%M:%S}", r["ref"], r["message"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])


@dlq_app.command("retry")
def dlq_retry(
    code: Annotated[str | None, typer.Option(help="Retry every dead letter with this code.")] = None,
    job: Annotated[str | None, typer.Option(help="Retry every dead letter of this job.")] = None,
    item: Annotated[str | None, typer.Option("--id", help="One item, as JOB:SEQ (from `dlq list`); its JOB "
                                             "takes the place of --job.")] = None,
) -> None:
    """Put dead-lettered items back in the queue (attempts reset to 0). They wait in Postgres like
    any backlog: this publishes what the broker window has room for, the workers' feeder the rest.

    A filter is required (error[bad_filter] without one): --code, --job or --id. Filters given
    together combine: only the dead letters that match every one are retried (--code with --job:
    that job's dead letters of that code; --code with --id: that item, if its code is that one).
    Dead letters of a cancelled job stay. With --id, a SEQ the job has no item for is
    error[bad_filter]; an item that is not a dead letter re-queues nothing and says why."""

    if not (code or job or item):
        _fail("bad_filter", "name --code, --job or --id; retrying everything needs an explicit filter")
    seq = None
    if item:
        job, seq = _item_id(item)
    settings = _settings()
    admin = _admin(settings)
    code = _code_filter(code)
    job_id = _job_id(job, settings) if job else None
    batches = admin.take_dead_letters(code=code, job=job_id, seq=seq)
    requeued = sum(len(b.items) for b in batches)
    if not requeued:  # nothing of this retry's to publish; the feeders publish any other backlog
        if item and job_id and seq is not None:
            why = _why_not_retried(admin, item, job_id, seq, code)
        elif job_id is not None:
            why = _why_job_not_retried(admin, job_id, code)
        else:
            why = None
        typer.echo("re-queued 0 items")
        if why:
            typer.echo(why, err=True)
        return
    try:
        report = _feeder(settings, admin).feed(wait_s=10)
    except Exception as exc:
        # Committed already: an error (exit 1) would have scripts retry what is back in the queue.
        typer.echo(f"re-queued {requeued} items")
        _warn_publish_failed(f"the retry is committed ({_n(requeued, 'item')} re-queued)",
                             f"{type(exc).__name__}: {first_line(exc)}",
                             f"imgq reconcile --job {job}" if job else "imgq reconcile")
        return
    published = f"; {report.items} published now" if report is not None and report.items else ""
    typer.echo(f"re-queued {requeued} items{published}")


def _why_not_retried(admin: Any, item: str, job: Any, seq: int, code: str | None) -> str | None:
    """Why ``--id`` re-queued nothing: an item the job does not have is error[bad_filter]; else the
    line to print (None if it has just been retried by someone else)."""
    found = admin.item_state(job, seq)
    if found is None:  # the job was deleted since it was found
        _fail("not_found", f"no job {job}", 1)
    if found.state is None:
        if seq < found.total:
            _fail("bad_filter", f"--id {item}: item {seq} of job {job} was a dead letter, purged since "
                  "(`imgq dlq purge`)")
        items = f"its items are 0 to {found.total - 1}" if found.total > 1 else "its only item is 0"
        _fail("bad_filter", f"--id {item}: job {job} has no item {seq} ({items})")
    where = f"item {job}:{seq}"
    if found.state != "dead":
        return f"{where} is {found.state}, not a dead letter: nothing to retry"
    if found.cancelled:
        return f"{where} is a dead letter of a cancelled job: nothing to retry"
    if code is not None and found.code != code:
        return f"{where} is a dead letter of code {found.code}, not {code}: nothing to retry"
    return None


def _why_job_not_retried(admin: Any, job: Any, code: str | None) -> str | None:
    """Why ``--job`` re-queued nothing: the line to print, or None (it had no such dead letter)."""
    found = admin.job_dead(job, code)
    if found is None or not found[1]:
        return None
    cancelled, dead = found
    of = f" of code {code}" if code else ""
    stay = "stays as it is" if dead == 1 else "stay as they are"
    return f"job {job} was cancelled: its {_n(dead, 'dead letter')}{of} {stay}" if cancelled else None


# Item numbers are Postgres integers: a larger one names no item, and would fail the query.
_SEQ_MAX = 2**31 - 1


def _item_id(item: str) -> tuple[str, int]:
    """``--id JOB:SEQ`` as (job, seq); the job is checked by the caller."""
    job, _, raw_seq = item.partition(":")
    # isdigit alone takes '²' and other digits int() refuses.
    if not (raw_seq.isascii() and raw_seq.isdigit()):
        _fail("bad_filter", f"--id must be JOB:SEQ, not {item!r}")
    seq = int(raw_seq)
    if seq > _SEQ_MAX:
        _fail("bad_filter", f"--id {item!r}: SEQ is at most {_SEQ_MAX} (the item numbers `imgq dlq list` shows)")
    return job, seq


@dlq_app.command("purge")
def dlq_purge(
    older_than: Annotated[str, typer.Option(help="Only dead letters older than this: 45s, 90m, 12h, 30d, "
                                            "or 0 (or 'all') for every one.")],
) -> None:
    """Delete dead letters (and their items) older than an age; jobs keep a purged count."""
    import datetime as dt

    from imgq.ages import parse_age

    removed = _admin(_settings()).purge(dt.timedelta(seconds=parse_age(older_than)))
    typer.echo(f"purged {removed} dead letters")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(dlq_app, name="dlq")
