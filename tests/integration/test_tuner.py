"""The worker's start-up timing on a real tiny checkpoint (imgq.worker.tuner), and what it leaves alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from imgq.config import Settings, usable_cpus
from imgq.worker import tuner
from imgq.worker.decode import decode
from imgq.worker.runners import build_runners


def _decode(data: bytes):
    return decode(data, max_pixels=50_000_000, target=384)


class Counting:
    """A real runner whose model calls are counted."""

    def __init__(self, runner) -> None:
        self.inner, self.calls = runner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def run(self, pixels, texts, params):
        self.calls += 1
        return self.inner.run(pixels, texts, params)


@pytest.fixture
def runner(tiny_model_dir: Path, tmp_path: Path):
    import torch

    settings = Settings(_env_file=None, caption_model=str(tiny_model_dir), kinds=["caption"], local_roots=[tmp_path])
    caption = build_runners(settings)["caption"]
    caption.load()
    threads = torch.get_num_threads()
    yield Counting(caption)
    torch.set_num_threads(threads)  # the probe sets a process-wide count: leave the session as found


def _settings(tmp_path: Path, **overrides) -> Settings:
    return Settings(_env_file=None, local_roots=[tmp_path], **overrides)


def test_left_at_zero_the_batch_and_threads_come_from_timings_of_the_model(runner, tmp_path):
    import torch

    choice = tuner.resolve(_settings(tmp_path), runner, _decode)
    assert runner.calls == 7  # warm-up, one image twice, then two batch sizes twice each
    assert tuning_bounds(choice.max_batch)
    assert 1 <= choice.torch_threads <= usable_cpus()
    assert torch.get_num_threads() == choice.torch_threads  # applied, not only reported
    assert any("ms per call" in why for why in choice.reasons)
    assert any("decode" in why for why in choice.reasons)


def tuning_bounds(batch: int) -> bool:
    from imgq import tuning

    return tuning.MIN_BATCH <= batch <= tuning.CPU.cap and batch & (batch - 1) == 0


def test_explicit_settings_win_and_nothing_is_timed(runner, tmp_path):
    choice = tuner.resolve(_settings(tmp_path, max_batch=24, torch_threads=1), runner, _decode)
    assert (choice.max_batch, choice.torch_threads, runner.calls) == (24, 1, 0)


def test_an_explicit_batch_still_gets_its_threads_chosen(runner, tmp_path):
    choice = tuner.resolve(_settings(tmp_path, max_batch=24), runner, _decode)
    assert choice.max_batch == 24 and choice.torch_threads >= 1 and runner.calls > 0
    assert "batch set by the operator" in choice.reasons


def test_autotune_off_keeps_the_fixed_defaults(runner, tmp_path):
    choice = tuner.resolve(_settings(tmp_path, autotune=False), runner, _decode)
    assert (choice.max_batch, choice.torch_threads, runner.calls) == (tuner.DEFAULT_BATCH, 0, 0)


def test_a_failing_probe_falls_back_and_the_worker_still_serves(runner, tmp_path, caplog):
    def broken(pixels, texts, params):
        raise RuntimeError("probe exploded")

    runner.run = broken
    choice = tuner.resolve(_settings(tmp_path), runner, _decode)
    assert (choice.max_batch, choice.torch_threads) == (tuner.DEFAULT_BATCH, 0)
    assert "autotune failed (RuntimeError: probe exploded)" in caplog.text
