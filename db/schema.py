"""Whether a database holds the schema this imgq's code was written for: its migrations' head.

The long-running processes (worker, api, beat) check it before they start, so that an imgq upgraded
without `imgq db upgrade` stops with one line instead of failing item by item at the first query
that names a new column."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from sqlalchemy import Engine, text


@dataclass(frozen=True)
class SchemaState:
    current: tuple[str, ...]  # the database's revisions (() before the first migration)
    head: str  # this imgq's newest migration
    known: frozenset[str]  # every revision of this imgq's migrations
    tables: bool = False  # imgq's tables exist (``jobs``), whatever alembic_version says

    @property
    def behind(self) -> bool:
        """Missing or older than this imgq: its queries would fail on it."""
        return self.current != (self.head,) and not self.newer

    @property
    def newer(self) -> bool:
        """Migrated by a newer imgq (a revision this imgq does not have)."""
        return any(rev not in self.known for rev in self.current)

    def describe(self) -> str | None:
        """What is wrong, in one line; None when the database is at this imgq's head."""
        at = ", ".join(self.current)
        if self.newer:
            return (f"the database is at revision {at}, newer than this imgq's migrations (head {self.head}): "
                    "a newer imgq migrated it")
        if len(self.current) > 1:  # imgq's migrations are one line: several rows are a damaged table
            return (f"alembic_version holds several revisions ({at}) but imgq's migrations are linear: "
                    "delete all but the newest row, then run `imgq db upgrade`")
        if not self.current and self.tables:
            return ("the database holds imgq's tables but no Alembic revision (alembic_version is empty or "
                    "missing), so `imgq db upgrade` cannot tell where it stands: restore that table, or record "
                    "the revision its schema is at with `alembic stamp`")
        if not self.current:
            return "the database has no imgq schema: run `imgq db upgrade`"
        if self.behind:
            return f"the database is at revision {at} and this imgq needs {self.head}: run `imgq db upgrade`"
        return None


@functools.lru_cache(maxsize=1)
def _migrations() -> tuple[str, frozenset[str]]:
    from alembic.script import ScriptDirectory

    from imgq.db.migrate import alembic_config

    script = ScriptDirectory.from_config(alembic_config(""))
    return script.get_current_head() or "", frozenset(r.revision for r in script.walk_revisions())


def schema_state(engine: Engine) -> SchemaState:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        current = tuple(sorted(MigrationContext.configure(conn).get_current_heads()))
        tables = not current and conn.execute(text("SELECT to_regclass('jobs') IS NOT NULL")).scalar_one()
    head, known = _migrations()
    return SchemaState(current, head, known, bool(tables))
