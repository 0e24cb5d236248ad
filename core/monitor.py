"""What monitors see: the Celery app that Flower and ``celery -A imgq.monitor`` import, and the
per-message result that makes dead-lettered items visible in Flower.

``celery -A imgq.monitor inspect active`` and ``imgq flower`` use :data:`app`, built from the
``IMGQ_*`` environment on first use, with imgq's task registered (a stub: only ``imgq worker``
runs it)."""

from __future__ import annotations

import contextlib
from functools import cache
from typing import Any

from celery import Celery

OK, RETRIED, DEAD_LETTERED = "ok", "retried", "dead_lettered"


def outcome(summary: dict[str, int]) -> str:
    """One word per message for Flower's task search (``result:dead_lettered``): the worst fate
    of any of its items."""
    if summary.get("dead", 0) or summary.get("dropped", 0):
        return DEAD_LETTERED
    if summary.get("retried", 0):
        return RETRIED
    return OK


def task_result(job: str | None, kinds: list[str], summary: dict[str, int]) -> dict[str, Any]:
    """The task's return value: Flower shows it on the task's page and can search it."""
    return {"outcome": outcome(summary), "job": job, "kinds": ",".join(kinds), **summary}


def make_monitor_app() -> Celery:
    from imgq.celeryconf import make_celery
    from imgq.config import Settings
    from imgq.contract import TASK_NAME

    celery_app = make_celery(Settings())

    @celery_app.task(name=TASK_NAME)
    def process(msg: dict[str, Any]) -> None:  # pragma: no cover - never executed here
        raise RuntimeError("imgq.process runs only in `imgq worker`")

    return celery_app


@cache
def _app() -> Celery:
    return make_monitor_app()


def __getattr__(name: str) -> Celery:
    # Built lazily: importing this module must not read settings (or fail on them).
    if name in ("app", "celery"):
        return _app()
    raise AttributeError(name)


def require_auth_on_metrics() -> None:
    """Flower serves ``/metrics`` without authentication even when its UI requires it: put it
    behind the same basic auth or OAuth (an unauthenticated scrape gets 401)."""
    import tornado.web
    from flower.views import monitor

    if not getattr(monitor.Metrics.get, "_imgq_authenticated", False):
        guarded = tornado.web.authenticated(monitor.Metrics.get)
        guarded._imgq_authenticated = True  # type: ignore[attr-defined]
        monitor.Metrics.get = guarded


def drop_worker_metrics(registry: Any = None) -> None:
    """Flower's ``/metrics`` serves prometheus-client's default registry, where imgq's own families
    land as soon as anything imports :mod:`imgq.metrics` (the broker transport does): Flower then
    served every worker metric again, all zeros and its own broker connection counted in
    ``imgq_broker_refusing``, doubling the series of any dashboard that sums them. Only the workers
    serve them."""
    from prometheus_client import REGISTRY
    from prometheus_client.metrics import MetricWrapperBase

    from imgq import metrics

    registry = REGISTRY if registry is None else registry
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            with contextlib.suppress(KeyError):  # not registered there (already dropped)
                registry.unregister(value)


def flower_argv(*, port: int, address: str, db: str, max_tasks: int) -> list[str]:
    """``celery`` arguments that run Flower with the imgq app. Credentials travel in the
    environment (FLOWER_BASIC_AUTH), never on the command line where `ps` shows them."""
    return ["celery", "-A", "imgq.monitor", "flower", f"--port={port}", f"--address={address}",
            "--persistent=True", f"--db={db}", f"--max_tasks={max_tasks}", "--state_save_interval=10000",
            "--purge_offline_workers=3600"]


# Celery's remote control lets any client of the broker shut a worker down or revoke tasks.
# "read-only" keeps what Flower's pages read (stats, active, registered, ...) and the event
# switch it flips; it drops shutdown, revoke, rate limits, pool and consumer changes, and the
# inspect commands that dump the configuration or memory.
_READ_ONLY_EXTRA = {"enable_events", "heartbeat", "election"}
_NEVER = {"conf", "memdump", "memsample", "objgraph"}


def allowed_control_commands(mode: str, kinds: dict[str, str]) -> set[str]:
    """Remote-control commands a worker answers; ``kinds`` maps each command to Celery's type
    (``inspect`` or ``control``)."""
    if mode == "full":
        return set(kinds)
    if mode == "off":
        return set()
    return {name for name, kind in kinds.items() if kind == "inspect" and name not in _NEVER} | (
        _READ_ONLY_EXTRA & set(kinds))
