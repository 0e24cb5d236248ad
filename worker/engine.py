"""The worker's data path: fetch+decode pool -> dynamic batcher -> runners -> bulk result writes.

Three kinds of threads, so the models never wait on I/O while work is queued:
- decode threads fetch bytes, decode them once and prepare each task's input (Pillow and boto3
  release the GIL);
- one inference thread owns the batcher and the runners;
- one writer thread commits results in bulk and only then resolves the items' futures.
Celery task threads call :meth:`Engine.submit` and wait on the futures before acknowledging.

An item of a ``caption,embed`` job is fetched and decoded once and enters one batch per kind; it
is written, all kinds in one transaction, only once every kind has a value. A stage (a kind with
``after``: translate) runs on another kind's value instead of the image: once an item's caption is
made, or found already stored for the same image version, model and parameters, it enters one
translation batch per language, grouped by language across items and jobs.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from imgq import errors, metrics
from imgq.batching import Batch, Batcher
from imgq.classify import classify, is_outage
from imgq.contract import TaskSpec
from imgq.kinds import KINDS
from imgq.ports import Blob, DeadRow, Decoded, DoneItem, ItemStore, ObjectInfo, Runner

log = logging.getLogger(__name__)

State = Literal["done", "dead", "retry"]
BatchKey = tuple[str, str]  # (kind, params digest)


@dataclass(frozen=True, slots=True)
class Outcome:
    seq: int
    state: State
    code: str | None = None
    message: str | None = None


@dataclass(slots=True)
class WorkItem:
    job: uuid.UUID
    seq: int
    ref: str
    tasks: tuple[TaskSpec, ...]
    text: str | None = None
    future: Future[Outcome] = field(default_factory=Future)
    inputs: dict[Any, Any] = field(default_factory=dict)  # prep key -> prepared array
    results: dict[str, Any] = field(default_factory=dict)  # kind -> value
    obj: ObjectInfo | None = None
    failed: bool = False

    def input_for(self, runner: Runner, task: TaskSpec) -> Any:
        return self.inputs[runner.prep_key(task.params)]


@dataclass(slots=True)
class _Entry:
    """One task of one item, as the batcher holds it (a stage's entry: one of its languages)."""

    item: WorkItem
    task: TaskSpec
    lang: str | None = None

    def key(self) -> BatchKey:
        digest = self.task.params.batch_digest()
        return (self.task.kind, digest if self.lang is None else f"{digest}/{self.lang}")


def _stages(tasks: Sequence[TaskSpec]) -> list[TaskSpec]:
    return [t for t in tasks if KINDS[t.kind].after is not None]


def _stage_units(stage: TaskSpec) -> int:
    """Entries a stage puts in batches: one per language (any other task puts one)."""
    return len(stage.params.langs)  # type: ignore[attr-defined]


def _items_own(error: errors.ImgqError) -> bool:
    """A permanent error imgq raised itself is a fact about the item, whatever the model's health."""
    return isinstance(error, errors.Permanent) and not isinstance(error, errors.ModelError)


def unstorable(value: Any) -> str | None:
    """Why a model's output for one item cannot be its result (pgvector refuses NaN and infinity;
    a score that is not a number means nothing), or None."""
    if isinstance(value, np.ndarray):
        if value.ndim != 1 or value.size == 0:
            return f"an output of shape {value.shape}, not a vector"
        if not np.isfinite(value).all():
            return "a vector with NaN or infinite values"
    scores = value if isinstance(value, tuple) else (value,)  # validate: (score, cosine)
    if bad := [v for v in scores if isinstance(v, float | np.floating) and not math.isfinite(v)]:
        return f"a score of {bad[0]}"
    return None


@dataclass(slots=True)
class _Write:
    done: list[WorkItem] = field(default_factory=list)
    dead: list[tuple[WorkItem, errors.ImgqError]] = field(default_factory=list)


class Engine:
    """Owns the decode pool, the batcher, the runners' thread and the writer threads."""

    def __init__(
        self,
        *,
        store: ItemStore,
        runners: Mapping[str, Runner],
        fetch: Callable[[str], Blob],
        decode: Callable[[bytes], Decoded],
        worker_name: str,
        max_batch: int,
        max_wait_s: float,
        decode_threads: int,
        clock: Callable[[], float] = time.monotonic,
        db_retry_s: float = 120.0,  # pragma: no mutate (how long an outage is ridden out: wall-clock only)
        max_strikes: int = 3,
        on_unhealthy: Callable[[str], None] | None = None,
        decode_timeout_s: float | None = 30.0,
        writers: int = 2,  # pragma: no mutate (the worker always passes IMGQ_RESULT_WRITERS)
        wedged_after_s: float | None = None,
    ) -> None:
        self._store = store
        self.runners = dict(runners)
        self._fetch = fetch
        self._decode = decode
        self._clock = clock
        self.worker_name = worker_name
        self._db_retry_s = db_retry_s
        # Beam search holds num_beams sequences per image: keep the sequence count near max_batch.
        self._costs: dict[BatchKey, int] = {}
        self._batcher: Batcher[BatchKey, _Entry] = Batcher(
            max_batch, max_wait_s, clock, limit=lambda key: max_batch // self._costs.get(key, 1)
        )
        self._pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="imgq-decode")
        self._ready: queue.Queue[_Entry | None] = queue.Queue()  # None: a wake-up (stop, or decodes done)
        self._writes: queue.Queue[_Write | None] = queue.Queue()
        self._preparing = 0
        # Backpressure: at most this many decoded items wait for the models. Decode threads block
        # here, so worker memory is bounded by the batch size, not by the messages in flight.
        self._decoded = threading.BoundedSemaphore(max(8, 4 * max_batch))
        self._inflight: dict[tuple[uuid.UUID, int], WorkItem] = {}
        self._remaining: dict[int, int] = {}  # id(item) -> tasks not yet run
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Writers each commit on their own connection: while one waits on Postgres, the next one
        # prepares its parameters (two: x1.86 rows/s of one at 512 rows per call, docs/performance.md W6).
        self._writers = [threading.Thread(target=self._write_loop, name=f"imgq-write-{i}", daemon=True)
                         for i in range(max(1, writers))]
        self._infer = threading.Thread(target=self._infer_loop, name="imgq-infer", daemon=True)
        self.stats = {"batches": 0, "items": 0, "split": 0, "decodes": 0, "reused": 0}
        # Model health: a batch in which every item fails says nothing about the items. Only an
        # item that fails alone while the model works is model_error; a run of failed batches
        # means the model or device is broken, and the worker must stop rather than drain the queue.
        # A decode cannot be interrupted, but its item need not wait for it: past the bound the
        # item is dead-lettered and the late decode, when it ends, is dropped.
        self._decode_timeout_s = decode_timeout_s
        self._decoding: dict[int, tuple[WorkItem, float]] = {}
        self._max_strikes = max_strikes
        self._strikes = 0
        self._ever_ok = False  # pragma: no mutate (None is as falsy; the first batch makes it a bool)
        self.unhealthy: str | None = None
        self._on_unhealthy = on_unhealthy
        # A model call that never returns (a hung device, a deadlock in a kernel) raises nothing:
        # no strike is ever counted while the worker keeps taking messages that only time out.
        # Past wedged_after_s one call makes the worker unhealthy, as strikes do (the worker passes
        # IMGQ_TASK_TIME_LIMIT_S: by then every message of the batch has timed out anyway).
        self._wedged_after_s = wedged_after_s
        self._model_since: float | None = None
        self._watchdog = threading.Thread(target=self._watch, name="imgq-watchdog", daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Engine:
        for thread in (self._infer, *self._writers):
            thread.start()
        if self._wedged_after_s is not None:
            self._watchdog.start()
        return self

    def wedged(self) -> str | None:
        """Why inference looks stuck (one model call running past ``wedged_after_s``), or None."""
        since = self._model_since
        if self._wedged_after_s is None or since is None:
            return None
        running = self._clock() - since
        if running <= self._wedged_after_s:
            return None
        return f"one model call has run for {running:.0f} s, over {self._wedged_after_s:g} s: inference is wedged"

    def _watch(self) -> None:
        assert self._wedged_after_s is not None
        while not self._stop.wait(min(5.0, self._wedged_after_s / 10)):  # pragma: no mutate (a poll period)
            reason = self.wedged()
            if reason is not None and self.unhealthy is None:
                self.unhealthy = reason
                log.error("model unhealthy: %s", reason, extra={"action": "unhealthy"})
                if self._on_unhealthy is not None:
                    self._on_unhealthy(reason)
                return

    def stop(self, timeout: float = 30.0) -> None:  # pragma: no mutate (a join bound only a hung thread meets)
        # Not mutated: both are the defaults, spelled out (omitting either changes nothing). That stop()
        # waits for the decodes under way is pinned by tests/unit/test_engine_mutants.
        self._pool.shutdown(wait=True, cancel_futures=False)  # pragma: no mutate
        self._stop.set()
        self._ready.put(None)  # the inference thread sees the stop now, not at its next 0.2 s poll
        self._infer.join(timeout)  # pragma: no mutate (a bound only a hung thread meets)
        # One stop per writer, queued behind every write: each writer takes one and ends.
        for _ in self._writers:
            self._writes.put(None)
        for write in self._writers:
            write.join(timeout)  # pragma: no mutate (a bound only a hung thread meets)

    def serves(self, task: TaskSpec) -> bool:
        runner = self.runners.get(task.kind)
        return runner is not None and runner.name == task.model

    # -- entry point for task threads ---------------------------------------------------------------
    def submit(self, job: uuid.UUID, tasks: Sequence[TaskSpec], items: Sequence[Sequence[Any]]) -> list[WorkItem]:
        """Start work on ``[seq, ref]`` (or ``[seq, ref, text]``) items; every task must be served."""
        for task in tasks:
            self._costs[(task.kind, task.params.batch_digest())] = task.params.batch_cost()
        work: list[WorkItem] = []
        fresh: list[WorkItem] = []
        with self._lock:
            for seq, ref, *rest in items:
                # A second delivery of an item this process is already working on (a requeued or
                # duplicated message) waits for the same outcome instead of computing it again.
                running = self._inflight.get((job, seq))
                if running is None:
                    running = self._inflight[(job, seq)] = WorkItem(job, seq, ref, tuple(tasks),
                                                                    rest[0] if rest else None)
                    fresh.append(running)
                work.append(running)
            # The whole message counts as preparing before its first item reaches a decode thread:
            # counted one by one, an item decoded before the next was counted left the inference
            # loop seeing nothing more coming, and it flushed batches of one.
            self._preparing += len(fresh)
        for item in fresh:
            item.future.add_done_callback(lambda _f, key=(item.job, item.seq): self._forget(key))
            self._pool.submit(self._prepare, item)
        return work

    def in_flight(self, job: uuid.UUID, seqs: Sequence[int]) -> dict[int, WorkItem]:
        with self._lock:
            return {seq: item for seq in seqs if (item := self._inflight.get((job, seq))) is not None}

    def _forget(self, key: tuple[uuid.UUID, int]) -> None:
        with self._lock:
            self._inflight.pop(key)  # always there: only this callback removes it

    # -- decode threads -------------------------------------------------------------------------
    def _prepare(self, item: WorkItem) -> None:
        self._decoded.acquire()
        # Not mutated: None is as falsy. That a failed item frees its slot is pinned by test_engine_mutants.
        ready = False  # pragma: no mutate
        try:
            for task in item.tasks:  # parameters only a worker can judge (a language, an adapter)
                check = getattr(self.runners[task.kind], "check_params", None)
                if check is not None:
                    check(task.params)
            blob = self._fetch(item.ref)
            stages = _stages(item.tasks)
            size = self._reuse(item, blob, stages)  # None without stages
            todo = [t for t in item.tasks if KINDS[t.kind].after is None and t.kind not in item.results]
            if todo:
                with self._lock:
                    self._decoding[id(item)] = (item, self._clock())
                try:
                    decoded = self._decode(blob.data)
                finally:
                    with self._lock:
                        del self._decoding[id(item)]
                size = (decoded.width, decoded.height)
            if item.failed:  # timed out meanwhile: settled already
                return
            for task in todo:
                runner = self.runners[task.kind]
                if item.text is not None:
                    runner.check_text(item.text)
                # Kinds whose models take the same input (size, normalisation, resize) share it.
                key = runner.prep_key(task.params)
                if key not in item.inputs:
                    item.inputs[key] = runner.prepare(decoded.image, task.params, original=size)
            assert size is not None
            item.obj = ObjectInfo(blob.source, blob.bucket, blob.key, blob.version, len(blob.data), *size)
            with self._lock:
                self._remaining[id(item)] = len(todo) + sum(_stage_units(t) for t in stages)
                self.stats["decodes"] += bool(todo)
            for task in todo:
                self._ready.put(_Entry(item, task))
            for stage in stages:
                if KINDS[stage.kind].after in item.results:
                    self._queue_stage(item, stage)
            ready = True
        except Exception as exc:
            self._fail(item, classify(exc))
        finally:
            if not ready:
                self._decoded.release()
            with self._lock:
                self._preparing -= 1
                last = self._preparing == 0
            if last:
                # The loop may have taken this item's entries while it still counted as preparing,
                # and be waiting out max_wait_s for more: nothing more is coming, so wake it.
                self._ready.put(None)

    def _reuse(self, item: WorkItem, blob: Blob, stages: list[TaskSpec]) -> tuple[int, int] | None:
        """A stage's input already stored for this image version, model and parameters (a caption
        from an earlier job): taken as this item's value, so the model does not run again. Returns
        the image's size when found."""
        for stage in stages:
            after = KINDS[stage.kind].after
            # A stage's input task is in every job that has the stage (imgq.kinds checks it at
            # enqueue), and nothing has run yet: this is the item's first step.
            task = next(t for t in item.tasks if t.kind == after)
            # Not mutated: that input is a caption, whose params always have explain; and a job has one
            # stage at most (a kind appears once, only translate has `after`): continue and break agree.
            if getattr(task.params, "explain", False):  # pragma: no mutate
                continue  # pragma: no mutate
            runner = self.runners[task.kind]
            found = self._store.existing_caption(blob.source, blob.bucket, blob.key, blob.version, runner.name,
                                                 runner.revision, task.params.digest())
            if found is not None:
                text_, width, height = found
                item.results[task.kind] = text_
                with self._lock:
                    self.stats["reused"] += 1
                metrics.REUSED.labels(task.kind).inc()
                return width, height
        return None

    def _queue_stage(self, item: WorkItem, stage: TaskSpec) -> None:
        for lang in stage.params.langs:  # type: ignore[attr-defined]
            self._ready.put(_Entry(item, stage, lang))

    def _stages_after(self, entry: _Entry) -> list[TaskSpec]:
        return [t for t in _stages(entry.item.tasks) if KINDS[t.kind].after == entry.task.kind]

    def _settle_failed(self, entry: _Entry) -> None:
        """Count a failed entry as run, and the stages that would have run on its value."""
        self._finish_task(entry.item, 1 + sum(_stage_units(t) for t in self._stages_after(entry)))

    def _fail(self, item: WorkItem, error: errors.ImgqError) -> None:
        """Settle an item that cannot finish (first failure wins; its other tasks are dropped)."""
        with self._lock:
            if item.failed:
                return
            item.failed = True
        metrics.FAILURES.labels(error.code).inc()
        if isinstance(error, errors.Permanent):
            self._writes.put(_Write(dead=[(item, error)]))
        else:
            item.future.set_result(Outcome(item.seq, "retry", error.code, error.message))

    # -- inference thread -----------------------------------------------------------------------
    def _infer_loop(self) -> None:
        while not (self._stop.is_set() and self._ready.empty() and not len(self._batcher)):
            # Not mutated: another poll, floor or no deadline only delays due batches and decode expiry.
            # That the wait ends when the oldest batch is due is pinned by tests/unit/test_engine_mutants.
            deadline = self._batcher.next_deadline()  # pragma: no mutate
            timeout = 0.2 if deadline is None else max(0.0, deadline - self._clock())  # pragma: no mutate
            batches: list[Batch[BatchKey, _Entry]] = []
            try:
                entry = self._ready.get(timeout=timeout)
                if entry is not None:
                    batches = self._batcher.add(entry.key(), entry)
            except queue.Empty:
                pass
            batches += self._batcher.due()
            self._expire_decodes()
            with self._lock:
                idle = self._preparing == 0
            # Nothing more is coming soon: waiting out max_wait would only add latency.
            if (idle and self._ready.empty()) or self._stop.is_set():
                batches += self._batcher.drain()
            # Every batch of this pass left the batcher now: observed before any runs, or a later
            # batch's wait would include the model time of those run before it.
            now = self._clock()
            for batch in batches:
                metrics.BATCH_WAIT.labels(batch.key[0]).observe(max(0.0, now - batch.opened))
            for batch in batches:
                self._run_batch(batch.items)

    def _expire_decodes(self) -> None:
        if self._decode_timeout_s is None:
            return
        now = self._clock()
        with self._lock:
            late = [item for item, started in self._decoding.values() if now - started > self._decode_timeout_s]
        for item in late:
            self._fail(item, errors.DecodeTimeout(
                f"decoding took longer than IMGQ_DECODE_TIMEOUT_S={self._decode_timeout_s:g}s"))

    def _run_batch(self, entries: list[_Entry]) -> None:
        if self.unhealthy is not None:
            for entry in entries:
                self._fail(entry.item, errors.Retryable(f"worker unhealthy: {self.unhealthy}"))
                self._settle_failed(entry)
            return
        failed: list[tuple[_Entry, errors.ImgqError]] = []
        succeeded = self._run(entries, failed)
        # A permanent error that imgq raised itself (an adapter withdrawn or outside the roots, a
        # language the model cannot write, a text too long) is a fact about the item, whatever the
        # model's health: dead-lettered under its own code, never counted against the model.
        # (classify() makes every foreign exception, a real model crash included, retryable; and a
        # model_error, an output that cannot be stored, is not one: a batch of NaNs is the model's.)
        for entry, error in failed:
            if _items_own(error):
                self._fail(entry.item, error)
                self._settle_failed(entry)
        failed = [(entry, error) for entry, error in failed if not _items_own(error)]
        if not failed and not succeeded:
            return
        alone = len(entries) == 1 and self._ever_ok and self._strikes == 0
        if succeeded or alone:
            self._ever_ok = self._ever_ok or bool(succeeded)
            self._strikes = 0  # after a success; and an item fails alone only when there are none
            for entry, error in failed:  # failed alone while the model works: the item's fault
                if isinstance(error, errors.OutOfMemory | errors.ModelError):
                    self._fail(entry.item, error)  # OOM: the device is busy elsewhere; try again later
                else:
                    self._fail(entry.item, errors.ModelError(
                        f"{entry.task.kind} model failed on this item: {error.message}"))
                self._settle_failed(entry)
            return
        # Every item failed: the model (or device) may be what is broken. Nothing is charged to
        # the items beyond the delivery; they go back to the queue.
        self._strikes += 1
        reason = failed[0][1].message  # a batch that ran nothing failed every one of its items
        for entry, error in failed:
            self._fail(entry.item, error if isinstance(error, errors.OutOfMemory) else
                       errors.ModelUnhealthy(f"every item of the batch failed: {error.message}"))
            self._settle_failed(entry)
        if self._strikes >= self._max_strikes and self.unhealthy is None:
            self.unhealthy = f"{self._strikes} batches in a row failed entirely; last: {reason}"
            log.error("model unhealthy: %s", self.unhealthy, extra={"action": "unhealthy"})
            if self._on_unhealthy is not None:
                self._on_unhealthy(self.unhealthy)

    def _run(self, entries: list[_Entry], failed: list[tuple[_Entry, errors.ImgqError]]) -> int:
        """Run a batch, splitting it on failure down to single items; returns how many succeeded
        and collects the single items that failed, for :meth:`_run_batch` to judge."""
        task = entries[0].task
        runner = self.runners[task.kind]
        lang = entries[0].lang
        try:
            started = time.perf_counter()
            self._model_since = self._clock()
            try:
                if lang is not None:  # a stage: runs on the value of the kind it follows
                    after = KINDS[task.kind].after
                    sources = [str(e.item.results[after]) for e in entries]
                    values = runner.translate(sources, lang)  # type: ignore[attr-defined]
                else:
                    pixels = np.stack([e.item.input_for(runner, task) for e in entries])
                    texts = [e.item.text or "" for e in entries] if entries[0].item.text is not None else None
                    values = self._run_model(runner, pixels, texts, entries)
            finally:
                self._model_since = None
            metrics.MODEL_SECONDS.labels(task.kind).observe(time.perf_counter() - started)
            metrics.BATCH_SIZE.labels(task.kind).observe(len(entries))
        except Exception as exc:
            error = classify(exc)
            if len(entries) > 1:
                # One bad item (or an out-of-memory batch) must not fail its batchmates.
                self.stats["split"] += 1
                log.warning("%s batch of %d failed (%s); retrying halves", task.kind, len(entries), error.message)
                half = len(entries) // 2
                return self._run(entries[:half], failed) + self._run(entries[half:], failed)
            failed.append((entries[0], error))
            return 0
        self.stats["batches"] += 1
        self.stats["items"] += len(entries)
        done: list[WorkItem] = []
        stored = 0
        for entry, value in zip(entries, values, strict=True):  # pragma: no mutate (one value per input)
            if (reason := unstorable(value)) is not None:
                # Caught here, not by the writer: there it would fail every batch coalesced into the write.
                failed.append((entry, errors.ModelError(f"{task.kind} model returned {reason}")))
                continue
            stored += 1  # pragma: no mutate (only whether a batch stored anything is read)
            if lang is None:
                entry.item.results[task.kind] = value
            else:
                entry.item.results.setdefault(task.kind, {})[lang] = value
            for stage in self._stages_after(entry):
                if entry.item.failed:  # settled already: its stages will not run
                    self._finish_task(entry.item, _stage_units(stage))
                else:
                    self._queue_stage(entry.item, stage)
            if self._finish_task(entry.item) and not entry.item.failed:
                done.append(entry.item)
        if done:
            self._writes.put(_Write(done=done))
        return stored

    @staticmethod
    def _run_model(runner: Runner, pixels: np.ndarray, texts: list[str] | None, entries: list[_Entry]) -> list[Any]:
        params = [e.task.params for e in entries]
        if any(getattr(p, "adapter", None) is not None for p in params):
            # Captions of several adapters (and of none) in one generate: the batch key ignores them.
            return runner.run_adapters(pixels, params[0], [p.adapter for p in params])  # type: ignore[attr-defined]
        return runner.run(pixels, texts, params[0])

    def _finish_task(self, item: WorkItem, n: int = 1) -> bool:
        """Count ``n`` tasks of ``item`` as run; True once all have (its input memory is then freed)."""
        with self._lock:
            left = self._remaining[id(item)] = self._remaining[id(item)] - n
            if left:
                return False
            del self._remaining[id(item)]
        item.inputs.clear()
        self._decoded.release()
        return True

    # -- writer thread --------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            first = self._writes.get()
            if first is None:
                return
            pending = [first]
            # Coalesce whatever else is ready: fewer, larger transactions under load.
            while len(pending) < 64:
                try:
                    nxt = self._writes.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._writes.put(None)
                    break
                pending.append(nxt)
            merged = _Write()
            for w in pending:
                merged.done += w.done
                merged.dead += w.dead
            self._commit(merged)

    def _done_row(self, item: WorkItem) -> DoneItem:
        results = {}
        for task in item.tasks:
            runner = self.runners[task.kind]
            results[task.kind] = (runner.name, runner.revision, task.params.digest(), task.params.canonical(),
                                  item.results[task.kind])
        assert item.obj is not None
        return DoneItem(item.job, item.seq, item.obj, self.worker_name, results, item.text)

    def _commit(self, write: _Write) -> None:
        done = [self._done_row(item) for item in write.done]
        dead = [DeadRow(item.job, item.seq, err.code, err.message, self.worker_name) for item, err in write.dead]
        deadline = time.monotonic() + self._db_retry_s
        delay = 0.2
        while True:
            try:
                self._store.write_done(done)
                self._store.write_dead(dead)
                break
            except Exception as exc:
                if not is_outage(exc):
                    # Not the database being away: a row it refuses. Retrying the whole write would
                    # fail it again and every batchmate with it, as db_unavailable.
                    self._split_commit(write, exc)
                    return
                if time.monotonic() + delay > deadline:
                    log.error("result write failed for %d items; asking for retry: %s", len(done) + len(dead), exc)
                    for item in [*write.done, *(item for item, _ in write.dead)]:
                        if not item.future.done():
                            item.future.set_result(Outcome(item.seq, "retry", "db_unavailable", str(exc)))
                    return
                log.warning("result write failed, retrying in %.1fs: %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        for item in write.done:
            item.future.set_result(Outcome(item.seq, "done"))
        for item, err in write.dead:
            item.future.set_result(Outcome(item.seq, "dead", err.code, err.message))

    def _split_commit(self, write: _Write, exc: Exception) -> None:
        """Commit the halves of a write the database refused, down to the one item it refuses; that
        item is retried (transient: bounded by its attempts, then a dead letter with this message)."""
        rows: list[Any] = [*write.done, *write.dead]
        if len(rows) == 1:
            item = rows[0] if isinstance(rows[0], WorkItem) else rows[0][0]
            log.error("result write refused job %s item %d: %s", item.job, item.seq, exc)
            if not item.future.done():
                item.future.set_result(Outcome(item.seq, "retry", "transient", f"result write failed: {exc}"))
            return
        half = len(rows) // 2
        for part in (rows[:half], rows[half:]):
            self._commit(_Write(done=[r for r in part if isinstance(r, WorkItem)],
                                dead=[r for r in part if not isinstance(r, WorkItem)]))
