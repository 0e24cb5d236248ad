"""Runners: one job kind on one loaded model, in the shape the engine drives (``imgq.ports.Runner``).

A worker builds one model per family (``imgq.kinds.KindSpec.family``) and one runner per kind it
serves, so ``embed`` and ``validate`` share the retrieval model. ``prepare`` runs on decode threads,
``run`` on the inference thread.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from imgq import errors
from imgq.config import Settings
from imgq.kinds import KINDS, load
from imgq.params import CaptionParams, Params
from imgq.worker.preprocess import Preprocessor


class ImageRunner:
    """What every BLIP runner shares: the model's preprocessing, identity and revision."""

    kind = ""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.name: str = model.name
        self._pre: Preprocessor | None = None

    @classmethod
    def make_model(cls, settings: Settings) -> Any:
        raise NotImplementedError

    def load(self) -> None:
        loader = getattr(self.model, "load", None)
        if loader is not None:
            loader()

    @property
    def revision(self) -> str:
        return str(self.model.revision)

    @property
    def pre(self) -> Preprocessor:
        if self._pre is None:
            processor = getattr(self.model, "image_processor", None)
            self._pre = Preprocessor.from_image_processor(processor) if processor is not None else Preprocessor()
        return self._pre

    @property
    def input_size(self) -> int:
        return self.pre.size

    def prep_key(self, params: Params) -> tuple[Any, ...]:
        pre = self.pre
        return (pre.size, pre.mean, pre.std, pre.resample, params.resize)

    def prepare(self, image: Any, params: Params) -> np.ndarray:
        return self.pre.pixels(image, params.resize)

    def check_text(self, text: str) -> None:
        """Image-only kinds ignore a pair's text."""

    def kind_params(self) -> Params:
        """This kind's default parameters."""
        from imgq.kinds import spec

        return spec(self.kind).params()

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: Any) -> list[Any]:
        raise NotImplementedError


def _model_options(settings: Settings) -> dict[str, Any]:
    return {"device": settings.device, "dtype": settings.dtype, "threads": settings.torch_threads}


class CaptionRunner(ImageRunner):
    kind = "caption"

    @classmethod
    def make_model(cls, settings: Settings) -> Any:
        from imgq.worker.model import CaptionModel

        return CaptionModel(settings.caption_model, revision=settings.model_revision, **_model_options(settings))

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: CaptionParams) -> list[str]:
        return list(self.model.caption(pixels, params))


class RetrievalRunner(ImageRunner):
    @classmethod
    def make_model(cls, settings: Settings) -> Any:
        from imgq.worker.retrieval import RetrievalModel

        return RetrievalModel(settings.embed_model, revision=settings.embed_model_revision,
                              attention=settings.attention, **_model_options(settings))


class EmbedRunner(RetrievalRunner):
    kind = "embed"

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: Params) -> list[np.ndarray]:
        return list(np.asarray(self.model.embed_images(pixels), dtype=np.float32))


class ValidateRunner(RetrievalRunner):
    kind = "validate"

    def check_text(self, text: str) -> None:
        if not text.strip():
            raise errors.BadText("the pair's text is empty")
        tokens = self.model.count_tokens([text])[0]
        if tokens > self.model.max_text_tokens:
            raise errors.BadText(f"the text is {tokens} tokens; the model reads at most {self.model.max_text_tokens}")

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: Params) -> list[tuple[float, float]]:
        if texts is None:
            raise ValueError("validate needs a text per image")
        scores, cosines = self.model.match(pixels, texts)
        return [(float(s), float(c)) for s, c in zip(scores, cosines, strict=True)]


def build_runners(settings: Settings, models: dict[str, Any] | None = None) -> dict[str, ImageRunner]:
    """One runner per kind in IMGQ_KINDS, one model per family (``models`` may inject them)."""
    models = dict(models or {})
    runners: dict[str, ImageRunner] = {}
    for kind in settings.kinds:
        spec = KINDS[kind]
        cls = load(spec.runner)
        if spec.family not in models:
            models[spec.family] = cls.make_model(settings)
        runners[kind] = cls(models[spec.family])
    return runners
