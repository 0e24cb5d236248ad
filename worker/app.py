"""Wire a worker process: store, model, fetcher, engine and the thin Celery task."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from celery import Celery, signals
from celery.exceptions import Reject

from imgq import metrics
from imgq.celeryconf import make_celery
from imgq.classify import is_outage
from imgq.config import Settings
from imgq.contract import TASK_NAME, TaskMessage
from imgq.db.admin import Admin
from imgq.db.callbacks import CallbackStore
from imgq.db.store import Store
from imgq.metrics import MeteredStore
from imgq.monitor import allowed_control_commands, task_result
from imgq.ports import Runner
from imgq.publish import delivered_lane, publish
from imgq.publish import republish as republish_batches
from imgq.retry import Backoff, RetryPolicy
from imgq.worker import tuner
from imgq.worker.decode import DecodedImage, decode, draft_target
from imgq.worker.engine import Engine
from imgq.worker.feeder import Feeder, FeedReport
from imgq.worker.fetch import Fetcher
from imgq.worker.heartbeat import Heartbeat
from imgq.worker.metrics_server import MetricsServer
from imgq.worker.notifier import Notifier
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
        # Every committed result and dead letter passes through the store: count them there.
        self.store = MeteredStore(Store.from_url(settings.sync_database_url, pool_size=4, max_overflow=8))
        self.fetcher = Fetcher(settings, s3_client)
        self.app: Celery | None = None
        self.engine: Engine | None = None
        self.service: MessageService | None = None
        self.feeder: Feeder | None = None
        self.heartbeat: Heartbeat | None = None
        self.notifier: Notifier | None = None
        self.metrics: MetricsServer | None = None
        self.started = False  # models loaded, and the engine, heartbeat, feeder and notifier running

    def load(self) -> None:
        for kind, runner in self.runners.items():
            load = getattr(runner, "load", None)
            if load is not None:
                load()
            log.info("serving %s with %s (revision %s)", kind, runner.name, runner.revision,
                     extra={"action": "serve", "kind": kind, "model": runner.name})

    def start(self, app: Celery) -> None:
        queue = self.settings.queue
        if self.settings.metrics_port:
            # Before the models load (minutes from the hub): a port in use fails the start at once,
            # and the probes answer meanwhile (/readyz: 503 "models not loaded").
            self.metrics = MetricsServer(
                bind=self.settings.metrics_bind, port=self.settings.metrics_port, token=self.settings.metrics_token,
                ready=lambda: self._not_ready(app), queue_depths=lambda: {queue: _queue_depth(app, queue)},
                alive=lambda: self.engine.wedged() if self.engine is not None else None,
            ).start()
        self.load()
        max_pixels = self.settings.max_pixels
        # One decode per image for every kind: JPEG draft decoding stops at the largest input.
        target = draft_target((runner.input_size for runner in self.runners.values()), self.settings.draft_decode)

        def decode_once(data: bytes) -> DecodedImage:
            return decode(data, max_pixels=max_pixels, target=target)

        # Fills in IMGQ_MAX_BATCH / IMGQ_TORCH_THREADS left at 0 from timings of this worker's
        # model (imgq.tuning); the batch then also bounds what the runners keep per batch.
        probed = self.runners.get("caption") or next(iter(self.runners.values()))
        choice = tuner.resolve(self.settings, probed, decode_once)
        self.settings = self.settings.model_copy(update={"max_batch": choice.max_batch,
                                                         "torch_threads": choice.torch_threads})
        for runner in self.runners.values():
            configure = getattr(runner, "configure_batch", None)  # injected runners may lack it
            if configure is not None:
                configure(choice.max_batch)

        self.engine = Engine(
            store=self.store, runners=self.runners, fetch=self.fetcher.fetch, decode=decode_once,
            worker_name=self.name, max_batch=self.settings.max_batch,
            max_wait_s=self.settings.max_wait_ms / 1000, decode_threads=self.settings.decode_threads,
            on_unhealthy=self._unhealthy, decode_timeout_s=self.settings.decode_timeout_s,
            writers=self.settings.result_writers, wedged_after_s=self.settings.task_time_limit_s,
        ).start()

        def send(messages: Iterable[TaskMessage], delay: float) -> None:
            # Retries go back to the lane of the message being handled (this thread's task). Nothing is
            # counted here: crash suspects pass too, and the service counts the retries it settles.
            publish(app, list(messages), queue=queue, countdown=delay or None, lane=delivered_lane(app))

        policy = RetryPolicy(self.settings.max_attempts, self.settings.retry_base_s, self.settings.retry_max_s)
        self.service = MessageService(store=self.store, engine=self.engine, policy=policy, publish=send,
                                      time_limit_s=self.settings.task_time_limit_s)
        admin = Admin(self.store.engine)
        self.heartbeat = Heartbeat(
            admin=admin, name=self.name, interval_s=self.settings.heartbeat_s,
            dead_after_s=self.settings.worker_dead_after_s,
            republish=lambda batches: self._recovered(republish_batches(
                app, batches, queue=queue, per_message=self.settings.refs_per_message), batches),
        ).start()
        # Every worker runs a feeder; one at a time (leader lock) keeps the broker window topped up.
        self.feeder = Feeder.from_settings(
            self.settings, admin=admin, app=app, interval_s=self.settings.feed_interval_s,
            lost_after_s=self.settings.reconcile_after_s, sweep_interval_s=self.settings.reconcile_interval_s,
            running_lost_after_s=self.settings.visibility_timeout_s + self.settings.task_time_limit_s,
            name=self.name, on_cycle=_count_feed,
        ).start()
        # Every worker sends the signed summaries of finished jobs (docs/callbacks.md).
        self.notifier = Notifier.from_settings(self.settings, CallbackStore(self.store.engine)).start()
        self.started = True

    @staticmethod
    def _recovered(sent: int, batches: list[Any]) -> int:
        metrics.RECOVERED.labels("orphan").inc(sum(len(b.items) for b in batches))
        return sent

    def _not_ready(self, app: Celery) -> str | None:
        """Why this worker cannot take work yet (readiness probe), or None."""
        if not self.started or self.unhealthy:
            return self.unhealthy or "models not loaded"
        # What failed, not the driver's message: the probe needs no token (the log has the detail).
        try:
            with self.store.engine.connect() as conn:
                conn.exec_driver_sql("SELECT 1")
        except Exception as exc:
            log.warning("readiness: database unavailable: %s", exc, extra={"action": "readyz"})
            return f"database unavailable ({type(exc).__name__})"
        try:
            with app.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1)
        except Exception as exc:
            log.warning("readiness: broker unavailable: %s", exc, extra={"action": "readyz"})
            return f"broker unavailable ({type(exc).__name__})"
        return None

    def _unhealthy(self, reason: str) -> None:
        # Stop taking messages: a warm shutdown lets the held ones settle (as retries, the engine
        # runs nothing more) and Redis keeps the rest. `imgq worker` then exits 3, so a
        # supervisor restarts it, on a healthy device with luck.
        self.unhealthy = reason
        log.error("model unhealthy, shutting down: %s", reason, extra={"action": "unhealthy"})
        os.kill(os.getpid(), signal.SIGTERM)

    def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        if self.feeder is not None:
            self.feeder.stop()
        if self.notifier is not None:
            self.notifier.stop()
        if self.heartbeat is not None:
            # Retired only once the engine has settled everything: until then a beat is a promise.
            self.heartbeat.stop(retire=False)
        if self.engine is not None:
            self.engine.stop()
        if self.heartbeat is not None:
            self.heartbeat.stop(retire=True)
        self.store.engine.dispose()


def _result(msg: Any, summary: dict[str, int]) -> dict[str, Any]:
    """What Flower shows for the message: its outcome (searchable as result:dead_lettered), job
    and kinds, and the item counts."""
    body = msg if isinstance(msg, dict) else {}
    tasks = body.get("tasks") if isinstance(body.get("tasks"), list) else []
    kinds = [str(t.get("kind")) for t in tasks if isinstance(t, dict)]
    return task_result(str(body["job"]) if "job" in body else None, kinds, summary)


def _queue_depth(app: Celery, queue: str) -> int:
    with app.connection_for_read() as conn:
        try:
            return int(conn.default_channel.queue_declare(queue, passive=True).message_count)
        except conn.channel_errors:
            return 0  # no such queue (yet, or Redis restarted): empty


def limit_remote_control(app: Celery, mode: str) -> None:
    from celery.worker.control import Panel

    if mode == "off":
        app.conf.worker_enable_remote_control = False
        return
    keep = allowed_control_commands(mode, {name: meta.type for name, meta in Panel.meta.items()})
    for name in list(Panel.data):
        if name not in keep:
            # Process-wide: this process is the worker. Answered with an error reply, not removed:
            # an unknown command raises KeyError in kombu, which logs a traceback at ERROR for each
            # of Flower's periodic inspects (it asks for `conf`).
            Panel.data[name] = _refused(name, mode)


def _refused(name: str, mode: str) -> Callable[..., dict[str, str]]:
    def refuse(state: Any, **kwargs: Any) -> dict[str, str]:
        return {"error": f"{name!r} is not answered: IMGQ_REMOTE_CONTROL={mode}"}
    return refuse


def _count_feed(report: FeedReport, swept: bool) -> None:
    metrics.PUBLISHED.inc(report.messages)
    if report.held:
        metrics.MEMORY_HELD.inc()
    if swept:
        metrics.SWEEPS.inc()
    if report.lost:
        metrics.RECOVERED.labels("lost").inc(report.lost)
    if report.abandoned:
        metrics.ABANDONED.inc(report.abandoned)


def make_worker_app(settings: Settings, runtime: WorkerRuntime) -> Celery:
    app = make_celery(settings, name="imgq-worker")
    runtime.app = app
    limit_remote_control(app, settings.remote_control)

    outages = Backoff()

    @app.task(name=TASK_NAME, bind=True)
    def process(self: Any, msg: dict[str, Any]) -> dict[str, Any]:
        assert runtime.service is not None, "worker runtime not started"
        try:
            summary = runtime.service.handle(msg).as_dict()
        except Exception as exc:
            if not is_outage(exc):
                # A bug or an unforeseen input: requeueing would loop for ever. Its items become
                # internal_error dead letters (retryable with `imgq dlq retry` once fixed).
                log.exception("message failed; dead-lettering its items", extra={"action": "internal_error"})
                try:
                    return _result(msg, runtime.service.give_up(msg, exc).as_dict())
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
        return _result(msg, summary)

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
