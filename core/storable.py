"""Text that Postgres cannot store: a NUL character, or a lone surrogate (what Python makes of bytes
that are not UTF-8, in a command-line argument or a JSON ``\\ud800`` escape). Refused where it enters,
naming the field, so that it is a clear 4xx or exit 2 and never an internal error at the insert."""

from __future__ import annotations

import re
from typing import Any

_UNSTORABLE = re.compile(r"[\x00\ud800-\udfff]")


def unstorable(text: str) -> str | None:
    """Why ``text`` cannot be stored, or None."""
    found = _UNSTORABLE.search(text)
    if found is None:
        return None
    return "a NUL character" if found.group() == "\x00" else "text that is not UTF-8 (a lone surrogate)"


def first_unstorable(value: Any) -> str | None:
    """Why some string in ``value`` (a str, or lists, tuples and dicts of them, keys included)
    cannot be stored, or None."""
    if isinstance(value, str):
        return unstorable(value)
    if isinstance(value, dict):
        value = [*value.keys(), *value.values()]
    if isinstance(value, list | tuple):
        for item in value:
            if (reason := first_unstorable(item)) is not None:
                return reason
    return None
