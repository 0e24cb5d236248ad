"""The engine's stages (translate after caption) and mixed-adapter batches, with in-memory fakes."""

from __future__ import annotations

import uuid

import pytest

from imgq.contract import CaptionParams, make_task
from imgq.params import TranslateParams
from imgq.ports import CaptionText
from imgq.worker.engine import Engine, _Entry
from imgq.worker.fakes import EchoRunner, EchoTranslator, MemoryResults
from tests.unit.test_engine import DECODES, decode, fetch
from tests.waits import SETTLE_S


def make(results: MemoryResults, captioner: EchoRunner, translator: EchoTranslator, max_batch: int = 8) -> Engine:
    return Engine(store=results, runners={"caption": captioner, "translate": translator}, fetch=fetch,  # type: ignore[arg-type]
                  decode=decode, worker_name="w", max_batch=max_batch, max_wait_s=0.01, decode_threads=2,
                  db_retry_s=2.0).start()


def tasks(*langs: str, params: CaptionParams | None = None) -> list:
    return [make_task("caption", "echo", params or CaptionParams()),
            make_task("translate", "echo-mt", TranslateParams(langs=list(langs)))]


def settle(engine: Engine, job: uuid.UUID, refs: list[str], task_list: list) -> dict[int, tuple[str, str | None]]:
    work = engine.submit(job, task_list, list(enumerate(refs)))
    return {item.seq: (o.state, o.code) for item in work for o in [item.future.result(SETTLE_S)]}


def stored_key(ref: str, params: CaptionParams, version: str = "v", revision: str = "echo-1") -> tuple[str, ...]:
    """The key a caption of ``ref`` (tests/unit/test_engine.py's fetch: a local blob, version "v")
    is stored under for the echo captioner."""
    return ("local", "", ref, version, "echo", revision, params.digest())


@pytest.fixture
def results() -> MemoryResults:
    return MemoryResults()


def test_each_caption_is_translated_into_every_language_in_batches_of_one_language(results):
    captioner, translator = EchoRunner(), EchoTranslator()
    engine = make(results, captioner, translator)
    outcomes = settle(engine, uuid.uuid4(), [f"img-0.{i}" for i in range(1, 7)], tasks("de", "fr"))
    engine.stop()
    assert set(outcomes.values()) == {("done", None)}
    for done in results.done:
        english = done.results["caption"][4]
        translated = done.results["translate"][4]
        assert set(translated) == {"de", "fr"}
        assert translated["de"] == f"de: {english}" and translated["fr"] == f"fr: {english}"
        assert isinstance(translated["de"], CaptionText) and translated["de"].via == "echo-mt"
        assert done.results["translate"][:2] == ("echo-mt", "mt-1")
    # Grouped by language: every translation batch is one language; 12 translations in all.
    assert sum(n for _, n in translator.batches) == 12
    assert {lang for lang, _ in translator.batches} == {"de", "fr"}
    assert not engine._remaining


def test_languages_of_different_jobs_share_batches(results):
    captioner, translator = EchoRunner(), EchoTranslator()
    engine = make(results, captioner, translator, max_batch=16)
    a = engine.submit(uuid.uuid4(), tasks("de"), [(0, "img-0.1"), (1, "img-0.2")])
    b = engine.submit(uuid.uuid4(), tasks("de", "ja"), [(0, "img-0.3"), (1, "img-0.4")])
    for item in [*a, *b]:
        assert item.future.result(SETTLE_S).state == "done"
    engine.stop()
    assert sum(n for lang, n in translator.batches if lang == "de") == 4
    assert sum(n for lang, n in translator.batches if lang == "ja") == 2
    # Whether two jobs' items meet in one call depends on timing; that they may is the batch key:
    # a language's entries of different jobs (and other language lists) share it, other languages not.
    de_a, de_b = _Entry(a[0], a[0].tasks[1], "de"), _Entry(b[0], b[0].tasks[1], "de")
    ja_b = _Entry(b[0], b[0].tasks[1], "ja")
    assert de_a.key() == de_b.key() != ja_b.key()


def test_a_stored_english_caption_is_translated_without_running_the_captioner_again(results):
    captioner, translator = EchoRunner(), EchoTranslator()
    results.stored[stored_key("img-0.5", CaptionParams())] = ("an old caption", 640, 480)
    engine = make(results, captioner, translator)
    DECODES.clear()
    outcomes = settle(engine, uuid.uuid4(), ["img-0.5", "img-0.25"], tasks("de"))
    engine.stop()
    assert set(outcomes.values()) == {("done", None)}
    by_seq = {d.seq: d for d in results.done}
    assert by_seq[0].results["caption"][4] == "an old caption"
    assert by_seq[0].results["translate"][4] == {"de": "de: an old caption"}
    assert (by_seq[0].obj.width, by_seq[0].obj.height) == (640, 480)  # the stored image's size
    assert DECODES == ["img-0.25"]  # the reused item is not even decoded
    assert sum(captioner.batches) == 1 and engine.stats["reused"] == 1


@pytest.mark.parametrize("key", [stored_key("img-0.5", CaptionParams(), version="v0"),
                                 stored_key("img-0.5", CaptionParams(), revision="echo-0"),
                                 stored_key("img-0.5", CaptionParams(max_new_tokens=7)),
                                 ("s3", "", "img-0.5", "v", "echo", "echo-1", CaptionParams().digest())])
def test_a_caption_of_another_version_revision_params_or_source_is_not_reused(results, key):
    captioner, translator = EchoRunner(), EchoTranslator()
    results.stored[key] = ("an old caption", 640, 480)
    engine = make(results, captioner, translator)
    settle(engine, uuid.uuid4(), ["img-0.5"], tasks("de"))
    engine.stop()
    assert results.done[0].results["caption"][4] != "an old caption"
    assert sum(captioner.batches) == 1 and engine.stats["reused"] == 0


def test_an_explained_caption_is_never_reused(results):
    captioner, translator = EchoRunner(), EchoTranslator()
    params = CaptionParams(explain=True)
    results.stored[stored_key("img-0.5", params)] = ("an old caption", 640, 480)
    engine = make(results, captioner, translator)
    settle(engine, uuid.uuid4(), ["img-0.5"], tasks("de", params=params))
    engine.stop()
    assert sum(captioner.batches) == 1 and engine.stats["reused"] == 0


def test_a_failed_caption_settles_its_item_and_drops_its_translations(results):
    captioner, translator = EchoRunner(poison=0.5), EchoTranslator()
    engine = make(results, captioner, translator)
    outcomes = settle(engine, uuid.uuid4(), ["img-0.1", "img-0.5", "img-0.3"], tasks("de", "fr"))
    engine.stop()
    assert outcomes[1] == ("dead", "model_error")
    assert outcomes[0] == outcomes[2] == ("done", None)
    assert sum(n for _, n in translator.batches) == 4  # the dead item's two were never run
    assert not engine._remaining  # nothing left counting (its decode slot is free again)


def test_a_translation_that_fails_alone_dead_letters_only_its_item(results):
    captioner, translator = EchoRunner(), EchoTranslator(poison="0.300")
    engine = make(results, captioner, translator)
    outcomes = settle(engine, uuid.uuid4(), ["img-0.1", "img-0.3", "img-0.2"], tasks("de"))
    engine.stop()
    assert outcomes[1] == ("dead", "model_error")
    assert outcomes[0] == outcomes[2] == ("done", None)
    assert not engine._remaining


def test_a_language_the_model_cannot_write_is_dead_lettered_before_any_work(results):
    captioner, translator = EchoRunner(), EchoTranslator(langs=("de",))
    engine = make(results, captioner, translator)
    outcomes = settle(engine, uuid.uuid4(), ["img-0.1"], tasks("de", "ko"))
    engine.stop()
    assert outcomes[0] == ("dead", "unsupported_language")
    assert captioner.batches == [] and translator.batches == []


def test_captions_of_different_adapters_share_one_batch(results):
    captioner = EchoRunner()
    engine = Engine(store=results, runners={"caption": captioner}, fetch=fetch, decode=decode,  # type: ignore[arg-type]
                    worker_name="w", max_batch=8, max_wait_s=0.05, decode_threads=2).start()
    jobs = [(uuid.uuid4(), CaptionParams(adapter=name)) for name in ("de-news", "fr-art", None)]
    work = [item for i, (job, params) in enumerate(jobs)
            for item in engine.submit(job, [make_task("caption", "echo", params)], [(0, f"img-0.{i + 1}")])]
    assert {item.future.result(SETTLE_S).state for item in work} == {"done"}
    engine.stop()
    assert sorted((a for b in captioner.adapter_batches for a in b), key=str) == [None, "de-news", "fr-art"]
    assert len(captioner.adapter_batches) < 3  # at least two adapters shared a generate
    captions = {d.job: d.results["caption"][4] for d in results.done}
    assert captions[jobs[0][0]].startswith("de-news ") and captions[jobs[2][0]] == "mean 0.300"


def test_adapter_params_keep_plain_digests_and_share_a_batch_digest():
    plain, adapted = CaptionParams(), CaptionParams(adapter="de-news")
    assert "adapter" not in plain.canonical()  # captions stored before adapters keep their identity
    assert adapted.digest() != plain.digest()
    assert adapted.batch_digest() == plain.batch_digest()
