"""Ages given on the command line (`dlq purge --older-than`, `reconcile --older-than`)."""

from __future__ import annotations

import re

from imgq.errors import BadAge

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
FORMS = "a number of seconds or 45s, 90m, 12h, 30d; 0 or 'all' means no minimum age"
_AGE = re.compile(r"(\d+(?:\.\d+)?)([smhd]?)")


def parse_age(raw: str) -> float:
    """Seconds for an age such as ``45s``, ``90m``, ``12h``, ``30d`` or a bare number of seconds;
    ``0`` and ``all`` mean every age. Negative or malformed ages are refused."""
    text = raw.strip().lower()
    if text == "all":
        return 0.0
    found = _AGE.fullmatch(text)
    if found is None:
        raise BadAge(f"--older-than must be {FORMS}; not {raw!r}")
    return float(found.group(1)) * UNITS[found.group(2) or "s"]
