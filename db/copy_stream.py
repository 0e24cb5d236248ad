"""A job's items loaded by several COPYs at once, fed from the thread that validates the refs.

The server loads one COPY on one core, and a thread that writes its own COPY waits for the server
instead of validating the next refs. Here the job's thread only formats chunks; writer threads
take them, whichever is free first: one writes the job's own COPY (in the job's transaction), the
others each their side COPY in their own connection and transaction, opened only once a job has
more chunks than streams (docs/performance.md, "Acceptance after migration 0010").

A side transaction commits only when told, just before the job's own commits, so a failure
anywhere before that rolls everything back. Only a crash between those commits (milliseconds)
can leave committed items whose job never was: every reader of items joins ``jobs`` (no foreign
key since migration 0009), so they are never fed, counted or shown. ``on_first_side`` runs before
the first side stream opens: the store records the acceptance there, so that the feeder's sweep
can find and delete such items (migration 0011).
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any

_END = object()
_ABORT = object()
_WAIT_S = 0.5  # how often a blocked put looks at whether a stream has failed


class StreamFailed(RuntimeError):
    """A writer thread's failure, raised in the job's thread."""


class CopyStreams:
    """Up to ``n`` COPYs of one job's items: ``copy`` (the job's own, already open) and side
    streams on ``engine``. ``write`` blocks while every stream is busy, so memory stays at a few
    chunks; ``finish``, ``commit_sides`` and ``abort`` are called from the job's thread."""

    def __init__(self, copy: Any, engine: Any, statement: str, n: int,
                 on_first_side: Callable[[], None] | None = None) -> None:
        self._copy = copy
        self._on_first_side = on_first_side
        self._engine = engine
        self._statement = statement
        self._n = n
        # A memory bound (two chunks per stream), not a behaviour: any size passes the tests.
        self._chunks: queue.Queue[Any] = queue.Queue(maxsize=2 * n)  # pragma: no mutate
        self._threads: list[threading.Thread] = []
        self._copied: list[threading.Event] = []
        self._decisions: list[queue.Queue[bool]] = []
        self._errors: list[BaseException] = []
        self._committed = threading.Event()  # set by the first side transaction to commit

    @property
    def sides(self) -> bool:
        """Whether a side stream was opened (``on_first_side`` ran)."""
        return bool(self._decisions)

    @property
    def committed(self) -> bool:
        """Whether a side transaction committed (its items then outlive a failed job)."""
        return self._committed.is_set()

    # -- the job's thread ---------------------------------------------------------------------
    def write(self, chunk: str) -> None:
        if len(self._threads) < self._n:  # the k-th chunk opens the k-th stream: a side only when needed
            self._start()
        self._put(chunk)

    def finish(self) -> None:
        """End every COPY and wait until the server has loaded them (transactions stay open)."""
        for _ in self._threads:
            self._put(_END)
        for copied in self._copied:
            copied.wait()
        self._raise_failure()

    def commit_sides(self) -> None:
        for decision in self._decisions:
            decision.put(True)
        for thread in self._threads:
            thread.join()
        self._raise_failure()

    def abort(self, timeout: float = 30.0) -> None:  # pragma: no mutate (how long a stuck writer is waited for)
        """Stop every writer (the job's COPY is not written to after this returns) and roll the
        side transactions back, wherever they stand; never raises."""
        while True:  # chunks not taken yet are dropped, so the aborts are next in line
            try:
                self._chunks.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:  # fits: the queue was just emptied, and holds 2 per stream
            self._chunks.put_nowait(_ABORT)
        for decision in self._decisions:
            with contextlib.suppress(queue.Full):  # commit_sides() decided already
                decision.put_nowait(False)
        for thread in self._threads:
            thread.join(timeout)

    def _put(self, item: Any) -> None:
        while True:
            self._raise_failure()
            try:
                self._chunks.put(item, timeout=_WAIT_S)
                return
            except queue.Full:
                continue

    def _raise_failure(self) -> None:
        if self._errors:
            raise StreamFailed(f"a COPY stream failed: {self._errors[0]}") from self._errors[0]

    def _start(self) -> None:
        copied = threading.Event()
        target: Callable[..., None] = self._own
        args: tuple[Any, ...] = (copied,)
        if self._threads:
            if not self._decisions and self._on_first_side is not None:
                self._on_first_side()
            decision: queue.Queue[bool] = queue.Queue(maxsize=1)
            self._decisions.append(decision)
            target, args = self._side, (copied, decision)
        self._copied.append(copied)
        name = f"imgq-copy-{len(self._threads)}"
        # Daemon: a stuck COPY must not keep a producer that is exiting alive.
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)  # pragma: no mutate
        self._threads.append(thread)
        thread.start()

    # -- writer threads -----------------------------------------------------------------------
    def _pump(self, copy: Any) -> bool:
        """Write chunks into ``copy`` until the end (True) or an abort (False)."""
        try:
            while (chunk := self._chunks.get()) is not _END:
                if chunk is _ABORT:
                    return False
                copy.write(chunk)
            return True
        except BaseException as exc:
            self._errors.append(exc)
            return False

    def _own(self, copied: threading.Event) -> None:
        # The job's thread ends this COPY (leaving its `with`) once ``copied`` is set.
        try:
            self._pump(self._copy)
        finally:
            copied.set()

    def _side(self, copied: threading.Event, decision: queue.Queue[bool]) -> None:
        raw = None
        try:
            raw = self._engine.raw_connection()
            with raw.cursor() as cur, cur.copy(self._statement) as copy:
                if not self._pump(copy):
                    raise StreamFailed  # fails the COPY: its rows are never loaded
            copied.set()  # loaded by the server: leaving the `with` ended the COPY
            if decision.get():
                raw.commit()
                self._committed.set()
                return
        except BaseException as exc:
            if not isinstance(exc, StreamFailed):
                self._errors.append(exc)
        finally:
            copied.set()
            if raw is not None:
                with contextlib.suppress(Exception):  # the connection is gone, and its transaction
                    raw.rollback()
                raw.close()
