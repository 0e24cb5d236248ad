"""In-memory stand-ins for the engine's ports, for unit tests and in-process benchmarks.

They import no torch and touch no service; they are part of the package so that users' own
tests can use them too.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from imgq.ports import CaptionText, Claim, DeadRow, DoneItem


@dataclass
class MemoryResults:
    """An ``ItemStore`` that records what the engine writes; ``fail_next`` makes the next N writes
    raise. Claims always succeed (every item is new)."""

    done: list[DoneItem] = field(default_factory=list)
    dead: list[DeadRow] = field(default_factory=list)
    fail_next: int = 0
    # The whole lookup key, as Store.existing_caption matches it: a caption of another image version
    # or model revision must not be taken.
    stored: dict[tuple[str, ...], tuple[str, int, int]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _maybe_fail(self) -> None:
        with self._lock:
            if self.fail_next:
                self.fail_next -= 1
                raise ConnectionError("database unavailable (injected)")

    def claim(self, job: uuid.UUID, seqs: Sequence[int], worker: str, *, leave_peers: bool = False) -> dict[int, Claim]:
        return {seq: Claim(1, False) for seq in seqs}

    def unsettled(self, job: uuid.UUID, seqs: Sequence[int]) -> set[int]:
        return set()

    def records(self, job: uuid.UUID, seqs: Sequence[int]) -> dict[int, tuple[Any, ...]]:
        return {}

    def job_tasks(self, job: uuid.UUID) -> list[dict[str, Any]] | None:
        return None

    def existing_caption(self, source: str, bucket: str, key: str, version: str, model: str, revision: str,
                         params_hash: str) -> tuple[str, int, int] | None:
        """Captions stored before: ``stored[(source, bucket, key, version, model, revision,
        params_hash)] = (text, width, height)``."""
        return self.stored.get((source, bucket, key, version, model, revision, params_hash))

    def release(self, job: uuid.UUID, seqs: Sequence[int]) -> None:
        pass

    def write_done(self, items: Sequence[DoneItem]) -> None:
        if items:
            self._maybe_fail()
            with self._lock:
                self.done.extend(items)

    def write_dead(self, rows: Sequence[DeadRow]) -> None:
        if rows:
            self._maybe_fail()
            with self._lock:
                self.dead.extend(rows)

    def values(self, kind: str) -> dict[int, Any]:
        """seq -> the stored value of ``kind``."""
        with self._lock:
            return {d.seq: d.results[kind][4] for d in self.done}


class OutOfMemoryError(RuntimeError):
    """Named like torch's, which is how error classification recognises it."""


@dataclass
class EchoRunner:
    """A ``Runner`` without a model: its value for an image is its mean pixel value (caption:
    ``"mean 0.250"``; embed: a unit vector built from it). A pixel value of ``poison`` makes the
    whole batch fail, as a model error on one item would; batches larger than ``oom_above`` run out
    of memory. ``prepare`` takes any array-like "image" and returns it as float32."""

    kind: str = "caption"
    name: str = "echo"
    poison: float | None = None
    oom_above: int | None = None
    input_size: int = 4
    batches: list[int] = field(default_factory=list)
    adapter_batches: list[list[str | None]] = field(default_factory=list)
    prepared: int = 0

    @property
    def revision(self) -> str:
        return "echo-1"

    def prep_key(self, params: Any) -> tuple[Any, ...]:
        return ("echo", params.resize)

    def prepare(self, image: Any, params: Any, original: tuple[int, int] | None = None) -> np.ndarray:
        self.prepared += 1
        return np.asarray(image, dtype=np.float32)

    def check_text(self, text: str) -> None:
        pass

    def run(self, pixels: np.ndarray, texts: list[str] | None, params: Any) -> list[Any]:
        self.batches.append(len(pixels))
        if self.oom_above is not None and len(pixels) > self.oom_above:
            raise OutOfMemoryError(f"batch of {len(pixels)} does not fit")
        means = pixels.reshape(len(pixels), -1).mean(axis=1)
        if self.poison is not None and np.any(np.isclose(means, self.poison)):
            raise ValueError("model failed on a poison input")
        if self.kind == "embed":
            return [np.array([m, np.sqrt(max(0.0, 1 - m * m))], dtype=np.float32) for m in means]
        if self.kind == "validate":
            return [(float(m), float(len(t or "")) / 100) for m, t in zip(means, texts or [""] * len(means),
                                                                          strict=True)]
        return [f"mean {m:.3f}" for m in means]

    def run_adapters(self, pixels: np.ndarray, params: Any, adapters: list[str | None]) -> list[Any]:
        """Captions of a mixed-adapter batch: ``"<adapter> mean 0.250"`` (``base`` for none)."""
        self.adapter_batches.append(list(adapters))
        return [CaptionText(f"{name or 'base'} {text}", lang="de", method="adapter", via=name or "",
                            via_revision="r1") if name else text
                for name, text in zip(adapters, self.run(pixels, None, params), strict=True)]


@dataclass
class EchoTranslator:
    """A translation ``Runner`` without a model: ``"de: <text>"``. A text containing ``poison``
    fails its batch; ``langs`` are the languages it can write."""

    kind: str = "translate"
    name: str = "echo-mt"
    input_size: int = 0
    poison: str | None = None
    langs: tuple[str, ...] = ("de", "fr", "ja")
    batches: list[tuple[str, int]] = field(default_factory=list)
    revision: str = "mt-1"

    def check_params(self, params: Any) -> None:
        from imgq import errors

        if missing := [lang for lang in params.langs if lang not in self.langs]:
            raise errors.UnsupportedLanguage(f"cannot translate into {', '.join(missing)}")

    def translate(self, texts: list[str], lang: str) -> list[CaptionText]:
        self.batches.append((lang, len(texts)))
        if self.poison is not None and any(self.poison in t for t in texts):
            raise ValueError("translation failed on a poison input")
        return [CaptionText(f"{lang}: {t}", lang=lang, method="translated", via=self.name, via_revision=self.revision)
                for t in texts]
