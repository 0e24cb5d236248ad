"""Tasks that cannot be one job: an adapter's caption (not English) with a translate stage, which
translates BLIP's English captions. Refused on every path that makes a job, and by the worker for
a job recorded before the refusal."""

from __future__ import annotations

import pytest

from imgq import errors
from imgq.config import Settings
from imgq.contract import ADAPTER_AND_LANG, make_task, tasks_conflict
from imgq.kinds import parse_kinds
from imgq.params import CaptionParams, TranslateParams
from imgq.producer.api.jobs import make_tasks as api_make_tasks
from imgq.producer.backfill import make_tasks as backfill_make_tasks
from imgq.producer.backfill import task_records
from imgq.publish import tasks_from_record

RAW = {"adapter": "de-news", "langs": ["fr"]}


def test_an_adapter_caption_with_a_translate_stage_is_a_conflict_and_either_alone_is_not():
    adapter = make_task("caption", "m", CaptionParams(adapter="de-news"))
    english = make_task("caption", "m", CaptionParams())
    translate = make_task("translate", "mt", TranslateParams(langs=["fr"]))
    assert tasks_conflict([adapter, translate]) == ADAPTER_AND_LANG
    assert tasks_conflict([translate, adapter]) == ADAPTER_AND_LANG
    assert tasks_conflict([adapter]) is None and tasks_conflict([english, translate]) is None


def test_the_api_and_backfills_refuse_it():
    settings = Settings(_env_file=None)
    with pytest.raises(errors.BadParams, match="choose one"):
        api_make_tasks(settings, parse_kinds(["caption", "translate"]), RAW)
    with pytest.raises(errors.BadParams, match="choose one"):
        backfill_make_tasks(settings, "caption,translate", RAW)


def test_a_worker_refuses_a_job_recorded_with_it():
    records = task_records([make_task("caption", "m", CaptionParams(adapter="de-news")),
                            make_task("translate", "mt", TranslateParams(langs=["fr"]))])
    with pytest.raises(errors.BadParams, match="choose one"):
        tasks_from_record(records)
