"""TranslationModel on the tiny random NLLB checkpoint, against itself one sentence at a time and
against plain transformers calls (needs torch, transformers and sentencepiece; no services)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("sentencepiece")

from transformers import AutoModelForSeq2SeqLM, AutoTokenizer  # noqa: E402

from imgq.config import DEFAULT_TRANSLATE_MODEL  # noqa: E402
from imgq.errors import ModelUnavailable  # noqa: E402
from imgq.languages import LANGUAGES  # noqa: E402
from imgq.worker.tiny import MARKER, CheckpointFolderError  # noqa: E402
from imgq.worker.tiny_translate import write_tiny_translation_checkpoint  # noqa: E402
from imgq.worker.translate import Target, TranslationModel, steering, token_budget  # noqa: E402

# Caption-like, from 1 to 28 words, so one micro-batch pads short texts far.
SENTENCES = [
    "a dog",
    "a man riding a wave on top of a surfboard",
    "two people walking down a busy city street next to a red bus on a rainy day while a man on a "
    "bicycle rides past a row of parked cars",
    "a plate of food with broccoli and rice",
    "a black cat lying on a wooden table",
    "a large elephant standing in a grassy field with trees in the background",
    "kitchen",
    "a group of people flying kites on a sandy beach near the ocean on a sunny day",
    "a train",
    "a brown horse pulling a cart down a dirt road in front of a small white house",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the tiny model's ops are too small to split, and on a busy 2-core machine
    two spinning OpenMP threads made a 0.3 s test take 20 s."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_translation_checkpoint(tmp_path_factory.mktemp("translate") / "tiny-nllb", seed=0)


@pytest.fixture(scope="module")
def model(checkpoint: Path) -> TranslationModel:
    model = TranslationModel(str(checkpoint), device="cpu")
    model.load()
    return model


def test_checkpoint_loads_with_the_auto_classes_as_nllb(checkpoint: Path) -> None:
    model = AutoModelForSeq2SeqLM.from_pretrained(checkpoint)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert type(model).__name__ == "M2M100ForConditionalGeneration"
    assert type(tokenizer).__name__ == "NllbTokenizer"
    assert model.config.vocab_size == len(tokenizer)
    codes = [lang.nllb for lang in LANGUAGES.values()]
    ids = tokenizer.convert_tokens_to_ids(codes)
    assert tokenizer.unk_token_id not in ids and len(set(ids)) == len(codes)
    tokenizer.src_lang = "eng_Latn"
    encoded = tokenizer("a dog on a bench")["input_ids"]
    # NLLB's (non-legacy) layout: the source language token first, </s> last, no <unk> in between.
    assert encoded[0] == tokenizer.convert_tokens_to_ids("eng_Latn") and encoded[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in encoded
    assert tokenizer.decode(encoded, skip_special_tokens=True) == "a dog on a bench"
    # The sentencepiece normaliser (NFKC) came along: a compatibility ligature is split as NLLB's is.
    assert tokenizer.decode(tokenizer("ﬁeld")["input_ids"], skip_special_tokens=True) == "field"


def test_checkpoint_is_deterministic_for_a_seed_and_reused_when_complete(checkpoint: Path, tmp_path: Path) -> None:
    files = sorted(p.name for p in checkpoint.iterdir())
    assert MARKER in files and "sentencepiece.bpe.model" in files and "tokenizer.json" in files
    again = write_tiny_translation_checkpoint(tmp_path / "again", seed=0)
    assert all((again / f).read_bytes() == (checkpoint / f).read_bytes() for f in files)
    other = write_tiny_translation_checkpoint(tmp_path / "other", seed=1)
    assert (other / "model.safetensors").read_bytes() != (checkpoint / "model.safetensors").read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (checkpoint / "tokenizer.json").read_bytes()

    stamps = {f: (checkpoint / f).stat().st_mtime_ns for f in files}
    assert write_tiny_translation_checkpoint(checkpoint, seed=0) == checkpoint
    assert {f: (checkpoint / f).stat().st_mtime_ns for f in files} == stamps  # untouched
    # An earlier tiny checkpoint (its marker) of other settings is replaced, and no staging folder is left.
    (again / "stale").write_text("x")
    write_tiny_translation_checkpoint(again, seed=1)
    assert not (again / "stale").exists() and (again / MARKER).exists()
    assert (again / "model.safetensors").read_bytes() == (other / "model.safetensors").read_bytes()
    # Without its marker a folder may be anyone's: it is refused, and nothing in it is deleted.
    (again / MARKER).unlink()
    with pytest.raises(CheckpointFolderError, match="holds no tiny checkpoint"):
        write_tiny_translation_checkpoint(again, seed=0)
    assert (again / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]


@pytest.mark.parametrize("lang", ["de", "ru", "zh"])
def test_batched_translation_equals_one_sentence_at_a_time(model: TranslationModel, lang: str) -> None:
    alone = [model.translate([s], lang)[0] for s in SENTENCES]
    # Distinct, non-empty outputs, so a batch that mixed up rows could not pass by chance.
    assert all(alone) and len(set(alone)) >= len(SENTENCES) - 2, alone
    # micro_batch 3 over 10 texts: 4 micro-batches, each padding texts of different lengths.
    assert model.translate(SENTENCES, lang, micro_batch=3) == alone
    shuffled = [SENTENCES[i] for i in (7, 0, 9, 2, 5, 1, 8, 3, 6, 4)]
    assert model.translate(shuffled, lang, micro_batch=4) == [alone[SENTENCES.index(s)] for s in shuffled]


def test_target_language_changes_the_output(model: TranslationModel) -> None:
    de, fr = model.translate(SENTENCES, "de"), model.translate(SENTENCES, "fr")
    assert sum(a != b for a, b in zip(de, fr, strict=True)) >= len(SENTENCES) // 2


def test_matches_plain_transformers_generate_within_each_texts_own_budget(
    model: TranslationModel, checkpoint: Path
) -> None:
    reference = AutoModelForSeq2SeqLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.src_lang = "eng_Latn"
    texts = SENTENCES[:4]
    expected, ran_to_budget = [], 0
    for text in texts:
        inputs = tokenizer([text], return_tensors="pt")
        budget = token_budget(inputs["input_ids"].shape[1])
        with torch.inference_mode():
            out = reference.generate(**inputs, forced_bos_token_id=tokenizer.convert_tokens_to_ids("deu_Latn"),
                                     num_beams=1, do_sample=False, max_new_tokens=budget)
        ran_to_budget += out.shape[1] == 1 + budget and out[0, -1] != tokenizer.eos_token_id
        expected.append(tokenizer.decode(out[0], skip_special_tokens=True).strip())
    # Short texts that ran to their budget, batched with a far longer one: each is cut at its own.
    assert ran_to_budget >= 2
    assert model.translate(texts, "de", micro_batch=4) == expected


def test_outputs_vary_in_length(model: TranslationModel) -> None:
    lengths = {len(text) for lang in ("de", "fr", "es") for text in model.translate(SENTENCES, lang)}
    assert len(lengths) >= 10 and 0 not in lengths, lengths


def test_order_duplicates_blanks_and_empty_input(model: TranslationModel) -> None:
    assert model.translate([], "de") == []
    a, b = SENTENCES[1], SENTENCES[5]
    ta, tb = model.translate([a, b], "fr")
    assert model.translate([b, "", a, b, "   "], "fr", micro_batch=1) == [tb, "", ta, tb, ""]
    assert model.count_tokens([]) == [] and model.count_tokens(["a dog"])[0] >= 4  # eng_Latn ... </s>


def test_supported_languages(model: TranslationModel) -> None:
    assert model.supports("de") and model.supports(" FR ")
    assert not model.supports("en") and not model.supports("xx")  # English is the source
    assert model.languages() == [code for code in LANGUAGES if code != "en"]
    for lang in ("xx", "en"):
        with pytest.raises(ValueError, match="cannot translate into"):
            model.translate(["a dog"], lang)
    with pytest.raises(ValueError, match="micro_batch"):
        model.translate(["a dog"], "de", micro_batch=0)


def test_concurrent_callers_get_the_same_translations(checkpoint: Path) -> None:
    model = TranslationModel(str(checkpoint), device="cpu")  # loaded by the threads themselves
    texts = [SENTENCES[i] for i in (0, 1, 3, 4, 6)]
    expected = {lang: [model.translate([s], lang)[0] for s in texts] for lang in ("de", "it")}
    results: dict[tuple[str, int], list[str]] = {}

    def run(lang: str, k: int) -> None:
        results[(lang, k)] = model.translate(texts, lang, micro_batch=2)

    threads = [threading.Thread(target=run, args=(lang, k)) for lang in expected for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {(lang, k): expected[lang] for lang in expected for k in range(3)}


def test_revision_of_a_local_checkpoint(model: TranslationModel, checkpoint: Path) -> None:
    assert model.revision.startswith("local-")
    assert TranslationModel(str(checkpoint)).revision == model.revision


def test_hub_id_offline_fails_fast_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # A revision no cache can hold, so a developer's cached copy cannot make this load.
    wrapper = TranslationModel(DEFAULT_TRANSLATE_MODEL, revision="0" * 40)
    start = time.monotonic()
    with pytest.raises(ModelUnavailable) as info:
        wrapper.load()
    assert time.monotonic() - start < 5
    message = info.value.message
    assert "offline" in message and "IMGQ_TRANSLATE_MODEL" in message and "\n" not in message


@pytest.mark.parametrize("kind", ["missing", "not a checkpoint", "not seq2seq"])
def test_unusable_local_directory(tmp_path: Path, kind: str) -> None:
    target = tmp_path / "model"
    if kind != "missing":
        target.mkdir()
    if kind == "not seq2seq":
        (target / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(ModelUnavailable) as info:
        TranslationModel(str(target)).load()
    message = info.value.message
    assert "IMGQ_TRANSLATE_MODEL" in message and "\n" not in message


def test_steering_per_model_family() -> None:
    """Which languages a model can produce, decided from its vocabulary, config and name (pure)."""
    nllb = steering("m2m_100", {"eng_Latn": 5, "deu_Latn": 7, "fra_Latn": 8}, ["facebook/nllb"], None)
    assert nllb == {"de": Target(forced_bos=7), "fr": Target(forced_bos=8)}
    m2m = steering("m2m_100", {"__en__": 5, "__de__": 6}, ["facebook/m2m100_418M"], None)
    assert m2m == {"de": Target(forced_bos=6)}
    # Opus-MT: one pair, named by the tokenizer config or else by the model's name.
    assert steering("marian", {"▁a": 3}, ["Helsinki-NLP/opus-mt-en-de"], None) == {"de": Target()}
    assert steering("marian", {"▁a": 3}, ["/models/opus-mt-en-fr/"], None) == {"fr": Target()}
    assert steering("marian", {"▁a": 3}, ["/models/mine"], "spa") == {"es": Target()}
    assert steering("marian", {"▁a": 3}, ["Helsinki-NLP/opus-mt-de-en"], None) == {}
    romance = steering("marian", {">>fr<<": 1, ">>spa<<": 2, ">>xx<<": 3}, ["Helsinki-NLP/opus-mt-en-ROMANCE"], None)
    assert romance == {"fr": Target(prefix=">>fr<< "), "es": Target(prefix=">>spa<< ")}
    assert steering("t5", {"▁a": 3}, ["t5-small"], None) == {}


def test_dev_tiny_model_writes_a_translation_checkpoint(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imgq.cli import app

    out = CliRunner().invoke(app, ["dev", "tiny-model", "--kind", "translate", str(tmp_path / "mt")])
    assert out.exit_code == 0, out.stderr
    model = TranslationModel(out.stdout.strip(), device="cpu")
    assert model.supports("de") and model.translate(["a dog on a beach"], "de")[0]
