"""The CLI's own input handling, without services: a refs listing is read as it is consumed, and
operator mistakes (a URL of the wrong kind, a `--limit` below 1, an item number beyond any item)
are refused by name with exit 2 before anything connects, instead of ending as internal_error."""

from __future__ import annotations

import errno
import itertools
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imgq import cli, cli_jobs
from imgq.cli import app

JOB = "0b8f7f5e-1111-4222-8333-944455556666"
# Nothing listens on port 1: a command that got as far as connecting would fail with exit 1, not 2.
ENV = {"IMGQ_DATABASE_URL": "postgresql+psycopg://u:p@127.0.0.1:1/none", "IMGQ_BROKER_URL": "redis://127.0.0.1:1/0"}


class CountedLines:
    """A stdin that counts the lines taken from it."""

    def __init__(self, lines: list[str]) -> None:
        self.lines, self.taken = lines, 0

    def __iter__(self) -> Iterator[str]:
        for line in self.lines:
            self.taken += 1
            yield line

    def __enter__(self) -> CountedLines:
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


def test_stdin_is_read_only_as_far_as_its_refs_are_consumed(monkeypatch) -> None:
    stdin = CountedLines([f"s3://photos/{i}.jpg\n" for i in range(100_000)])
    monkeypatch.setattr(sys, "stdin", stdin)
    first = list(itertools.islice(cli._read_lines("-"), 3))
    assert first == ["s3://photos/0.jpg", "s3://photos/1.jpg", "s3://photos/2.jpg"]
    assert stdin.taken == 3, "the listing must stream to the store, not be held whole in memory"


def test_a_listing_file_streams_and_skips_blank_lines_and_comments(tmp_path: Path) -> None:
    listing = tmp_path / "refs.txt"
    listing.write_text("# header\n\n  s3://photos/a.jpg  \r\n   # indented comment\n\t\ns3://photos/b#1.jpg\n"
                       "s3://photos/c.jpg", encoding="utf-8")
    refs = cli._read_lines(str(listing))
    assert iter(refs) is refs, "a generator, not a list"
    assert list(refs) == ["s3://photos/a.jpg", "s3://photos/b#1.jpg", "s3://photos/c.jpg"]


def test_a_missing_listing_is_refused_when_opened_before_any_ref_is_read(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        cli._read_lines(str(tmp_path / "nope.txt"))  # not iterated: the job is never begun


def test_a_listing_that_is_not_utf8_is_an_unreadable_file(tmp_path: Path) -> None:
    listing = tmp_path / "refs.txt"
    listing.write_bytes(b"s3://photos/a.jpg\n" * 3 + b"s3://photos/\xff.jpg\n")
    with pytest.raises(OSError) as raised:
        list(cli._read_lines(str(listing)))
    assert raised.value.errno == errno.EILSEQ and raised.value.filename == str(listing)
    assert raised.value.strerror == "not UTF-8 text (bytes ff: invalid start byte)"


def _refused(args: list[str], env: dict[str, str], code: str) -> str:
    out = CliRunner().invoke(app, args, env=ENV | env)
    assert out.exit_code == 2, (out.exit_code, out.output, out.exception)
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error[{code}]: "), out.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("variable", "value", "shown"),
    [
        ("IMGQ_DATABASE_URL", "notaurl", "'notaurl'): not a URL"),
        ("IMGQ_DATABASE_URL", "mysql://imgq:hunter2@db/imgq", "'mysql://imgq:***@db/imgq'): not a Postgres URL"),
        ("IMGQ_DATABASE_URL", "postgresql://u@db:notaport/imgq", "'postgresql://u@db:notaport/imgq'): not a URL"),
        ("IMGQ_DATABASE_URL", "sqlite://", "'sqlite://'): not a Postgres URL"),  # in memory: no file, ever
        ("IMGQ_BROKER_URL", "foo://bar", "'foo://bar'): not a Redis URL"),
        ("IMGQ_BROKER_URL", "amqp://guest:secret@rabbit//", "'amqp://guest:***@rabbit//'): not a Redis URL"),
        ("IMGQ_BROKER_URL", "redis", "'redis'): not a Redis URL"),
    ],
)
@pytest.mark.parametrize("command", [["status", JOB], ["dlq", "retry", "--code", "empty"], ["config"]])
def test_a_url_of_the_wrong_kind_is_a_config_error_naming_its_variable(
    command: list[str], variable: str, value: str, shown: str
) -> None:
    line = _refused(command, {variable: value}, "config_error")
    assert f"{variable} (got {shown}" in line and "; expected " in line
    assert "hunter2" not in line and "secret" not in line


@pytest.mark.parametrize(
    "env",
    [
        {"IMGQ_DATABASE_URL": "postgres://imgq@db/imgq", "IMGQ_BROKER_URL": "rediss://:pw@redis:6380/0"},
        {"IMGQ_DATABASE_URL": "postgresql+psycopg2://imgq@db:5432/imgq", "IMGQ_BROKER_URL": "redis+socket:///r.sock"},
        {"IMGQ_DATABASE_URL": "postgresql:///imgq?host=/run/pg", "IMGQ_BROKER_URL": "redis://127.0.0.1:6379/0"},
    ],
)
def test_every_postgres_and_redis_spelling_imgq_reads_is_accepted(env: dict[str, str]) -> None:
    out = CliRunner().invoke(app, ["config"], env=env)
    assert out.exit_code == 0, out.output


def _main(*args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point (its one-line usage errors), against services nobody runs."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")} | ENV
    return subprocess.run([sys.executable, "-m", "imgq.cli", *args], env=env, capture_output=True, text=True,
                          timeout=60)


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_dlq_list_refuses_a_limit_below_one(limit: str) -> None:
    # --limit 0 printed "no dead letters" while some existed; -1 failed in Postgres (internal_error).
    out = _main("dlq", "list", "--limit", limit)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error[usage]: Invalid value for '--limit'"), out.stderr


@pytest.mark.parametrize("seq", ["99999999999", "2147483648"])
def test_dlq_retry_refuses_an_item_number_beyond_any_item(seq: str) -> None:
    line = _refused(["dlq", "retry", "--id", f"{JOB}:{seq}"], {}, "bad_filter")
    assert line == f"error[bad_filter]: --id '{JOB}:{seq}': SEQ is at most 2147483647 (the item numbers " \
                   "`imgq dlq list` shows)"


def test_dlq_retry_refuses_digits_int_cannot_read() -> None:
    assert _refused(["dlq", "retry", "--id", f"{JOB}:\u00b2"], {}, "bad_filter") == \
        f"error[bad_filter]: --id must be JOB:SEQ, not '{JOB}:\u00b2'"


def test_the_wait_poll_backs_off_with_the_cost_of_a_read() -> None:
    assert [cli_jobs._poll_interval(s) for s in (0.0, 0.02, 0.1, 0.4, 3.0)] == [1.0, 1.0, 2.0, 8.0, 10.0]


def _help(*command: str) -> str:
    out = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert out.exit_code == 0, out.output
    return " ".join(out.stdout.split())  # the help as one line: wrapping does not matter


@pytest.mark.parametrize("command", ["status", "wait", "results", "cancel", "check"])
def test_the_job_argument_says_what_it_is(command: str) -> None:
    text = _help(command)
    assert "The job id (printed by imgq enqueue)" in text, text


@pytest.mark.parametrize("command", ["status", "cancel"])
def test_json_options_say_what_they_print(command: str) -> None:
    text = _help(command)
    assert "--json Print one JSON object" in text, text


def test_help_says_what_the_reference_says() -> None:
    assert "'-' reads stdin" in _help("enqueue"), "-f - reads stdin (README)"
    wait = _help("wait")
    assert "exits 1 with error[timeout]" in wait, wait
    retry = _help("dlq", "retry")
    assert "A filter is required" in retry and "--code" in retry and "combine" in retry, retry


def test_apikey_limits_refuses_a_limit_both_set_and_unset() -> None:
    line = _refused(["apikey", "limits", "acme", "--set", "num_beams=3", "--unset", "num_beams"], {}, "bad_request")
    assert line == "error[bad_request]: --set num_beams and --unset num_beams contradict each other: choose one"


@pytest.mark.parametrize(("assignment", "says"), [("num_beams=3.5", "num_beams takes an integer"),
                                                  ("item_cost=lots", "item_cost takes a number")])
def test_apikey_limits_names_the_type_a_limit_takes(assignment: str, says: str) -> None:
    line = _refused(["apikey", "limits", "acme", "--set", assignment], {}, "bad_request")
    assert line == f"error[bad_request]: {assignment!r}: {says}", line
