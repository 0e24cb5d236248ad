"""Configured backfills (``IMGQ_BACKFILLS``) and their crontab schedules. Pure: no SQL, no celery app
(its crontab parser only, so a schedule beat would refuse is refused here, as a config error).

``IMGQ_BACKFILLS`` is a JSON list; each entry names a backfill as ``imgq backfill`` would run it::

    [{"name": "nightly", "source": "s3://photos/", "kinds": "caption,embed",
      "params": {"num_beams": 3}, "schedule": "0 2 * * *"}]

``imgq beat`` turns each into a Celery beat entry (``producer/beat.py``).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

CRON_FIELDS = ("minute", "hour", "day_of_month", "month_of_year", "day_of_week")
# (max + 1, min) of each field, as celery.schedules.crontab parses them.
_CRON_RANGES = {"minute": (60, 0), "hour": (24, 0), "day_of_month": (31, 1), "month_of_year": (12, 1),
                "day_of_week": (7, 0)}
# One crontab field: *, numbers, names (mon, jan), ranges, lists and steps.
_FIELD = re.compile(r"^[A-Za-z0-9*/,\-]+$")


def parse_cron(text: str) -> dict[str, str]:
    """``"0 2 * * *"`` -> the keyword arguments of ``celery.schedules.crontab`` (five fields:
    minute, hour, day of month, month, day of week). Raises ValueError for anything else."""
    parts = text.split()
    if len(parts) != 5:
        raise ValueError(f"a schedule is five crontab fields (minute hour day month weekday), not {text!r}")
    from celery.schedules import crontab_parser  # celery's own parser: what beat will accept

    for name, part in zip(CRON_FIELDS, parts, strict=True):
        if not _FIELD.match(part):
            raise ValueError(f"crontab field {part!r} of {text!r} is malformed")
        try:
            crontab_parser(*_CRON_RANGES[name]).parse(part)
        except Exception as exc:  # celery's ValueError or ParseException: "61 > 59", not an internal error
            raise ValueError(f"crontab {name.replace('_', ' ')} {part!r} of {text!r}: {exc}") from None
    return dict(zip(CRON_FIELDS, parts, strict=True))


def default_name(source: str, kinds: str) -> str:
    """The name of a backfill run without ``--name``: its kinds and source."""
    return f"{kinds}:{source}"


class BackfillSpec(BaseModel):
    """One configured backfill: what ``imgq backfill`` would be given, and when to run it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1, max_length=200)
    source: str = Field(pattern=r"^s3://[^/]+")
    kinds: str = "caption"
    params: dict[str, Any] = Field(default_factory=dict)
    schedule: str = "0 2 * * *"
    since: dt.datetime | None = None
    tenant: str | None = None
    priority: int = -10
    max_rate: float | None = Field(None, gt=0)

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        parse_cron(value)
        return value

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: str) -> str:
        from imgq.errors import BadParams
        from imgq.kinds import parse_kinds

        try:
            return ",".join(parse_kinds(value))
        except BadParams as exc:
            raise ValueError(exc.message) from None


def check_unique(specs: list[BackfillSpec]) -> list[BackfillSpec]:
    names = [s.name for s in specs]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"backfill names must be unique; repeated: {', '.join(twice)}")
    return specs
