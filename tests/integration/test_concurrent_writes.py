"""Result writes from two connections at once (the worker's two writers, or two workers) over the
same objects, against a real Postgres: no deadlock, no duplicate, every item done and linked; and
the write's array parameters go over the wire in binary, with their values intact."""

from __future__ import annotations

import threading
import uuid

import pytest
from psycopg.adapt import PyFormat
from psycopg.types.array import ListBinaryDumper
from sqlalchemy import text

from imgq.db.admin import Admin
from imgq.db.arrays import Binary
from imgq.db.store import DeadRow, DoneItem, ObjectInfo, Store

pytestmark = pytest.mark.integration

TASK = {"kind": "caption", "model": "m", "params": {}, "params_hash": "h"}


def done(job: uuid.UUID, seq: int, key: str, caption: str, worker: str) -> DoneItem:
    return DoneItem(job, seq, ObjectInfo("s3", "b", key, "v1", 10, 640, 480), worker,
                    {"caption": ("m", "rev", "h", {}, caption)})


def test_two_writers_over_the_same_objects_in_opposite_orders_finish_everything_once(store: Store):
    objects, rounds = 400, 8
    keys = [f"shared/{i}.jpg" for i in range(objects)]
    jobs = [[store.create_job(tasks=[TASK], refs=[f"s3://b/{k}" for k in keys]) for _ in range(rounds)]
            for _ in range(2)]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def write(side: int) -> None:
        try:
            start.wait(30)
            for job in jobs[side]:
                # Side 1 lists the objects backwards: the statements' own order must decide the lock order.
                order = range(objects) if side == 0 else reversed(range(objects))
                store.write_done([done(job, i, keys[i], f"caption of {i}", f"w{side}") for i in order])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(side,)) for side in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM images WHERE key LIKE 'shared/%'")).scalar_one() == objects
        captions = conn.execute(text(
            "SELECT c.text, im.key FROM captions c JOIN images im ON im.id = c.image_id WHERE im.key LIKE 'shared/%'"
        )).all()
        assert sorted(captions) == sorted((f"caption of {i}", keys[i]) for i in range(objects))
        linked = conn.execute(text(
            "SELECT count(DISTINCT i.caption_id), count(*) FROM job_items i JOIN captions c ON c.id = i.caption_id "
            "WHERE i.job_id = ANY(:jobs) AND i.state = 'done' AND c.image_id = i.image_id"
        ), {"jobs": [j for side in jobs for j in side]}).one()
    assert tuple(linked) == (objects, 2 * rounds * objects)
    for job in (jobs[0][0], jobs[1][-1]):
        report = Admin(store.engine).check(job)
        assert report is not None and report.ok and report.done == objects


def test_array_parameters_are_sent_in_binary_and_round_trip_exactly(store: Store):
    with store.engine.connect() as conn:
        dumper = conn.connection.driver_connection.adapters.get_dumper(Binary, PyFormat.AUTO)
    assert issubclass(dumper, ListBinaryDumper)
    awkward = ['a "quoted", {braced} caption', "back\\slash and NULL", "", "ünïcödé ✓", "tab\there\nnewline"]
    job = store.create_job(tasks=[TASK], refs=[f"s3://b/odd/{i}" for i in range(len(awkward) + 1)])
    store.write_done([done(job, i, f"odd/{i}", t, "w") for i, t in enumerate(awkward)])
    store.write_dead([DeadRow(job, len(awkward), "not_found", 'gone, "really" {x}', "w")])
    with store.engine.connect() as conn:
        got = conn.execute(text(
            "SELECT i.seq, c.text FROM job_items i JOIN captions c ON c.id = i.caption_id WHERE i.job_id = :j"
        ), {"j": job}).all()
        message = conn.execute(text("SELECT message FROM dead_letters WHERE job_id = :j"), {"j": job}).scalar_one()
    assert dict(got) == dict(enumerate(awkward))
    assert message == 'gone, "really" {x}'
