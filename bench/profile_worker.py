"""``imgq worker`` with stage timers and (optionally) per-thread cProfile, for ``bench.pipeline --profile``.

Same CLI as ``python -m imgq.cli``; nothing in imgq is edited: the stages are wrapped by monkeypatching.
Writes to $BENCH_PROFILE_DIR at exit (SIGTERM -> Celery warm shutdown):

* ``stages.json``: per stage (fetch, decode, preprocess, caption generate and detokenise or
  ``embed_images``, the engine's model batches, DB claim, DB write, message handling): calls, wall
  seconds, and the calling thread's CPU seconds (torch's extra intra-op threads are not in the
  latter; the process total is); and ``batch_sizes``: how many model batches of each size ran;
* ``cprofile.txt`` (with BENCH_CPROFILE=1): every thread's cProfile merged, top functions by tottime.
"""

from __future__ import annotations

import atexit
import cProfile
import functools
import json
import os
import pstats
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

OUT = Path(os.environ.get("BENCH_PROFILE_DIR", ".imgq/bench/profile"))
STAGES: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0.0])
_LOCK = threading.Lock()
_PROFILES: list[cProfile.Profile] = []
BATCH_SIZES: dict[int, int] = defaultdict(int)
_T0 = time.monotonic()


def timed(name: str, fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        w, c = time.perf_counter(), time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            dw, dc = time.perf_counter() - w, time.thread_time() - c
            with _LOCK:
                s = STAGES[name]
                s[0] += 1
                s[1] += dw
                s[2] += dc

    return wrapper


def _count_batches(fn: Any) -> Any:
    @functools.wraps(fn)
    def wrapper(self: Any, entries: list[Any]) -> Any:
        with _LOCK:
            BATCH_SIZES[len(entries)] += 1
        return fn(self, entries)

    return wrapper


def install() -> None:
    from imgq.db.store import Store
    from imgq.worker import app as worker_app
    from imgq.worker import service
    from imgq.worker.engine import Engine
    from imgq.worker.fetch import Fetcher
    from imgq.worker.model import CaptionModel
    from imgq.worker.preprocess import Preprocessor
    from imgq.worker.retrieval import RetrievalModel

    Fetcher.fetch = timed("fetch", Fetcher.fetch)
    worker_app.decode = timed("decode (Pillow, draft)", worker_app.decode)
    Preprocessor.__call__ = timed("preprocess (resize+normalise, letterbox)", Preprocessor.__call__)
    Preprocessor.pixels = timed("preprocess pixels (resize to uint8)", Preprocessor.pixels)
    CaptionModel.generate_ids = timed("model generate", CaptionModel.generate_ids)
    CaptionModel.caption = timed("model caption (generate + detokenise)", CaptionModel.caption)
    RetrievalModel.embed_images = timed("model embed_images", RetrievalModel.embed_images)
    Engine._run = timed("engine model batch (stack + runner.run)", _count_batches(Engine._run))
    Store.claim = timed("db claim", Store.claim)
    Store.write_done = timed("db write_done", Store.write_done)
    Store.write_dead = timed("db write_dead", Store.write_dead)
    Store.release = timed("db release", Store.release)
    service.MessageService.handle = timed("message handle (wall, incl. waiting)", service.MessageService.handle)
    service.TaskMessage.model_validate = timed("message validate", service.TaskMessage.model_validate)

    if os.environ.get("BENCH_CPROFILE") == "1":
        original_run = threading.Thread.run

        def run(self: threading.Thread) -> None:
            prof = cProfile.Profile()
            prof.enable()
            try:
                original_run(self)
            finally:
                prof.disable()
                with _LOCK:
                    _PROFILES.append(prof)

        threading.Thread.run = run  # type: ignore[method-assign]


def dump(main_prof: cProfile.Profile | None) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    import psutil

    cpu = psutil.Process().cpu_times()
    data = {"uptime_s": time.monotonic() - _T0, "process_cpu_s": cpu.user + cpu.system,
            "stages": {k: {"calls": int(v[0]), "wall_s": v[1], "thread_cpu_s": v[2]} for k, v in STAGES.items()},
            "batch_sizes": dict(sorted(BATCH_SIZES.items()))}
    (OUT / "stages.json").write_text(json.dumps(data, indent=1))
    profs = list(_PROFILES) + ([main_prof] if main_prof else [])
    if profs:
        with open(OUT / "cprofile.txt", "w") as fh:
            stats = pstats.Stats(profs[0], stream=fh)
            for p in profs[1:]:
                stats.add(p)
            fh.write(f"{len(profs)} threads merged\n")
            stats.sort_stats("tottime").print_stats(60)
            stats.sort_stats("cumulative").print_stats(60)


def main() -> None:
    install()
    main_prof = cProfile.Profile() if os.environ.get("BENCH_CPROFILE") == "1" else None
    atexit.register(lambda: dump(main_prof))
    from imgq.cli import main as cli_main

    if main_prof is not None:
        main_prof.enable()
    try:
        cli_main()
    finally:
        if main_prof is not None:
            main_prof.disable()


if __name__ == "__main__":
    main()
