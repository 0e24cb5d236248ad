"""A database outage longer than IMGQ_WORKER_DEAD_AFTER_S: every worker's last beat is old when it
ends, for the same reason. The first reaper back must not take its live peers' items."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from imgq.db.admin import Admin
from imgq.db.store import Store
from imgq.worker.heartbeat import Heartbeat
from tests.jobs import caption_task, create_job

pytestmark = pytest.mark.integration

INTERVAL_S, DEAD_AFTER_S = 0.2, 1.0


class Cut:
    """One worker's connection to Postgres: what it asks fails while the cut is on."""

    def __init__(self, admin: Admin) -> None:
        self._admin = admin
        self.down = threading.Event()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._admin, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            if self.down.is_set():
                raise OperationalError("SELECT 1", {}, ConnectionRefusedError("Postgres restarting (injected)"))
            return attr(*args, **kwargs)
        return call


def worker(admin: Admin, name: str, published: list[Any], dead_after_s: float = DEAD_AFTER_S) -> tuple[Heartbeat, Cut]:
    cut = Cut(admin)
    host, pid = name.split(":")
    beat = Heartbeat(admin=cut, name=name, host=host, pid=int(pid), interval_s=INTERVAL_S,
                     dead_after_s=dead_after_s, republish=lambda batches: published.extend(batches) or 0)
    return beat, cut


def running(store: Store, job: Any) -> list[tuple[int, str | None]]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(  # type: ignore[misc]
            text("SELECT seq, worker FROM job_items WHERE job_id = :j AND state = 'running' ORDER BY seq"),
            {"j": job})]


def test_after_an_outage_the_first_reaper_back_leaves_a_live_peers_items(store: Store):
    admin = Admin(store.engine)
    job = create_job(store, [caption_task("m")], ["/d/0.jpg", "/d/1.jpg"], published=True)
    published: list[Any] = []
    (busy, busy_cut), (reaper, reaper_cut) = worker(admin, "a:1", published), worker(admin, "b:2", published)
    busy.start()
    reaper.start()
    store.claim(job, [0, 1], "a:1")
    try:
        time.sleep(DEAD_AFTER_S + 2 * INTERVAL_S)  # both steady: past the start-up hold-off
        busy_cut.down.set()
        reaper_cut.down.set()
        time.sleep(2 * DEAD_AFTER_S)  # the outage: both last beats are now old
        reaper_cut.down.clear()
        time.sleep(0.3)  # the busy worker's pool takes a moment longer to reconnect
        busy_cut.down.clear()
        time.sleep(3 * DEAD_AFTER_S)
        assert published == [], "a live worker's items were taken after the outage"
        assert running(store, job) == [(0, "a:1"), (1, "a:1")]
        # The hold-off is bounded: once a:1 really stops beating, b:2 takes its items.
        busy.stop(retire=False)
        deadline = time.monotonic() + 10 * DEAD_AFTER_S
        while not published:
            assert time.monotonic() < deadline, "the stopped worker's items were never re-published"
            time.sleep(INTERVAL_S)
        assert [(b.job, b.items) for b in published] == [(job, [(0, "/d/0.jpg"), (1, "/d/1.jpg")])]
    finally:
        busy.stop(retire=False)
        reaper.stop()


def test_a_worker_started_as_the_database_comes_back_leaves_its_peers_items(store: Store):
    """Its start-up reap takes only its own earlier incarnation and dead processes on its host."""
    admin = Admin(store.engine)
    job = create_job(store, [caption_task("m")], ["/d/0.jpg"], published=True)
    admin.heartbeat("a:1", "a", 1)
    store.claim(job, [0], "a:1")
    with store.engine.begin() as conn:  # a:1 was cut off by the outage, and reconnects in a moment
        conn.execute(text("UPDATE workers SET heartbeat_at = now() - interval '60 seconds' WHERE name = 'a:1'"))
    published: list[Any] = []
    # A longer dead-after age than the module's: a:1's first beat must land before b:2 may reap by
    # age, with a margin a loaded host cannot eat (at 1 s it was 0.3 s).
    dead_after_s = 2.0
    fresh, _ = worker(admin, "b:2", published, dead_after_s)
    back = threading.Event()

    def beats() -> None:  # a:1, back half a dead-after age after b:2 started
        admin.heartbeat("a:1", "a", 1)
        while not back.wait(INTERVAL_S):
            admin.heartbeat("a:1", "a", 1)
    fresh.start()
    time.sleep(0.5 * dead_after_s)
    beating = threading.Thread(target=beats)
    beating.start()
    try:
        time.sleep(2 * dead_after_s)
        assert published == [] and running(store, job) == [(0, "a:1")]
    finally:
        back.set()
        beating.join()
        fresh.stop()
