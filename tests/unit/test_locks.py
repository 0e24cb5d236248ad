"""Every advisory lock class is declared once, in imgq.db.locks (a class shared by backfills and
cancels once made a cancel wait for a whole backfill run)."""

from __future__ import annotations

import re
from pathlib import Path

from imgq.db import locks

DB = Path(__file__).resolve().parents[2] / "db"


def test_the_classes_are_distinct() -> None:
    assert len(set(locks.CLASSES)) == len(locks.CLASSES)
    declared = {v for k, v in vars(locks).items() if k.isupper() and isinstance(v, int)}
    assert declared == set(locks.CLASSES), "a class missing from CLASSES"


def test_no_module_spells_a_class_itself() -> None:
    spelled = {str(path.relative_to(DB)) for path in DB.rglob("*.py")
               if path.name != "locks.py" and re.search(r"\b7465730\d\b", path.read_text())}
    assert spelled == set(), "use imgq.db.locks"
