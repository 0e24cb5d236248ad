"""`--older-than` ages (imgq.ages): only the e2e CLI tests used them, so mutation testing's unit and
integration tiers saw none of the units, the decimal form or the refusal text."""

from __future__ import annotations

import pytest

from imgq.ages import parse_age
from imgq.errors import BadAge


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        ("45s", 45.0),
        ("90m", 5400.0),
        ("12h", 43200.0),
        ("30d", 2592000.0),
        ("10", 10.0),
        ("0", 0.0),
        ("1.5h", 5400.0),
        ("0.5d", 43200.0),
        (" 2H ", 7200.0),
        ("all", 0.0),
        (" ALL ", 0.0),
    ],
)
def test_an_age_is_its_number_times_its_unit(raw: str, seconds: float) -> None:
    assert parse_age(raw) == seconds


@pytest.mark.parametrize("raw", ["-5", "-1d", "soon", "", "5x", "1.h", ".5h", "5 m", "5mm", "1e3", "al"])
def test_a_negative_or_malformed_age_is_refused_with_the_forms_it_may_take(raw: str) -> None:
    with pytest.raises(BadAge) as refused:
        parse_age(raw)
    assert str(refused.value) == (
        "--older-than must be a number of seconds or 45s, 90m, 12h, 30d; 0 or 'all' means no minimum age; "
        f"not {raw!r}"
    )
    assert refused.value.code == "bad_age"
