"""Fast checks of what `Store` and `Admin` promise, each on a few rows in a real Postgres: what
`create_job` records, what `write_done` stores and in which order its writers run, the engine's
options, and the counters of `imgq check` (written to kill the mutants that survived a run)."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from imgq.contract import CaptionParams, make_task
from imgq.db.admin import Admin
from imgq.db.results import writer
from imgq.db.store import DoneItem, EmptyJob, ObjectInfo, Store
from imgq.kinds import KINDS, KindSpec
from imgq.params import EmbedParams, TranslateParams, ValidateParams
from imgq.ports import CaptionText
from tests.integration.test_check import sql
from tests.jobs import record

pytestmark = pytest.mark.integration

CAPTION = make_task("caption", "cap-model", CaptionParams(num_beams=2))
EMBED = make_task("embed", "itm-model", EmbedParams())
VALIDATE = make_task("validate", "itm-model", ValidateParams())
TRANSLATE = make_task("translate", "mt-model", TranslateParams(langs=["de", "fr"]))


def obj(seq: int) -> ObjectInfo:
    return ObjectInfo("local", "", f"/m/{seq}.jpg", "v1", 10, 4, 4)


def result(task: Any, value: Any) -> tuple[str, str, str, dict[str, Any], Any]:
    return (task.model, "rev1", task.params.digest(), task.params.canonical(), value)


def translations(seq: int) -> dict[str, CaptionText]:
    return {
        lang: CaptionText(
            f"[{lang}] caption {seq}", lang=lang, method="translated", via="mt-model", via_revision="mt-rev"
        )
        for lang in ("de", "fr")
    }


def done_job(store: Store, tasks: list[Any], n: int = 3) -> uuid.UUID:
    """A job of these tasks (in this order) whose items are all done, written by the store."""
    job = store.create_job(tasks=[record(t) for t in tasks], refs=[f"/m/{i}.jpg" for i in range(n)])
    store.claim(job, list(range(n)), "w1")
    values = {
        "caption": lambda s: f"caption {s}",
        "translate": translations,
        "embed": lambda s: np.eye(256, dtype=np.float32)[s],
    }
    store.write_done(
        [DoneItem(job, s, obj(s), "w1", {t.kind: result(t, values[t.kind](s)) for t in tasks}) for s in range(n)]
    )
    return job


# -- create_job ----------------------------------------------------------------------------------------


def test_a_job_records_its_kinds_first_params_and_the_default_tenant(store):
    job = store.create_job(tasks=[record(CAPTION), record(EMBED)], refs=["/m/0.jpg", "/m/1.jpg"])
    row = sql(store, "SELECT kind, model, params, tenant, total FROM jobs WHERE id = :j", j=job).mappings().one()
    assert dict(row) == {
        "kind": "caption,embed",
        "model": "cap-model",
        "params": CAPTION.params.canonical(),
        "tenant": "default",
        "total": 2,
    }
    assert CAPTION.params.canonical() != {}


def test_in_transaction_runs_with_the_jobs_cursor_before_any_item(store):
    seen: list[tuple[Any, ...]] = []

    def in_transaction(cursor: Any, job: uuid.UUID) -> None:
        cursor.execute(
            "SELECT j.id, j.tenant, (SELECT count(*) FROM job_items i WHERE i.job_id = j.id) "
            "FROM jobs j WHERE j.id = %s",
            (job,),
        )
        seen.append(cursor.fetchone())

    job = store.create_job(tasks=[record(CAPTION)], refs=["/m/0.jpg"], tenant="t1", in_transaction=in_transaction)
    assert seen == [(job, "t1", 0)]


def test_refs_past_one_copy_chunk_are_numbered_in_order_and_counted(store):
    n = 5_001  # two COPY chunks
    job = store.create_job(tasks=[record(CAPTION)], refs=(f"/m/{i}.jpg" for i in range(n)))
    seqs = sql(
        store,
        "SELECT count(*), count(DISTINCT seq), min(seq), max(seq), "
        "bool_and(ref = '/m/' || seq || '.jpg') FROM job_items WHERE job_id = :j",
        j=job,
    ).one()
    assert tuple(seqs) == (n, n, 0, n - 1, True)
    assert sql(store, "SELECT total FROM jobs WHERE id = :j", j=job).scalar_one() == n


def test_an_empty_job_is_refused_with_its_message_and_leaves_no_row(store):
    with pytest.raises(EmptyJob) as refused:
        store.create_job(tasks=[record(CAPTION)], refs=[])
    assert str(refused.value) == "a job needs at least one item"
    assert sql(store, "SELECT count(*) FROM jobs").scalar_one() == 0


# -- write_done ----------------------------------------------------------------------------------------


def test_result_rows_keep_their_params_and_the_items_text(store):
    job = store.create_job(tasks=[record(VALIDATE)], refs=[("/m/0.jpg", "a red door")])
    store.claim(job, [0], "w1")
    store.write_done([DoneItem(job, 0, obj(0), "w1", {"validate": result(VALIDATE, (0.75, 0.25))}, "a red door")])
    row = sql(
        store, "SELECT m.text, m.params FROM matches m JOIN job_items i ON i.match_id = m.id WHERE i.job_id = :j", j=job
    ).one()
    assert tuple(row) == ("a red door", VALIDATE.params.canonical())
    cap = done_job(store, [CAPTION], n=1)
    params = sql(
        store, "SELECT c.params FROM captions c JOIN job_items i ON i.caption_id = c.id WHERE i.job_id = :j", j=cap
    ).scalar_one()
    assert params == CAPTION.params.canonical() != {}


def test_a_stage_listed_before_the_kind_it_follows_is_written_after_it(store):
    job = store.create_job(tasks=[record(CAPTION), record(TRANSLATE)], refs=["/m/0.jpg"])
    store.claim(job, [0], "w1")
    store.write_done(
        [
            DoneItem(
                job,
                0,
                obj(0),
                "w1",
                {"translate": result(TRANSLATE, translations(0)), "caption": result(CAPTION, "caption 0")},
            )
        ]
    )
    rows = sql(
        store,
        "SELECT t.lang, c.text, c.source_id = i.caption_id FROM item_translations t "
        "JOIN captions c ON c.id = t.caption_id JOIN job_items i ON i.job_id = t.job_id "
        "AND i.seq = t.seq WHERE t.job_id = :j ORDER BY t.lang",
        j=job,
    ).all()
    assert [tuple(r) for r in rows] == [("de", "[de] caption 0", True), ("fr", "[fr] caption 0", True)]
    assert store.counts(job)["done"] == 1


class NoteWriter:
    """A stage kind whose name sorts before the kind it follows: it links each item to its caption."""

    kind = "a_note"
    table = "captions"
    link_column = None
    after = "caption"

    def write(self, conn: Any, rows: Any, sources: dict[tuple[uuid.UUID, int], int]) -> dict[Any, int]:
        for r in rows:
            conn.execute(
                text("INSERT INTO item_translations (job_id, seq, lang, caption_id) VALUES (:j, :s, 'xx', :c)"),
                {"j": r.job, "s": r.seq, "c": sources[(r.job, r.seq)]},
            )
        return {}


@pytest.fixture
def note_kind(monkeypatch):
    monkeypatch.setitem(
        KINDS,
        "a_note",
        KindSpec(
            "a_note",
            TranslateParams,
            family="note",
            input="image",
            model_setting="translate_model",
            runner="imgq.worker.runners:TranslateRunner",
            writer=f"{__name__}:NoteWriter",
            after="caption",
        ),
    )
    yield "a_note"
    writer.cache_clear()


def test_a_stage_runs_after_its_kind_whatever_their_names(store, note_kind):
    job = store.create_job(tasks=[record(CAPTION)], refs=["/m/0.jpg", "/m/1.jpg"])
    store.claim(job, [0, 1], "w1")
    store.write_done(
        [
            DoneItem(
                job, s, obj(s), "w1", {note_kind: result(CAPTION, None), "caption": result(CAPTION, f"caption {s}")}
            )
            for s in (0, 1)
        ]
    )
    linked = sql(
        store,
        "SELECT t.seq, t.caption_id = i.caption_id FROM item_translations t JOIN job_items i "
        "ON i.job_id = t.job_id AND i.seq = t.seq WHERE t.job_id = :j ORDER BY t.seq",
        j=job,
    ).all()
    assert [tuple(r) for r in linked] == [(0, True), (1, True)]


# -- the engine ----------------------------------------------------------------------------------------


def test_from_url_passes_engine_options(database_url):
    store = Store.from_url(database_url, connect_args={"application_name": "imgq-mutants"})
    try:
        with store.engine.connect() as conn:
            assert conn.execute(text("SELECT current_setting('application_name')")).scalar_one() == "imgq-mutants"
    finally:
        store.engine.dispose()


def test_a_pooled_connection_the_server_dropped_is_replaced(store, database_url):
    with store.engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    killer = create_engine(database_url, poolclass=NullPool)
    try:
        with killer.connect() as conn:
            assert conn.execute(text("SELECT pg_terminate_backend(:p, 5000)"), {"p": pid}).scalar_one()
    finally:
        killer.dispose()
    assert store.job_exists(uuid.uuid4()) is False  # the pool pings and reconnects, no error


# -- reading -------------------------------------------------------------------------------------------


def test_results_of_an_unknown_job_are_empty(store):
    assert list(store.results(uuid.uuid4())) == []


def test_a_job_without_a_caption_task_has_no_captioned_refs(store):
    captioned = done_job(store, [CAPTION], n=1)
    job = store.create_job(tasks=[record(EMBED)], refs=["/m/0.jpg"])
    # An inconsistent link: the embed job's item points at the other job's caption.
    sql(
        store,
        "UPDATE job_items SET caption_id = (SELECT caption_id FROM job_items WHERE job_id = :c) WHERE job_id = :j",
        c=captioned,
        j=job,
    )
    assert store.captioned(job) == (None, [])
    assert store.captioned(captioned) == (record(CAPTION), ["/m/0.jpg"])


# -- imgq check ----------------------------------------------------------------------------------------


def test_check_counts_cancelled_items(store):
    job = store.create_job(tasks=[record(CAPTION)], refs=["/m/0.jpg", "/m/1.jpg", "/m/2.jpg"])
    sql(store, "UPDATE jobs SET cancelled_at = now(), cancelled_items = 2 WHERE id = :j", j=job)  # as a cancel
    sql(store, "UPDATE job_items SET state = 'cancelled' WHERE job_id = :j AND seq > 0", j=job)
    report = Admin(store.engine).check(job)
    assert report is not None and report.ok
    assert (report.total, report.pending, report.cancelled, report.missing) == (3, 1, 2, 0)


def test_check_of_a_pending_job_of_a_stage_alone(store):
    job = store.create_job(tasks=[record(TRANSLATE)], refs=["/m/0.jpg", "/m/1.jpg"])
    report = Admin(store.engine).check(job)
    assert report is not None and report.ok
    assert (report.pending, report.missing, report.translations, report.offenders) == (2, 0, 0, [])


def test_check_looks_at_every_task_listed_after_a_stage(store):
    job = done_job(store, [CAPTION, TRANSLATE, EMBED])
    assert Admin(store.engine).check(job).ok
    # Seq 0's embedding by another model; seq 1's embedding stored twice (the constraint gone).
    sql(
        store,
        "UPDATE embeddings SET model = 'other' WHERE id = "
        "(SELECT embedding_id FROM job_items WHERE job_id = :j AND seq = 0)",
        j=job,
    )
    sql(store, "ALTER TABLE embeddings DROP CONSTRAINT embeddings_identity")
    with store.engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TEMP TABLE e ON COMMIT DROP AS SELECT * FROM embeddings WHERE id = "
                "(SELECT embedding_id FROM job_items WHERE job_id = :j AND seq = 1)"
            ),
            {"j": job},
        )
        conn.execute(text("UPDATE e SET id = nextval(pg_get_serial_sequence('embeddings', 'id'))"))
        conn.execute(text("INSERT INTO embeddings SELECT * FROM e"))
    report = Admin(store.engine).check(job)
    assert report is not None
    assert (report.missing, report.duplicates, report.mismatched, report.translations) == (0, 1, 1, 6)


def test_check_counts_every_missing_and_every_wrong_translation(store):
    job = done_job(store, [CAPTION, TRANSLATE], n=4)
    sql(store, "DELETE FROM item_translations WHERE job_id = :j AND seq IN (0, 1) AND lang = 'fr'", j=job)
    sql(
        store,
        "UPDATE item_translations t SET caption_id = f.caption_id FROM item_translations f "
        "WHERE f.job_id = t.job_id AND f.seq = t.seq AND f.lang = 'fr' "
        "AND t.job_id = :j AND t.seq IN (2, 3) AND t.lang = 'de'",
        j=job,
    )
    report = Admin(store.engine).check(job)
    assert report is not None
    assert (report.missing, report.mismatched, report.duplicates) == (2, 2, 0)
    assert len(report.offenders) == 4


def test_one_write_of_two_revisions_of_an_adapter_stores_each_captions_own(store: Store):
    """The worker coalesces pending writes into one. An adapter registered again (same name, so the
    same params hash; a new revision, maybe a new language) between two batches made one group,
    and the second batch's captions were stored under the first's revision and language."""
    task = make_task("caption", "cap-model", CaptionParams(adapter="news"))
    job = store.create_job(tasks=[record(task)], refs=[f"/m/{i}.jpg" for i in range(2)])
    store.claim(job, [0, 1], "w1")
    values = [CaptionText("ein hund", lang="de", method="adapter", via="news", via_revision="a" * 64),
              CaptionText("un chien", lang="fr", method="adapter", via="news", via_revision="b" * 64)]
    store.write_done([DoneItem(job, s, obj(s), "w1", {"caption": result(task, values[s])}) for s in range(2)])
    assert sql(store, "SELECT c.text, c.lang, c.via_revision FROM job_items i JOIN captions c ON c.id = i.caption_id "
                      "WHERE i.job_id = :j ORDER BY i.seq", j=job).all() == [("ein hund", "de", "a" * 64),
                                                                             ("un chien", "fr", "b" * 64)]
