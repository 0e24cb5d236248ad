"""The reaper against a real Postgres, when things go wrong: a publish that fails leaves the
orphans for the next beat (not for the hour-long running sweep), and a restarted worker's reap of
its earlier incarnation is never skipped because another reaper holds the lock."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any

import pytest
from sqlalchemy import text

from imgq.db.admin import Admin
from imgq.db.store import Store
from imgq.worker import heartbeat
from imgq.worker.heartbeat import Heartbeat
from tests.jobs import caption_task, create_job
from tests.waits import SETTLE_S

pytestmark = pytest.mark.integration

REAPER_LOCK = text("SELECT pg_advisory_xact_lock(74657302)")


def items(store: Store, job: uuid.UUID) -> list[tuple[Any, ...]]:
    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT seq, state, worker FROM job_items WHERE job_id = :j ORDER BY seq"),
                            {"j": job}).all()
    return [tuple(r) for r in rows]


def workers(store: Store) -> list[str]:
    with store.engine.connect() as conn:
        return list(conn.execute(text("SELECT name FROM workers ORDER BY name")).scalars())


def waits_for_the_reaper_lock(store: Store, running: threading.Thread) -> bool:
    deadline = time.monotonic() + SETTLE_S
    while running.is_alive() and time.monotonic() < deadline:
        with store.engine.connect() as conn:
            if conn.execute(text("SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
                                 "WHERE d.datname = current_database() AND l.locktype = 'advisory' "
                                 "AND l.objid = 74657302 AND NOT l.granted")).scalar_one():
                return True
        time.sleep(0.02)
    return False


def beat(admin: Admin, name: str, published: list[Any], **kwargs: Any) -> Heartbeat:
    host, pid = name.split(":")
    return Heartbeat(admin=admin, name=name, host=host, pid=int(pid), interval_s=60, dead_after_s=12,
                     republish=lambda batches: published.extend(batches) or 0, **kwargs)


def test_a_failed_republish_leaves_the_orphans_to_the_next_reap(store: Store):
    admin = Admin(store.engine)
    job = create_job(store, [caption_task("m")], ["/d/0.jpg", "/d/1.jpg"], published=True)
    admin.heartbeat("dead:1", "dead", 1)
    store.claim(job, [0, 1], "dead:1")
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE workers SET heartbeat_at = now() - interval '60 seconds' WHERE name = 'dead:1'"))
    calls: list[Any] = []

    def republish(batches: list[Any]) -> int:
        calls.append(batches)
        if len(calls) == 1:
            raise ConnectionError("Redis restarting (injected)")
        return 0

    reaper = Heartbeat(admin=admin, name="live:2", host="live", pid=2, interval_s=60, dead_after_s=12,
                       republish=republish)
    with pytest.raises(ConnectionError):
        reaper.reap()
    # Nothing of the take committed: the items are still the dead worker's, and it is still known.
    assert items(store, job) == [(0, "running", "dead:1"), (1, "running", "dead:1")]
    assert workers(store) == ["dead:1"]
    assert reaper.reaped == 0
    # Redis is back: the next beat re-publishes them, and only that one.
    assert reaper.reap() == 2 and reaper.reap() == 0
    assert [(b.job, b.items) for b in calls[1]] == [(job, [(0, "/d/0.jpg"), (1, "/d/1.jpg")])]
    assert items(store, job) == [(0, "running", None), (1, "running", None)]
    assert workers(store) == []


def test_a_restarted_worker_waits_for_another_reaper_before_its_first_beat(store: Store):
    admin = Admin(store.engine)
    job = create_job(store, [caption_task("m")], ["/d/0.jpg"], published=True)
    admin.heartbeat("box:7", "box", 7)  # the first incarnation, then killed (a container restart)
    store.claim(job, [0], "box:7")
    published: list[Any] = []
    restarted = beat(admin, "box:7", published)
    with store.engine.connect() as other:
        tx = other.begin()
        other.execute(REAPER_LOCK)  # another worker's reap, mid-transaction
        starting = threading.Thread(target=restarted.start)
        starting.start()
        assert waits_for_the_reaper_lock(store, starting), "the start-up reap did not wait for the lock"
        tx.commit()
    starting.join(SETTLE_S)
    restarted.stop(retire=False)
    assert [(b.job, b.items) for b in published] == [(job, [(0, "/d/0.jpg")])]
    assert items(store, job) == [(0, "running", None)]
    assert workers(store) == ["box:7"]  # beating again, as the new process


def test_a_start_up_reap_that_cannot_get_the_lock_fails_before_beating(store: Store):
    admin = Admin(store.engine)
    job = create_job(store, [caption_task("m")], ["/d/0.jpg"], published=True)
    admin.heartbeat("box:7", "box", 7)
    store.claim(job, [0], "box:7")
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE workers SET heartbeat_at = now() - interval '1 hour'"))
    published: list[Any] = []
    with store.engine.connect() as other, other.begin():
        other.execute(REAPER_LOCK)
        with pytest.raises(heartbeat.ReaperBusy):
            beat(admin, "box:7", published, start_wait_s=0.2).start()
    with store.engine.connect() as conn:
        stale = conn.execute(text("SELECT heartbeat_at < now() - interval '59 minutes' FROM workers")).scalar_one()
    assert stale, "a worker whose start-up reap failed must not beat: its old items would look alive"
    assert published == [] and items(store, job) == [(0, "running", "box:7")]
