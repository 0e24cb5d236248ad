"""IMGQ_DRAFT_DECODE: on, JPEGs decode at a reduced scale that still covers the model input; off,
the worker's decode target is None and every JPEG decodes at full size."""

from __future__ import annotations

import pytest

from imgq.config import Settings
from imgq.worker.decode import decode, draft_target
from tests.corpus import jpeg

MAX_PIXELS = 40_000_000
INPUT = 384


def worker_decode(settings: Settings, data: bytes):
    """The decode a worker serving one 384 px model runs (WorkerRuntime.start's decode_once)."""
    return decode(data, max_pixels=settings.max_pixels, target=draft_target([INPUT], settings.draft_decode))


@pytest.fixture
def photo() -> bytes:
    return jpeg(1600, 1200)


def test_draft_decoding_is_on_by_default_and_reduces_a_large_jpeg_no_lower_than_the_input(monkeypatch, photo):
    monkeypatch.delenv("IMGQ_DRAFT_DECODE", raising=False)
    settings = Settings(_env_file=None)
    assert settings.draft_decode is True
    decoded = worker_decode(settings, photo)
    assert decoded.image.size == (800, 600)  # 1/2 scale: 1/4 would be 300 px high, below 384
    assert (decoded.width, decoded.height) == (1600, 1200)  # the original's size is still reported


@pytest.mark.parametrize("value", ["0", "false"])
def test_imgq_draft_decode_off_decodes_at_full_size(monkeypatch, photo, value):
    monkeypatch.setenv("IMGQ_DRAFT_DECODE", value)
    settings = Settings(_env_file=None)
    assert settings.draft_decode is False
    decoded = worker_decode(settings, photo)
    assert decoded.image.size == (1600, 1200)


def test_the_target_covers_every_model_the_worker_serves():
    assert draft_target([224, 384], True) == 384
    assert draft_target([224, 384], False) is None
