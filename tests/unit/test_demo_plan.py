"""Which models `imgq demo` runs with: the choice (pure) and where a model would come from (a real
folder, a real cache layout, a real socket standing in for the hub's endpoint)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from huggingface_hub import constants

from imgq.demo import plan
from imgq.hub import model_source

CAPTION = "Salesforce/blip-image-captioning-base"
EMBED = "Salesforce/blip-itm-base-coco"


@pytest.mark.parametrize("choice", ["auto", "default"])
@pytest.mark.parametrize("source", ["local", "cached", "hub"])
def test_a_loadable_caption_model_is_used_as_configured(choice, source) -> None:
    chosen = plan(choice, (CAPTION, source), (EMBED, source))
    assert (chosen.tiny, chosen.kinds, chosen.error) == (False, "caption,embed", None)
    downloads = [n for n in chosen.notes if "downloaded from the hub" in n]
    assert len(downloads) == (2 if source == "hub" else 0)


def test_auto_falls_back_to_the_tiny_checkpoints_and_says_why_and_how_to_get_real_captions() -> None:
    chosen = plan("auto", (CAPTION, None), (EMBED, "cached"))
    assert chosen.tiny and chosen.kinds == "caption,embed" and chosen.error is None
    (note,) = chosen.notes
    assert CAPTION in note and "offline" in note and "IMGQ_CAPTION_MODEL" in note and "--model default" in note


def test_default_refuses_in_one_line_naming_the_variable() -> None:
    chosen = plan("default", (CAPTION, None), (EMBED, None))
    assert chosen.error is not None and "\n" not in chosen.error
    assert chosen.error.startswith("error[model_unavailable]: caption model 'Salesforce/")
    assert "IMGQ_CAPTION_MODEL" in chosen.error and not chosen.tiny


@pytest.mark.parametrize("choice", ["auto", "default"])
def test_without_the_retrieval_model_the_demo_captions_only_and_says_so(choice) -> None:
    chosen = plan(choice, (CAPTION, "local"), (EMBED, None))
    assert chosen.kinds == "caption" and not chosen.tiny
    assert any("captioning only" in n and "IMGQ_EMBED_MODEL" in n for n in chosen.notes)


def test_tiny_is_asked_for_and_needs_nothing() -> None:
    assert plan("tiny", (CAPTION, None), (EMBED, None)) == plan("tiny", (CAPTION, "hub"), (EMBED, "hub"))
    assert plan("tiny", (CAPTION, None), (EMBED, None)).tiny


def test_a_folder_is_a_checkpoint_only_with_its_config(tmp_path: Path) -> None:
    assert model_source(str(tmp_path)) is None
    (tmp_path / "config.json").write_text("{}")
    assert model_source(str(tmp_path)) == "local"


def test_a_cached_model_is_found_in_the_cache_layout(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_source("imgq-test/some-model") is None
    snapshot = tmp_path / "models--imgq-test--some-model" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (tmp_path / "models--imgq-test--some-model" / "refs").mkdir()
    (tmp_path / "models--imgq-test--some-model" / "refs" / "main").write_text("abc123")
    assert model_source("imgq-test/some-model") == "cached"


def test_an_uncached_model_comes_from_the_hub_only_when_its_endpoint_answers(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
        assert model_source("imgq-test/some-model") == "hub"
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the variable wins over a reachable endpoint
        assert model_source("imgq-test/some-model") is None
        monkeypatch.delenv("HF_HUB_OFFLINE")
        port = listener.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")  # closed now: nothing answers
    assert model_source("imgq-test/some-model") is None
