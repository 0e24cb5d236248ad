"""`imgq backfill` and `imgq beat` without services: what they print, and what `imgq beat` refuses
before it starts."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from typer.testing import CliRunner

from imgq import cli as cli_module
from imgq.cli import app
from imgq.db.backfills import Listed
from imgq.producer import backfill as backfill_module
from imgq.producer import beat as beat_module
from imgq.producer.backfill import Progress, Report, _page

ENV = {"IMGQ_ALLOWED_BUCKETS": "photos", "IMGQ_DATABASE_URL": "postgresql+psycopg://u:p@127.0.0.1:1/none",
       "IMGQ_BROKER_URL": "redis://127.0.0.1:1/0"}


class NotStarted:
    """A control app that must not be reached: `imgq beat` refuses the configuration first."""

    started = False

    def __init__(self, settings: Any) -> None:
        NotStarted.started = True

    def Worker(self, **_: Any) -> Any:
        return SimpleNamespace(start=lambda: None, exitcode=0)

    def Beat(self, **_: Any) -> Any:
        return SimpleNamespace(run=lambda: None)


@pytest.mark.parametrize("mode", [[], ["--send-only"], ["--consume-only"]])
def test_beat_refuses_at_start_every_configured_backfill_that_would_fail_each_night(monkeypatch, tmp_path, mode):
    monkeypatch.setattr(beat_module, "make_control_app", NotStarted)
    monkeypatch.setattr(cli_module, "_require_schema", lambda settings: None)  # no Postgres here
    schedule = ["--schedule-file", str(tmp_path / "schedule")]
    good = {"name": "ok", "source": "s3://photos/2026/", "kinds": "caption,embed", "params": {"num_beams": 3}}
    for bad, problem in [
        ({"kinds": "validate"}, "validate scores image-text pairs"),
        ({"params": {"num_beams": 0}}, "num_beams"),
        ({"params": {"bogus": 1}}, "bogus"),
        ({"source": "s3://elsewhere/x/"}, "'elsewhere' is not in IMGQ_ALLOWED_BUCKETS"),
    ]:
        NotStarted.started = False
        entries = [good, {"name": "broken", "source": "s3://photos/", **bad}]
        result = CliRunner().invoke(app, ["beat", *mode, *schedule],
                                    env=ENV | {"IMGQ_BACKFILLS": json.dumps(entries)})
        assert result.exit_code == 2, (bad, result.output)
        assert "error[config_error]" in result.stderr and "'broken'" in result.stderr, result.stderr
        assert problem in result.stderr
        assert not NotStarted.started
    result = CliRunner().invoke(app, ["beat", *mode, *schedule], env=ENV | {"IMGQ_BACKFILLS": json.dumps([good])})
    assert result.exit_code == 0, result.output
    assert NotStarted.started


class Bar:
    """tqdm's interface as the command uses it; records what each refresh would show."""

    last: Bar | None = None

    def __init__(self, *_: Any, **__: Any) -> None:
        self.n = 0
        self.postfix: dict[str, Any] = {}
        self.shown: list[tuple[int, dict[str, Any]]] = []
        Bar.last = self

    def update(self, n: int) -> None:
        self.n += n
        self.shown.append((self.n, dict(self.postfix)))

    def set_postfix(self, refresh: bool = True, **postfix: Any) -> None:
        self.postfix = postfix
        if refresh:
            self.shown.append((self.n, dict(self.postfix)))

    def close(self) -> None:
        pass


def test_the_progress_bar_shows_the_count_and_the_postfix_of_the_same_page(monkeypatch):
    import tqdm

    def three_pages(**kwargs: Any) -> Report:
        progress = kwargs.get("progress") or Progress()
        for _ in range(3):
            progress.listed += 4
            progress.enqueued += 3
            progress.skipped += 1
            progress.pages += 1
            kwargs["on_page"](progress)
        return Report(kwargs["definition"].name, None, progress, None)

    monkeypatch.setattr(tqdm, "tqdm", Bar)
    monkeypatch.setattr(backfill_module, "run_backfill", three_pages)
    result = CliRunner().invoke(app, ["backfill", "s3://photos/p/", "--name", "bar"], env=ENV)
    assert result.exit_code == 0, result.output
    assert Bar.last is not None and [n for n, _ in Bar.last.shown] == [4, 8, 12]
    for n, postfix in Bar.last.shown:
        assert postfix.get("listed") == n and postfix.get("enqueued") == n // 4 * 3


class Decides:
    def decide(self, d: Any, bucket: str, objects: list[Listed]) -> tuple[list[Listed], list[Listed]]:
        return list(objects), []


def test_a_refused_key_is_named_in_the_warning_itself(caplog):
    control = Listed("p/ctrl\x01.jpg", "v", "e")
    long = Listed("p/" + "x" * 3000 + "\x02.jpg", "v", "e")
    progress = Progress()
    with caplog.at_level(logging.WARNING, logger="imgq.producer.backfill"):
        enqueue, _ = _page(Decides(), SimpleNamespace(since=None), "photos",  # type: ignore[arg-type]
                           [control, Listed("p/ok.jpg", "v", "e"), long], progress)
    assert [o.key for o in enqueue] == ["p/ok.jpg"] and progress.refused == 2
    first, second = [r.getMessage() for r in caplog.records]
    assert repr("p/ctrl\x01.jpg") in first  # the CLI's log format shows the message only
    assert repr(long.key)[:150] in second and len(second) < 450  # cut: the key and the reason that quotes it
