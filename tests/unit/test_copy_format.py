"""Acceptance's COPY text rows (db/store.py), without a server: every character COPY's text format
treats specially is escaped, each on its own, and chunks keep every ref in order. Through Postgres
these are covered by every job the integration tier creates; here a broken escape fails in
milliseconds."""

from __future__ import annotations

import pytest

from imgq.db.store import _chunks, _copy_row, _copy_text


def unescape(field: str) -> str:
    """COPY's text format read back (the escapes _copy_text writes)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\":
            out.append({"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}[field[i + 1]])
            i += 2
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


@pytest.mark.parametrize(("value", "written"), [
    ("s3://photos/a.jpg", "s3://photos/a.jpg"),
    ("a\\b", "a\\\\b"),
    ("a\tb", "a\\tb"),
    ("a\nb", "a\\nb"),
    ("a\rb", "a\\rb"),
    ("\\\t\n\r", "\\\\\\t\\n\\r"),
])
def test_each_special_character_is_escaped_on_its_own(value: str, written: str) -> None:
    assert _copy_text(value) == written
    assert "\t" not in written and "\n" not in written and "\r" not in written
    assert unescape(written) == value


def test_a_row_is_ref_tab_text_and_a_missing_text_is_null() -> None:
    assert _copy_row("/d/a.jpg") == "/d/a.jpg\t\\N"
    assert _copy_row(("/d/a.jpg", "a dog\tand\na cat")) == "/d/a.jpg\ta dog\\tand\\na cat"
    assert _copy_row(("/d/\\N", "\\N")) == "/d/\\\\N\t\\\\N"  # a literal \N is text, not NULL


def test_chunks_are_full_but_the_last_and_keep_every_ref_in_order() -> None:
    assert list(_chunks(iter(range(7)), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    assert list(_chunks(iter(range(6)), 3)) == [[0, 1, 2], [3, 4, 5]]
    assert list(_chunks(iter([]), 3)) == []
