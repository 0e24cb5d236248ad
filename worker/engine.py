"""The worker's data path: fetch+decode pool -> dynamic batcher -> model -> bulk result writes.

Three kinds of threads, so the model never waits on I/O while work is queued:
- decode threads fetch bytes and decode/preprocess them (Pillow and boto3 release the GIL);
- one inference thread owns the batcher and the model;
- one writer thread commits results in bulk and only then resolves the items' futures.
Celery task threads call :meth:`Engine.submit` and wait on the futures before acknowledging.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from imgq import errors
from imgq.batching import Batch, Batcher
from imgq.classify import classify
from imgq.contract import CaptionParams
from imgq.db.store import CaptionRow, DeadRow, ObjectInfo, Store

log = logging.getLogger(__name__)

State = Literal["done", "dead", "retry"]
BatchKey = tuple[str, str, str, str]  # (kind, model, params hash, resize mode)


class CaptionRunner(Protocol):
    name: str

    @property
    def revision(self) -> str: ...

    def caption(self, pixel_values: np.ndarray, params: CaptionParams) -> list[str]: ...


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
    params: CaptionParams
    params_hash: str
    future: Future[Outcome] = field(default_factory=Future)
    pixels: np.ndarray | None = None
    obj: ObjectInfo | None = None

    @property
    def key(self) -> BatchKey:
        return ("caption", "", self.params_hash, self.params.resize)


@dataclass(slots=True)
class _Write:
    done: list[tuple[WorkItem, str]] = field(default_factory=list)  # (item, caption)
    dead: list[tuple[WorkItem, errors.ImgqError]] = field(default_factory=list)


class Engine:
    def __init__(
        self,
        *,
        store: Store,
        model: CaptionRunner,
        fetch: Callable[[str], Any],
        prepare: Callable[[bytes, CaptionParams], tuple[np.ndarray, int, int]],
        worker_name: str,
        max_batch: int,
        max_wait_s: float,
        decode_threads: int,
        clock: Callable[[], float] = time.monotonic,
        db_retry_s: float = 120.0,
    ) -> None:
        self._store = store
        self._model = model
        self._fetch = fetch
        self._prepare_pixels = prepare
        self._clock = clock
        self.worker_name = worker_name
        self._db_retry_s = db_retry_s
        # Beam search holds num_beams sequences per image: keep the sequence count near max_batch.
        self._batcher: Batcher[BatchKey, WorkItem] = Batcher(
            max_batch, max_wait_s, clock, limit=lambda key: max_batch // self._beams.get(key[2], 1)
        )
        self._beams: dict[str, int] = {}
        self._pool = ThreadPoolExecutor(decode_threads, thread_name_prefix="imgq-decode")
        self._ready: queue.Queue[WorkItem] = queue.Queue()
        self._writes: queue.Queue[_Write | None] = queue.Queue()
        self._preparing = 0
        # Backpressure: at most this many decoded images wait for the model. Decode threads block
        # here, so worker memory is bounded by the batch size, not by the messages in flight.
        self._decoded = threading.BoundedSemaphore(max(8, 4 * max_batch))
        self._inflight: dict[tuple[uuid.UUID, int], WorkItem] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._infer_loop, name="imgq-infer", daemon=True),
            threading.Thread(target=self._write_loop, name="imgq-write", daemon=True),
        ]
        self.stats = {"batches": 0, "items": 0, "split": 0}

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> Engine:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._pool.shutdown(wait=True, cancel_futures=False)
        self._stop.set()
        self._threads[0].join(timeout)
        self._writes.put(None)
        self._threads[1].join(timeout)

    # -- entry point for task threads ---------------------------------------------------------------
    def submit(self, job: uuid.UUID, params: CaptionParams, items: Sequence[tuple[int, str]]) -> list[WorkItem]:
        params_hash = params.digest()
        self._beams[params_hash] = params.num_beams
        work: list[WorkItem] = []
        for seq, ref in items:
            with self._lock:
                # A second delivery of an item this process is already working on (a requeued or
                # duplicated message) waits for the same outcome instead of computing it again.
                running = self._inflight.get((job, seq))
                if running is not None:
                    work.append(running)
                    continue
                item = self._inflight[(job, seq)] = WorkItem(job, seq, ref, params, params_hash)
                self._preparing += 1
            item.future.add_done_callback(lambda _f, key=(job, seq): self._forget(key))
            work.append(item)
            self._pool.submit(self._prepare, item)
        return work

    def in_flight(self, job: uuid.UUID, seqs: Sequence[int]) -> dict[int, WorkItem]:
        with self._lock:
            return {seq: item for seq in seqs if (item := self._inflight.get((job, seq))) is not None}

    def _forget(self, key: tuple[uuid.UUID, int]) -> None:
        with self._lock:
            self._inflight.pop(key, None)

    # -- decode threads -------------------------------------------------------------------------
    def _prepare(self, item: WorkItem) -> None:
        self._decoded.acquire()
        ready = False
        try:
            blob = self._fetch(item.ref)
            pixels, width, height = self._prepare_pixels(blob.data, item.params)
            item.pixels = pixels
            item.obj = ObjectInfo(blob.source, blob.bucket, blob.key, blob.version, len(blob.data),
                                  width, height)
            self._ready.put(item)
            ready = True
        except Exception as exc:
            self._fail(item, classify(exc))
        finally:
            if not ready:
                self._decoded.release()
            with self._lock:
                self._preparing -= 1

    def _fail(self, item: WorkItem, error: errors.ImgqError) -> None:
        if isinstance(error, errors.Permanent):
            self._writes.put(_Write(dead=[(item, error)]))
        else:
            item.future.set_result(Outcome(item.seq, "retry", error.code, error.message))

    # -- inference thread -----------------------------------------------------------------------
    def _infer_loop(self) -> None:
        while not (self._stop.is_set() and self._ready.empty() and not len(self._batcher)):
            deadline = self._batcher.next_deadline()
            timeout = 0.2 if deadline is None else max(0.0, deadline - self._clock())
            batches: list[Batch[BatchKey, WorkItem]] = []
            try:
                item = self._ready.get(timeout=timeout)
                batches += self._batcher.add(item.key, item)
            except queue.Empty:
                pass
            batches += self._batcher.due()
            with self._lock:
                idle = self._preparing == 0
            # Nothing more is coming soon: waiting out max_wait would only add latency.
            if (idle and self._ready.empty()) or self._stop.is_set():
                batches += self._batcher.drain()
            for batch in batches:
                try:
                    self._run(batch.items)
                finally:
                    for _ in batch.items:
                        self._decoded.release()

    def _run(self, items: list[WorkItem]) -> None:
        try:
            pixels = np.stack([item.pixels for item in items])  # type: ignore[misc]
            texts = self._model.caption(pixels, items[0].params)
        except Exception as exc:
            error = classify(exc)
            if len(items) > 1:
                # One bad item (or an out-of-memory batch) must not fail its batchmates.
                self.stats["split"] += 1
                log.warning("batch of %d failed (%s); retrying halves", len(items), error.message)
                half = len(items) // 2
                self._run(items[:half])
                self._run(items[half:])
            elif "OutOfMemory" in error.message:
                # Out of memory even alone: the device is busy elsewhere; try again later.
                items[0].future.set_result(Outcome(items[0].seq, "retry", error.code, error.message))
            else:
                failure = errors.ModelError(f"model failed on this item: {error.message}")
                self._writes.put(_Write(dead=[(items[0], failure)]))
            return
        self.stats["batches"] += 1
        self.stats["items"] += len(items)
        for item in items:
            item.pixels = None  # release memory before the write
        self._writes.put(_Write(done=list(zip(items, texts, strict=True))))

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

    def _commit(self, write: _Write) -> None:
        rows = [
            CaptionRow(item.job, item.seq, item.obj, self._model.name, self._model.revision,  # type: ignore[arg-type]
                       item.params_hash, item.params.canonical(), text, self.worker_name)
            for item, text in write.done
        ]
        dead = [DeadRow(item.job, item.seq, err.code, err.message, self.worker_name) for item, err in write.dead]
        deadline = time.monotonic() + self._db_retry_s
        delay = 0.2
        while True:
            try:
                self._store.write_captions(rows)
                self._store.write_dead(dead)
                break
            except Exception as exc:
                if time.monotonic() + delay > deadline:
                    log.error("result write failed for %d items; asking for retry: %s", len(rows) + len(dead), exc)
                    for item, _ in write.done + write.dead:  # type: ignore[operator]
                        if not item.future.done():
                            item.future.set_result(Outcome(item.seq, "retry", "db_unavailable", str(exc)))
                    return
                log.warning("result write failed, retrying in %.1fs: %s", delay, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        for item, _ in write.done:
            item.future.set_result(Outcome(item.seq, "done"))
        for item, err in write.dead:
            item.future.set_result(Outcome(item.seq, "dead", err.code, err.message))
