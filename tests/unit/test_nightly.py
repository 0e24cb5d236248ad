"""Scheduled backfills: IMGQ_BACKFILLS, crontab parsing, the beat schedule, the tasks' identity."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from imgq.config import Settings
from imgq.nightly import BackfillSpec, default_name, parse_cron
from imgq.producer.backfill import make_tasks, task_records, tasks_sha256
from imgq.producer.beat import BACKFILL_TASK, beat_schedule, make_control_app


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0 2 * * *", ("0", "2", "*", "*", "*")),
        ("*/15 1-5 1,15 * mon-fri", ("*/15", "1-5", "1,15", "*", "mon-fri")),
        ("  30   3 * jan sun ", ("30", "3", "*", "jan", "sun")),
    ],
)
def test_a_crontab_string_gives_celery_crontab_arguments(text, expected):
    assert tuple(parse_cron(text).values()) == expected
    assert list(parse_cron(text)) == ["minute", "hour", "day_of_month", "month_of_year", "day_of_week"]


@pytest.mark.parametrize("bad", ["", "0 2 * *", "0 2 * * * *", "0 2 * * $(rm)", "@daily"])
def test_malformed_schedules_are_refused(bad):
    with pytest.raises(ValueError):
        parse_cron(bad)


def _settings(backfills: object) -> Settings:
    return Settings(_env_file=None, backfills=backfills)


def test_imgq_backfills_is_read_as_json_and_round_trips_through_the_environment(monkeypatch):
    raw = json.dumps([{"name": "nightly", "source": "s3://photos/2026/", "kinds": "embed,caption",
                       "params": {"num_beams": 3}, "schedule": "0 2 * * *"}])
    monkeypatch.setenv("IMGQ_BACKFILLS", raw)
    settings = Settings(_env_file=None)
    [spec] = settings.backfills
    assert (spec.name, spec.kinds, spec.priority, spec.params) == ("nightly", "caption,embed", -10, {"num_beams": 3})
    monkeypatch.setenv("IMGQ_BACKFILLS", settings.as_env()["IMGQ_BACKFILLS"])
    assert Settings(_env_file=None).backfills == settings.backfills
    monkeypatch.setenv("IMGQ_BACKFILLS", "")
    assert Settings(_env_file=None).backfills == []
    assert "IMGQ_BACKFILLS" in Settings(_env_file=None).as_env()  # empty, not garbage


@pytest.mark.parametrize(
    "bad",
    [
        "not json",
        [{"name": "a", "source": "/srv/photos"}],
        [{"name": "a", "source": "s3://b/", "schedule": "daily"}],
        [{"name": "a", "source": "s3://b/", "kinds": "colour"}],
        [{"name": "a", "source": "s3://b/", "pickle": True}],
        [{"name": "a", "source": "s3://b/"}, {"name": "a", "source": "s3://c/"}],
    ],
)
def test_bad_backfill_definitions_are_refused_at_start(bad):
    with pytest.raises(ValidationError):
        _settings(bad)


def test_the_beat_schedule_has_one_crontab_entry_per_backfill_sent_to_the_control_queue():
    from celery.schedules import crontab

    specs = _settings([{"name": "a", "source": "s3://b/x/", "schedule": "0 2 * * *"},
                       {"name": "b", "source": "s3://b/y/", "schedule": "*/30 * * * 1"}]).backfills
    schedule = beat_schedule(specs, "ctl")
    assert set(schedule) == {"backfill:a", "backfill:b"}
    entry = schedule["backfill:a"]
    assert entry["task"] == BACKFILL_TASK and entry["args"] == ["a"] and entry["options"]["queue"] == "ctl"
    assert entry["schedule"] == crontab(minute="0", hour="2")
    assert schedule["backfill:b"]["schedule"] == crontab(minute="*/30", day_of_week="1")
    json.dumps(entry["args"])  # the message carries only the name, as JSON


def test_the_control_app_speaks_json_only_and_registers_the_task():
    settings = Settings(_env_file=None, backfills=[{"name": "a", "source": "s3://b/"}], control_queue="ctl")
    app = make_control_app(settings)
    assert app.conf.accept_content == ["json"] and app.conf.task_serializer == "json"
    assert app.conf.task_default_queue == "ctl"
    assert BACKFILL_TASK in app.tasks and app.tasks[BACKFILL_TASK].acks_late is False
    assert set(app.conf.beat_schedule) == {"backfill:a"}


def test_the_tasks_identity_changes_with_model_params_and_pinned_revision_only():
    base = Settings(_env_file=None)
    records = task_records(make_tasks(base, "caption,embed", {}))
    same = task_records(make_tasks(base, "embed,caption", {}))
    digest = tasks_sha256(records, {})
    assert tasks_sha256(same, {}) == digest
    assert tasks_sha256(task_records(make_tasks(base, "caption,embed", {"num_beams": 3})), {}) != digest
    other_model = base.model_copy(update={"caption_model": "elsewhere"})
    assert tasks_sha256(task_records(make_tasks(other_model, "caption,embed", {})), {}) != digest
    assert tasks_sha256(records, {"caption": "abc123"}) != digest


def test_pair_kinds_and_unknown_parameters_are_refused():
    from imgq.errors import BadParams

    with pytest.raises(BadParams, match="pairs"):
        make_tasks(Settings(_env_file=None), "validate", {})
    with pytest.raises(BadParams, match="colour"):
        make_tasks(Settings(_env_file=None), "caption", {"colour": 1})


def test_a_backfill_without_a_name_is_named_after_its_kinds_and_source():
    assert default_name("s3://photos/2026/", "caption,embed") == "caption,embed:s3://photos/2026/"
    assert BackfillSpec(name="x", source="s3://b").kinds == "caption"


def test_repeated_backfill_names_are_all_named_once_in_order():
    from imgq.nightly import BackfillSpec, check_unique

    specs = [BackfillSpec(name=n, source="s3://photos/") for n in ("b", "a", "b", "c", "a", "b")]
    with pytest.raises(ValueError) as info:
        check_unique(specs)
    assert str(info.value) == "backfill names must be unique; repeated: a, b"
    assert check_unique(specs[1:2] + specs[3:4]) == [specs[1], specs[3]]
