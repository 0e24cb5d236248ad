"""Ack after commit, against a real Postgres: the engine's writer resolves an item's future (which
lets the task acknowledge its message) only once the item's result has committed. The gate is a
real row lock held by another transaction, so the writer's transaction is stuck before COMMIT."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass

import numpy as np
import pytest
from sqlalchemy import text

from imgq.db.admin import Admin
from imgq.db.store import Store
from imgq.ports import Blob
from imgq.worker.engine import Engine
from imgq.worker.fakes import EchoRunner
from tests.jobs import caption_task, create_job
from tests.waits import SETTLE_S

pytestmark = pytest.mark.integration


@dataclass
class Picture:
    image: np.ndarray
    width: int = 4
    height: int = 4


def state(store: Store, job: uuid.UUID, seq: int) -> str:
    with store.engine.connect() as conn:
        return conn.execute(text("SELECT state FROM job_items WHERE job_id = :j AND seq = :s"),
                            {"j": job, "s": seq}).scalar_one()


def writer_waits_on_a_lock(store: Store, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with store.engine.connect() as conn:
            waiting = conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND query LIKE '%job_items%'"
            )).scalar_one()
        if waiting:
            return True
        time.sleep(0.05)
    return False


def test_a_future_resolves_only_after_its_result_commits(store: Store):
    task = caption_task("echo")
    job = create_job(store, [task], ["/d/0.jpg"])
    store.claim(job, [0], "w")
    engine = Engine(store=store, runners={"caption": EchoRunner()},
                    fetch=lambda ref: Blob(ref.encode(), "local", "", ref, "v1"),
                    decode=lambda data: Picture(np.full((3, 4, 4), 0.5, dtype=np.float32)),
                    worker_name="w", max_batch=4, max_wait_s=0.01, decode_threads=1).start()
    gate = store.engine.connect()
    seen_at_resolution: list[str] = []
    called = threading.Event()

    def on_resolved(_future: object) -> None:
        seen_at_resolution.append(state(store, job, 0))
        called.set()

    try:
        tx = gate.begin()
        gate.execute(text("SELECT 1 FROM job_items WHERE job_id = :j AND seq = 0 FOR UPDATE"), {"j": job})
        [item] = engine.submit(job, [task], [(0, "/d/0.jpg")])
        item.future.add_done_callback(on_resolved)
        assert writer_waits_on_a_lock(store), "the writer never reached the item's row"
        # The result is written but not committed: acknowledging the message now could lose it.
        time.sleep(0.3)
        assert not item.future.done(), "resolved while the write was still uncommitted"
        assert state(store, job, 0) == "running"
        tx.rollback()
        assert item.future.result(SETTLE_S).state == "done"
        assert called.wait(10)
        assert seen_at_resolution == ["done"], "the future resolved before the commit was visible"
    finally:
        gate.close()
        engine.stop()
    report = Admin(store.engine).check(job)
    assert report is not None and report.ok and report.done == 1
