"""Scheduled backfills: the Celery beat schedule built from IMGQ_BACKFILLS, and the ``imgq.backfill``
control task that runs one of them by name.

The task is thin: its message is the backfill's name (JSON), the definition comes from the
consumer's own settings (a message cannot make it list another bucket), and the work is
:func:`imgq.producer.backfill.run_backfill` under the backfill's lock. A run still going when the
next one is due is not doubled: the second finds the lock held and returns ``running``.

The task is acknowledged when it starts (not late, unlike image messages): a backfill outlives
the broker's visibility timeout, and one that dies is resumed by the next run from its cursor.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery

from imgq.config import Settings
from imgq.nightly import BackfillSpec, parse_cron

log = logging.getLogger(__name__)

BACKFILL_TASK = "imgq.backfill"
# A scheduled run not started within this long is dropped (no consumer): the next one is due soon.
EXPIRES_S = 6 * 3600


def beat_schedule(specs: list[BackfillSpec], queue: str) -> dict[str, dict[str, Any]]:
    """Celery's ``beat_schedule``: one entry per configured backfill, sent to ``queue``."""
    from celery.schedules import crontab

    return {
        f"backfill:{s.name}": {
            "task": BACKFILL_TASK,
            "schedule": crontab(**parse_cron(s.schedule)),
            "args": [s.name],
            "options": {"queue": queue, "expires": EXPIRES_S},
        }
        for s in specs
    }


def run_configured(settings: Settings, name: str, **kwargs: Any) -> dict[str, Any]:
    """Run the configured backfill ``name``; ``kwargs`` go to ``run_backfill`` (tests: page size,
    hooks). Returns its report, or ``{"state": "running"}`` when another run holds its lock."""
    from imgq.db.store import make_engine
    from imgq.errors import BackfillCancelled, BackfillLockLost, BackfillRunning
    from imgq.producer.backfill import define, run_backfill
    from imgq.s3 import make_s3_client

    found = [s for s in settings.backfills if s.name == name]
    if not found:
        log.error("no such backfill in IMGQ_BACKFILLS", extra={"action": "backfill_unknown", "backfill": name})
        return {"name": name, "state": "unknown"}
    s = found[0]
    definition, bucket, prefix = define(settings, name=s.name, source=s.source, kinds=s.kinds, params=s.params,
                                        since=s.since, tenant=s.tenant, priority=s.priority)
    engine = make_engine(settings.sync_database_url)
    try:
        report = run_backfill(engine=engine, s3_client=kwargs.pop("s3_client", None) or make_s3_client(settings),
                              settings=settings, definition=definition, bucket=bucket, prefix=prefix,
                              max_rate=s.max_rate, **kwargs)
    except BackfillRunning as exc:
        log.info("backfill already running; this run is skipped",
                 extra={"action": "backfill_skipped", "backfill": name, "reason": exc.message})
        return {"name": name, "state": "running"}
    except (BackfillCancelled, BackfillLockLost) as exc:
        # Not a failure of the schedule: the run stopped on purpose, and the next trigger runs again.
        log.warning("backfill %s stopped: %s", name, exc.message,
                    extra={"action": exc.code, "backfill": name})
        return {"name": name, "state": "stopped", "code": exc.code, "message": exc.message}
    finally:
        engine.dispose()
    return {**report.as_dict(), "state": "done"}


def make_control_app(settings: Settings) -> Celery:
    """A Celery app (JSON only) whose beat sends the configured backfills to IMGQ_CONTROL_QUEUE and
    whose worker runs them."""
    from imgq.celeryconf import make_celery

    app = make_celery(settings, name="imgq-control")
    app.conf.update(beat_schedule=beat_schedule(settings.backfills, settings.control_queue),
                    task_default_queue=settings.control_queue, timezone="UTC", enable_utc=True)

    @app.task(name=BACKFILL_TASK, acks_late=False, ignore_result=True)
    def backfill(name: str) -> dict[str, Any]:
        return run_configured(settings, name)

    return app
