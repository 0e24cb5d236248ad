"""The job-kind registry. Pure: a kind is declared here once, by name, and everything else looks
it up: the producer (params, input type), the batcher (batch key and cost), the worker (which
runner and which model setting) and the database (which result writer, by import path, so this
module imports no SQL or torch).

Adding a kind is one local change: its params model, a runner, a result writer with its
migration, a settings entry for its model, tests, and one ``register(...)`` line below.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

from imgq.errors import BadParams
from imgq.params import CaptionParams, EmbedParams, Namer, Params, TranslateParams, ValidateParams, validate_params

InputType = Literal["image", "pair"]


@dataclass(frozen=True, slots=True)
class KindSpec:
    name: str
    params: type[Params]
    # Runners of one family share one loaded model (embed and validate both use the retrieval model).
    family: str
    input: InputType  # "pair": every item carries a text beside its image ref
    model_setting: str  # the Settings field that names the model (IMGQ_<FIELD>)
    runner: str  # "module:Class" of the worker-side runner
    writer: str  # "module:Class" of the result writer
    # A stage that runs on another kind's value instead of the image: translate runs on the
    # caption, once per language, after it (the same job must have that kind).
    after: str | None = None

    def parse(self, raw: dict[str, object] | None, name: Namer | None = None) -> Params:
        return validate_params(self.params, raw, f"{self.name} parameters", name)


KINDS: dict[str, KindSpec] = {}


def register(spec: KindSpec) -> KindSpec:
    if spec.name in KINDS:
        raise ValueError(f"kind {spec.name!r} is already registered")
    KINDS[spec.name] = spec
    return spec


register(KindSpec("caption", CaptionParams, family="caption", input="image", model_setting="caption_model",
                  runner="imgq.worker.runners:CaptionRunner", writer="imgq.db.results.caption:CaptionWriter"))
register(KindSpec("embed", EmbedParams, family="retrieval", input="image", model_setting="embed_model",
                  runner="imgq.worker.runners:EmbedRunner", writer="imgq.db.results.embedding:EmbeddingWriter"))
register(KindSpec("validate", ValidateParams, family="retrieval", input="pair", model_setting="embed_model",
                  runner="imgq.worker.runners:ValidateRunner", writer="imgq.db.results.match:MatchWriter"))
register(KindSpec("translate", TranslateParams, family="translate", input="image", model_setting="translate_model",
                  runner="imgq.worker.runners:TranslateRunner",
                  writer="imgq.db.results.translation:TranslationWriter", after="caption"))


def spec(name: str) -> KindSpec:
    try:
        return KINDS[name]
    except KeyError:
        raise BadParams(f"unknown job kind {name!r}; known kinds: {', '.join(KINDS)}") from None


def parse_kinds(text: str | list[str]) -> list[str]:
    """``"caption,embed"`` -> ``["caption", "embed"]``: known, de-duplicated, registry order."""
    names = [part.strip() for part in (text.split(",") if isinstance(text, str) else text) if part.strip()]
    if not names:
        raise BadParams("name at least one job kind, e.g. caption or caption,embed")
    for name in names:
        if (after := spec(name).after) is not None and after not in names:
            raise BadParams(f"{name} runs on the {after} of the same job: ask for {after},{name} "
                            f"(or `imgq enqueue {after} --lang ...`)")
    return [name for name in KINDS if name in names]


def load(path: str) -> Any:
    """Import ``"module:attr"`` (runners and writers live outside the pure core)."""
    module, _, attr = path.partition(":")
    return getattr(importlib.import_module(module), attr)
