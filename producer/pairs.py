"""Image-text pairs for ``validate`` jobs: a CSV with ``ref`` and ``text`` columns, checked row by
row so a bad row is refused with its number before anything is accepted."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterable, Iterator
from typing import TextIO

from imgq.errors import InvalidRequest, RefRefused
from imgq.producer.expand import Expander
from imgq.storable import unstorable

# BLIP's text encoder has 512 positions, and every word is at least one WordPiece token, so more
# words than this is certainly too long; the worker counts tokens exactly (dead letter bad_text).
MAX_WORDS = 510


class BadPairs(InvalidRequest):
    """The pairs file is malformed."""

    code = "bad_pairs"


def read_pairs(stream: TextIO, *, max_words: int = MAX_WORDS) -> Iterator[tuple[int, str, str]]:
    """``(row number, ref, text)`` for each data row; the header row is row 1."""
    reader = csv.DictReader(stream)
    missing = {"ref", "text"} - set(reader.fieldnames or [])
    if missing:
        found = ", ".join(reader.fieldnames or []) or "nothing"
        raise BadPairs(f"row 1: the header needs columns ref and text (found {found})")
    for row in reader:
        line = reader.line_num
        if row.get(None):
            raise BadPairs(f"row {line}: more fields than the header names (quote a text that has commas)")
        if row.get("ref") is None or row.get("text") is None:
            raise BadPairs(f"row {line}: missing the {'ref' if row.get('ref') is None else 'text'} column")
        ref, text = row["ref"].strip(), row["text"].strip()
        if not ref:
            raise BadPairs(f"row {line}: empty ref")
        if not text:
            raise BadPairs(f"row {line}: empty text for {ref}")
        if (reason := unstorable(text)) is not None:
            raise BadPairs(f"row {line}: the text contains {reason}")
        if len(text.split()) > max_words:
            raise BadPairs(f"row {line}: text has {len(text.split())} words; the model reads at most 512 tokens")
        yield line, ref, text


def accept_pairs(rows: Iterable[tuple[int, str, str]], expand: Expander,
                 where: Callable[[int], str] = "row {}".format) -> Iterator[tuple[str, str]]:
    """Canonical ``(ref, text)`` pairs; a ref must name exactly one object (no prefixes). ``where``
    names a row in a refusal: a CSV's line, or the API's ``refs[i]``."""
    for line, raw, text in rows:
        try:
            refs = expand(raw)
        except RefRefused as exc:
            raise RefRefused(f"{where(line)}: {exc.message}") from None
        if len(refs) != 1 or raw.endswith("/"):
            raise RefRefused(f"{where(line)}: {raw!r} must name one image, not a folder or prefix")
        yield refs[0], text
