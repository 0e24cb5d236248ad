"""Wire a worker process: store, model, fetcher, engine and the thin Celery task."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from celery import Celery, signals
from celery.exceptions import Reject

from imgq.celeryconf import make_celery
from imgq.classify import is_outage
from imgq.config import Settings
from imgq.contract import TASK_NAME, TaskMessage
from imgq.db.admin import Admin
from imgq.db.store import Store
from imgq.ports import Runner
from imgq.publish import publish
from imgq.publish import republish as republish_batches
from imgq.retry import Backoff, RetryPolicy
from imgq.worker.decode import DecodedImage, decode
from imgq.worker.engine import Engine
from imgq.worker.fetch import Fetcher
from imgq.worker.heartbeat import Heartbeat
from imgq.worker.reconciler import Reconciler
from imgq.worker.runners import build_runners
from imgq.worker.service import MessageService

log = logging.getLogger(__name__)


class WorkerRuntime:
    """Everything one worker process owns. The models load in this process (threads pool: no
    fork follows), once each, before the first message is taken."""

    def __init__(
        self, settings: Settings, *, runners: dict[str, Runner] | None = None, s3_client: Any = None
    ) -> None:
        self.settings = settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        self.runners = runners if runners is not None else build_runners(settings)
        self.unhealthy: str | None = None
        self.store = Store.from_url(settings.sync_database_url, pool_size=4, max_overflow=8)
        self.fetcher = Fetcher(settings, s3_client)
        self.app: Celery | None = None
        self.engine: Engine | None = None
        self.service: MessageService | None = None
        self.reconciler: Reconciler | None = None
        self.heartbeat: Heartbeat | None = None

    def load(self) -> None:
        for kind, runner in self.runners.items():
            load = getattr(runner, "load", None)
            if load is not None:
                load()
            log.info("serving %s with %s (revision %s)", kind, runner.name, runner.revision,
                     extra={"action": "serve", "kind": kind, "model": runner.name})

    def start(self, app: Celery) -> None:
        self.load()
        max_pixels = self.settings.max_pixels
        # One decode per image for every kind: JPEG draft decoding stops at the largest input.
        target = max(runner.input_size for runner in self.runners.values())

        def decode_once(data: bytes) -> DecodedImage:
            return decode(data, max_pixels=max_pixels, target=target)

        self.engine = Engine(
            store=self.store, runners=self.runners, fetch=self.fetcher.fetch, decode=decode_once,
            worker_name=self.name, max_batch=self.settings.max_batch,
            max_wait_s=self.settings.max_wait_ms / 1000, decode_threads=self.settings.decode_threads,
            on_unhealthy=self._unhealthy, decode_timeout_s=self.settings.decode_timeout_s,
        ).start()
        queue = self.settings.queue

        def send(messages: Iterable[TaskMessage], delay: float) -> None:
            publish(app, messages, queue=queue, countdown=delay or None)

        policy = RetryPolicy(self.settings.max_attempts, self.settings.retry_base_s, self.settings.retry_max_s)
        self.service = MessageService(store=self.store, engine=self.engine, policy=policy, publish=send,
                                      time_limit_s=self.settings.task_time_limit_s)
        admin = Admin(self.store.engine)
        self.heartbeat = Heartbeat(
            admin=admin, name=self.name, interval_s=self.settings.heartbeat_s,
            dead_after_s=self.settings.worker_dead_after_s,
            republish=lambda batches: republish_batches(app, batches, queue=queue,
                                                        per_message=self.settings.refs_per_message),
        ).start()
        self.reconciler = Reconciler(
            admin=admin, app=app, queue=queue, per_message=self.settings.refs_per_message,
            older_than_s=self.settings.reconcile_after_s, interval_s=self.settings.reconcile_interval_s,
            running_older_than_s=self.settings.visibility_timeout_s + self.settings.task_time_limit_s,
        ).start()

    def _unhealthy(self, reason: str) -> None:
        # Stop taking messages: a warm shutdown lets the held ones settle (as retries, the engine
        # runs nothing more) and Redis keeps the rest. `imgq worker` then exits 3, so a
        # supervisor restarts it, on a healthy device with luck.
        self.unhealthy = reason
        log.error("model unhealthy, shutting down: %s", reason, extra={"action": "unhealthy"})
        os.kill(os.getpid(), signal.SIGTERM)

    def stop(self) -> None:
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.heartbeat is not None:
            # Retired only once the engine has settled everything: until then a beat is a promise.
            self.heartbeat.stop(retire=False)
        if self.engine is not None:
            self.engine.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop(retire=True)
        self.store.engine.dispose()


def make_worker_app(settings: Settings, runtime: WorkerRuntime) -> Celery:
    app = make_celery(settings, name="imgq-worker")
    runtime.app = app

    outages = Backoff()

    @app.task(name=TASK_NAME, bind=True)
    def process(self: Any, msg: dict[str, Any]) -> dict[str, int]:
        assert runtime.service is not None, "worker runtime not started"
        try:
            summary = runtime.service.handle(msg).as_dict()
        except Exception as exc:
            if not is_outage(exc):
                # A bug or an unforeseen input: requeueing would loop for ever. Its items become
                # internal_error dead letters (retryable with `imgq dlq retry` once fixed).
                log.exception("message failed; dead-lettering its items", extra={"action": "internal_error"})
                try:
                    return runtime.service.give_up(msg, exc).as_dict()
                except Exception as again:
                    if not is_outage(again):
                        raise
                    exc = again
            # Postgres or Redis is unreachable: nothing was settled, so hand the message back
            # after a pause that grows while the outage lasts, rather than acknowledge it.
            pause = outages.failed()
            log.warning("message not settled, requeueing in %.0fs: %r", pause, exc, extra={"action": "requeue"})
            time.sleep(pause)
            raise Reject(str(exc), requeue=True) from exc
        outages.succeeded()
        return summary

    global _current
    _current = runtime
    return app


# Connected once per process (dispatch_uid), acting on the runtime of the latest app: connecting
# per make_worker_app piled up handlers, each holding an old runtime.
_current: WorkerRuntime | None = None


@signals.worker_ready.connect(weak=False, dispatch_uid="imgq-worker-ready")
def _ready(**_: Any) -> None:
    if _current is not None:
        log.info("worker ready", extra={"action": "ready", "worker": _current.name})


@signals.worker_shutting_down.connect(weak=False, dispatch_uid="imgq-worker-grace")
def _grace(**_: Any) -> None:
    # Warm shutdown waits for in-flight messages; past the grace period, exit anyway. Their
    # messages were never acknowledged, so Redis hands them to another worker.
    if _current is None:
        return
    grace = _current.settings.shutdown_grace_s

    def expire() -> None:
        log.error("shutdown grace of %.0fs expired; exiting with messages unacknowledged", grace)
        os._exit(70)

    timer = threading.Timer(grace, expire)
    timer.daemon = True
    timer.start()


@signals.worker_shutdown.connect(weak=False, dispatch_uid="imgq-worker-shutdown")
def _shutdown(**_: Any) -> None:
    if _current is not None:
        _current.stop()
