"""Whether a database holds the schema this imgq's code was written for: its migrations' head.

The long-running processes (worker, api, beat) check it before they start, so that an imgq upgraded
without `imgq db upgrade` stops with one line instead of failing item by item at the first query
that names a new column."""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path

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


# Read from the migration files rather than through Alembic's ScriptDirectory, which imports every
# migration: 0.75 s on a loaded 2-core host, paid by each worker start (tests/unit/test_schema.py
# checks that both agree).
_ASSIGNED = re.compile(r"""^(revision|down_revision)\s*=\s*(?:["']([^"']+)["']|None)""", re.MULTILINE)
VERSIONS = Path(__file__).parent / "migrations" / "versions"


@functools.lru_cache(maxsize=1)
def _migrations() -> tuple[str, frozenset[str]]:
    """(head, every revision) of this imgq's migrations, which form one line."""
    revisions: set[str] = set()
    parents: set[str | None] = set()
    for path in VERSIONS.glob("*.py"):
        found = {m.group(1): m.group(2) for m in _ASSIGNED.finditer(path.read_text(encoding="utf-8"))}
        if found.get("revision"):
            revisions.add(found["revision"])
            parents.add(found.get("down_revision"))
    heads = sorted(revisions - parents)
    return (heads[0] if len(heads) == 1 else ""), frozenset(revisions)


def schema_state(engine: Engine) -> SchemaState:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        current = tuple(sorted(MigrationContext.configure(conn).get_current_heads()))
        tables = not current and conn.execute(text("SELECT to_regclass('jobs') IS NOT NULL")).scalar_one()
    head, known = _migrations()
    return SchemaState(current, head, known, bool(tables))
