"""The README's tables are the user's reference: they must match what the code prints and reads."""

from __future__ import annotations

import re
from pathlib import Path

from imgq.cli_errors import dead_letter_codes
from imgq.config import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _table_after(heading: str) -> list[str]:
    """First cells of the first table under ``heading``."""
    section = README[README.index(heading) :]
    rows, started = [], False
    for line in section.splitlines()[1:]:
        if line.startswith("|"):
            started = True
            rows.append(line.split("|")[1].strip())
        elif started:
            break
    return [r for r in rows[2:]]  # past the header and the --- row


def _codes(cells: list[str]) -> set[str]:
    return {code for cell in cells for code in re.findall(r"`([a-z_]+)`", cell)}


def _cli_codes() -> set[str]:
    """Every code the CLI can print: literal ones in its sources, the error classes it surfaces."""
    from imgq import errors
    from imgq.producer import pairs  # noqa: F401  (defines BadPairs)

    found: set[str] = set()
    for path in (ROOT / "core").glob("*.py"):
        source = path.read_text(encoding="utf-8")
        found |= set(re.findall(r'_fail\(\s*"([a-z_]+)"', source))
        found |= set(re.findall(r"error\[([a-z_]+)\]", source))
        if path.name == "cli_errors.py":
            found |= set(re.findall(r'return \(\s*"([a-z_]+)"', source))
    stack: list[type[errors.ImgqError]] = [errors.InvalidRequest, errors.ModelUnavailable, errors.ConfigError,
                                           errors.VectorIndexError, errors.BackfillCancelled, errors.BackfillLockLost]
    while stack:
        cls = stack.pop()
        found.add(cls.code)
        stack.extend(cls.__subclasses__())
    # The base class is never raised; a callback URL reaches imgq only through the API (docs/api.md).
    return found - {"invalid_request", "callback_not_allowed"}


def test_the_dead_letter_table_lists_exactly_the_codes_a_dead_letter_can_carry():
    assert _codes(_table_after("## Error codes")) == dead_letter_codes()


def test_the_cli_table_lists_every_code_the_cli_prints_and_no_other():
    table = _codes(_table_after("### CLI errors"))
    dead = _codes(_table_after("## Error codes"))
    printed = _cli_codes()
    assert printed - table - dead == set(), "codes the CLI prints that the README does not list"
    assert table - printed == set(), "README codes that nothing prints"


def test_the_configuration_table_documents_every_variable_imgq_config_prints():
    cells = _table_after("### Configuration")
    documented = {name for cell in cells for name in re.findall(r"`(IMGQ_[A-Z0-9_]+)`", cell)}
    variables = {f"IMGQ_{field.upper()}" for field in Settings.model_fields}
    assert variables - documented == set(), "variables missing from the README"
    assert documented - variables == set(), "README variables that Settings does not read"


def test_the_first_publish_cap_is_the_one_the_help_texts_and_docs_state():
    """`imgq enqueue --help`, the API's OpenAPI text and the README quote PRODUCER_MESSAGES."""
    from imgq.cli import enqueue
    from imgq.producer.api.jobs import create_job
    from imgq.worker.feeder import PRODUCER_MESSAGES

    quoted = f"at most {PRODUCER_MESSAGES:,}"
    assert quoted in " ".join((enqueue.__doc__ or "").split())
    assert quoted in " ".join((create_job.__doc__ or "").split())
    api = (ROOT / "docs" / "api.md").read_text(encoding="utf-8")
    for text in (README, api):  # every "first messages ... (at most N" and "publishes at most N messages"
        stated = re.findall(r"first messages[^(]{0,40}\(at most ([\d,]+)|publishes at most ([\d,]+) messages", text)
        assert stated and {n.rstrip(",") for pair in stated for n in pair if n} == {f"{PRODUCER_MESSAGES:,}"}
