"""Runners: one job kind on one loaded model, in the shape the engine drives (``imgq.ports.Runner``).

A worker builds one model per family (``imgq.kinds.KindSpec.family``) and one runner per kind it
serves, so ``embed`` and ``validate`` share the retrieval model. ``prepare`` runs on decode threads,
``run`` on the inference thread.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from imgq import errors
from imgq.config import Settings
from imgq.kinds import KINDS, load
from imgq.params import CaptionParams, Params, TranslateParams
from imgq.ports import CaptionText
from imgq.worker.preprocess import Preprocessor

log = logging.getLogger(__name__)


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

    def configure(self, settings: Settings) -> None:
        """Hook: what a runner takes from the worker's settings beyond its model."""

    def configure_batch(self, max_batch: int) -> None:
        """Hook: the model batch the worker settled on (imgq.worker.tuner)."""

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

    def prepare(self, image: Any, params: Params, original: tuple[int, int] | None = None) -> np.ndarray:
        """The model input of a decoded image; ``original`` is the picture's own (width, height)
        when ``image`` was draft-decoded smaller (None: ``image.size``)."""
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
    """Captions; with ``explain``, also each token's cross-attention, captured inside the same
    batched generate (:meth:`imgq.worker.model.CaptionModel.explain`).

    Overlays are drawn on the original picture, which only ``prepare`` (a decode thread) sees: it
    keeps a small copy keyed by a hash of the prepared pixels, which ``run`` finds again in its
    batch. The copies are bounded like the engine's decoded items (4 x max batch); one evicted
    before its batch ran loses its overlays, never its caption or stored maps."""

    kind = "caption"
    _THUMB_SIDE = 512  # overlays of jobs: enough to see where a word looked

    def __init__(self, model: Any) -> None:
        super().__init__(model)
        self.sink: Any = None
        self._originals: OrderedDict[bytes, Any] = OrderedDict()
        self._originals_limit = 4 * 32 + 8
        self._originals_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._settings: Settings | None = None
        self._bank: Any = None
        self._bank_lock = threading.Lock()

    @classmethod
    def make_model(cls, settings: Settings) -> Any:
        from imgq.worker.model import CaptionModel

        return CaptionModel(settings.caption_model, revision=settings.model_revision, attention=settings.attention,
                            decode_loop=settings.decode_loop, **_model_options(settings))

    def configure(self, settings: Settings) -> None:
        self._settings = settings
        if settings.explain_output:
            from imgq.worker.explainer import OverlaySink

            self.sink = OverlaySink(settings.explain_output, settings=settings)

    def configure_batch(self, max_batch: int) -> None:
        self._originals_limit = 4 * max_batch + 8

    def prep_key(self, params: Params) -> tuple[Any, ...]:
        key = super().prep_key(params)
        # Not shared with another kind's input: only this runner's prepare keeps the original.
        return (*key, "explain") if getattr(params, "explain", False) else key

    def prepare(self, image: Any, params: Params, original: tuple[int, int] | None = None) -> np.ndarray:
        pixels = super().prepare(image, params)
        if getattr(params, "explain", False) and self.sink is not None:
            thumb = image.copy()
            thumb.thumbnail((self._THUMB_SIDE, self._THUMB_SIDE))
            with self._originals_lock:
                # explain.json's sizes and boxes are in the picture's pixels, as in Postgres and
                # `imgq explain`, not in those of a draft decode.
                self._originals[_fingerprint(pixels)] = (thumb, original or image.size)
                while len(self._originals) > self._originals_limit:
                    self._originals.popitem(last=False)
        return pixels

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: CaptionParams) -> list[str]:
        if not params.explain:
            return list(self.model.caption(pixels, params))
        from imgq.explain import ExplainedCaption, Geometry, summary
        from imgq.worker.explainer import explain_batch, model_info
        from imgq.worker.overlay import EXPLAIN_JSON, document, dumps, render_files

        size = int(pixels.shape[-1])
        explained = explain_batch(self.model, pixels, params)
        info = model_info(self.model) if self.sink is not None else {}

        def draw(row: np.ndarray, ex: Any) -> str | None:
            fingerprint = _fingerprint(row)
            with self._originals_lock:
                original = self._originals.get(fingerprint)
            if original is None:
                log.warning("no original kept for an explained caption; its overlays are skipped",
                            extra={"action": "explain_no_original"})
                return None
            thumb, (width, height) = original
            geometry = Geometry.of(params.resize, width, height, size)
            files = render_files(thumb, ex, geometry)
            files[EXPLAIN_JSON] = dumps(document(ex, geometry, ref=None, model=info, params=params.canonical(),
                                                 files=files))
            # Content-addressed: the same input, model and parameters always land in the same
            # folder, so a redelivered item rewrites it instead of adding another.
            name = f"{params.digest()}/{hashlib.sha256(fingerprint + info['revision'].encode()).hexdigest()[:24]}"
            return str(self.sink.write(name, files))

        if self.sink is None:
            overlays: list[str | None] = [None] * len(explained)
        else:
            # PNG encoding (zlib) and the numpy work release the GIL: the batch's images are drawn
            # side by side, and the batch still settles only once every overlay is written.
            overlays = list(self._drawing().map(draw, pixels, explained))
        return [ExplainedCaption(ex.caption, summary(ex, size, where))
                for ex, where in zip(explained, overlays, strict=True)]

    # -- adapters (imgq.worker.adapters): built on the first job that names one ----------------------
    @property
    def bank(self) -> Any:
        with self._bank_lock:
            if self._bank is None:
                from imgq.db.store import make_engine
                from imgq.worker.adapters import AdapterBank

                if self._settings is None:
                    raise errors.AdapterUnavailable("this worker was built without settings: it serves no adapters")
                engine = make_engine(self._settings.sync_database_url, pool_size=2, max_overflow=2)
                self._bank = AdapterBank.for_worker(self.model, self._settings, engine)
            return self._bank

    def check_params(self, params: CaptionParams) -> None:
        """An unregistered adapter, or one trained on another model, and a prompt too long for the
        decoder are dead-lettered before any work."""
        check_prompt = getattr(self.model, "check_prompt", None)  # test doubles have none
        if check_prompt is not None:
            check_prompt(params)
        if params.adapter is not None:
            self.bank.resolve([params.adapter])

    def run_adapters(self, pixels: np.ndarray, params: CaptionParams, adapters: list[str | None]) -> list[str]:
        """Captions of a batch whose rows name different adapters (or none), in one generate."""
        records = self.bank.resolve(adapters)
        texts = self.bank.caption(pixels, params, records)
        return [text if r is None else CaptionText(text, lang=r.lang, method="adapter", via=r.name,
                                                   via_revision=r.revision)
                for text, r in zip(texts, records, strict=True)]

    def _drawing(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1), thread_name_prefix="imgq-overlay")
        return self._pool


def _fingerprint(pixels: np.ndarray) -> bytes:
    return hashlib.blake2b(np.ascontiguousarray(pixels).data, digest_size=16).digest()


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


class TranslateRunner:
    """The translation stage: English captions -> one language per batch (``imgq.worker.translate``).
    It runs on the caption's text, never on the image (``imgq.kinds`` ``after``)."""

    kind = "translate"
    input_size = 0  # takes no image: draft decoding follows the image models alone

    def __init__(self, model: Any) -> None:
        self.model = model
        self.name: str = model.name

    @classmethod
    def make_model(cls, settings: Settings) -> Any:
        from imgq.worker.translate import TranslationModel

        return TranslationModel(settings.translate_model, revision=settings.translate_model_revision,
                                **_model_options(settings))

    def configure(self, settings: Settings) -> None:
        pass

    def configure_batch(self, max_batch: int) -> None:
        pass

    def load(self) -> None:
        self.model.load()

    @property
    def revision(self) -> str:
        return str(self.model.revision)

    def check_params(self, params: TranslateParams) -> None:
        self.load()
        missing = [lang for lang in params.langs if not self.model.supports(lang)]
        if missing:
            raise errors.UnsupportedLanguage(f"the translation model {self.name} cannot translate into "
                                         f"{', '.join(missing)}")

    def translate(self, texts: list[str], lang: str) -> list[CaptionText]:
        return [CaptionText(text, lang=lang, method="translated", via=self.name, via_revision=self.revision)
                for text in self.model.translate(texts, lang)]


def build_runners(settings: Settings, models: dict[str, Any] | None = None) -> dict[str, Any]:
    """One runner per kind in IMGQ_KINDS, one model per family (``models`` may inject them)."""
    models = dict(models or {})
    runners: dict[str, Any] = {}
    for kind in settings.kinds:
        spec = KINDS[kind]
        cls = load(spec.runner)
        if spec.family not in models:
            models[spec.family] = cls.make_model(settings)
        runners[kind] = cls(models[spec.family])
        runners[kind].configure(settings)
    return runners
