"""Wire a worker process: store, model, fetcher, engine and the thin Celery task."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

from celery import Celery, signals
from celery.exceptions import Reject

from imgq.celeryconf import make_celery
from imgq.config import Settings
from imgq.contract import TASK_NAME, CaptionParams, TaskMessage
from imgq.db.admin import Admin
from imgq.db.store import Store
from imgq.publish import publish
from imgq.retry import RetryPolicy
from imgq.worker.decode import decode
from imgq.worker.engine import CaptionRunner, Engine
from imgq.worker.fetch import Fetcher
from imgq.worker.preprocess import Preprocessor
from imgq.worker.reconciler import Reconciler
from imgq.worker.service import MessageService

log = logging.getLogger(__name__)


class WorkerRuntime:
    """Everything one worker process owns. The model loads in this process (threads pool: no
    fork follows), once, before the first message is taken."""

    def __init__(self, settings: Settings, *, model: CaptionRunner | None = None, s3_client: Any = None) -> None:
        self.settings = settings
        self.name = f"{socket.gethostname()}:{os.getpid()}"
        if model is None:
            from imgq.worker.model import CaptionModel

            model = CaptionModel(settings.caption_model, revision=settings.model_revision,
                                 device=settings.device, dtype=settings.dtype, threads=settings.torch_threads)
        self.model = model
        self.store = Store.from_url(settings.sync_database_url, pool_size=4, max_overflow=8)
        self.fetcher = Fetcher(settings, s3_client)
        self.app: Celery | None = None
        self.engine: Engine | None = None
        self.service: MessageService | None = None
        self.reconciler: Reconciler | None = None

    def load(self) -> None:
        load = getattr(self.model, "load", None)
        if load is not None:
            load()

    def start(self, app: Celery) -> None:
        self.load()
        processor = getattr(self.model, "image_processor", None)
        pre = Preprocessor.from_image_processor(processor) if processor is not None else Preprocessor()
        max_pixels = self.settings.max_pixels

        def prepare(data: bytes, params: CaptionParams) -> tuple[Any, int, int]:
            image = decode(data, max_pixels=max_pixels, target=pre.size)
            return pre.pixels(image.image, params.resize), image.width, image.height

        self.engine = Engine(
            store=self.store, model=self.model, fetch=self.fetcher.fetch, prepare=prepare,
            worker_name=self.name, max_batch=self.settings.max_batch,
            max_wait_s=self.settings.max_wait_ms / 1000, decode_threads=self.settings.decode_threads,
        ).start()
        queue = self.settings.queue

        def republish(messages: Iterable[TaskMessage], delay: float) -> None:
            publish(app, messages, queue=queue, countdown=delay or None)

        policy = RetryPolicy(self.settings.max_attempts, self.settings.retry_base_s, self.settings.retry_max_s)
        self.service = MessageService(store=self.store, engine=self.engine, policy=policy, publish=republish,
                                      time_limit_s=self.settings.task_time_limit_s)
        self.reconciler = Reconciler(
            admin=Admin(self.store.engine), app=app, queue=queue, per_message=self.settings.refs_per_message,
            older_than_s=self.settings.reconcile_after_s, interval_s=self.settings.reconcile_interval_s,
            running_older_than_s=self.settings.visibility_timeout_s + self.settings.task_time_limit_s,
        ).start()

    def stop(self) -> None:
        if self.reconciler is not None:
            self.reconciler.stop()
        if self.engine is not None:
            self.engine.stop()
        self.store.engine.dispose()


def make_worker_app(settings: Settings, runtime: WorkerRuntime) -> Celery:
    app = make_celery(settings, name="imgq-worker")
    runtime.app = app

    @app.task(name=TASK_NAME, bind=True)
    def process(self: Any, msg: dict[str, Any]) -> dict[str, int]:
        assert runtime.service is not None, "worker runtime not started"
        try:
            return runtime.service.handle(msg).as_dict()
        except Exception as exc:
            # Postgres or Redis is unreachable: nothing was settled, so hand the message back
            # (after a pause, so an outage is not a hot loop) rather than acknowledge it.
            log.warning("message not settled, requeueing: %r", exc, extra={"action": "requeue"})
            time.sleep(2.0)
            raise Reject(str(exc), requeue=True) from exc

    @signals.worker_ready.connect(weak=False)
    def _ready(**_: Any) -> None:
        log.info("worker ready", extra={"action": "ready", "worker": runtime.name})

    @signals.worker_shutting_down.connect(weak=False)
    def _grace(**_: Any) -> None:
        # Warm shutdown waits for in-flight messages; past the grace period, exit anyway. Their
        # messages were never acknowledged, so Redis hands them to another worker.
        def expire() -> None:
            log.error("shutdown grace of %.0fs expired; exiting with messages unacknowledged",
                      settings.shutdown_grace_s)
            os._exit(70)

        timer = threading.Timer(settings.shutdown_grace_s, expire)
        timer.daemon = True
        timer.start()

    @signals.worker_shutdown.connect(weak=False)
    def _shutdown(**_: Any) -> None:
        runtime.stop()

    return app
