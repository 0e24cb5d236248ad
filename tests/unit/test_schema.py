"""db/schema.py reads the migrations' revisions from their files without importing them: the same
head and revisions as Alembic's own reading."""

from __future__ import annotations

from alembic.script import ScriptDirectory

from imgq.db.migrate import alembic_config
from imgq.db.schema import _migrations


def test_the_files_give_alembics_head_and_revisions() -> None:
    script = ScriptDirectory.from_config(alembic_config(""))
    head, known = _migrations()
    assert head == script.get_current_head() and head
    assert known == {r.revision for r in script.walk_revisions()}
    assert len(known) >= 17
