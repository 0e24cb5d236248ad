"""Each job kind's parameters: validated once at enqueue, again at the worker, hashed into results.

Importable without torch or celery. A result's identity includes ``digest()`` of the parameters
that produced it, so two jobs with different parameters never share a row.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from imgq.errors import BadParams
from imgq.storable import first_unstorable

ResizeMode = Literal["stretch", "center_crop", "letterbox"]
MAX_TEXT_POSITIONS = 512  # BLIP-base's text decoder and encoder

Namer = Callable[[str], str]
"""How a field is named to the user: the JSON key by default; the CLI passes its flag names."""


def _same(field: str) -> str:
    return field


class Params(BaseModel):
    """Parameters common to every kind: how the image is fitted to the model's square input."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: ResizeMode = "stretch"

    def canonical(self) -> dict[str, object]:
        return self.model_dump(mode="json")  # pragma: no mutate (every field is a JSON value: both modes agree)

    def digest(self) -> str:
        """A stable hash of the parameters: part of a result's identity."""
        return self._digest

    @functools.cached_property
    def _digest(self) -> str:
        # Cached: the batcher and the writer ask for it for every item, and the model is frozen.
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def batch_cost(self) -> int:
        """Sequences one image occupies in a batch (beam search keeps several)."""
        return 1

    def batch_digest(self) -> str:
        """Tasks whose parameters have equal batch digests may share a model call."""
        return self.digest()

    def problems(self, name: Namer = _same) -> list[str]:
        """Conflicts between fields that are each valid alone, naming fields with ``name``."""
        return []

    @field_validator("*", mode="after")
    @classmethod
    def _storable(cls, value: Any) -> Any:
        # A NUL in a prompt or an adapter's name would fail the job's insert (jsonb), not name the field.
        if (reason := first_unstorable(value)) is not None:
            raise ValueError(f"contains {reason}")
        return value

    @model_validator(mode="after")
    def _coherent(self, info: ValidationInfo) -> Params:
        # validate_params checks the valid fields alone, to list every problem in one message.
        if not (info.context or {}).get("fields_only") and (problems := self.problems()):
            raise ValueError("; ".join(problems))
        return self


class CaptionParams(Params):
    """Generation parameters of a captioning job (the ``transformers`` ``generate`` names)."""

    max_new_tokens: int = Field(30, ge=1, le=512)
    min_new_tokens: int = Field(0, ge=0, le=512)
    num_beams: int = Field(1, ge=1, le=16)
    do_sample: bool = False
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0, le=10_000)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    prompt: str | None = Field(None, max_length=512, description="Text the caption continues from.")
    seed: int | None = Field(None, ge=0, le=2**32 - 1, description="Seed for sampling; fixes results per batch.")
    explain: bool = Field(False, description="Also store each token's cross-attention map (README, 'Explaining "
                          "a caption'). Part of the identity only when true, so plain jobs keep their digests.")
    adapter: str | None = Field(None, min_length=1, max_length=200, description="A registered LoRA adapter that "
                                "captions in its language (README, 'Captions in other languages').")

    def canonical(self) -> dict[str, object]:
        # Omitted when unset: every caption stored before these fields existed keeps its params hash.
        out = super().canonical()
        if not self.explain:
            del out["explain"]
        if self.adapter is None:
            del out["adapter"]
        return out

    def batch_digest(self) -> str:
        # Captions of different adapters share one generate (peft's mixed-adapter batches). Built
        # anew, not with model_copy, which would copy the cached digest along.
        if self.adapter is None:
            return self.digest()
        return type(self).model_validate({**self.model_dump(), "adapter": None}).digest()

    def problems(self, name: Namer = _same) -> list[str]:
        problems: list[str] = []
        if self.min_new_tokens > self.max_new_tokens:
            problems.append(f"{name('min_new_tokens')} ({self.min_new_tokens}) exceeds {name('max_new_tokens')} "
                            f"({self.max_new_tokens})")
        if not self.do_sample:
            for field, neutral in (("top_p", 1.0), ("top_k", 50), ("temperature", 1.0), ("seed", None)):
                if getattr(self, field) != neutral:
                    problems.append(f"{name(field)} only applies with sampling ({name('do_sample')})")
        if self.adapter is not None and self.explain:
            problems.append(f"{name('explain')} is not available with {name('adapter')}")
        if self.prompt is not None and not self.prompt.strip():
            problems.append(f"{name('prompt')} must not be blank; omit it for unconditional captions")
        # Every prompt word is at least one token, plus [DEC] and [SEP]: past BLIP's 512 text
        # positions the whole batch would fail at run time.
        if self.prompt is not None and len(self.prompt.split()) + 2 + self.max_new_tokens > MAX_TEXT_POSITIONS:
            problems.append(f"{name('prompt')} ({len(self.prompt.split())} words) plus {name('max_new_tokens')} "
                            f"({self.max_new_tokens}) exceeds the model's {MAX_TEXT_POSITIONS} text positions")
        return problems

    def batch_cost(self) -> int:
        return self.num_beams


class TranslateParams(Params):
    """The languages an English caption is translated into (``imgq enqueue caption --lang de,fr``).
    Decoding is fixed (greedy, length-bounded), so the languages are the only parameter."""

    langs: list[str] = Field(min_length=1, max_length=32)

    def batch_digest(self) -> str:
        # A translation batch is one language (the engine adds it to the key), whatever other
        # languages each job asked for: jobs of "de" and of "de,ja" share their German batches.
        return "translate"  # pragma: no mutate (any constant groups them alike)

    def problems(self, name: Namer = _same) -> list[str]:
        from imgq.languages import LANGUAGES, SOURCE

        unknown = [code for code in self.langs if code not in LANGUAGES or code == SOURCE]
        if unknown:
            return [f"{name('langs')}: unknown or source language {', '.join(map(repr, unknown))}"]
        if len(set(self.langs)) != len(self.langs):
            return [f"{name('langs')}: a language appears twice"]
        return []


class EmbedParams(Params):
    """An image embedding has no parameters beyond the resize mode."""


class ValidateParams(Params):
    """An image-text match score has no parameters beyond the resize mode."""


def validate_params(cls: type[Params], raw: dict[str, object] | None, what: str = "parameters",
                    name: Namer | None = None) -> Params:
    """Validate user parameters, raising :class:`BadParams` with every problem in one line, each
    field named by ``name``."""
    name = name or _same
    try:
        return cls.model_validate(raw or {})
    except ValidationError as exc:
        problems = [f"{name(str(err['loc'][0]))}: {err['msg']}" for err in exc.errors() if err["loc"]]
        # A field error stops pydantic before the cross-field checks: run them on the fields
        # that are valid alone, so that one message names every problem.
        bad = {err["loc"][0] for err in exc.errors() if err["loc"]}
        if isinstance(raw, dict):
            good = {k: v for k, v in raw.items() if k in cls.model_fields and k not in bad}
            # A required field that was the bad one fails this too: its own error says it all.
            with contextlib.suppress(ValidationError):
                problems += cls.model_validate(good, context={"fields_only": True}).problems(name)
        problems = problems or [err["msg"] for err in exc.errors()]  # e.g. not a JSON object at all
        raise BadParams(f"invalid {what}: {'; '.join(problems)}") from None


def parse_params(raw: dict[str, object] | None) -> CaptionParams:
    """Caption parameters (kept for callers that only caption)."""
    return validate_params(CaptionParams, raw, "generation parameters")  # type: ignore[return-value]
