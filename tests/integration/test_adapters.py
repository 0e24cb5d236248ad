"""Per-language LoRA adapters against real Postgres and S3 (moto), on the tiny checkpoint: the registry, mixed
adapter batches vs one adapter at a time, the LRU, and what a worker refuses (a wrong hash, another base model,
a location outside the allow-lists). The adapters are random LoRA weights in peft's saved layout."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlalchemy as sa
import torch

from imgq import errors
from imgq.config import Settings
from imgq.contract import CaptionParams
from imgq.db.adapters import AdapterRecord, Adapters
from imgq.db.store import make_engine
from imgq.worker.adapters import AdapterBank, AdapterFiles
from imgq.worker.model import CaptionModel
from tests.waits import SETTLE_S, lock_waited

pytestmark = pytest.mark.integration

GREEDY = CaptionParams(max_new_tokens=8)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    # The tiny model gains nothing from threads, and OpenMP spinning on a shared 2-core machine costs 100x.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_adapter(model_dir: Path, out: Path, seed: int) -> str:
    """Random LoRA weights (A and B non-zero, so the adapter changes captions) saved by peft; returns the
    SHA-256 of the weights."""
    from peft import get_peft_model

    from imgq.worker.lora import lora_config

    model = CaptionModel(str(model_dir), device="cpu")
    model.load()
    peft_model = get_peft_model(model._model, lora_config(4, 8))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.6)
    peft_model.save_pretrained(str(out))
    return hashlib.sha256((out / "adapter_model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("adapters")
    return {name: (root / name, write_adapter(tiny_model_dir, root / name, seed))
            for seed, name in enumerate(["a", "b", "c"])}


def record(name: str, dirs: dict[str, tuple[Path, str]], model: CaptionModel, **changes: Any) -> AdapterRecord:
    folder, revision = dirs[name]
    fields = {"name": name, "lang": "de", "base_model": model.name, "base_revision": model.revision,
              "location": str(folder), "revision": revision} | changes
    return AdapterRecord(**fields)


@pytest.fixture
def model(tiny_model_dir: Path) -> CaptionModel:
    m = CaptionModel(str(tiny_model_dir), device="cpu")
    m.load()
    return m


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, (8, 3, 384, 384), dtype=np.uint8)


def test_mixed_batches_equal_one_adapter_at_a_time(model: CaptionModel, adapter_dirs: Any, pixels: np.ndarray):
    base = model.caption(pixels, GREEDY)
    bank = AdapterBank(model, None, capacity=4)
    recs = {n: record(n, adapter_dirs, model) for n in "abc"}
    rows = [recs["a"], recs["b"], None, recs["a"], recs["c"], recs["b"], None, recs["c"]]
    for params in (GREEDY, CaptionParams(max_new_tokens=8, num_beams=2)):
        plain = model.caption(pixels, params)
        mixed = bank.caption(pixels, params, rows)
        expected: list[str | None] = [None] * len(rows)
        for name in "abc":
            idx = [i for i, r in enumerate(rows) if r is not None and r.name == name]
            one = bank.caption(pixels[idx], params, [recs[name]] * len(idx))
            for i, text in zip(idx, one, strict=True):
                expected[i] = text
        for i, r in enumerate(rows):
            if r is None:
                expected[i] = plain[i]
        assert mixed == expected, params
    # The adapters do change captions, each its own way; the base model is untouched by loading them.
    per_adapter = {n: bank.caption(pixels, GREEDY, [recs[n]] * 8) for n in "abc"}
    assert all(per_adapter[n] != base for n in "abc")
    assert len({tuple(v) for v in per_adapter.values()}) == 3
    assert model.caption(pixels, GREEDY) == base
    assert bank.caption(pixels, GREEDY, [None] * 8) == base
    assert sorted(bank.loaded) == ["a", "b", "c"] and bank.loads == 3


def test_lru_evicts_least_recently_used_and_reloads_it(model: CaptionModel, adapter_dirs: Any, pixels: np.ndarray):
    bank = AdapterBank(model, None, capacity=2)
    a, b, c = (record(n, adapter_dirs, model) for n in "abc")
    first_a = bank.caption(pixels, GREEDY, [a] * 8)
    bank.caption(pixels[:2], GREEDY, [b, b])
    bank.caption(pixels[:2], GREEDY, [c, c])
    assert bank.loaded == ["b", "c"] and bank.loads == 3  # a was least recently used
    bank.caption(pixels[:1], GREEDY, [b])  # b is now the most recent: loading a evicts c
    assert bank.caption(pixels, GREEDY, [a] * 8) == first_a
    assert bank.loaded == ["b", "a"] and bank.loads == 4
    # A batch that needs more adapters than the capacity still runs, then the bank shrinks back.
    mixed = bank.caption(pixels[:3], GREEDY, [a, b, c])
    assert mixed[0] == first_a[0]
    assert len(bank.loaded) == 2


def test_wrong_hash_and_wrong_base_are_refused(model: CaptionModel, adapter_dirs: Any, pixels: np.ndarray,
                                               tmp_path: Path):
    bank = AdapterBank(model, None, capacity=2)
    with pytest.raises(errors.AdapterUnavailable, match="SHA-256"):
        bank.caption(pixels[:1], GREEDY, [record("a", adapter_dirs, model, revision="0" * 64)])
    # The same name and revision, but the file changed since it was registered.
    folder = adapter_dirs["b"][0]
    tampered = tmp_path / "b"
    tampered.mkdir()
    (tampered / "adapter_config.json").write_bytes((folder / "adapter_config.json").read_bytes())
    weights = bytearray((folder / "adapter_model.safetensors").read_bytes())
    weights[-1] ^= 1
    (tampered / "adapter_model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(errors.AdapterUnavailable, match="registered revision"):
        bank.load(record("b", adapter_dirs, model, location=str(tampered)))
    with pytest.raises(errors.AdapterUnavailable, match="trained on"):
        bank.load(record("a", adapter_dirs, model, base_model="Salesforce/blip-image-captioning-base"))
    assert bank.loaded == [] and bank.loads == 0
    assert model.caption(pixels[:2], GREEDY) == bank.caption(pixels[:2], GREEDY, [None, None])


@pytest.mark.parametrize("config", ['{"peft_type": "LORA", ', "[1, 2]", '{"peft_type": "LORA", "target_modules": 5}',
                                    None])
def test_an_unreadable_config_or_missing_files_refuse_the_adapter_not_the_worker(
        model: CaptionModel, adapter_dirs: Any, pixels: np.ndarray, tmp_path: Path, config: str | None):
    """The weights' hash (the revision) does not cover the config: a truncated config raised
    JSONDecodeError, retried as a transient failure; every batch of the adapter failed, and the
    strikes stopped the worker (exit 3, its items queued for the next worker to die on). Files
    deleted from the location were dead-lettered as not_found, as if the image were missing."""
    folder = tmp_path / "a"
    shutil.copytree(adapter_dirs["a"][0], folder)
    if config is None:
        (folder / "adapter_model.safetensors").unlink()
    else:
        (folder / "adapter_config.json").write_text(config)
    bank = AdapterBank(model, None, capacity=2)
    with pytest.raises(errors.AdapterUnavailable, match="adapter 'a'"):
        bank.load(record("a", adapter_dirs, model, location=str(folder)))
    if config is None:  # as a worker reads it: through the allow-listed location
        settings = Settings(_env_file=None, local_roots=[tmp_path], adapter_dir=tmp_path / "cache")
        with pytest.raises(errors.AdapterUnavailable, match="cannot read"):
            AdapterFiles(settings)(record("a", adapter_dirs, model, location=str(folder)))
    assert bank.loaded == [] and model.caption(pixels[:1], GREEDY) == bank.caption(pixels[:1], GREEDY, [None])


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def edit_alpha(folder: Path, lora_alpha: int) -> None:
    """``lora_alpha`` edited in place: the weights, so the revision, stay the same."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["lora_alpha"] != lora_alpha
    (folder / "adapter_config.json").write_text(json.dumps(config | {"lora_alpha": lora_alpha}, indent=2))


def test_a_config_edited_after_registration_is_refused(model: CaptionModel, adapter_dirs: Any, pixels: np.ndarray,
                                                       tmp_path: Path):
    """The revision covers the weights only; ``lora_alpha`` edited in place changed the captions while they
    kept the same ``via_revision``. A record pins its config's digest too (migration 0016); one from
    before has none and loads as it always did."""
    folder = tmp_path / "a"
    shutil.copytree(adapter_dirs["a"][0], folder)
    config = folder / "adapter_config.json"
    pinned = record("a", adapter_dirs, model, location=str(folder), config_sha256=sha256_of(config))
    running = AdapterBank(model, None, capacity=4)  # a worker that loaded the adapter before the edit
    registered = running.caption(pixels[:4], GREEDY, [pinned] * 4)
    edit_alpha(folder, 64)
    fresh = AdapterBank(CaptionModel(model.name, device="cpu"), None, capacity=4)  # one bank per model
    with pytest.raises(errors.AdapterUnavailable, match=r"adapter 'a': adapter_config\.json has SHA-256 "
                       rf"{sha256_of(config)[:16]}\.\.\., not its registered "
                       rf"{pinned.config_sha256[:16]}\.\.\..*re-register it.*imgq finetune") as refused:
        fresh.caption(pixels[:4], GREEDY, [pinned] * 4)
    assert "\n" not in refused.value.message
    assert fresh.loaded == [] and fresh.loads == 0
    # Registered again with the new config's digest (same weights, same revision), it loads, in a running
    # worker too (not the slot loaded with the old config); the edit did change the captions.
    again = record("a", adapter_dirs, model, location=str(folder), config_sha256=sha256_of(config))
    edited = fresh.caption(pixels[:4], GREEDY, [again] * 4)
    assert edited != registered
    assert running.caption(pixels[:4], GREEDY, [again] * 4) == edited and running.loads == 2
    # A registration from before 0016 pins no config: not checked, as before.
    legacy = record("a", adapter_dirs, model, location=str(folder))
    assert legacy.config_sha256 is None
    assert fresh.caption(pixels[:4], GREEDY, [legacy] * 4) == edited


def test_a_cached_copy_is_reused_only_with_the_registered_config(model: CaptionModel, adapter_dirs: Any,
                                                                  pixels: np.ndarray, tmp_path: Path):
    """A worker's copy in IMGQ_ADAPTER_DIR was reused when its weights matched: after the config was edited
    and the adapter registered again (same weights, same revision, same folder name), that worker kept
    the old config while a fresh one read the new, and they wrote different captions under one revision."""
    source = tmp_path / "roots" / "a"
    shutil.copytree(adapter_dirs["a"][0], source)
    settings = Settings(_env_file=None, local_roots=[tmp_path / "roots"], adapter_dir=tmp_path / "cache")
    fresh_settings = Settings(_env_file=None, local_roots=[tmp_path / "roots"], adapter_dir=tmp_path / "fresh")
    v1 = (source / "adapter_config.json").read_bytes()
    pinned = record("a", adapter_dirs, model, location=str(source), config_sha256=hashlib.sha256(v1).hexdigest())
    files = AdapterFiles(settings)
    cached = files(pinned)
    assert (cached / "adapter_config.json").read_bytes() == v1

    edit_alpha(source, 64)
    v2 = (source / "adapter_config.json").read_bytes()
    # Not registered again: the cached copy is the registered config; a fresh worker refuses the edited one.
    assert files(pinned) == cached and (cached / "adapter_config.json").read_bytes() == v1
    with pytest.raises(errors.AdapterUnavailable, match=r"adapter_config\.json has SHA-256.*re-register"):
        AdapterFiles(fresh_settings)(pinned)
    with pytest.raises(errors.AdapterUnavailable, match=r"adapter_config\.json has SHA-256"):
        AdapterBank(CaptionModel(model.name, device="cpu"), AdapterFiles(fresh_settings), 2).load(pinned)
    assert not (tmp_path / "fresh" / cached.name).exists()

    # Registered again with the edited config: the worker with the old copy fetches the new config, and
    # writes what a fresh worker writes.
    again = record("a", adapter_dirs, model, location=str(source), config_sha256=hashlib.sha256(v2).hexdigest())
    assert files(again) == cached and (cached / "adapter_config.json").read_bytes() == v2
    old_worker = AdapterBank(model, files, 2).caption(pixels[:4], GREEDY, [again] * 4)
    other = CaptionModel(model.name, device="cpu")
    assert AdapterBank(other, AdapterFiles(fresh_settings), 2).caption(pixels[:4], GREEDY, [again] * 4) == old_worker

    # A cached copy whose config was edited in place is not reused either.
    edit_alpha(cached, 3)
    assert files(again) == cached and (cached / "adapter_config.json").read_bytes() == v2
    # A record from before 0016 (no config digest) reuses a copy whose weights match, as before.
    edit_alpha(cached, 5)
    legacy = record("a", adapter_dirs, model, location=str(source))
    assert files(legacy) == cached and json.loads((cached / "adapter_config.json").read_text())["lora_alpha"] == 5


def test_registry_upserts_and_require_explains(database_url: str):
    engine = make_engine(database_url)
    registry = Adapters(engine)
    rec = AdapterRecord("blip-de", "de", "cap-model", "local-abc", "/data/adapters/blip-de", "ab" * 32,
                        {"chrf": 41.5})
    registry.register(rec)
    assert registry.get("blip-de") == rec
    newer = AdapterRecord("blip-de", "de", "cap-model", "local-abc", "s3://models/blip-de", "cd" * 32, {})
    registry.register(newer)  # re-registering a name replaces it
    assert registry.list() == [newer]
    assert registry.require("blip-de", "cap-model") == newer
    with pytest.raises(errors.UnknownAdapter, match="no adapter named 'blip-fr'; registered: blip-de"):
        registry.require("blip-fr", "cap-model")
    with pytest.raises(errors.UnknownAdapter, match="trained on caption model 'cap-model'"):
        registry.require("blip-de", "other-model")
    with pytest.raises(errors.UnknownAdapter, match="revision"):
        registry.require("blip-de", "cap-model", base_revision="local-xyz")
    with pytest.raises(errors.BadParams, match="adapter name"):
        registry.register(AdapterRecord("../x", "de", "m", "r", "/x", "ab" * 32))
    with pytest.raises(errors.BadParams, match="SHA-256"):
        registry.register(AdapterRecord("x", "de", "m", "r", "/x", "not-a-hash"))
    # The config's digest (migration 0016) is stored and read back; a record without one reads as None.
    assert newer.config_sha256 is None and registry.get("blip-de").config_sha256 is None
    pinned = AdapterRecord("blip-de", "de", "cap-model", "local-abc", "/data/adapters/blip-de", "ab" * 32, {},
                           config_sha256="ef" * 32)
    registry.register(pinned)
    assert registry.get("blip-de") == pinned
    registry.register(newer)  # registered again without one: not pinned any more
    assert registry.get("blip-de") == newer
    with pytest.raises(errors.BadParams, match="config_sha256"):
        registry.register(AdapterRecord("x", "de", "m", "r", "/x", "ab" * 32, config_sha256="not-a-hash"))
    engine.dispose()


def test_a_registration_racing_a_first_one_returns_what_it_replaced(database_url: str):
    """Two first registrations of one name: the later one waits for the earlier and replaces it,
    so `imgq adapter register` says "re-registered" or "replaced", never "registered" twice."""
    engine = make_engine(database_url)
    registry = Adapters(engine)
    first = AdapterRecord("blip-race", "de", "cap-model", "local-abc", "/data/adapters/a", "ab" * 32, {})
    second = dataclasses.replace(first, location="/data/adapters/b", revision="cd" * 32)
    found: list[Any] = []
    with engine.connect() as other:
        tx = other.begin()  # the first registration, between its insert and its commit
        other.execute(sa.text("INSERT INTO adapters (name, lang, base_model, base_revision, location, revision, "
                           "metrics) VALUES ('blip-race', 'de', 'cap-model', 'local-abc', '/data/adapters/a', "
                           ":rev, '{}')"), {"rev": "ab" * 32})
        racing = threading.Thread(target=lambda: found.append(registry.register(second)))
        racing.start()
        assert lock_waited(engine), "the second registration never waited for the first's uncommitted row"
        tx.commit()
    racing.join(SETTLE_S)
    assert found == [first], "the second replaced the first: it must say so"
    assert registry.get("blip-race").location == "/data/adapters/b"
    engine.dispose()


def test_worker_bank_reads_s3_and_local_roots_only(model: CaptionModel, adapter_dirs: Any, pixels: np.ndarray,
                                                   database_url: str, s3_server: Any, s3_client: Any, bucket: str,
                                                   tmp_path: Path):
    folder_a, rev_a = adapter_dirs["a"]
    folder_b, rev_b = adapter_dirs["b"]
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        s3_client.put_object(Bucket=bucket, Key=f"adapters/a/{name}", Body=(folder_a / name).read_bytes())
    settings = Settings(_env_file=None, database_url=database_url, s3_endpoint_url=s3_server.url,
                        allowed_buckets=[bucket], local_roots=[folder_b.parent], adapter_dir=tmp_path / "cache",
                        caption_model=model.name)
    engine = make_engine(settings.sync_database_url)
    registry = Adapters(engine)
    registry.register(record("a", adapter_dirs, model, location=f"s3://{bucket}/adapters/a"))
    registry.register(record("b", adapter_dirs, model))  # a folder under IMGQ_LOCAL_ROOTS
    bank = AdapterBank.for_worker(model, settings, engine)
    other = CaptionModel(model.name, device="cpu")  # one bank per model, as in a worker
    reference = AdapterBank(other, None, capacity=4)
    direct = reference.caption(pixels[:4], GREEDY, [record("a", adapter_dirs, model)] * 2
                               + [record("b", adapter_dirs, model)] * 2)
    assert bank.caption(pixels[:4], GREEDY, ["a", "a", "b", "b"]) == direct
    assert (tmp_path / "cache" / f"a-{rev_a}" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "cache" / f"b-{rev_b}" / "adapter_model.safetensors").is_file()
    # The dead letter is the tenant's to read: it names neither the other adapters nor the model.
    with pytest.raises(errors.AdapterUnavailable, match="no adapter named 'nope'") as refused:
        bank.caption(pixels[:1], GREEDY, ["nope"])
    assert refused.value.message == "no adapter named 'nope' is registered now (withdrawn after the job was accepted?)"
    registry.register(dataclasses.replace(record("a", adapter_dirs, model), name="old",
                                          base_revision="local-000000000000"))
    with pytest.raises(errors.AdapterUnavailable, match="another caption model or revision") as refused:
        bank.caption(pixels[:1], GREEDY, ["old"])
    assert model.name not in refused.value.message and "local-000000000000" not in refused.value.message

    files = AdapterFiles(settings)
    shutil.copytree(adapter_dirs["c"][0], tmp_path / "elsewhere")
    outside = record("c", adapter_dirs, model, location=str(tmp_path / "elsewhere"))  # not under IMGQ_LOCAL_ROOTS
    with pytest.raises(errors.AdapterUnavailable, match="outside IMGQ_LOCAL_ROOTS"):
        AdapterBank(model, files, 2).load(outside)
    with pytest.raises(errors.AdapterUnavailable, match="IMGQ_ALLOWED_BUCKETS"):
        files(record("a", adapter_dirs, model, location="s3://not-allowed/adapters/a"))
    engine.dispose()


def test_fused_attention_runs_the_lora_layers(tiny_model_dir: Path, adapter_dirs: Any, pixels: np.ndarray):
    """The SDPA decoder (imgq.worker.attention) calls query/key/value as modules, so LoRA applies there
    exactly as on transformers' eager path."""
    texts = {}
    for attention in ("eager", "sdpa"):
        m = CaptionModel(str(tiny_model_dir), device="cpu", attention=attention)
        m.load()
        bank = AdapterBank(m, None, capacity=2)
        rec = record("a", adapter_dirs, m)
        texts[attention] = (m.caption(pixels, GREEDY), bank.caption(pixels, GREEDY, [rec, None] * 4))
    assert texts["sdpa"] == texts["eager"]
    base, mixed = texts["sdpa"]
    assert [mixed[i] for i in range(1, 8, 2)] == [base[i] for i in range(1, 8, 2)]
    assert [mixed[i] for i in range(0, 8, 2)] != [base[i] for i in range(0, 8, 2)]
