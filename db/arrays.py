"""Array parameters that psycopg sends in Postgres' binary format.

psycopg sends a plain ``list`` as a text-format array literal, quoting each element with a regular
expression in Python: 256-593 us per 512-element array here, against 74-87 us in binary, and a
caption result write sends 14 of them per call (docs/performance.md, "Result writes: two writers
and binary arrays"). A :class:`Binary` list is dumped with psycopg's own ``ListBinaryDumper``,
registered for this class only, so every other ``list`` parameter is sent as before.

Every statement that takes one casts it (``CAST(:x AS bigint[])``): the binary array carries its
element type (int2 for small ints, text for str), and the cast makes it the column's type.
"""

from __future__ import annotations

from typing import Any

from psycopg.types.array import ListBinaryDumper
from sqlalchemy import Engine, event


class Binary(list):  # type: ignore[type-arg]
    """A list parameter sent as a binary array (on an engine set up by :func:`register`)."""


def register(engine: Engine) -> Engine:
    """Teach every psycopg connection of ``engine`` to send :class:`Binary` lists in binary."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        adapters = getattr(dbapi_conn, "adapters", None)  # psycopg 3 only; another driver sends lists as it does
        if adapters is not None:
            adapters.register_dumper(Binary, ListBinaryDumper)

    return engine
