"""The translation model behind one small wrapper: lazy, thread-safe loading, and batched greedy
``generate`` of English captions into the languages of :mod:`imgq.languages`.

Invariants:

* ``translate(texts, lang)`` returns one string per text, in input order, and each equals what
  translating that text alone returns (checked in tests/integration/test_translate_model.py): texts are
  sorted by token length only to limit padding, every text gets its own token budget (below) at which
  its row stops, and greedy decoding is causal, so each row is the one a run of its own would give.
  A blank text translates to "", without the model.
* Source is English. How a target language is chosen depends on the model family, decided once at
  load from the tokenizer's vocabulary and the model's config (see :func:`steering`):

  - a language-token model (NLLB-200, the default; M2M100) can target a language when its tokenizer
    has that language's token: the FLORES-200 code of ``LANGUAGES[code].nllb`` (``deu_Latn``), or
    M2M100's ``__de__``. The token is forced as the first generated one (``forced_bos_token_id``);
    the source token (``eng_Latn`` / ``__en__``) is set once at load and never changed afterwards,
    because ``src_lang`` rewrites the shared tokenizer's post-processor.
  - an Opus-MT (Marian) model translates one pair, so it supports one language: the one its tokenizer
    config names (``target_lang``), or failing that the ``-en-XX`` at the end of its name
    (``Helsinki-NLP/opus-mt-en-de`` or a local ``.../opus-mt-en-de`` directory: ``de``). A multi-target
    Opus-MT model (``opus-mt-en-ROMANCE``) has ``>>fr<<``-style tokens instead; a text is prefixed with
    its language's token, ISO 639-1 (``>>fr<<``) or 639-3 (``>>fra<<``) as the vocabulary has it.
  - any other seq2seq model is refused at load: it has no way to be told the target language.
* English itself is not a target: the English caption is stored as it is (``parse_langs`` drops it).

Notes checked against the installed transformers (5.24): ``NllbTokenizer`` is the ``tokenizers``-backed
class (there is no separate "fast" one) and converts a bare ``sentencepiece.bpe.model`` only through
protobuf; a checkpoint's ``tokenizer.json`` is what loads. NLLB's ``generation_config.json`` carries
``max_length: 200``, which with a per-call ``max_new_tokens`` logs a "both set" warning on every call,
so it is cleared at load (the budget below replaces it).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSeq2SeqLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList

from imgq.errors import ModelUnavailable
from imgq.languages import LANGUAGES, SOURCE
from imgq.worker.loading import load_checkpoint, prepare_torch, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

_OPUS_TARGET = re.compile(r"(?:^|[-_.])en[-_]([a-z]{2,3})$")  # opus-mt-en-de, opus-mt-tc-big-en-pt
MAX_SOURCE_TOKENS = 256  # longer texts are cut (a BLIP caption is 10-30 tokens)
MAX_NEW_TOKENS = 256
HINT = (
    "Set IMGQ_TRANSLATE_MODEL to a local seq2seq checkpoint directory "
    "(`imgq dev tiny-model --kind translate DIR` writes a tiny one)."
)


def token_budget(source_tokens: int) -> int:
    """New tokens one text may generate, from its source length in tokens (special ones included).

    A translation is rarely more than twice its source in sub-word tokens, even into languages that
    split into more pieces than English does (German compounds, Cyrillic, Indic scripts); the +16
    gives very short captions room (and covers the forced language token and ``</s>``); 256 stops a
    degenerate output (a random or broken model that never emits ``</s>``) from running on. It is a
    per-text bound, not per batch: a short text batched with a long one is cut at its own budget."""
    return min(MAX_NEW_TOKENS, 2 * source_tokens + 16)


@dataclass(frozen=True, slots=True)
class Target:
    """How to steer the model into one language."""

    forced_bos: int | None = None  # token forced first (language-token models)
    prefix: str = ""  # text put before the source (multi-target Opus-MT: ">>fr<< ")


def steering(model_type: str, vocab: dict[str, int], names: list[str], target_lang: str | None) -> dict[str, Target]:
    """ISO code -> how to target it, for every language of :data:`imgq.languages.LANGUAGES` but the
    source that this model can produce. Pure: ``vocab`` is the tokenizer's (added tokens included),
    ``names`` the model's name or directory and its config's ``_name_or_path``, ``target_lang`` the
    tokenizer config's (Opus-MT sets it)."""
    targets: dict[str, Target] = {}
    codes = [code for code in LANGUAGES if code != SOURCE]
    if model_type == "marian":
        if any(token.startswith(">>") and token.endswith("<<") for token in vocab):  # multi-target
            for code in codes:
                nllb = LANGUAGES[code].nllb
                tag = next((t for t in (f">>{code}<<", f">>{nllb}<<", f">>{nllb[:3]}<<") if t in vocab), None)
                if tag is not None:
                    targets[code] = Target(prefix=f"{tag} ")
            return targets
        named = (target_lang or "").strip().lower()
        if not named:
            for name in names:
                match = _OPUS_TARGET.search(Path(name.rstrip("/")).name.lower())
                if match:
                    named = match.group(1)
                    break
        return {code: Target() for code in codes if named and named in (code, LANGUAGES[code].nllb[:3])}
    for code in codes:
        for token in (LANGUAGES[code].nllb, f"__{code}__"):  # NLLB-200, then M2M100
            if token in vocab:
                targets[code] = Target(forced_bos=vocab[token])
                break
    return targets


def _source_lang(vocab: dict[str, int]) -> str | None:
    for token in (LANGUAGES[SOURCE].nllb, SOURCE):  # NLLB's tokenizer takes "eng_Latn", M2M100's "en"
        if token in vocab or f"__{token}__" in vocab:
            return token
    return None


class _RowBudget(StoppingCriteria):
    """Ends each row at its own budget (the row is padded from then on), so a micro-batch stops as
    soon as every row has ended or used its budget: a short text's runaway repetition does not keep
    the batch going to the longest text's budget."""

    def __init__(self, lengths: torch.Tensor) -> None:
        self.lengths = lengths  # (B,) decoder length at which each row is complete

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return input_ids.shape[1] >= self.lengths


class TranslationModel:
    """A seq2seq translation checkpoint (hub id or local directory), loaded on first use; translates
    English texts into one language per call, in length-sorted micro-batches."""

    kind = "translation model"

    def __init__(
        self,
        name_or_path: str,
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        threads: int = 0,
    ) -> None:
        self.name = name_or_path
        self._requested_revision = revision
        self._threads = threads
        self._dtype_arg = dtype
        self._lock = threading.Lock()
        self._tokenize_lock = threading.Lock()  # the tokenizers backend is not safe to call concurrently
        self._model: Any = None
        self._tokenizer: Any = None
        self._revision: str | None = None
        self._targets: dict[str, Target] = {}
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)

    # -- loading -------------------------------------------------------------------------------

    def load(self) -> None:
        """Load model and tokenizer once; safe to call from many threads."""
        if self._model is not None:
            return
        with self._lock:
            if self._model is None:
                self._load_locked()

    def _load_locked(self) -> None:
        self.dtype = prepare_torch(self.kind, self.name, self._threads, self.device, self._dtype_arg, self.dtype)
        (model, tokenizer), revision = load_checkpoint(
            self.name, self.kind, HINT, self._requested_revision, self._from_pretrained)
        vocab = tokenizer.get_vocab()
        names = [self.name, str(getattr(model.config, "_name_or_path", "") or "")]
        targets = steering(model.config.model_type, vocab, names, getattr(tokenizer, "target_lang", None))
        if not targets:
            raise ModelUnavailable(
                f"cannot use {self.kind} {self.name!r}: no target language of imgq's table can be chosen "
                f"(no NLLB/M2M100 language tokens, not an Opus-MT en-XX model). {HINT}"
            )
        source = _source_lang(vocab)
        if source is not None and hasattr(tokenizer, "src_lang"):
            tokenizer.src_lang = source  # once, here: the setter rewrites the shared post-processor
        model.generation_config.max_length = None  # replaced by token_budget (module docstring)
        model.to(self.device)
        model.eval()
        self._tokenizer = tokenizer
        self._targets = targets
        self._revision = revision
        self._model = model  # last: a non-None model means fully loaded to other threads
        logger.info(
            f"{self.kind} loaded",
            extra={
                "action": "model_loaded",
                "model": self.name,
                "revision": revision,
                "device": self.device,
                "dtype": str(self.dtype),
                "languages": ",".join(targets),
            },
        )

    def _from_pretrained(self, source: str, *, local_files_only: bool, revision: str | None) -> tuple[Any, Any]:
        kwargs: dict[str, Any] = {"revision": revision, "local_files_only": local_files_only}
        model = AutoModelForSeq2SeqLM.from_pretrained(source, dtype=self.dtype, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        return model, tokenizer

    # -- what the loaded model can do -------------------------------------------------------------

    @property
    def revision(self) -> str:
        """The hub commit hash, or ``local-<sha>`` of a local checkpoint's config and weights."""
        self.load()
        assert self._revision is not None
        return self._revision

    @property
    def tokenizer(self) -> Any:
        self.load()
        return self._tokenizer

    def supports(self, lang: str) -> bool:
        """Whether ``translate`` can produce ``lang`` (an ISO 639-1 code of imgq.languages; not English)."""
        self.load()
        return lang.strip().lower() in self._targets

    def languages(self) -> list[str]:
        """The ISO codes this model can translate into, in imgq.languages' order."""
        self.load()
        return list(self._targets)

    def count_tokens(self, texts: list[str]) -> list[int]:
        """Source length of each text in tokens, as the model sees it (special tokens included)."""
        return [len(ids) for ids in self._encode(list(texts))]

    # -- translation -------------------------------------------------------------------------------

    def translate(self, texts: list[str], lang: str, *, micro_batch: int = 32) -> list[str]:
        """Translate English ``texts`` into ``lang``: one string per text, in input order.

        Repeated texts are translated once. The distinct texts are sorted by token length, longest
        first (a batch that runs out of memory does so at once), and run in micro-batches of at most
        ``micro_batch`` through greedy ``generate``, so a batch pads only to similar lengths.
        Raises ValueError for a language the model cannot produce."""
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
        self.load()
        code = lang.strip().lower()
        target = self._targets.get(code)
        if target is None:
            raise ValueError(
                f"{self.kind} {self.name!r} cannot translate into {lang!r}; it supports "
                f"{', '.join(self._targets) or 'none of imgq.languages'}"
            )
        unique = list(dict.fromkeys(t for t in texts if t.strip()))
        if not unique:
            return ["" for _ in texts]
        ids = self._encode([target.prefix + t for t in unique])
        order = sorted(range(len(unique)), key=lambda i: -len(ids[i]))  # stable: ties keep input order
        translated: list[str] = [""] * len(unique)
        for start in range(0, len(order), micro_batch):
            chunk = order[start : start + micro_batch]
            for i, text in zip(chunk, self._generate([ids[i] for i in chunk], target), strict=True):
                translated[i] = text
        by_text = dict(zip(unique, translated, strict=True))
        return [by_text.get(t, "") for t in texts]

    def _encode(self, texts: list[str]) -> list[list[int]]:
        self.load()
        if not texts:
            return []  # the tokenizers backend fails on an empty batch
        with self._tokenize_lock:
            return self._tokenizer(texts, truncation=True, max_length=MAX_SOURCE_TOKENS)["input_ids"]

    def _generate(self, rows: list[list[int]], target: Target) -> list[str]:
        pad = self._tokenizer.pad_token_id
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):  # right padding: the encoder masks it, the decoder never sees it
            input_ids[r, : len(row)] = torch.tensor(row)
            attention_mask[r, : len(row)] = 1
        budgets = [token_budget(len(row)) for row in rows]
        # Column 0 of the output is the decoder start token: a row is complete at 1 + its budget.
        complete_at = torch.tensor([1 + b for b in budgets], device=self.device)
        kwargs: dict[str, Any] = {
            "num_beams": 1,
            "do_sample": False,
            "max_new_tokens": max(budgets),
            "stopping_criteria": StoppingCriteriaList([_RowBudget(complete_at)]),
        }
        if target.forced_bos is not None:
            kwargs["forced_bos_token_id"] = target.forced_bos
        with torch.inference_mode():
            out = self._model.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), **kwargs
            ).cpu()
        # Rows already end at their budget (padded after it); the cut states it once more.
        cut = [out[r, : 1 + budget].tolist() for r, budget in enumerate(budgets)]
        return [text.strip() for text in self._tokenizer.batch_decode(cut, skip_special_tokens=True)]
