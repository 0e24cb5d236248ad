"""The cost model and the per-tenant cost limits, as tables."""

from __future__ import annotations

import pytest

from imgq.config import Settings
from imgq.contract import make_task
from imgq.cost import check_cost, item_cost, limits_for, task_cost
from imgq.errors import CostLimitExceeded, InvalidRequest
from imgq.kinds import spec


def _task(kind: str, **params: object):  # a TaskSpec, as the API builds it
    return make_task(kind, "m", spec(kind).parse(params))


@pytest.mark.parametrize(("params", "cost"), [
    ({"max_new_tokens": 20}, 1.0),  # the unit
    ({}, 1.35),  # the CLI's defaults: greedy, 30 tokens
    ({"max_new_tokens": 20, "num_beams": 4}, 3.1),
    ({"max_new_tokens": 40, "num_beams": 4}, 5.9),
    ({"max_new_tokens": 512, "num_beams": 16}, 287.02),
    ({"max_new_tokens": 20, "explain": True}, 1.5),
    ({"max_new_tokens": 20, "do_sample": True, "top_p": 0.9}, 1.0),  # sampling costs what greedy does
])
def test_a_caption_costs_its_beams_times_its_tokens(params: dict[str, object], cost: float) -> None:
    assert task_cost(_task("caption", **params)) == pytest.approx(cost)


def test_a_job_costs_the_sum_of_its_tasks_and_records_cost_what_specs_do() -> None:
    tasks = [_task("caption", max_new_tokens=20), _task("embed")]
    assert item_cost(tasks) == pytest.approx(1.3)
    assert item_cost([_task("validate")]) == pytest.approx(0.4)
    # The feeder reads the stored jobs.tasks records: absent params take the kind's defaults.
    records = [{"kind": "caption", "model": "m", "params": {"num_beams": 2}}, {"kind": "embed", "params": {}}]
    assert item_cost(records) == pytest.approx(item_cost([_task("caption", num_beams=2), _task("embed")]))


LIMITS = {"num_beams": 4, "max_new_tokens": 64, "item_cost": 10.0}


@pytest.mark.parametrize(("tasks", "refused"), [
    ([_task("caption")], None),
    ([_task("caption", num_beams=4, max_new_tokens=64)], None),  # costs 9.26: under 10
    ([_task("caption", num_beams=4, max_new_tokens=40)], None),
    ([_task("caption", num_beams=5)], "caption num_beams 5 exceeds this tenant's limit of 4"),
    ([_task("caption", max_new_tokens=65)], "caption max_new_tokens 65 exceeds this tenant's limit of 64"),
    ([_task("caption", num_beams=16, max_new_tokens=512)], "num_beams 16"),  # the first limit it breaks
    ([_task("caption", num_beams=4, max_new_tokens=64, explain=True)], "item_cost 13.89"),
    ([_task("embed"), _task("validate")], None),  # no parameters to limit
])
def test_check_cost_refuses_parameters_over_the_limits(tasks: list, refused: str | None) -> None:
    if refused is None:
        check_cost(tasks, LIMITS)
        return
    with pytest.raises(CostLimitExceeded) as caught:
        check_cost(tasks, LIMITS)
    assert refused in caught.value.message
    assert caught.value.code == "cost_limit_exceeded"
    assert isinstance(caught.value, InvalidRequest)


def test_the_item_cost_limit_names_the_cost_and_the_limit() -> None:
    with pytest.raises(CostLimitExceeded, match=r"item_cost 5.9 .* exceeds this tenant's limit of 5"):
        check_cost([_task("caption", num_beams=4, max_new_tokens=40)], {"item_cost": 5})


def test_a_missing_or_null_limit_is_no_limit() -> None:
    check_cost([_task("caption", num_beams=16, max_new_tokens=512)], {})
    check_cost([_task("caption", num_beams=16, max_new_tokens=512)], {"num_beams": None, "item_cost": None})


def test_tenant_limits_override_the_settings_defaults() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    defaults = limits_for(settings, {})
    assert defaults == {"num_beams": 8, "max_new_tokens": 128, "item_cost": 64.0}
    # The defaults allow the CLI's defaults and every limit's own maximum at once.
    check_cost([_task("caption"), _task("embed")], defaults)
    check_cost([_task("caption", num_beams=8, max_new_tokens=128, explain=True), _task("embed")], defaults)
    with pytest.raises(CostLimitExceeded):
        check_cost([_task("caption", num_beams=16)], defaults)
    mine = limits_for(settings, {"num_beams": 16, "item_cost": None, "rate": 5})
    assert mine == {"num_beams": 16, "max_new_tokens": 128, "item_cost": 64.0, "rate": 5}
    tight = Settings(_env_file=None, max_num_beams=2, max_new_tokens=30, max_item_cost=2)  # type: ignore[call-arg]
    assert limits_for(tight, None) == {"num_beams": 2, "max_new_tokens": 30, "item_cost": 2.0}


def test_a_stored_caption_record_without_beams_or_tokens_costs_a_default_caption() -> None:
    stored = {"kind": "caption", "model": "m", "params": {"num_beams": None}}
    assert task_cost(stored) == task_cost({"kind": "caption", "params": {"num_beams": 1, "max_new_tokens": 30}})
    assert task_cost({"kind": "caption", "params": {}}) == pytest.approx(0.3 + 0.7 * 30 / 20)


def test_a_kind_the_cost_model_does_not_know_costs_one() -> None:
    assert task_cost({"kind": "sketch", "params": {"strokes": 9}}) == 1.0
