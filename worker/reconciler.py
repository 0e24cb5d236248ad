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
                 older_than_s: float, interval_s: float) -> None:
        self._admin = admin
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

    def sweep(self) -> int:
        batches = self._admin.take_stale(self._older_than_s)
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
