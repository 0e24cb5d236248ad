"""Translation links against a concurrent dead letter, in a real Postgres: an item that another
worker dead-letters while this one writes its result ends either done with its links or dead
without any, never dead with links (which `imgq check` reports)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable

import pytest
from sqlalchemy import text

from imgq.db import store as store_module
from imgq.db.admin import Admin
from imgq.db.arrays import Binary
from imgq.db.results import translation as tr
from imgq.db.store import DeadRow, Store
from tests.integration.test_translations import CAPTION, TRANSLATE, done
from tests.jobs import create_job
from tests.waits import SETTLE_S, lock_waited

pytestmark = pytest.mark.integration


def waits_on_a_lock(store: Store, running: Callable[[], bool]) -> bool:
    """Whether a session of this test's database waits on a lock, polled while ``running``."""
    return lock_waited(store.engine, running=running)


def outcome(store: Store, job: uuid.UUID) -> tuple[str, int, int]:
    """The item's state, its translation links and its dead letters."""
    with store.engine.connect() as conn:
        return conn.execute(text(
            "SELECT state, (SELECT count(*) FROM item_translations t WHERE t.job_id = i.job_id), "
            "(SELECT count(*) FROM dead_letters d WHERE d.job_id = i.job_id) FROM job_items i WHERE job_id = :j"
        ), {"j": job}).one()._tuple()


def test_a_dead_letter_after_the_links_waits_for_the_result_and_changes_nothing(store, monkeypatch):
    job = create_job(store, [CAPTION, TRANSLATE], ["/r/0.jpg"])
    store.claim(job, [0], "w1")
    original = tr.TranslationWriter.write
    other: list[threading.Thread] = []

    def write_then_another_worker_dead_letters(self, conn, rows, sources):  # type: ignore[no-untyped-def]
        out = original(self, conn, rows, sources)
        # A duplicate delivery dead-letters the item between the links and the finishing UPDATE.
        t = threading.Thread(target=store.write_dead, args=([DeadRow(job, 0, "decode_timeout", "slow", "w2")],))
        t.start()
        other.append(t)
        assert waits_on_a_lock(store, t.is_alive), "the dead letter did not wait for the item being written"
        return out

    monkeypatch.setattr(tr.TranslationWriter, "write", write_then_another_worker_dead_letters)
    store.write_done([done(job, 0, "r")])
    other[0].join(SETTLE_S)
    assert not other[0].is_alive()
    report = Admin(store.engine).check(job)
    assert report is not None and report.ok, report.offenders
    assert outcome(store, job) == ("done", 2, 0)


def test_a_dead_letter_not_yet_committed_when_linking_leaves_no_links(store):
    job = create_job(store, [CAPTION, TRANSLATE], ["/r/0.jpg"])
    store.claim(job, [0], "w1")
    with store.engine.connect() as dead_letterer:
        tx = dead_letterer.begin()
        dead_letterer.execute(store_module._ITEMS_DEAD, {  # store.write_dead's statement, its commit held back
            "job": Binary([job]), "seq": Binary([0]), "code": Binary(["decode_timeout"]),
            "message": Binary(["slow"]), "worker": Binary(["w2"])})
        writer = threading.Thread(target=store.write_done, args=([done(job, 0, "r")],))
        writer.start()
        assert waits_on_a_lock(store, writer.is_alive), "the result write did not wait for the item's row"
        tx.commit()
    writer.join(SETTLE_S)
    assert not writer.is_alive()
    report = Admin(store.engine).check(job)
    assert report is not None and report.ok, report.offenders
    assert outcome(store, job) == ("dead", 0, 1)
