"""The message contract between producers and workers. Importable without torch or celery.

Versioning: ``v`` is bumped on any incompatible change; a worker refuses versions it does not
know (the items are dead-lettered with code ``bad_message``, never dropped).
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imgq.errors import BadParams

MESSAGE_VERSION = 1
TASK_NAME = "imgq.process"
RECONCILE_TASK_NAME = "imgq.reconcile"

Kind = Literal["caption"]
ResizeMode = Literal["stretch", "center_crop", "letterbox"]


class CaptionParams(BaseModel):
    """Generation parameters of a captioning job (the ``transformers`` ``generate`` names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_new_tokens: int = Field(30, ge=1, le=512)
    min_new_tokens: int = Field(0, ge=0, le=512)
    num_beams: int = Field(1, ge=1, le=16)
    do_sample: bool = False
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0, le=10_000)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=100.0)
    prompt: str | None = Field(None, max_length=512, description="Text the caption continues from.")
    resize: ResizeMode = "stretch"
    seed: int | None = Field(None, ge=0, description="Seed for sampling; fixes results per batch.")

    @model_validator(mode="after")
    def _coherent(self) -> CaptionParams:
        if self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) exceeds max_new_tokens ({self.max_new_tokens})"
            )
        if not self.do_sample:
            for name, neutral in (("top_p", 1.0), ("top_k", 50), ("temperature", 1.0), ("seed", None)):
                if getattr(self, name) != neutral:
                    raise ValueError(f"{name} only applies with do_sample=true")
        if self.prompt is not None and not self.prompt.strip():
            raise ValueError("prompt must not be blank; omit it for unconditional captions")
        return self

    def canonical(self) -> dict[str, object]:
        return self.model_dump(mode="json")

    def digest(self) -> str:
        """A stable hash of the parameters: part of a result's identity."""
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def parse_params(raw: dict[str, object] | None) -> CaptionParams:
    """Validate user parameters, raising :class:`BadParams` with every problem in one line."""
    try:
        return CaptionParams.model_validate(raw or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'params'}: {err['msg']}" for err in exc.errors()
        )
        raise BadParams(f"invalid generation parameters: {problems}") from None


class TaskMessage(BaseModel):
    """One broker message: up to ``IMGQ_REFS_PER_MESSAGE`` items of one job."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = MESSAGE_VERSION
    job: str
    kind: Kind = "caption"
    model: str
    params: CaptionParams
    # [seq, ref] pairs; seq identifies the item inside its job.
    items: list[tuple[int, str]] = Field(min_length=1)

    def to_json(self) -> dict[str, object]:
        return self.model_dump(mode="json")
