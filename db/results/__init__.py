"""Result writers, one per job kind. Each owns its table's SQL; the registry in ``imgq.kinds``
names them by import path, so ``writer("embed")`` is the only way the store reaches one."""

from __future__ import annotations

from functools import cache
from typing import Any

from imgq.kinds import load, spec

# Columns that identify one result: two rows with equal values would be a duplicate.
DEFAULT_IDENTITY = "image_id, model, model_revision, params_hash"


@cache
def writer(kind: str) -> Any:
    """The ResultWriter (``imgq.ports.ResultWriter``) of a kind, created once per process."""
    return load(spec(kind).writer)()


def identity(kind: str) -> str:
    return getattr(writer(kind), "identity_columns", DEFAULT_IDENTITY)
