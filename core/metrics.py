"""The worker's Prometheus metrics (prometheus-client, default registry).

Labels are bounded: kinds, error codes and queue names come from small fixed sets; no job ids,
refs or worker names (Prometheus adds ``instance`` itself). README "Operations" explains each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

# Batches are 1..4096 items; the buckets follow the powers of two a batcher produces.
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_SECONDS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

BATCH_SIZE = Histogram("imgq_batch_size", "Items per model batch.", ["kind"], buckets=_SIZES)
BATCH_WAIT = Histogram("imgq_batch_wait_seconds", "How long a batch's first item waited for batchmates "
                       "(until the batch left the batcher, not until its model call began).",
                       ["kind"], buckets=_SECONDS)
MODEL_SECONDS = Histogram("imgq_model_seconds", "Model time per batch (forward or generate).", ["kind"],
                          buckets=_SECONDS)
IMAGES = Counter("imgq_images", "Items whose result for this kind was committed; rate() is images/s.",
                 ["kind"])
REUSED = Counter("imgq_reused_results", "Results found already stored for the same image version, model and "
                 "params, so the model did not run (a caption a --lang job translates).", ["kind"])
FAILURES = Counter("imgq_failures", "Failed item attempts, by error code (retried or dead-lettered; also items "
                   "dead-lettered without running them: refused, worn out or given up after an internal error).",
                   ["code"])
RETRIES = Counter("imgq_retries", "Items re-published to be tried again after a retryable failure (not a dead "
                  "worker's items sent again one per message: nothing of theirs failed).")
DEAD_LETTERS = Counter("imgq_dead_letters", "Items dead-lettered, by error code.", ["code"])
SWEEPS = Counter("imgq_reconcile_sweeps", "Lost-message sweeps this worker ran (as the feeder).")
RECOVERED = Counter("imgq_recovered_items",
                    "Items published again because their message was lost, by reason "
                    "(lost: queued but gone from Redis; orphan: their worker died).", ["reason"])
ABANDONED = Counter("imgq_abandoned_items", "Items of acceptances whose producer died between its commits, deleted "
                    "by the feeder's sweep: no job ever had them (migration 0011).")
PUBLISHED = Counter("imgq_fed_messages", "Messages the feeder published to keep the broker window full.")
BROKER_REFUSING = Gauge("imgq_broker_refusing", "1 while this process's last try to open a broker channel found "
                        "Redis refusing writes, by reason (maxmemory, replica): its consumer waits with back-off "
                        "(imgq.transport).", ["reason"])
MEMORY_HELD = Counter("imgq_feed_memory_held", "Feed cycles that stopped short of the window because Redis was at "
                      "IMGQ_BROKER_MEMORY_FRACTION of its maxmemory (the rest waited in Postgres).")
# Both series exist from the start at 0: a counter whose first sample is already 5 shows no
# increase(), so the first loss of a worker's life would raise no alert (ImgqMessagesLost).
for _reason in ("lost", "orphan"):
    RECOVERED.labels(_reason)


def count_done(items: Iterable[Any]) -> None:
    """``items`` are committed :class:`imgq.ports.DoneItem`."""
    for item in items:
        for kind in item.results:
            IMAGES.labels(kind).inc()


def count_failures(codes: Iterable[str]) -> None:
    """Failures settled outside the engine (which counts its own as they happen)."""
    for code in codes:
        FAILURES.labels(code).inc()


def count_dead(rows: Sequence[Any]) -> None:
    """``rows`` are committed :class:`imgq.ports.DeadRow`."""
    for row in rows:
        DEAD_LETTERS.labels(row.code).inc()


class MeteredStore:
    """The worker's store, counting what it commits: every result and dead letter passes here."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    # Only what the write finished: a duplicate delivery's rows, skipped by the state guard, and a
    # write repeated after a failure of the next one are not counted twice.
    def write_done(self, items: Sequence[Any]) -> Any:
        finished = self._store.write_done(items)
        count_done(items if finished is None else [i for i in items if (i.job, i.seq) in finished])
        return finished

    def write_dead(self, rows: Sequence[Any]) -> Any:
        finished = self._store.write_dead(rows)
        count_dead(rows if finished is None else [r for r in rows if (r.job, r.seq) in finished])
        return finished
