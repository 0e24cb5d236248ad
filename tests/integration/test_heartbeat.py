"""Heartbeats and the reaper against the real Store: a dead worker's running items come back at
once, marked unsettled; a live worker keeps its own."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from imgq.db.admin import Admin
from imgq.db.store import Store
from imgq.worker.heartbeat import Heartbeat
from tests.jobs import caption_task, create_job

pytestmark = pytest.mark.integration


@pytest.fixture
def store(database_url: str) -> Store:
    s = Store.from_url(database_url)
    yield s
    s.engine.dispose()


def test_a_silent_workers_items_are_republished_once_and_stay_suspect(store: Store):
    admin = Admin(store.engine)
    job = create_job(store, [caption_task("m")], [f"/d/{i}.jpg" for i in range(4)])
    admin.heartbeat("dead:1", "dead", 1)
    admin.heartbeat("live:2", "live", 2)
    store.claim(job, [0, 1], "dead:1")
    store.claim(job, [2], "live:2")
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE workers SET heartbeat_at = now() - interval '60 seconds' WHERE name = 'dead:1'"))
    batches = admin.take_orphans(dead_after_s=12)
    assert [(b.job, b.items) for b in batches] == [(job, [(0, "/d/0.jpg"), (1, "/d/1.jpg")])]
    assert admin.take_orphans(dead_after_s=12) == []  # once only
    claims = store.claim(job, [0, 1, 2, 3], "live:2")
    assert claims[0].unsettled and claims[1].unsettled and claims[2].unsettled  # 2: its own re-delivery
    assert not claims[3].unsettled
    with store.engine.connect() as conn:
        names = conn.execute(text("SELECT name FROM workers ORDER BY name")).scalars().all()
    assert names == ["live:2"], "a dead worker with nothing left running is forgotten"


def test_a_restarted_worker_reaps_its_own_earlier_incarnation_at_start(store: Store):
    admin = Admin(store.engine)
    job = create_job(store, [caption_task("m")], ["/d/0.jpg", "/d/1.jpg"])
    admin.heartbeat("box:4242", "box", 4242)  # same host and pid after a container restart
    store.claim(job, [0], "box:4242")
    admin.heartbeat("box:999999", "box", 999_999)  # an earlier worker on this host, process gone
    store.claim(job, [1], "box:999999")
    published: list = []
    beat = Heartbeat(admin=admin, name="box:4242", host="box", pid=4242, interval_s=60, dead_after_s=180,
                     republish=lambda batches: published.extend(batches) or 0).start()
    beat.stop()
    assert sorted(i for b in published for i in b.items) == [(0, "/d/0.jpg"), (1, "/d/1.jpg")]
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM workers")).scalar_one() == 0  # retired on stop


def test_reaper_is_exclusive(store: Store):
    admin = Admin(store.engine)
    with store.engine.begin() as conn:
        conn.execute(text("SELECT pg_advisory_xact_lock(74657302)"))
        assert admin.take_orphans(dead_after_s=1) is None
