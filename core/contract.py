"""The message contract between producers and workers. Importable without torch or celery.

A message carries one job's tasks (a union discriminated on ``kind``: every item gets every task,
so ``caption,embed`` fetches and decodes each image once) and up to ``IMGQ_REFS_PER_MESSAGE``
items, as ``[seq, ref]`` pairs, or ``[seq, ref, text]`` for kinds whose input is an image-text pair.

Versioning: ``v`` is bumped on any incompatible change. Version 1 messages (one caption task,
from before job kinds) are still read; a worker refuses versions it does not know (the items are
dead-lettered with code ``bad_message``, never dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from imgq.kinds import KINDS
from imgq.params import CaptionParams, Params, ResizeMode, parse_params

__all__ = ["MESSAGE_VERSION", "TASK_NAME", "CaptionParams", "ResizeMode", "Task", "TaskMessage", "TaskSpec",
           "make_task", "parse_params"]

MESSAGE_VERSION = 2
TASK_NAME = "imgq.process"


class TaskSpec(BaseModel):
    """One kind of work for every item of a message: the kind, the model it names, its parameters."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str
    model: str = Field(min_length=1)
    params: Params


def _task_model(name: str, params: type[Params]) -> type[TaskSpec]:
    return create_model(  # type: ignore[call-overload,no-any-return]
        f"{name.capitalize()}Task", __base__=TaskSpec, kind=(Literal[name], ...), params=(params, ...)
    )


_TASKS = {name: _task_model(name, spec.params) for name, spec in KINDS.items()}
Task = Annotated[Union[tuple(_TASKS.values())], Field(discriminator="kind")]  # type: ignore[valid-type]  # noqa: UP007


def make_task(kind: str, model: str, params: Params) -> TaskSpec:
    return _TASKS[kind](kind=kind, model=model, params=params)


ADAPTER_AND_LANG = ("an adapter captions in the adapter's language, and --lang (translate) translates BLIP's "
                    "English captions: choose one")


def tasks_conflict(tasks: Sequence[TaskSpec]) -> str | None:
    """Why these tasks cannot be one job, or None. Pure: every path that makes a job (CLI, API,
    backfill, ``enqueue translate --job``) and the worker reading a job's record ask it."""
    by_kind = {t.kind: t for t in tasks}
    caption = by_kind.get("caption")
    if caption is not None and "translate" in by_kind and getattr(caption.params, "adapter", None) is not None:
        return ADAPTER_AND_LANG
    return None


Item = tuple[int, str] | tuple[int, str, str]


class TaskMessage(BaseModel):
    """One broker message: the tasks and some items of one job."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[2] = MESSAGE_VERSION
    job: str
    tasks: list[Task] = Field(min_length=1)  # type: ignore[valid-type]
    items: list[Item] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _upgrade_v1(cls, data: Any) -> Any:
        # v1: {"v": 1, "job", "kind": "caption", "model", "params", "items"} (in flight across an upgrade).
        if isinstance(data, dict) and data.get("v") == 1:
            data = dict(data)
            data["tasks"] = [{"kind": data.pop("kind", "caption"), "model": data.pop("model", None),
                              "params": data.pop("params", {})}]
            data["v"] = MESSAGE_VERSION
        return data

    @model_validator(mode="after")
    def _coherent(self) -> TaskMessage:
        kinds = [t.kind for t in self.tasks]
        if len(set(kinds)) != len(kinds):
            raise ValueError(f"a kind appears twice in tasks: {kinds}")
        if any(KINDS[k].input == "pair" for k in kinds):
            if any(len(item) != 3 for item in self.items):
                raise ValueError("image-text pair kinds need [seq, ref, text] items")
        elif any(len(item) != 2 for item in self.items):
            raise ValueError("items must be [seq, ref] pairs")
        return self

    @property
    def kinds(self) -> list[str]:
        return [t.kind for t in self.tasks]

    def to_json(self) -> dict[str, object]:
        return self.model_dump(mode="json")
