"""One error path for every CLI command: whatever fails, one ``error[CODE]: message`` line on
stderr and a documented exit code, never a traceback (``--debug`` or ``IMGQ_DEBUG=1`` shows it).

Exit codes: 2 for a refused request (nothing was done), 1 for a failure of the system or an
unknown job, 70 for an unexpected error (a bug)."""

from __future__ import annotations

import os

from imgq import errors


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def describe(exc: BaseException) -> tuple[str, str, int]:
    """(code, message, exit code) for an exception that escaped a command."""
    if isinstance(exc, errors.ImgqError):
        return exc.code, exc.message, 2 if isinstance(exc, errors.InvalidRequest) else 1
    module = type(exc).__module__ or ""
    names = {cls.__name__ for cls in type(exc).__mro__}
    if module.startswith(("sqlalchemy", "psycopg")) and names & {"OperationalError", "InterfaceError"}:
        return ("db_unavailable", f"cannot use Postgres (IMGQ_DATABASE_URL): {first_line(exc)}", 1)
    if module.startswith(("kombu", "redis", "amqp")) or names & {"ConnectionRefusedError"}:
        return ("broker_unavailable", f"cannot use the broker (IMGQ_BROKER_URL): {first_line(exc)}", 1)
    if names & {"ProgrammingError", "UndefinedTable"}:
        return ("db_schema", f"the database schema is missing or old; run `imgq db upgrade` ({first_line(exc)})", 1)
    hint = "" if debug() else " (IMGQ_DEBUG=1 or --debug shows the traceback)"  # with it, the traceback is above
    return ("internal_error", f"{type(exc).__name__}: {first_line(exc)}{hint}", 70)


def debug() -> bool:
    return os.environ.get("IMGQ_DEBUG", "").strip().lower() in {"1", "true", "yes", "on"}


# Codes that dead letters carry besides the error classes' own (written by the worker's service).
_SERVICE_CODES = {"too_many_attempts", "bad_message", "internal_error", "db_unavailable", "transient"}


def dead_letter_codes() -> set[str]:
    """Every code a dead letter can carry, for validating ``--code`` filters."""
    found: set[str] = set()
    stack: list[type[errors.ImgqError]] = [errors.Permanent, errors.Retryable]
    while stack:
        cls = stack.pop()
        found.add(cls.code)
        stack.extend(cls.__subclasses__())
    return (found - {"permanent"}) | _SERVICE_CODES
