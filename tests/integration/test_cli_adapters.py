"""`imgq adapter list|register|withdraw` through imgq's typer app, against real Postgres and S3 (moto), on the
tiny checkpoint with real peft adapters: what `register` writes is what a worker's bank accepts, the files are
read under the worker's allow-lists and confinement, only imgq's LoRA layout is registered, a taken name is
replaced only with --replace, and a withdrawn name is gone for workers too."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from imgq import errors
from imgq.cli import app
from imgq.config import Settings
from imgq.contract import CaptionParams
from imgq.db.adapters import AdapterRecord, Adapters
from imgq.db.store import make_engine
from imgq.worker.adapters import AdapterBank
from imgq.worker.model import CaptionModel
from tests.integration.test_adapters import one_thread, write_adapter  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.integration

GREEDY = CaptionParams(max_new_tokens=8)
FILES = ("adapter_config.json", "adapter_model.safetensors")


@pytest.fixture(scope="module")
def roots(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """IMGQ_LOCAL_ROOTS with two adapters of the tiny checkpoint: de/news and fr/news."""
    root = tmp_path_factory.mktemp("adapter-roots").resolve()
    for seed, lang in enumerate(("de", "fr")):
        write_adapter(tiny_model_dir, root / lang / "news", seed)
    return root


@pytest.fixture
def model(tiny_model_dir: Path) -> CaptionModel:
    """The served model; one bank per model, as in a worker."""
    m = CaptionModel(str(tiny_model_dir), device="cpu")
    m.load()
    return m


@pytest.fixture
def env(database_url: str, s3_server: Any, bucket: str, tiny_model_dir: Path, roots: Path,
        tmp_path: Path) -> dict[str, str]:
    return {"IMGQ_DATABASE_URL": database_url, "IMGQ_S3_ENDPOINT_URL": s3_server.url, "IMGQ_ALLOWED_BUCKETS": bucket,
            "IMGQ_LOCAL_ROOTS": str(roots), "IMGQ_CAPTION_MODEL": str(tiny_model_dir), "IMGQ_DEVICE": "cpu",
            "IMGQ_ADAPTER_DIR": str(tmp_path / "adapter-cache")}


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings(_env_file=None, **{k.removeprefix("IMGQ_").lower(): v for k, v in env.items()})


@pytest.fixture
def registry(settings: Settings) -> Iterator[Adapters]:
    engine = make_engine(settings.sync_database_url)
    yield Adapters(engine)
    engine.dispose()


def imgq(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(app, ["adapter", *args], env=env)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def listed(env: dict[str, str]) -> list[dict[str, Any]]:
    result = imgq(env, "list", "--json")
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def pixels() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (4, 3, 384, 384), dtype=np.uint8)


def test_register_a_folder_lists_it_and_a_worker_serves_what_was_registered(
        env: dict[str, str], settings: Settings, registry: Adapters, roots: Path, model: CaptionModel):
    folder = roots / "de" / "news"
    weights, config = sha256(folder / FILES[1]), sha256(folder / FILES[0])
    assert listed(env) == []
    result = imgq(env, "register", "de-news", str(folder), "--lang", "DE")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("registered adapter 'de-news'") and weights[:16] in result.stdout

    table = imgq(env, "list")
    assert table.exit_code == 0, table.output
    header, row = table.stdout.splitlines()
    assert header.split()[:2] == ["NAME", "LANG"]
    assert row.split()[:6] == ["de-news", "de", str(settings.caption_model), model.revision, weights[:16],
                               config[:16]] and row.endswith(str(folder))
    (item,) = listed(env)
    assert item["revision"] == weights and item["config_sha256"] == config and item["created_at"]
    assert (item["lang"], item["location"], item["base_model"], item["base_revision"], item["metrics"]) == (
        "de", str(folder), str(settings.caption_model), model.revision, {})

    # What a worker builds (name through the registry, checked against the served model and its revision;
    # files through AdapterFiles) accepts it, and writes what the adapter itself writes.
    bank = AdapterBank.for_worker(model, settings, registry.engine)
    served = bank.caption(pixels(), GREEDY, ["de-news"] * 4)
    direct = AdapterBank(CaptionModel(model.name, device="cpu"), None, 2).caption(
        pixels(), GREEDY, [AdapterRecord("x", "de", model.name, model.revision, str(folder), weights)] * 4)
    assert served == direct and served != model.caption(pixels(), GREEDY)


def test_register_an_s3_copy(env: dict[str, str], settings: Settings, registry: Adapters, roots: Path,
                             model: CaptionModel, s3_client: Any, bucket: str):
    folder = roots / "fr" / "news"
    for name in FILES:
        s3_client.put_object(Bucket=bucket, Key=f"adapters/fr-news/{name}", Body=(folder / name).read_bytes())
    result = imgq(env, "register", "fr-news", f"s3://{bucket}/adapters/fr-news/", "--lang", "fr")
    assert result.exit_code == 0, result.output
    record = registry.get("fr-news")
    assert record is not None
    assert (record.location, record.revision, record.config_sha256, record.base_revision) == (
        f"s3://{bucket}/adapters/fr-news", sha256(folder / FILES[1]), sha256(folder / FILES[0]), model.revision)
    bank = AdapterBank.for_worker(model, settings, registry.engine)
    assert bank.caption(pixels()[:2], GREEDY, ["fr-news"] * 2) != model.caption(pixels()[:2], GREEDY)
    assert (Path(settings.adapter_dir) / f"fr-news-{record.revision}" / FILES[1]).is_file()


def test_register_refuses_what_a_worker_would_refuse(env: dict[str, str], registry: Adapters, roots: Path,
                                                      tmp_path: Path, s3_client: Any, bucket: str):
    outside = tmp_path / "elsewhere"
    shutil.copytree(roots / "de" / "news", outside)
    refused = imgq(env, "register", "x", str(outside), "--lang", "de")
    assert refused.exit_code == 2 and "error[bad_ref]" in refused.stderr
    assert "outside IMGQ_LOCAL_ROOTS" in refused.stderr
    # A symlink under the root that leads outside it is outside too (the worker's confinement).
    link = roots / "link-out"
    link.symlink_to(outside, target_is_directory=True)
    try:
        escaped = imgq(env, "register", "x", str(link), "--lang", "de")
    finally:
        link.unlink()
    assert escaped.exit_code == 2 and "outside IMGQ_LOCAL_ROOTS" in escaped.stderr
    bucket_refused = imgq(env, "register", "x", "s3://not-allowed/adapters/x", "--lang", "de")
    assert bucket_refused.exit_code == 2 and "error[bad_ref]" in bucket_refused.stderr
    assert "IMGQ_ALLOWED_BUCKETS" in bucket_refused.stderr
    missing = imgq(env, "register", "x", f"s3://{bucket}/nothing-here", "--lang", "de")
    assert missing.exit_code == 2 and "error[adapter_unavailable]" in missing.stderr

    # Another layout than imgq's: a LoRA on other modules, and a config that is not JSON.
    other = roots / "other"
    shutil.copytree(roots / "de" / "news", other)
    config = json.loads((other / FILES[0]).read_text())
    (other / FILES[0]).write_text(json.dumps(config | {"target_modules": ["query", "value"]}))
    layout = imgq(env, "register", "x", str(other), "--lang", "de")
    assert layout.exit_code == 2 and "error[adapter_unavailable]" in layout.stderr
    assert "not imgq's LoRA layout" in layout.stderr
    (other / FILES[0]).write_text("{not json")
    assert "is not JSON" in imgq(env, "register", "x", str(other), "--lang", "de").stderr
    (other / FILES[0]).write_text(json.dumps(config))  # imgq's config again, but weights that are not safetensors
    (other / FILES[1]).write_bytes(b"\0" * 64)
    assert "not a safetensors file" in imgq(env, "register", "x", str(other), "--lang", "de").stderr

    unknown = imgq(env, "register", "x", str(roots / "de" / "news"), "--lang", "xx")
    assert unknown.exit_code == 2 and "error[unknown_language]" in unknown.stderr
    bad_name = imgq(env, "register", "../x", str(roots / "de" / "news"), "--lang", "de")
    assert bad_name.exit_code == 2 and "error[bad_params]" in bad_name.stderr
    assert registry.list() == []
    # Each refusal was for its reason: the same adapter from the root registers.
    assert imgq(env, "register", "x", str(roots / "de" / "news"), "--lang", "de").exit_code == 0


def test_a_taken_name_is_replaced_only_with_replace(env: dict[str, str], registry: Adapters, roots: Path,
                                                    model: CaptionModel, tmp_path: Path):
    de, fr = roots / "de" / "news", roots / "fr" / "news"
    assert imgq(env, "register", "news", str(de), "--lang", "de").exit_code == 0
    before = registry.get("news")
    for args in ((str(fr), "--lang", "fr"), (str(fr), "--lang", "de"), (str(de), "--lang", "fr")):
        taken = imgq(env, "register", "news", *args)
        assert taken.exit_code == 2, taken.output
        assert taken.stderr.startswith("error[adapter_exists]: adapter 'news' is registered for de at ")
        assert "--replace" in taken.stderr and len(taken.stderr.splitlines()) == 1
        assert registry.get("news") == before and registry.get("news").created_at == before.created_at

    replaced = imgq(env, "register", "news", str(fr), "--lang", "fr", "--replace")
    assert replaced.exit_code == 0, replaced.output
    assert replaced.stdout.startswith(f"replaced adapter 'news' (was de at {de}): lang=fr")
    now = registry.get("news")
    assert (now.lang, now.location, now.revision) == ("fr", str(fr), sha256(fr / FILES[1]))

    # Registered again at the same location and language (e.g. after the base model's revision changed):
    # no --replace needed; the base revision is the current one, the metrics of the same weights are kept.
    registry.register(AdapterRecord("news", "fr", model.name, "local-old", str(fr), now.revision, {"chrF": 41.5},
                                    config_sha256="ab" * 32))
    again = imgq(env, "register", "news", str(fr), "--lang", "fr")
    assert again.exit_code == 0 and again.stdout.startswith("re-registered adapter 'news'"), again.output
    record = registry.get("news")
    assert (record.base_revision, record.metrics, record.config_sha256) == (
        model.revision, {"chrF": 41.5}, sha256(fr / FILES[0]))
    # New weights at that location: the metrics were measured on others and are dropped.
    registry.register(AdapterRecord("news", "fr", model.name, model.revision, str(fr), "cd" * 32, {"chrF": 41.5}))
    assert imgq(env, "register", "news", str(fr), "--lang", "fr").exit_code == 0
    assert registry.get("news").metrics == {}


def test_withdraw_removes_the_registration_for_workers_too(env: dict[str, str], settings: Settings,
                                                           registry: Adapters, roots: Path, model: CaptionModel):
    assert imgq(env, "register", "news", str(roots / "de" / "news"), "--lang", "de").exit_code == 0
    bank = AdapterBank.for_worker(model, settings, registry.engine)
    bank.caption(pixels()[:1], GREEDY, ["news"])
    withdrawn = imgq(env, "withdraw", "news")
    assert withdrawn.exit_code == 0, withdrawn.output
    assert "withdrew adapter 'news'" in withdrawn.stdout and "adapter_unavailable" in withdrawn.stdout
    assert registry.get("news") is None and listed(env) == []
    with pytest.raises(errors.AdapterUnavailable, match="no adapter named 'news'"):
        bank.caption(pixels()[:1], GREEDY, ["news"])
    assert (roots / "de" / "news" / FILES[1]).is_file()  # the files stay
    again = imgq(env, "withdraw", "news")
    assert again.exit_code == 2 and again.stderr.startswith("error[unknown_adapter]: no adapter named 'news'")


def test_list_needs_no_torch_and_register_says_it_needs_the_worker_extra(env: dict[str, str], registry: Adapters,
                                                                         roots: Path):
    registry.register(AdapterRecord("old", "de", "m", "local-abc", "/data/old", "ab" * 32))  # before 0016
    table = imgq(env, "list")
    assert table.exit_code == 0 and table.stdout.splitlines()[1].split()[5] == "-", table.output
    # A light install: torch, transformers and peft cannot be imported.
    script = ("import sys\n"
              "for name in ('torch', 'transformers', 'peft'): sys.modules[name] = None\n"
              "from imgq.cli import main\n"
              "sys.argv = ['imgq', 'adapter', *sys.argv[1:]]\n"
              "main()\n")
    light = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")} | env
    out = subprocess.run([sys.executable, "-c", script, "list", "--json"], env=light, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert [json.loads(line)["name"] for line in out.stdout.splitlines()] == ["old"]
    refused = subprocess.run([sys.executable, "-c", script, "register", "x", str(roots / "de" / "news"), "--lang",
                              "de"], env=light, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("error[missing_extra]:"), refused.stderr
    assert "pip install 'imgq[worker]'" in refused.stderr
    assert [r.name for r in registry.list()] == ["old"]
