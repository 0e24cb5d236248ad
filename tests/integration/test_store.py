"""The SQL layer against a real Postgres (embedded, pgvector-enabled)."""

import uuid

import pytest
from sqlalchemy import text

from imgq.db.store import Claim, DeadRow, DoneItem, EmptyJob, ObjectInfo, Store

pytestmark = pytest.mark.integration


CAPTION_TASK = {"kind": "caption", "model": "m", "params": {"num_beams": 1}, "params_hash": "h"}


def new_job(store: Store, refs: list[str]) -> uuid.UUID:
    return store.create_job(tasks=[CAPTION_TASK], refs=refs)


def row(job: uuid.UUID, seq: int, key: str, text_: str = "a cat", version: str = "v1") -> DoneItem:
    obj = ObjectInfo("s3", "b", key, version, 10, 640, 480)
    return DoneItem(job, seq, obj, "w1", {"caption": ("m", "rev", "h", {"num_beams": 1}, text_)})


def count(store: Store, table: str) -> int:
    with store.engine.connect() as conn:
        return conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one()


def test_create_job_commits_every_item(store: Store):
    job = new_job(store, [f"s3://b/{i}.jpg" for i in range(5000)])
    assert store.counts(job) == {"queued": 5000, "running": 0, "done": 0, "dead": 0}


def test_claim_counts_deliveries_and_skips_finished(store: Store):
    job = new_job(store, ["s3://b/0", "s3://b/1", "s3://b/2"])
    assert store.claim(job, [0, 1, 2], "w1") == {s: Claim(1, False, f"s3://b/{s}") for s in (0, 1, 2)}
    assert store.claim(job, [0, 1], "w2") == {0: Claim(2, True, "s3://b/0"), 1: Claim(2, True, "s3://b/1")}
    store.write_done([row(job, 0, "0")])
    store.write_dead([DeadRow(job, 1, "not_found", "gone", "w2")])
    store.release(job, [2])
    assert store.claim(job, [0, 1, 2], "w3") == {2: Claim(2, False, "s3://b/2")}
    assert store.counts(job) == {"queued": 0, "running": 1, "done": 1, "dead": 1}


def test_writes_are_idempotent(store: Store):
    job = new_job(store, ["s3://b/0", "s3://b/1"])
    store.claim(job, [0, 1], "w1")
    batch = [row(job, 0, "0", "first"), row(job, 1, "1", "second")]
    store.write_done(batch)
    # A redelivered message (different sampled text) must leave the first result alone.
    store.write_done([row(job, 0, "0", "again"), row(job, 1, "1", "again")])
    assert count(store, "captions") == 2 and count(store, "images") == 2
    texts = [r["caption"] for r in store.results(job)]
    assert texts == ["first", "second"]


def test_same_image_twice_in_one_batch(store: Store):
    job = new_job(store, ["s3://b/0", "s3://b/0"])
    store.claim(job, [0, 1], "w1")
    store.write_done([row(job, 0, "0"), row(job, 1, "0")])
    assert count(store, "captions") == 1
    assert store.counts(job)["done"] == 2


def test_new_object_version_is_a_new_result(store: Store):
    job = new_job(store, ["s3://b/0", "s3://b/0"])
    store.write_done([row(job, 0, "0", "old", version="v1")])
    store.write_done([row(job, 1, "0", "new", version="v2")])
    assert count(store, "images") == 2 and count(store, "captions") == 2


def test_dead_letters_keep_the_error_and_attempts(store: Store):
    job = new_job(store, ["s3://b/0"])
    store.claim(job, [0], "w1")
    store.claim(job, [0], "w1")
    store.write_dead([DeadRow(job, 0, "truncated", "image data ends early", "w1")])
    [result] = list(store.results(job))
    assert (result["state"], result["error_code"], result["attempts"]) == ("dead", "truncated", 2)
    # A late duplicate result does not resurrect a dead item into two states.
    store.write_done([row(job, 0, "0")])
    assert store.counts(job) == {"queued": 0, "running": 0, "done": 0, "dead": 1}


def test_pgvector_is_available(store: Store):
    with store.engine.begin() as conn:
        conn.execute(text("CREATE EXTENSION IF NOT EXISTS vector"))
        assert conn.execute(text("SELECT '[1,2,3]'::vector <-> '[1,2,4]'::vector")).scalar_one() == 1.0


def test_unclaim_keeps_items_unsettled_without_counting(store: Store):
    job = new_job(store, ["s3://b/0"])
    store.claim(job, [0], "w1")
    assert store.claim(job, [0], "w2") == {0: Claim(2, True, "s3://b/0")}
    store.unclaim(job, [0])
    assert store.claim(job, [0], "w3") == {0: Claim(2, True, "s3://b/0")}


def test_copy_keeps_refs_byte_for_byte(store: Store):
    refs = ["s3://b/back\\slash.jpg", "s3://b/tab\there", "/srv/ünïcode/ok.jpg", "s3://b/\\N"]
    job = new_job(store, refs)
    assert [r["ref"] for r in store.results(job)] == refs


def test_a_failure_while_streaming_refs_commits_nothing(store: Store):
    def refs():
        yield from (f"s3://b/{i}" for i in range(12_000))
        raise RuntimeError("bad ref found late")

    with pytest.raises(RuntimeError):
        store.create_job(tasks=[CAPTION_TASK], refs=refs())
    with pytest.raises(EmptyJob):
        store.create_job(tasks=[CAPTION_TASK], refs=iter([]))
    assert count(store, "jobs") == 0 and count(store, "job_items") == 0


def _job_items_rows_read(plan: dict) -> int:
    """Rows that plan nodes reading job_items produced, over all their loops."""
    own = plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1) if plan.get("Relation Name") == "job_items" else 0
    return own + sum(_job_items_rows_read(child) for child in plan.get("Plans", []))


def _per_message_statements_reading_more_than_their_items(store: Store, job: uuid.UUID) -> list[str]:
    """Claim, unclaim, finish, dead-letter and release a few items of ``job`` (a release is two
    statements: imgq.db.cancelling), then EXPLAIN
    ANALYZE each statement again: the ones that read more than 64 job_items rows."""
    from sqlalchemy import event

    captured: list[tuple[str, object]] = []

    def grab(conn, cursor, statement, parameters, context, executemany):
        if "job_items" in statement and statement.lstrip().upper().startswith(("WITH", "UPDATE")):
            captured.append((statement, parameters))

    event.listen(store.engine, "before_cursor_execute", grab)
    try:
        seqs = list(range(25_000, 25_016))
        store.claim(job, seqs, "w1")
        store.unclaim(job, seqs[:2])
        store.write_done([row(job, s, str(s)) for s in seqs[:8]])
        store.write_dead([DeadRow(job, s, "not_found", "gone", "w1") for s in seqs[8:12]])
        store.release(job, seqs[12:])
    finally:
        event.remove(store.engine, "before_cursor_execute", grab)
    # claim, unclaim, finish (with the caption link), dead, release and its cancel of a marked job's items
    assert len(captured) == 6
    slow = []
    for statement, parameters in captured:
        with store.engine.connect() as conn, conn.begin() as tx:
            plan = conn.exec_driver_sql("EXPLAIN (ANALYZE, FORMAT JSON) " + statement, parameters).scalar_one()
            tx.rollback()
        read = _job_items_rows_read(plan[0]["Plan"])
        if read > 64:
            slow.append(f"{read:.0f} job_items rows read by:\n{statement}")
    return slow


def test_per_message_statements_touch_only_their_items_in_a_new_big_job(store: Store):
    """The planner last analysed job_items when it held an earlier backfill; a new one lands
    (autoanalyze waits for 10 % of the table to change). Its job id is not in the statistics, so
    the planner expects a row or two per job. Every per-message statement must still find its
    items by (job, seq), not walk the whole job: a claim that did that cost 1.2 s per message
    with 1M items."""
    new_job(store, [f"s3://b/old-{i}.jpg" for i in range(50_000)])
    with store.engine.begin() as conn:
        conn.execute(text("ANALYZE job_items"))
    job = new_job(store, [f"s3://b/{i}.jpg" for i in range(50_000)])
    slow = _per_message_statements_reading_more_than_their_items(store, job)
    assert not slow, "\n\n".join(slow)


def test_per_message_statements_touch_only_their_items_when_statistics_saw_nothing_pending(store: Store):
    """job_items was analysed while the queue was drained, so the statistics say nothing is
    pending; then a big job lands. A state guard the planner matched to the partial index
    job_items_pending made every write read all pending items of the table (7.7 s per 32-row
    call with 200,000 pending): the guard is written so that it cannot (db/store.py, PENDING)."""
    old = new_job(store, [f"s3://b/old-{i}.jpg" for i in range(20_000)])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET state = 'done' WHERE job_id = :j"), {"j": old})
        conn.execute(text("ANALYZE job_items"))
    job = new_job(store, [f"s3://b/{i}.jpg" for i in range(50_000)])
    slow = _per_message_statements_reading_more_than_their_items(store, job)
    assert not slow, "\n\n".join(slow)


def test_the_lost_sweep_reads_only_items_in_flight_however_deep_the_backlog(store: Store):
    """No index holds every pending item any more (migration 0009): the sweep must find lost
    messages among the items in flight (job_items_in_flight), not by reading the backlog."""
    from imgq.db.admin import _LOST

    job = new_job(store, [f"s3://b/{i}.jpg" for i in range(30_000)])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET published_at = now() - interval '1 hour', "
                          "updated_at = now() - interval '1 hour' WHERE job_id = :j AND seq < 20"), {"j": job})
        conn.execute(text("ANALYZE job_items"))
    store.claim(job, [20, 21], "w1")  # running, and so published
    params = {"queued_age": 60.0, "running_age": 0.0, "job": None, "queue": "imgq", "limit": 100_000,
              "top_before": None, "backfill_before": None, "live_after": None, "beat_within": None}
    with store.engine.connect() as conn, conn.begin() as tx:
        plan = conn.execute(text(f"EXPLAIN (ANALYZE, FORMAT JSON) {_LOST.text}"), params).scalar_one()
        found = conn.execute(text("SELECT count(*) FROM job_items WHERE job_id = :j AND published_at IS NULL "
                                  "AND seq < 22"), {"j": job}).scalar_one()
        tx.rollback()
    assert found == 22, "the 20 old published items and the 2 running ones are the lost ones"
    read = _job_items_rows_examined(plan[0]["Plan"])
    assert read <= 100, f"the sweep examined {read:.0f} job_items rows for 22 in flight"


def _job_items_rows_examined(plan: dict) -> float:
    """Rows that plan nodes reading job_items produced or filtered out, over all their loops."""
    own = 0.0
    if plan.get("Relation Name") == "job_items":
        own = (plan.get("Actual Rows", 0) + plan.get("Rows Removed by Filter", 0)
               + plan.get("Rows Removed by Index Recheck", 0)) * plan.get("Actual Loops", 1)
    return own + sum(_job_items_rows_examined(child) for child in plan.get("Plans", []))


def test_a_running_item_of_a_job_cancelled_meanwhile_is_released_as_cancelled(store: Store):
    # DELETE /v1/jobs/{id} cancels only queued items; one that was running and then handed back for
    # a retry must not go back to the queue and run after all.
    job, other = new_job(store, ["s3://b/0", "s3://b/1"]), new_job(store, ["s3://b/0"])
    store.claim(job, [0], "w1")
    store.claim(other, [0], "w1")
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET state = 'cancelled' WHERE job_id = :j AND state = 'queued'"),
                     {"j": job})
        conn.execute(text("UPDATE jobs SET cancelled_at = now() WHERE id = :j"), {"j": job})
    store.release(job, [0])
    store.release(other, [0])
    assert store.counts(job) == {"queued": 0, "running": 0, "done": 0, "dead": 0, "cancelled": 2}
    assert store.counts(other) == {"queued": 1, "running": 0, "done": 0, "dead": 0}
    assert store.claim(job, [0, 1], "w2") == {}  # the retry message finds nothing to run


# -- the staged caption path (COPY into a temp table, then set-based statements) -----------------


def versions(store: Store, table: str) -> dict[int, str]:
    """id -> xmin: a row that any statement rewrote (even to the same values) gets a new xmin."""
    with store.engine.connect() as conn:
        return dict(conn.execute(text(f"SELECT id, xmin::text FROM {table}")).all())


def item_rows(store: Store, job: uuid.UUID) -> dict[int, tuple]:
    with store.engine.connect() as conn:
        return {seq: rest for seq, *rest in conn.execute(text(
            "SELECT seq, state, caption_id, image_id, worker, xmin::text FROM job_items WHERE job_id = :j"
        ), {"j": job})}


def test_a_replayed_write_adds_no_row_and_keeps_the_first_result(store: Store):
    job = new_job(store, [f"s3://b/{i}" for i in range(3)])
    store.claim(job, [0, 1, 2], "w1")
    store.write_done([row(job, s, str(s), f"first {s}") for s in (0, 1)])
    before = {t: versions(store, t) for t in ("images", "captions")}, item_rows(store, job)
    # The same results delivered again, with other texts: no row is added, the first results stay,
    # item 2 (not written before) links to a caption stored by this batch.
    store.write_done([row(job, 0, "0", "again"), row(job, 1, "1", "again"), row(job, 2, "2", "late")])
    after = {t: versions(store, t) for t in ("images", "captions")}, item_rows(store, job)
    assert {t: set(after[0][t]) >= set(before[0][t]) for t in after[0]} == {"images": True, "captions": True}
    assert len(after[0]["images"]) == 3 and len(after[0]["captions"]) == 3
    assert {s: after[1][s] for s in (0, 1)} == {s: before[1][s] for s in (0, 1)}
    assert [r["caption"] for r in store.results(job)] == ["first 0", "first 1", "late"]


def test_a_late_write_leaves_dead_done_and_cancelled_items_untouched(store: Store):
    job = new_job(store, [f"s3://b/{i}" for i in range(4)])
    store.claim(job, [0, 1, 2, 3], "w1")
    store.write_dead([DeadRow(job, 0, "not_found", "gone", "w1")])
    store.write_done([row(job, 1, "1", "kept")])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET state = 'cancelled' WHERE job_id = :j AND seq = 2"), {"j": job})
    before = item_rows(store, job)
    late = [DoneItem(job, s, ObjectInfo("s3", "b", str(s), "v1", 10, 640, 480), "w2",
                     {"caption": ("m", "rev", "h", {"num_beams": 1}, "late")}) for s in range(4)]
    store.write_done(late)
    after = item_rows(store, job)
    assert {s: after[s] for s in (0, 1, 2)} == {s: before[s] for s in (0, 1, 2)}  # same xmin: not rewritten
    assert (after[3][0], after[3][3]) == ("done", "w2") and after[3][1] is not None
    assert [r["caption"] for r in store.results(job)] == [None, "kept", None, "late"]
