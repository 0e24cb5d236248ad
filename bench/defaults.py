"""Defaults against tuning: end-to-end images/s of a worker left on its defaults (it times itself at
start-up, imgq.tuning) and of workers given hand-picked settings, side by side in one run.

    .venv/bin/python -m bench.defaults [--arch tiny|base] [--images N] [--repeats R]
        [--variant NAME=BATCH,THREADS ...] [--json]

Each repeat runs every variant in turn, in a rotating order, each with a fresh ``imgq worker``
(settings are per process): start, one small warm-up job, then the timed job, from ``submit`` to
the last item done. ``auto`` is the default (``IMGQ_MAX_BATCH=0``, ``IMGQ_TORCH_THREADS=0``,
``IMGQ_AUTOTUNE=true``); ``fixed`` is what the defaults were before (batch 32, torch's own
threads). Reported: the median of each, the best tuned median, and ``auto / best tuned``, paired
per repeat too. The worker's logged choice is printed with each ``auto`` run.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import sys
from typing import Any

from bench.common import WORK, Services, bench_task, checkpoint, make_images, median
from bench.pipeline import log, machine, run_job, start_worker

# name -> (IMGQ_MAX_BATCH, IMGQ_TORCH_THREADS, IMGQ_AUTOTUNE)
VARIANTS = {
    "tiny": {"auto": (0, 0, True), "fixed": (32, 0, False), "b64-t1": (64, 1, False),
             "b128-t1": (128, 1, False), "b256-t1": (256, 1, False), "b64-t2": (64, 2, False)},
    "base": {"auto": (0, 0, True), "fixed": (32, 0, False), "b8-t2": (8, 2, False), "b16-t2": (16, 2, False),
             "b4-t2": (4, 2, False)},
}


def parse_variant(text: str) -> tuple[str, tuple[int, int, bool]]:
    name, _, spec = text.partition("=")
    batch, threads = (int(x) for x in spec.split(","))
    return name, (batch, threads, False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--images", type=int, default=None, help="timed job size (default 1024 tiny / 16 base)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variant", action="append", type=parse_variant, default=None,
                    help="NAME=BATCH,THREADS; replaces the tuned variants (auto and fixed always run)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    n = args.images or (1024 if args.arch == "tiny" else 16)
    variants = dict(VARIANTS[args.arch])
    if args.variant:
        variants = {"auto": variants["auto"], "fixed": variants["fixed"], **dict(args.variant)}
    command = "python -m bench.defaults " + shlex.join(argv if argv is not None else sys.argv[1:])
    paths = make_images(n)
    ckpt = checkpoint(args.arch)
    svc = Services.start(home=WORK / "defaults")
    runs: dict[str, list[float]] = {name: [] for name in variants}
    cpu_ms: dict[str, list[float]] = {name: [] for name in variants}
    chosen: list[str] = []
    try:
        from imgq.celeryconf import make_celery
        from imgq.db.store import Store

        base = svc.settings(kinds=["caption"], caption_model=str(ckpt))
        store = Store.from_url(base.sync_database_url, pool_size=2)
        app = make_celery(base)
        task = bench_task("caption", base.caption_model)
        refs = [str(p) for p in paths]
        timeout = 120 + n * (0.2 if args.arch == "tiny" else 10)
        names = list(variants)
        for r in range(args.repeats):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                batch, threads, autotune = variants[name]
                settings = base.model_copy(update={"max_batch": batch, "torch_threads": threads,
                                                   "autotune": autotune})
                worker = start_worker(settings, f"defaults-{name}")
                try:
                    svc.truncate(store)
                    run_job(settings, store, app, refs[:4], task, 600, worker)  # load + tune + warm
                    svc.truncate(store)
                    out = run_job(settings, store, app, refs, task, timeout, worker,
                                  {"worker": [worker.p.pid]})
                finally:
                    worker.stop(60)
                runs[name].append(out["img_s"])
                cpu_ms[name].append(1000 * out["cpu_s"]["worker"] / n)
                note = ""
                if autotune:
                    found = re.search(r"autotune: (.*)", worker.log_path.read_text(errors="replace"))
                    note = f"  [{found[1] if found else 'no autotune line in the log'}]"
                    chosen.append(found[1] if found else "")
                log(f"repeat {r + 1} {name}: {out['img_s']:.1f} img/s, worker {cpu_ms[name][-1]:.2f} ms CPU/img{note}")
        store.engine.dispose()
    finally:
        svc.stop()

    tuned = [name for name in variants if name not in ("auto", "fixed")]
    best = max(tuned, key=lambda name: median(runs[name]))
    result: dict[str, Any] = {
        "command": command, "arch": args.arch, "images": n, "repeats": args.repeats, "machine": machine(),
        "variants": {name: {"batch": b, "torch_threads": t, "autotune": a} for name, (b, t, a) in variants.items()},
        "img_s": {name: median(v) for name, v in runs.items()}, "raw": runs,
        "worker_cpu_ms_per_img": {name: median(v) for name, v in cpu_ms.items()},
        "best_tuned": best, "auto_chose": chosen,
        "auto_over_best": median(runs["auto"]) / median(runs[best]),
        "auto_over_best_paired": median([a / b for a, b in zip(runs["auto"], runs[best], strict=True)]),
        "auto_over_fixed": median(runs["auto"]) / median(runs["fixed"]),
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"\n{command}\n{machine()}\n")
    print("| variant | batch | torch threads | e2e img/s (median) | raw | worker CPU ms/img |")
    print("|---|---|---|---|---|---|")
    for name, (b, t, a) in variants.items():
        label = "auto (defaults)" if a else name
        print(f"| {label} | {b or 'auto'} | {t or ('auto' if a else 'torch default')} | "
              f"{result['img_s'][name]:.3g} | {', '.join(f'{x:.3g}' for x in runs[name])} | "
              f"{result['worker_cpu_ms_per_img'][name]:.2f} |")
    print(f"\nbest tuned: {best}; auto / best tuned = {result['auto_over_best']:.2f} "
          f"(paired per repeat {result['auto_over_best_paired']:.2f}); auto / fixed = {result['auto_over_fixed']:.2f}")
    for line in dict.fromkeys(chosen):
        print(f"auto chose: {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

