"""Store and Admin queries that only the CLI's e2e tests reached, so mutation testing's unit and
integration tiers had no test for them: which captions `enqueue translate --job` starts from
(Store.captioned), and the dead-letter listing and purge behind `imgq dlq list` / `dlq purge`."""

from __future__ import annotations

import datetime as dt
import uuid

import pytest
from sqlalchemy import text

from imgq.contract import CaptionParams, make_task
from imgq.db.admin import Admin
from imgq.db.store import Store
from imgq.params import EmbedParams
from imgq.ports import DeadRow, DoneItem, ObjectInfo
from tests.jobs import caption_task, create_job, record

pytestmark = pytest.mark.integration


def caption(store: Store, job: uuid.UUID, seq: int, task, words: str) -> None:
    obj = ObjectInfo("local", "", f"/data/{seq}.jpg", "v1", 10, 4, 4)
    store.write_done([DoneItem(job, seq, obj, "w1", {
        "caption": (task.model, "rev", task.params.digest(), task.params.canonical(), words)})])


def test_captioned_gives_the_caption_task_and_the_captioned_refs_in_item_order(store: Store):
    task = caption_task("blip", CaptionParams(num_beams=2))
    embed = make_task("embed", "itm", EmbedParams())
    job = create_job(store, [embed, task], ["/data/0.jpg", "/data/1.jpg", "/data/2.jpg"])
    assert store.captioned(job) == (record(task), [])
    caption(store, job, 2, task, "a dog")
    caption(store, job, 0, task, "a cat")
    assert store.captioned(job) == (record(task), ["/data/0.jpg", "/data/2.jpg"])


def test_captioned_of_a_job_without_captions_or_without_a_job(store: Store):
    job = create_job(store, [make_task("embed", "itm", EmbedParams())], ["/data/0.jpg"])
    assert store.captioned(job) == (None, [])
    assert store.captioned(uuid.uuid4()) is None


def dead(store: Store, job: uuid.UUID, seqs: range, code: str) -> None:
    store.claim(job, list(seqs), "w9")
    store.write_dead([DeadRow(job, seq, code, f"{code} #{seq}", "w9") for seq in seqs])


def test_dead_letters_are_listed_newest_first_filtered_by_code_and_job(store: Store):
    admin = Admin(store.engine)
    first = create_job(store, [caption_task("m")], [f"/data/{i}.jpg" for i in range(3)])
    second = create_job(store, [caption_task("m")], ["/data/x.jpg"])
    dead(store, first, range(3), "not_found")
    with store.engine.begin() as conn:  # the first job's letters are older
        conn.execute(text("UPDATE dead_letters SET created_at = now() - interval '1 hour' WHERE job_id = :j"),
                     {"j": first})
    dead(store, second, range(1), "wrong_model")

    rows = admin.dead_letters(code=None, job=None)
    assert [(r["job_id"], r["seq"]) for r in rows] == [(second, 0), (first, 0), (first, 1), (first, 2)]
    assert set(rows[0]) == {"job_id", "seq", "ref", "code", "message", "attempts", "worker", "created_at"}
    assert (rows[0]["ref"], rows[0]["code"], rows[0]["message"], rows[0]["attempts"], rows[0]["worker"]) == (
        "/data/x.jpg", "wrong_model", "wrong_model #0", 1, "w9")
    assert [(r["job_id"], r["seq"]) for r in admin.dead_letters(code="not_found", job=None)] == [
        (first, 0), (first, 1), (first, 2)]
    assert [r["seq"] for r in admin.dead_letters(code=None, job=first, limit=2)] == [0, 1]
    assert admin.dead_letters(code="not_found", job=second) == []


def test_a_dead_letters_message_is_kept_to_its_first_2000_characters(store: Store):
    job = create_job(store, [caption_task("m")], ["/data/long.jpg"])
    store.claim(job, [0], "w9")
    store.write_dead([DeadRow(job, 0, "model_error", "x" * 1999 + "yz" + "w" * 1000, "w9")])
    (row,) = Admin(store.engine).dead_letters(code=None, job=job)
    assert row["message"] == "x" * 1999 + "y"


def test_dead_letters_are_listed_a_hundred_at_a_time_by_default(store: Store):
    job = create_job(store, [caption_task("m")], [f"/data/{i}.jpg" for i in range(101)])
    dead(store, job, range(101), "not_found")
    assert len(Admin(store.engine).dead_letters(code=None, job=None)) == 100


def test_purge_deletes_dead_letters_older_than_the_age_with_their_items_and_counts_them(store: Store):
    admin = Admin(store.engine)
    old = create_job(store, [caption_task("m")], ["/data/0.jpg", "/data/1.jpg", "/data/2.jpg"])
    other = create_job(store, [caption_task("m")], ["/data/y.jpg", "/data/z.jpg"])
    dead(store, old, range(2), "not_found")
    dead(store, other, range(2), "not_found")
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE dead_letters SET created_at = now() - interval '2 hours' "
                          "WHERE job_id = :old OR (job_id = :other AND seq = 0)"), {"old": old, "other": other})

    assert admin.purge(dt.timedelta(hours=3)) == 0
    assert admin.purge(dt.timedelta(hours=1)) == 3
    assert store.purged(old) == 2 and store.purged(other) == 1
    assert store.counts(old) == {"queued": 1, "running": 0, "done": 0, "dead": 0}
    assert [(r["job_id"], r["seq"]) for r in admin.dead_letters(code=None, job=None)] == [(other, 1)]
    assert admin.purge(dt.timedelta(0)) == 1
    assert admin.dead_letters(code=None, job=None) == []


def test_existing_caption_gives_the_text_and_the_images_width_and_height(store: Store):
    task = caption_task("blip")
    job = create_job(store, [task], ["/data/0.jpg"])
    obj = ObjectInfo("local", "", "/data/0.jpg", "v1", 10, 4, 3)
    store.write_done([DoneItem(job, 0, obj, "w1", {
        "caption": (task.model, "rev", task.params.digest(), task.params.canonical(), "a cat")})])
    assert store.existing_caption("local", "", "/data/0.jpg", "v1", "blip", "rev", task.params.digest()) == (
        "a cat", 4, 3)
    assert store.existing_caption("local", "", "/data/0.jpg", "v2", "blip", "rev", task.params.digest()) is None


def test_purged_is_zero_for_a_job_with_nothing_purged_or_no_job(store: Store):
    job = create_job(store, [caption_task("m")], ["/data/0.jpg"])
    assert store.purged(job) == 0
    assert store.purged(uuid.uuid4()) == 0


def vector_indexes(store: Store) -> dict[str, str]:
    with store.engine.connect() as conn:
        return dict(conn.execute(text(
            "SELECT indexname, indexdef FROM pg_indexes WHERE indexname LIKE 'embeddings_hnsw_%'")).all())


def test_the_vector_index_defaults_to_blip_bases_256_dimensions_and_1gb_of_memory(store: Store):
    from imgq.db.admin import build_vector_index, drop_vector_index

    assert drop_vector_index(store.engine) is True
    assert "embeddings_hnsw_256" not in vector_indexes(store)
    build_vector_index(store.engine)
    assert vector_indexes(store)["embeddings_hnsw_256"].endswith(
        "USING hnsw (((embedding)::vector(256)) vector_cosine_ops) WHERE (dim = 256)")
    with pytest.raises(ValueError) as exc:
        build_vector_index(store.engine, maintenance_work_mem="1TB")
    assert str(exc.value) == "maintenance_work_mem must look like 512MB or 1GB, not '1TB'"


def test_the_counters_count_what_a_write_finished_not_what_it_was_given(store: Store):
    """A duplicate delivery's rows are skipped by the state guard: imgq_images_total and
    imgq_dead_letters_total count each item once, as the tables do."""
    from prometheus_client import REGISTRY

    from imgq.metrics import MeteredStore

    def sample(name: str, labels: dict[str, str]) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    task = caption_task("m")
    job = create_job(store, [task], ["/data/0.jpg", "/data/1.jpg"])
    store.claim(job, [0, 1], "w1")
    metered = MeteredStore(store)
    images, dead = sample("imgq_images_total", {"kind": "caption"}), sample("imgq_dead_letters_total",
                                                                            {"code": "not_found"})
    obj = ObjectInfo("local", "", "/data/0.jpg", "v1", 10, 4, 4)
    row = DoneItem(job, 0, obj, "w1", {"caption": (task.model, "r", task.params.digest(), task.params.canonical(),
                                                   "a cat")})
    assert metered.write_done([row]) == {(job, 0)}
    assert metered.write_done([row]) == set()  # the duplicate: nothing finished
    assert metered.write_dead([DeadRow(job, 1, "not_found", "gone", "w1")]) == {(job, 1)}
    assert metered.write_dead([DeadRow(job, 1, "not_found", "gone again", "w2"),
                               DeadRow(job, 0, "not_found", "late", "w2")]) == set()
    assert sample("imgq_images_total", {"kind": "caption"}) - images == 1
    assert sample("imgq_dead_letters_total", {"code": "not_found"}) - dead == 1
    assert store.counts(job) == {"queued": 0, "running": 0, "done": 1, "dead": 1}
