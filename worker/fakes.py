"""In-memory stand-ins for the engine's ports, for unit tests and in-process benchmarks.

They import no torch and touch no service; they are part of the package so that users' own
tests can use them too.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from imgq.contract import CaptionParams
from imgq.db.store import CaptionRow, DeadRow


@dataclass
class MemoryResults:
    """Records what the engine writes; ``fail_next`` makes the next N writes raise."""

    captions: list[CaptionRow] = field(default_factory=list)
    dead: list[DeadRow] = field(default_factory=list)
    fail_next: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def _maybe_fail(self) -> None:
        with self._lock:
            if self.fail_next:
                self.fail_next -= 1
                raise ConnectionError("database unavailable (injected)")

    def write_captions(self, rows: Sequence[CaptionRow]) -> None:
        if rows:
            self._maybe_fail()
            with self._lock:
                self.captions.extend(rows)

    def write_dead(self, rows: Sequence[DeadRow]) -> None:
        if rows:
            self._maybe_fail()
            with self._lock:
                self.dead.extend(rows)


class OutOfMemoryError(RuntimeError):
    """Named like torch's, which is how error classification recognises it."""


@dataclass
class EchoModel:
    """Captions each image with its mean pixel value. A pixel value of ``poison`` makes the whole
    batch fail, as a model error on one item would; batches larger than ``oom_above`` run out of
    memory."""

    name: str = "echo"
    poison: float | None = None
    oom_above: int | None = None
    batches: list[int] = field(default_factory=list)

    @property
    def revision(self) -> str:
        return "echo-1"

    def caption(self, pixel_values: np.ndarray, params: CaptionParams) -> list[str]:
        self.batches.append(len(pixel_values))
        if self.oom_above is not None and len(pixel_values) > self.oom_above:
            raise OutOfMemoryError(f"batch of {len(pixel_values)} does not fit")
        means = pixel_values.reshape(len(pixel_values), -1).mean(axis=1)
        if self.poison is not None and np.any(np.isclose(means, self.poison)):
            raise ValueError("model failed on a poison input")
        return [f"mean {m:.3f}" for m in means]
