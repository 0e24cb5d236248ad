"""Re-publish items whose messages were lost (Redis restarted empty, a producer died between
commit and publish). Postgres is the record; this thread makes Redis catch up with it."""

from __future__ import annotations

import logging
import threading

from celery import Celery

from imgq.db.admin import Admin
from imgq.publish import republish

log = logging.getLogger(__name__)


class Reconciler:
    def __init__(self, *, admin: Admin, app: Celery, queue: str, per_message: int,
                 older_than_s: float, interval_s: float, running_older_than_s: float) -> None:
        self._admin = admin
        self._running_older_than_s = running_older_than_s
        self._app = app
        self._queue = queue
        self._per_message = per_message
        self._older_than_s = older_than_s
        self._interval_s = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imgq-reconcile", daemon=True)

    def start(self) -> Reconciler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def broker_backlog(self) -> int:
        """Messages waiting in the queue. A queue that no longer exists (Redis restarted) is empty."""
        with self._app.connection_for_read() as conn:
            try:
                return int(conn.default_channel.queue_declare(self._queue, passive=True).message_count)
            except conn.channel_errors:
                return 0

    def sweep(self) -> int:
        # A queued item may simply be waiting behind a backlog (a nightly backfill holds items
        # queued for hours): it counts as lost only once the queue has drained. A running item's
        # message is either acknowledged or redelivered within visibility timeout + time limit.
        queued_age = self._older_than_s if self.broker_backlog() == 0 else None
        batches = self._admin.take_stale(
            queued_older_than_s=queued_age, running_older_than_s=self._running_older_than_s
        )
        if not batches:
            return 0
        republish(self._app, batches, queue=self._queue, per_message=self._per_message)
        count = sum(len(b.items) for b in batches)
        log.warning("re-published %d stale items", count, extra={"action": "reconcile", "items": count})
        return count

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.sweep()
            except Exception as exc:  # an outage: try again next interval
                log.warning("reconcile sweep failed: %s", exc)
