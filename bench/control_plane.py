"""The control plane's ceiling: N real `imgq worker` processes whose model costs nothing
(worker/fakes.EchoRunner), real Redis and Postgres, 16x16 JPEGs on local disk.

What limits imgq when the GPUs are infinitely fast is what it costs Redis and Postgres per item.
This bench measures end-to-end items/s for N workers and, from the servers' CPU time (psutil over
each server's process tree), Postgres and Redis CPU-seconds per 1,000 items: the figures from
which docs/scaling.md computes how many 2,000 img/s GPUs one Postgres and one Redis can feed.

    python -m bench.control_plane --items 8000 --workers 1 2 4

On a 2-core machine, N workers share the cores with both servers: items/s then measures this
machine, while CPU-seconds per item measure the servers' cost, which is what scales.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from typing import Any

import psutil

import bench.common as common
from bench.common import Services, bench_task, median, settings_env, wait_done

# Its own servers and folder: other benches (bench.feeder, ...) may run beside it.
WORK = common.WORK / "control-plane"

FREE_WORKER = [sys.executable, "-m", "bench.control_plane", "--serve"]


def serve() -> None:
    """`imgq worker` with every kind's runner replaced by EchoRunner (no torch, no model)."""
    import imgq.worker.app as worker_app
    from imgq.worker.fakes import EchoRunner

    def build_runners(settings: Any, models: Any = None) -> dict[str, Any]:
        return {kind: EchoRunner(kind=kind, name=settings.model_for(kind), input_size=16) for kind in settings.kinds}

    worker_app.build_runners = build_runners
    from imgq.cli import main

    sys.argv = ["imgq", "worker", "--concurrency", "16"]
    main()


def _tiny_images(n: int) -> list[str]:
    from PIL import Image

    folder = WORK / "cp-images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if not path.exists():
            Image.new("RGB", (16, 16), (i % 251, (i * 7) % 251, (i * 13) % 251)).save(path, quality=80)
        paths.append(str(path))
    return paths


def _cpu(pids: list[int]) -> float:
    """CPU seconds of these processes and all their children (Postgres backends)."""
    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            for p in [proc, *proc.children(recursive=True)]:
                try:
                    times = p.cpu_times()
                    total += times.user + times.system
                except psutil.NoSuchProcess:
                    pass
        except psutil.NoSuchProcess:
            pass
    return total


def run_once(svc: Services, refs: list[str], n_workers: int) -> dict[str, float]:
    from imgq.celeryconf import make_celery
    from imgq.db.store import Store
    from imgq.producer.submit import submit

    settings = svc.settings(local_roots=[WORK / "cp-images"], max_batch=256, max_wait_ms=5,
                            caption_model="echo", broker_window=100_000)
    store = Store.from_url(settings.sync_database_url)
    svc.truncate(store)
    svc.redis_client().flushall()
    env = settings_env(settings)
    logs = [open(WORK / f"cp-worker-{i}.log", "wb") for i in range(n_workers)]  # noqa: SIM115
    workers = [subprocess.Popen(FREE_WORKER, env=env, stdout=log, stderr=subprocess.STDOUT) for log in logs]
    try:
        time.sleep(4)  # the workers start (no model to load)
        assert all(w.poll() is None for w in workers), (WORK / "cp-worker-0.log").read_text()[-2000:]
        servers = svc.pids()
        cpu_before = {name: _cpu(pids) for name, pids in servers.items()}
        workers_before = sum(_cpu([w.pid]) for w in workers)
        started = time.monotonic()
        job = submit(settings=settings, store=store, app=make_celery(settings), refs=refs,
                     tasks=[bench_task("caption", "echo")]).job
        ended, counts = wait_done(store, job, len(refs), timeout=900)
        seconds = ended - started
        cpu = {name: _cpu(pids) - cpu_before[name] for name, pids in servers.items()}
        worker_cpu = sum(_cpu([w.pid]) for w in workers) - workers_before
    finally:
        for w in workers:
            w.terminate()
        for w in workers:
            try:
                w.wait(30)
            except subprocess.TimeoutExpired:
                w.kill()
        for log in logs:
            log.close()
        store.engine.dispose()
    assert counts["dead"] == 0, counts
    per_k = 1000 / len(refs)
    return {"items_s": len(refs) / seconds, "pg_cpu_per_k": cpu["postgres"] * per_k,
            "redis_cpu_per_k": cpu["redis"] * per_k, "worker_cpu_per_k": worker_cpu * per_k,
            "messages_s": len(refs) / settings.refs_per_message / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=8000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    refs = _tiny_images(args.items)
    common.WORK = WORK  # Services keeps its servers under bench.common.WORK
    svc = Services.start(fresh=True)
    try:
        runs: dict[int, list[dict[str, float]]] = {n: [] for n in args.workers}
        for _ in range(args.repeats):  # alternate N within each repeat: the machine drifts
            for n in args.workers:
                runs[n].append(run_once(svc, refs, n))
                print(f"  N={n}: {runs[n][-1]['items_s']:.0f} items/s", flush=True)
    finally:
        svc.stop()
    print(f"\n{args.items} items, 16 refs/message, {args.repeats} repeats, medians "
          f"({os.cpu_count()} CPUs here)")
    print(f"{'workers':>7} {'items/s':>9} {'msgs/s':>8} {'PG cpu-s/1k':>12} {'Redis cpu-s/1k':>15} "
          f"{'worker cpu-s/1k':>16}")
    for n, rs in runs.items():
        print(f"{n:>7} {median([r['items_s'] for r in rs]):>9.0f} {median([r['messages_s'] for r in rs]):>8.0f} "
              f"{median([r['pg_cpu_per_k'] for r in rs]):>12.3f} {median([r['redis_cpu_per_k'] for r in rs]):>15.3f} "
              f"{median([r['worker_cpu_per_k'] for r in rs]):>16.3f}")


if __name__ == "__main__":
    main()
