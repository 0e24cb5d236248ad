"""Helpers the ``imgq`` command modules share: the settings (built once per command and passed down),
the one-line error exit, job ids, the store and admin handles, the feeder that publishes a backlog, and
``--params``.

imgq.cli imports them, so the command modules that read them from there (cli_api, cli_backfill,
cli_finetune, cli_adapters) find the same functions."""

from __future__ import annotations

import json
import uuid
from typing import Any

import typer

from imgq.cli_errors import first_line
from imgq.config import Settings


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


# The help of every command's positional JOB argument.
JOB_HELP = "The job id (printed by imgq enqueue)."


def _json_default(value: Any) -> Any:
    """``json.dumps``' default for the CLI's --json lines: times in ISO 8601 (``2026-11-29T14:11:59+00:00``,
    what the API gives), anything else (UUIDs, decimals) as its str."""
    import datetime as dt

    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    return str(value)


def _n(count: int, noun: str) -> str:
    """``1 item``, ``50,000 items``."""
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _fail(code: str, message: str, exit_code: int = 2) -> typer.Exit:
    typer.echo(f"error[{code}]: {message}", err=True)
    raise typer.Exit(exit_code)


def _require_schema(settings: Settings) -> None:
    """Before a long-running process starts: a database without this imgq's schema, or behind it, is
    error[db_schema] (exit 1); one a newer imgq migrated is a warning, so that the usual rolling
    upgrade (migrate, then replace the processes) keeps the old ones starting. A database that cannot
    be reached is a warning too: the processes ride out an outage (the API's /readyz says 503), and
    one restarted during a failover must not crash-loop."""
    from imgq.cli_errors import describe, first_line
    from imgq.db.schema import schema_state
    from imgq.db.store import make_engine

    engine = make_engine(settings.sync_database_url)
    try:
        state = schema_state(engine)
    except Exception as exc:
        if describe(exc)[0] != "db_unavailable":
            raise
        typer.echo(f"warning[db_unavailable]: the schema revision was not checked ({first_line(exc)}); "
                   "starting anyway", err=True)
        return
    finally:
        engine.dispose()
    problem = state.describe()
    if problem is not None and state.newer:
        typer.echo(f"warning[db_newer]: {problem}; starting anyway", err=True)
    elif problem is not None:
        _fail("db_schema", problem, 1)


def _job_id(raw: str, settings: Settings | None = None) -> uuid.UUID:
    """A job id; with ``settings``, also one that exists (else error[not_found], exit 1)."""
    try:
        job = uuid.UUID(raw)
    except ValueError:
        _fail("bad_job", f"{raw!r} is not a job id (a UUID printed by `imgq enqueue`)")
    if settings is not None and not _store(settings).job_exists(job):
        _fail("not_found", f"no job {raw}", 1)
    return job


def _store(settings: Settings):  # type: ignore[no-untyped-def]
    from imgq.db.store import Store

    return Store.from_url(settings.sync_database_url)


def _admin(settings: Settings):  # type: ignore[no-untyped-def]
    from imgq.db.admin import Admin
    from imgq.db.store import make_engine

    return Admin(make_engine(settings.sync_database_url))


def _feeder(settings: Settings, admin: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
    """One feed cycle's worth of feeder, for commands that put items back in the backlog."""
    from imgq.celeryconf import make_celery
    from imgq.worker.feeder import Feeder

    return Feeder.from_settings(settings, admin=admin, app=make_celery(settings), **kwargs)


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


def _warn_publish_failed(committed: str, error: str, reconcile: str) -> None:
    """Items are committed but the broker refused their messages: a warning (exit 0), not an error,
    since nothing is lost and running the command again would act twice."""
    typer.echo(f"warning[publish_failed]: {committed} but the broker refused its messages ({error}). The items "
               "wait in Postgres: a worker's feeder publishes them once the broker is back; "
               f"`{reconcile}` does it now.", err=True)
