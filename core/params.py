"""Each job kind's parameters: validated once at enqueue, again at the worker, hashed into results.

Importable without torch or celery. A result's identity includes ``digest()`` of the parameters
that produced it, so two jobs with different parameters never share a row.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imgq.errors import BadParams

ResizeMode = Literal["stretch", "center_crop", "letterbox"]
MAX_TEXT_POSITIONS = 512  # BLIP-base's text decoder and encoder


class Params(BaseModel):
    """Parameters common to every kind: how the image is fitted to the model's square input."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    resize: ResizeMode = "stretch"

    def canonical(self) -> dict[str, object]:
        return self.model_dump(mode="json")

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

    def problems(self) -> list[str]:
        """Conflicts between fields that are each valid alone."""
        return []

    @model_validator(mode="after")
    def _coherent(self) -> Params:
        if problems := self.problems():
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

    def problems(self) -> list[str]:
        problems: list[str] = []
        if self.min_new_tokens > self.max_new_tokens:
            problems.append(f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})")
        if not self.do_sample:
            for name, neutral in (("top_p", 1.0), ("top_k", 50), ("temperature", 1.0), ("seed", None)):
                if getattr(self, name) != neutral:
                    problems.append(f"{name} only applies with sampling (--sample, do_sample=true)")
        if self.prompt is not None and not self.prompt.strip():
            problems.append("prompt must not be blank; omit it for unconditional captions")
        # Every prompt word is at least one token, plus [DEC] and [SEP]: past BLIP's 512 text
        # positions the whole batch would fail at run time.
        if self.prompt is not None and len(self.prompt.split()) + 2 + self.max_new_tokens > MAX_TEXT_POSITIONS:
            problems.append(f"prompt ({len(self.prompt.split())} words) plus max_new_tokens ({self.max_new_tokens}) "
                            f"exceeds the model's {MAX_TEXT_POSITIONS} text positions")
        return problems

    def batch_cost(self) -> int:
        return self.num_beams


class EmbedParams(Params):
    """An image embedding has no parameters beyond the resize mode."""


class ValidateParams(Params):
    """An image-text match score has no parameters beyond the resize mode."""


def validate_params(cls: type[Params], raw: dict[str, object] | None, what: str = "parameters") -> Params:
    """Validate user parameters, raising :class:`BadParams` with every problem in one line."""
    try:
        return cls.model_validate(raw or {})
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        ]
        # A field error stops pydantic before the cross-field checks; run them on the fields that
        # were valid, so one message names every problem.
        bad = {err["loc"][0] for err in exc.errors() if err["loc"]}
        if bad and isinstance(raw, dict):
            good = {k: v for k, v in raw.items() if k in cls.model_fields and k not in bad}
            try:
                cls.model_validate(good)
            except ValidationError as more:
                problems += [f"params: {e['msg'].removeprefix('Value error, ')}" for e in more.errors()]
        raise BadParams(f"invalid {what}: {'; '.join(problems)}") from None


def parse_params(raw: dict[str, object] | None) -> CaptionParams:
    """Caption parameters (kept for callers that only caption)."""
    return validate_params(CaptionParams, raw, "generation parameters")  # type: ignore[return-value]
