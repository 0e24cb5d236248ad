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


def test_a_slow_but_live_worker_keeps_its_items_and_a_paused_ones_late_result_is_harmless(store: Store):
    import time

    from imgq.db.admin import Admin
    from imgq.ports import DoneItem, ObjectInfo

    admin = Admin(store.engine)
    task = caption_task("m")
    job = create_job(store, [task], ["/d/0.jpg"])
    published: list = []

    def beat(name: str, pid: int) -> Heartbeat:
        return Heartbeat(admin=admin, name=name, host="h", pid=pid, interval_s=0.1, dead_after_s=0.5,
                         republish=lambda batches: published.extend(batches) or 0)

    slow = beat("h:1", 1).start()  # its beats come from their own thread
    store.claim(job, [0], "h:1")
    other = beat("h:2", 2).start()
    time.sleep(1.5)  # a long batch on "h:1": three times the dead-after age
    assert published == [], "a live worker's items must not be taken"
    slow.stop(retire=False)  # now it pauses (a frozen container): no beats, no retirement
    deadline = time.monotonic() + 5
    while not published:
        assert time.monotonic() < deadline, "the paused worker's item was never re-published"
        time.sleep(0.1)
    other.stop()
    assert published[0].items == [(0, "/d/0.jpg")]
    # Another worker finishes the item; then the paused one wakes and writes its own result.
    store.claim(job, [0], "h:2")
    obj = ObjectInfo("local", "", "/d/0.jpg", "v1", 10, 4, 4)
    for worker, caption in (("h:2", "first"), ("h:1", "late")):
        store.write_done([DoneItem(job, 0, obj, worker, {"caption": (
            "m", "r", task.params.digest(), task.params.canonical(), caption)})])
    report = admin.check(job)
    assert report is not None and report.ok and report.done == 1
    assert [r["caption"] for r in store.results(job)] == ["first"]


def test_an_orphan_goes_back_with_its_jobs_tasks_text_and_priority(store: Store):
    """What the reaper hands back is enough to publish the items as the job recorded them: its
    tasks, each item's text (a matching job) and the job's priority, which picks the broker lane."""
    admin = Admin(store.engine)
    task = caption_task("m")
    job = create_job(store, [task], [("/d/0.jpg", "a dog"), ("/d/1.jpg", "a cat"), "/d/2.jpg"])
    other = create_job(store, [task], ["/e/0.jpg"])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET priority = 7 WHERE id = :j"), {"j": job})
    admin.heartbeat("dead:1", "dead", 1)
    store.claim(job, [2, 0, 1], "dead:1")
    store.claim(other, [0], "dead:1")
    first = admin.take_orphans(dead_after_s=0, gone=["dead:1"], limit=3)
    assert sum(len(b.items) for b in first) == 3  # the limit (in job id, then seq order)
    items: dict = {}
    with store.engine.connect() as conn:
        recorded = conn.execute(text("SELECT tasks FROM jobs WHERE id = :j"), {"j": job}).scalar_one()
    for back in first + admin.take_orphans(dead_after_s=0, gone=["dead:1"]):
        assert (back.priority, back.tasks) == ((7, recorded) if back.job == job else (0, back.tasks))
        items.setdefault(back.job, []).extend(back.items)
    assert items == {job: [(0, "/d/0.jpg", "a dog"), (1, "/d/1.jpg", "a cat"), (2, "/d/2.jpg")],
                     other: [(0, "/e/0.jpg")]}


def test_a_restarted_worker_reaps_all_of_its_earlier_incarnation_take_after_take(store: Store):
    """More orphans than one take holds: the rest would look like the new process's own once it
    beats under the same name, and stay running until a visibility timeout."""
    admin = Admin(store.engine)
    job = create_job(store, [caption_task("m")], [f"/d/{i}.jpg" for i in range(5)])
    admin.heartbeat("box:4242", "box", 4242)
    store.claim(job, [0, 1, 2, 3, 4], "box:4242")
    published: list = []
    beat = Heartbeat(admin=admin, name="box:4242", host="box", pid=4242, interval_s=60, dead_after_s=180,
                     republish=lambda batches: published.append(batches) or 0, take_limit=2).start()
    beat.stop()
    assert [sum(len(b.items) for b in batches) for batches in published] == [2, 2, 1]
    assert sorted(i[0] for batches in published for b in batches for i in b.items) == [0, 1, 2, 3, 4]
    with store.engine.connect() as conn:
        owned = conn.execute(text("SELECT count(*) FROM job_items WHERE worker IS NOT NULL")).scalar_one()
    assert owned == 0
