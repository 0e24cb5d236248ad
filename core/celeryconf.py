"""Celery settings shared by producers and workers. JSON only: pickle is refused on both sides."""

from __future__ import annotations

from celery import Celery

from imgq.config import Settings
from imgq.feeding import LANES
from imgq.transport import install as install_transport

install_transport()  # Redis at maxmemory: workers wait for room instead of exiting (imgq.transport)


def make_celery(settings: Settings, name: str = "imgq") -> Celery:
    app = Celery(name, broker=settings.broker_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        event_serializer="json",
        task_ignore_result=True,
        task_default_queue=settings.queue,
        # Nothing is acknowledged before its items have a committed final state (or a retry is
        # published); a worker that dies mid-message leaves it to be redelivered.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout_s,
            # Sweep for messages of dead workers often enough that the visibility timeout, not
            # the sweep period, bounds redelivery.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 10)),
            "unacked_restore_throttle": 1,
            # One Redis list per lane (imgq.feeding.LANES), drained first to last by every BRPOP;
            # a restored (unacknowledged) message goes back to its own lane.
            "priority_steps": list(LANES),
        },
        broker_connection_retry_on_startup=True,
        worker_pool="threads",
        worker_concurrency=settings.messages_in_flight,
        worker_send_task_events=True,
        task_send_sent_event=False,
    )
    return app
