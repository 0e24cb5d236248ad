"""What one item of a job costs the workers, relative to a greedy 20-token caption, and the
per-tenant limits on it. Pure: imports no celery, redis, torch or sqlalchemy.

The feeder weighs each job's share of the workers by this cost (``imgq.feeding``): at equal
priority, a job whose items cost 10 gets a tenth of the messages a job of cost-1 items gets, so
tenants share worker *time*, not item counts. The API refuses a job whose parameters exceed its
tenant's limits (:func:`check_cost`) before anything is accepted.

The formula (docs/scaling.md, "Priority and fairness"), summed over the job's tasks:

- ``caption``: ``CAPTION_ENCODE + CAPTION_DECODE * num_beams * max_new_tokens / 20``, times
  ``EXPLAIN_FACTOR`` with ``explain``. A greedy 20-token caption is 1.0; the default (30 tokens)
  1.35; 16 beams of 512 tokens 287. Decoding dominates: beam search runs ``num_beams``
  sequences per image (the batcher already counts them against ``IMGQ_MAX_BATCH``), each for up
  to ``max_new_tokens`` steps. ``max_new_tokens`` is the bound, not the expected length: a
  caption that stops early cost less than was charged, which only errs on the side of the others.
- ``embed``: ``EMBED`` (the vision encoder and a projection: no decoding).
- ``validate``: ``VALIDATE`` (the vision encoder, the text encoder and the match head).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from imgq.errors import CostLimitExceeded

# Relative costs; a greedy caption of 20 tokens is 1.0 (CAPTION_ENCODE + CAPTION_DECODE).
CAPTION_ENCODE = 0.3  # the ViT forward of one image (and its fetch and decode)
CAPTION_DECODE = 0.7  # 20 greedy decoder steps
REFERENCE_TOKENS = 20
EXPLAIN_FACTOR = 1.5  # cross-attention maps kept for every token, and the overlays written
EMBED = 0.3
VALIDATE = 0.4
MIN_COST = 0.05  # a floor, so that no job weighs nothing in the fair shares

# The keys of a tenant's limits (``tenants.limits``) that this module reads, and the settings
# that give their defaults.
LIMIT_SETTINGS = {"num_beams": "max_num_beams", "max_new_tokens": "max_new_tokens", "item_cost": "max_item_cost"}


def _fields(task: Any) -> tuple[str, Mapping[str, Any]]:
    """``(kind, params)`` of a :class:`imgq.contract.TaskSpec` or a stored task record
    (``{"kind", "params", ...}``); missing params take the kind's defaults."""
    if isinstance(task, Mapping):
        kind, params = str(task["kind"]), task.get("params") or {}
    else:
        kind, params = task.kind, task.params
    if not isinstance(params, Mapping):
        params = params.model_dump()
    return kind, params


def _param(params: Mapping[str, Any], name: str, default: Any) -> Any:
    value = params.get(name)
    return default if value is None else value


def task_cost(task: Any) -> float:
    """The relative cost of one item for one task (a ``TaskSpec`` or a stored task record)."""
    kind, params = _fields(task)
    if kind == "caption":
        beams = int(_param(params, "num_beams", 1))
        tokens = int(_param(params, "max_new_tokens", 30))
        cost = CAPTION_ENCODE + CAPTION_DECODE * beams * tokens / REFERENCE_TOKENS
        return cost * EXPLAIN_FACTOR if params.get("explain") else cost
    if kind == "embed":
        return EMBED
    if kind == "validate":
        return VALIDATE
    return 1.0  # a kind this module does not know yet: as much as a greedy caption


def item_cost(tasks: Iterable[Any]) -> float:
    """The relative cost of one item of a job: the sum over its tasks, at least ``MIN_COST``."""
    return max(MIN_COST, sum(task_cost(task) for task in tasks))


def limits_for(settings: Any, tenant_limits: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A tenant's cost limits: its own (``tenants.limits``) where it sets them, else the
    settings' (``IMGQ_MAX_NUM_BEAMS``, ``IMGQ_MAX_NEW_TOKENS``, ``IMGQ_MAX_ITEM_COST``).
    Other keys of ``tenant_limits`` are kept as they are (other limits than cost)."""
    merged: dict[str, Any] = dict(tenant_limits or {})
    for key, setting in LIMIT_SETTINGS.items():
        if merged.get(key) is None:
            merged[key] = getattr(settings, setting)
    return merged


def check_cost(tasks: Iterable[Any], limits: Mapping[str, Any]) -> None:
    """Refuse a job whose parameters exceed ``limits`` (``{"num_beams": int, "max_new_tokens":
    int, "item_cost": float}``; a missing or None key is no limit) with
    :class:`imgq.errors.CostLimitExceeded`, naming the parameter, its value and the limit."""
    tasks = list(tasks)
    for task in tasks:
        kind, params = _fields(task)
        if kind != "caption":
            continue
        for name, default in (("num_beams", 1), ("max_new_tokens", 30)):
            limit, value = limits.get(name), int(_param(params, name, default))
            if limit is not None and value > int(limit):
                raise CostLimitExceeded(f"{kind} {name} {value} exceeds this tenant's limit of {int(limit)}")
    limit = limits.get("item_cost")
    if limit is not None and (cost := item_cost(tasks)) > float(limit):
        kinds = ",".join(_fields(task)[0] for task in tasks)
        raise CostLimitExceeded(f"item_cost {cost:g} ({kinds}; docs/scaling.md, 'Priority and fairness') exceeds "
                                f"this tenant's limit of {float(limit):g}")
