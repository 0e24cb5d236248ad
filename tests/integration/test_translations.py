"""Translated captions in a real Postgres: the store writes them beside their English caption and
links one row per language; `imgq check` counts them and catches each way they can be wrong;
`imgq results --lang` reads them back; a stored English caption is found for reuse."""

from __future__ import annotations

import json
import uuid

import pytest
from typer.testing import CliRunner

from imgq.cli import app
from imgq.contract import CaptionParams, make_task
from imgq.db.store import DeadRow, DoneItem, ObjectInfo, Store
from imgq.params import TranslateParams
from imgq.ports import CaptionText
from tests.integration.test_check import imgq_check, sql
from tests.jobs import create_job

pytestmark = pytest.mark.integration

N = 4
CAPTION = make_task("caption", "cap-model", CaptionParams())
TRANSLATE = make_task("translate", "mt-model", TranslateParams(langs=["de", "fr"]))


def translated(text: str, lang: str, via: str = "mt-model") -> CaptionText:
    return CaptionText(f"[{lang}] {text}", lang=lang, method="translated", via=via, via_revision="mt-rev")


def done(job: uuid.UUID, seq: int, folder: str, langs: tuple[str, ...] = ("de", "fr")) -> DoneItem:
    english = f"caption {seq}"
    return DoneItem(job, seq, ObjectInfo("local", "", f"/{folder}/{seq}.jpg", "v1", 10, 4, 4), "w1", {
        "caption": ("cap-model", "rev1", CAPTION.params.digest(), CAPTION.params.canonical(), english),
        "translate": ("mt-model", "mt-rev", TRANSLATE.params.digest(), TRANSLATE.params.canonical(),
                      {lang: translated(english, lang) for lang in langs}),
    })


def make_job(store: Store, folder: str) -> uuid.UUID:
    """Items 0..N-2 done with English + de + fr, item N-1 dead."""
    job = create_job(store, [CAPTION, TRANSLATE], [f"/{folder}/{i}.jpg" for i in range(N)])
    store.claim(job, list(range(N)), "w1")
    store.write_done([done(job, seq, folder) for seq in range(N - 1)])
    store.write_dead([DeadRow(job, N - 1, "not_an_image", "not an image", "w1")])
    return job


def test_translations_are_stored_linked_and_accounted_for(store, database_url):
    job = make_job(store, "t1")
    rows = sql(store, "SELECT c.lang, c.method, c.via, c.via_revision, c.text, s.text AS source, c.model, "
                      "c.params_hash FROM item_translations t JOIN captions c ON c.id = t.caption_id "
                      "JOIN captions s ON s.id = c.source_id WHERE t.job_id = :j AND t.seq = 1 ORDER BY c.lang",
               j=job).mappings().all()
    assert [(r["lang"], r["method"], r["via"], r["text"], r["source"]) for r in rows] == [
        ("de", "translated", "mt-model", "[de] caption 1", "caption 1"),
        ("fr", "translated", "mt-model", "[fr] caption 1", "caption 1")]
    # A translation keeps its source's BLIP identity: model and params.
    assert {(r["model"], r["params_hash"]) for r in rows} == {("cap-model", CAPTION.params.digest())}
    rc, out, err = imgq_check(database_url, job)
    assert rc == 0, err
    assert out.strip().endswith("missing=0 duplicates=0 mismatched=0 translations=6")


def test_a_second_delivery_reuses_the_rows_and_adds_no_link(store):
    job = make_job(store, "t2")
    before = sql(store, "SELECT count(*) FROM captions").scalar_one()
    store.write_done([done(job, 1, "t2")])  # already done: the state guard finishes nothing
    assert sql(store, "SELECT count(*) FROM captions").scalar_one() == before
    assert sql(store, "SELECT count(*) FROM item_translations WHERE job_id = :j", j=job).scalar_one() == 6


def test_results_in_a_language(store, database_url):
    job = make_job(store, "t3")
    out = CliRunner().invoke(app, ["results", str(job), "--lang", "de"], env={"IMGQ_DATABASE_URL": database_url})
    assert out.exit_code == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["seq"], r["caption"], r["method"], r["source_caption"]) for r in rows[:2]] == [
        (0, "[de] caption 0", "translated", "caption 0"), (1, "[de] caption 1", "translated", "caption 1")]
    assert rows[-1]["caption"] is None and rows[-1]["error_code"] == "not_an_image"
    english = CliRunner().invoke(app, ["results", str(job), "--lang", "en"], env={"IMGQ_DATABASE_URL": database_url})
    assert json.loads(english.stdout.splitlines()[0])["caption"] == "caption 0"
    bad = CliRunner().invoke(app, ["results", str(job), "--lang", "xx"], env={"IMGQ_DATABASE_URL": database_url})
    assert bad.exit_code == 2 and "error[unknown_language]" in bad.stderr
    # A language the job never asked for would be a column of nulls: refused, naming those it has.
    other = CliRunner().invoke(app, ["results", str(job), "--lang", "es"], env={"IMGQ_DATABASE_URL": database_url})
    assert other.exit_code == 2 and other.stdout == ""
    assert f"error[bad_request]: job {job} has no es captions (it asked for: en, de, fr)" in other.stderr
    nowhere = CliRunner().invoke(app, ["results", str(job), "-o", "/nonexistent/dir/x.csv", "--format", "csv"],
                                 env={"IMGQ_DATABASE_URL": database_url})
    assert nowhere.exit_code == 2
    assert "error[bad_file]: cannot write /nonexistent/dir/x.csv: No such file or directory" in nowhere.stderr
    plain = CliRunner().invoke(app, ["results", str(job)], env={"IMGQ_DATABASE_URL": database_url})
    assert json.loads(plain.stdout.splitlines()[0])["translations"] == {"de": "[de] caption 0", "fr": "[fr] caption 0"}


def test_a_stored_english_caption_is_found_for_reuse(store):
    make_job(store, "t4")
    digest = CAPTION.params.digest()
    assert store.existing_caption("local", "", "/t4/1.jpg", "v1", "cap-model", "rev1", digest) == ("caption 1", 4, 4)
    # Another version, revision or params is another caption; a translation is never taken for one.
    assert store.existing_caption("local", "", "/t4/1.jpg", "v2", "cap-model", "rev1", digest) is None
    assert store.existing_caption("local", "", "/t4/1.jpg", "v1", "cap-model", "rev2", digest) is None
    assert store.existing_caption("local", "", "/t4/1.jpg", "v1", "cap-model", "rev1", "other") is None


# -- each way a translation can be wrong ----------------------------------------------------------------


def missing_language(store: Store, job: uuid.UUID) -> None:
    sql(store, "DELETE FROM item_translations WHERE job_id = :j AND seq = 1 AND lang = 'fr'", j=job)


def link_to_another_language(store: Store, job: uuid.UUID) -> None:
    sql(store, "UPDATE item_translations SET caption_id = (SELECT caption_id FROM item_translations "
               "WHERE job_id = :j AND seq = 1 AND lang = 'fr') WHERE job_id = :j AND seq = 1 AND lang = 'de'", j=job)


def link_to_another_items_translation(store: Store, job: uuid.UUID) -> None:
    sql(store, "UPDATE item_translations SET caption_id = (SELECT caption_id FROM item_translations "
               "WHERE job_id = :j AND seq = 0 AND lang = 'de') WHERE job_id = :j AND seq = 1 AND lang = 'de'", j=job)


def link_to_the_english_caption(store: Store, job: uuid.UUID) -> None:
    sql(store, "UPDATE item_translations t SET caption_id = i.caption_id FROM job_items i "
               "WHERE i.job_id = t.job_id AND i.seq = t.seq AND t.job_id = :j AND t.seq = 1 AND t.lang = 'de'", j=job)


def translation_by_another_model(store: Store, job: uuid.UUID) -> None:
    sql(store, "UPDATE captions SET via = 'other-mt' WHERE id = (SELECT caption_id FROM item_translations "
               "WHERE job_id = :j AND seq = 1 AND lang = 'de')", j=job)


def translation_of_a_dead_item(store: Store, job: uuid.UUID) -> None:
    sql(store, "INSERT INTO item_translations (job_id, seq, lang, caption_id) SELECT job_id, :dead, lang, caption_id "
               "FROM item_translations WHERE job_id = :j AND seq = 0 AND lang = 'de'", j=job, dead=N - 1)


def a_language_the_job_did_not_ask_for(store: Store, job: uuid.UUID) -> None:
    sql(store, "UPDATE item_translations SET lang = 'ja' WHERE job_id = :j AND seq = 1 AND lang = 'fr'", j=job)


# (fault, the counters `imgq check` prints, its offender lines; {r} is the item's folder)
FAULTS = [
    (missing_language, "missing=1 duplicates=0 mismatched=0 translations=5",
     ["seq 1 {r}/1.jpg: done without its fr translation"]),
    (link_to_another_language, "missing=0 duplicates=0 mismatched=1 translations=6",
     ["seq 1 {r}/1.jpg: de link to a fr translated caption by 'mt-model'"]),
    (link_to_another_items_translation, "missing=0 duplicates=0 mismatched=1 translations=6",
     ["seq 1 {r}/1.jpg: de link to a de translated caption by 'mt-model', not a translation of its own caption"]),
    (link_to_the_english_caption, "missing=0 duplicates=0 mismatched=1 translations=6",
     ["seq 1 {r}/1.jpg: de link to a en native caption by '', not a translation of its own caption"]),
    (translation_by_another_model, "missing=0 duplicates=0 mismatched=1 translations=6",
     ["seq 1 {r}/1.jpg: de link to a de translated caption by 'other-mt'"]),
    (translation_of_a_dead_item, "missing=0 duplicates=0 mismatched=1 translations=7",
     ["seq 3 {r}/3.jpg: state dead with a de translation"]),
    (a_language_the_job_did_not_ask_for, "missing=1 duplicates=0 mismatched=1 translations=6",
     ["seq 1 {r}/1.jpg: done without its fr translation",
      "seq 1 {r}/1.jpg: ja link to a fr translated caption by 'mt-model'"]),
]


@pytest.mark.parametrize(("fault", "counts", "offenders"), FAULTS, ids=[f[0].__name__ for f in FAULTS])
def test_check_catches_a_wrong_translation(store, database_url, fault, counts, offenders):
    job = make_job(store, f"f-{fault.__name__}")
    healthy = make_job(store, f"h-{fault.__name__}")
    fault(store, job)
    rc, out, err = imgq_check(database_url, job)
    assert rc == 1, out
    assert out == f"job {job}: total=4 done=3 dead=1 pending=0 purged=0 {counts}\n"
    assert err.splitlines() == ["  " + line.format(r=f"/f-{fault.__name__}") for line in offenders]
    assert imgq_check(database_url, healthy)[0] == 0
