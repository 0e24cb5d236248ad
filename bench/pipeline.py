"""imgq throughput bench: model-only vs end-to-end, enqueue, result writes, worker memory, naive baseline.

    .venv/bin/python -m bench.pipeline [--kind caption|embed] [--arch tiny|base] [--images N] [--repeats R]
        [--batch B] [--refs 100000] [--naive] [--s3-images M] [--mem-refs 1000000 --mem-seconds 60] [--json]

Everything runs in one process tree, side by side, on embedded services this script starts and stops:
(a) model-only images/s on pre-decoded uint8 arrays (resized as the worker does), batch B:
    ``CaptionModel.caption`` (``--kind caption``, exactly 20 tokens) or ``RetrievalModel.embed_images``
    (``--kind embed``, 256-d normalised vectors);
(b) end-to-end images/s: ``submit`` with one task of that kind -> Redis -> a real ``imgq worker``
    subprocess (IMGQ_KINDS = the kind, its model setting = the checkpoint) -> Postgres (captions, or
    pgvector embeddings with the HNSW index present), timed from the call to ``submit`` until
    ``Store.counts`` shows every item done (worker already warm);
(c) b/a; (d) enqueue refs/s for ``--refs`` refs, split into acceptance (COPY) and publish;
(e) ``Store.write_done`` rows/s for caption results at batches of 32 and 512; optional S3 (moto),
naive baseline (caption only) and worker RSS with a deep queue. Repeats alternate (a), (b) and the
naive run so noise hits all alike; medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from bench.common import (
    CAPTION_TOKENS,
    WORK,
    Services,
    bench_task,
    caption_done,
    checkpoint,
    create_job,
    make_images,
    median,
    settings_env,
    wait_done,
)
from bench.photos import CORPORA, corpus_paths
from bench.photos import ROOT as PHOTOS_ROOT

PY = sys.executable


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# -- processes ------------------------------------------------------------------------------------

class Proc:
    """A subprocess we started, with its log; stopped by its own PID."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115
        self.p = subprocess.Popen(argv, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                  cwd=str(WORK.parent.parent))

    def alive(self) -> bool:
        return self.p.poll() is None

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self, timeout: float = 30) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._log.close()


def cpu_seconds(pids: list[int]) -> float:
    """User+system CPU of these processes and all their children (live ones)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs = [proc, *proc.children(recursive=True)]
        except psutil.Error:
            continue
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
    return total


def machine_busy_s() -> float:
    """CPU-seconds the whole machine spent busy (every process, ours and other tenants'), plus
    time stolen by the hypervisor: the noise gauge of a shared machine."""
    import psutil

    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)


def per_free_core(img_s: float, others_cores: float) -> float:
    """Images/s per core that other tenants left free (at least a tenth of one core)."""
    return img_s / max(0.1, (os.cpu_count() or 1) - others_cores)


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


# -- (a) model only --------------------------------------------------------------------------------

def prepare_arrays(model: Any, paths: list[Path], threads: int) -> tuple[Any, dict[str, float]]:
    """Decode + preprocess exactly as the worker does; also time that stage (1 thread and ``threads``)."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from imgq.worker.decode import decode
    from imgq.worker.preprocess import Preprocessor

    pre = Preprocessor.from_image_processor(model.image_processor)
    blobs = [p.read_bytes() for p in paths]

    def prep(data: bytes) -> Any:
        return pre.pixels(decode(data, max_pixels=40_000_000, target=pre.size).image, "stretch")

    t = time.perf_counter()
    arrays = [prep(b) for b in blobs]
    one = len(blobs) / (time.perf_counter() - t)
    with ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        list(pool.map(prep, blobs))
        many = len(blobs) / (time.perf_counter() - t)
    return np.stack(arrays), {"prep_1thread_img_s": one, f"prep_{threads}threads_img_s": many}


def model_only(model: Any, arrays: Any, task: Any, batch: int, others: list[float] | None = None,
               idle: list[float] | None = None, watch: dict[str, list[int]] | None = None) -> tuple[float, float]:
    """(images/s, process CPU-seconds per image): CPU time is robust to a noisy shared machine.
    The call the worker's runner makes for the task's kind, on each slice of ``batch`` images.
    ``others`` gets the cores that other tenants kept busy meanwhile, and ``idle`` those that our
    own idle services (``watch``: the waiting worker, Postgres, Redis) used."""
    if task.kind == "caption":
        def run(pixels: Any) -> Any:
            return model.caption(pixels, task.params)
    elif task.kind == "embed":
        run = model.embed_images
    else:
        raise ValueError(f"no model-only pass for kind {task.kind!r}")
    services0 = sum(cpu_seconds(v) for v in (watch or {}).values())
    busy = machine_busy_s()
    c = time.process_time()
    t = time.perf_counter()
    for start in range(0, len(arrays), batch):
        run(arrays[start : start + batch])
    dt = time.perf_counter() - t
    cpu = time.process_time() - c
    services = sum(cpu_seconds(v) for v in (watch or {}).values()) - services0
    if others is not None:
        others.append((machine_busy_s() - busy - cpu - services) / dt)
    if idle is not None:
        idle.append(services / dt)
    return len(arrays) / dt, cpu / len(arrays)


# -- (b) end to end ---------------------------------------------------------------------------------

def start_worker(settings: Any, name: str, profile_dir: Path | None = None) -> Proc:
    """``imgq worker`` with exactly ``settings`` (IMGQ_KINDS and the models included)."""
    env = settings_env(settings)
    if profile_dir is not None:
        env["BENCH_PROFILE_DIR"] = str(profile_dir)
        argv = [PY, "-m", "bench.profile_worker", "worker", "--loglevel", "WARNING", "--hostname", f"{name}@%h"]
    else:
        argv = [PY, "-m", "imgq.cli", "worker", "--loglevel", "WARNING", "--hostname", f"{name}@%h"]
    return Proc(argv, env, WORK / f"{name}.log")


def run_job(settings: Any, store: Any, app: Any, refs: list[str], task: Any, timeout: float,
            worker: Proc, watch: dict[str, list[int]] | None = None) -> dict[str, Any]:
    from imgq.producer.submit import submit

    cpu0 = {k: cpu_seconds(v) for k, v in (watch or {}).items()}
    busy0, own0 = machine_busy_s(), time.process_time()
    t0 = time.monotonic()
    sub = submit(settings=settings, store=store, app=app, refs=refs, tasks=[task])
    t_sub = time.monotonic() - t0
    end, counts = wait_done(store, sub.job, len(refs), timeout, alive=worker.alive)
    elapsed = end - t0
    busy, own = machine_busy_s() - busy0, time.process_time() - own0
    out = {"img_s": len(refs) / elapsed, "seconds": elapsed, "submit_s": t_sub, "counts": counts}
    if watch:
        out["cpu_s"] = {k: cpu_seconds(v) - cpu0[k] for k, v in watch.items()}
        # Everything else on the machine: other tenants (this bench process's submit and polling excluded).
        out["others_cores"] = (busy - own - sum(out["cpu_s"].values())) / elapsed
    if counts["dead"]:
        raise RuntimeError(f"{counts['dead']} items dead-lettered: see {worker.log_path}\n{worker.tail()}")
    linked = stored_results(store, sub.job, task.kind)
    if linked != len(refs):
        raise RuntimeError(f"{linked} of {len(refs)} items link a stored {task.kind} result")
    return out


def stored_results(store: Any, job: Any, kind: str) -> int:
    """Items of ``job`` whose result row of ``kind`` is stored and linked (checked after timing)."""
    from sqlalchemy import text

    from imgq.db.results import writer

    column = writer(kind).link_column
    with store.engine.connect() as conn:
        return int(conn.execute(text(f"SELECT count({column}) FROM job_items WHERE job_id = :job"),
                                {"job": job}).scalar_one())


def hnsw_indexes(store: Any) -> list[str]:
    """The HNSW indexes on ``embeddings``: e2e embed writes are timed with them in place."""
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return [r[0] for r in conn.execute(text(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'embeddings' AND indexdef ILIKE '%USING hnsw%'"))]


# -- (d) enqueue ------------------------------------------------------------------------------------

def bench_enqueue(svc: Services, n_refs: int, repeats: int) -> dict[str, Any]:
    from imgq.celeryconf import make_celery
    from imgq.db.store import Store
    from imgq.producer.submit import submit
    from imgq.publish import chunk_messages, publish

    queue = "bench-enqueue"  # nobody consumes it; emptied after each step
    settings = svc.settings(queue=queue)
    store = Store.from_url(settings.sync_database_url)
    app = make_celery(settings)
    rc = svc.redis_client()
    tasks = [bench_task("caption", settings.caption_model)]
    refs = [str(WORK / "images" / f"ref_{i:07d}.jpg") for i in range(n_refs)]
    res: dict[str, list[float]] = {"submit": [], "accept_copy": [], "publish": [], "build_messages": []}
    for _ in range(repeats):
        svc.truncate(store)
        t = time.perf_counter()
        submit(settings=settings, store=store, app=app, refs=refs, tasks=tasks)
        res["submit"].append(n_refs / (time.perf_counter() - t))
        rc.delete(queue)
        t = time.perf_counter()
        job = create_job(store, tasks, refs)
        res["accept_copy"].append(n_refs / (time.perf_counter() - t))
        items = list(enumerate(refs))
        t = time.perf_counter()
        msgs = [m.to_json() for m in chunk_messages(job=str(job), tasks=tasks, items=items,
                                                    per_message=settings.refs_per_message)]
        res["build_messages"].append(n_refs / (time.perf_counter() - t))
        del msgs
        t = time.perf_counter()
        publish(app, chunk_messages(job=str(job), tasks=tasks, items=items,
                                    per_message=settings.refs_per_message), queue=queue)
        res["publish"].append(n_refs / (time.perf_counter() - t))
        rc.delete(queue)
    svc.truncate(store)
    store.engine.dispose()
    rc.close()
    out: dict[str, Any] = {f"{k}_refs_s": median(v) for k, v in res.items()}
    out["raw"] = res
    out["refs_per_message"] = settings.refs_per_message
    return out


# -- (e) result writes ------------------------------------------------------------------------------

def bench_writes(svc: Services, rows_total: int, batches: list[int], repeats: int) -> dict[str, Any]:
    """``Store.write_done`` of caption results (images upsert, caption statement, finish)."""
    from imgq.db.store import Store
    from imgq.ports import ObjectInfo

    settings = svc.settings()
    store = Store.from_url(settings.sync_database_url, pool_size=2)
    task = bench_task("caption", "bench")
    out: dict[str, Any] = {}
    for batch in batches:
        speeds = []
        for _ in range(repeats):
            svc.truncate(store)
            refs = [f"/bench/w_{i:07d}.jpg" for i in range(rows_total)]
            job = create_job(store, [task], refs)
            rows = [caption_done(job, i, ObjectInfo("local", "", ref, f"{i:032x}", 98765, 640, 480), task,
                                 "a man riding a horse on a beach next to the ocean with a dog")
                    for i, ref in enumerate(refs)]
            t = time.perf_counter()
            for start in range(0, rows_total, batch):
                store.write_done(rows[start : start + batch])
            speeds.append(rows_total / (time.perf_counter() - t))
        out[f"batch_{batch}_rows_s"] = median(speeds)
        out[f"batch_{batch}_raw"] = speeds
    svc.truncate(store)
    store.engine.dispose()
    return out


# -- naive baseline ---------------------------------------------------------------------------------

def start_naive(svc: Services, ckpt: Path) -> Proc:
    from bench import naive

    naive.ensure_table(svc.database_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")}
    env.update(NAIVE_BROKER=svc.broker_url, NAIVE_DB=svc.database_url, NAIVE_MODEL=str(ckpt),
               NAIVE_TOKENS=str(CAPTION_TOKENS), HF_HUB_OFFLINE="1")
    if svc.s3 is not None:
        env["NAIVE_S3"] = svc.s3.url
    argv = [PY, "-m", "celery", "-A", "bench.naive", "worker", "--pool", "solo", "--concurrency", "1",
            "-Q", naive.QUEUE, "--without-mingle", "--without-gossip", "--loglevel", "WARNING",
            "--hostname", "naive@%h"]
    return Proc(argv, env, WORK / "naive-worker.log")


def run_naive(svc: Services, refs: list[str], timeout: float, worker: Proc) -> dict[str, Any]:
    from bench import naive

    naive.app.conf.broker_url = svc.broker_url
    run = uuid.uuid4().hex
    t0 = time.monotonic()
    naive.enqueue(run, refs)
    end = naive.wait(svc.database_url, run, len(refs), timeout, alive=worker.alive)
    return {"img_s": len(refs) / (end - t0), "seconds": end - t0}


# -- worker memory with a deep queue ------------------------------------------------------------------

def bench_memory(svc: Services, settings: Any, store: Any, app: Any, worker: Proc, paths: list[Path],
                 n_refs: int, seconds: float, task: Any) -> dict[str, Any]:
    from imgq.producer.submit import submit

    rc = svc.redis_client()
    refs = [str(paths[i % len(paths)]) for i in range(n_refs)]
    rss0 = rss_mb(worker.p.pid)
    redis0 = rc.info("memory")["used_memory"] / 2**20
    t = time.perf_counter()
    sub = submit(settings=settings, store=store, app=app, refs=refs, tasks=[task])
    enqueue_s = time.perf_counter() - t
    del refs
    log(f"memory: {n_refs} refs enqueued in {enqueue_s:.1f}s; sampling worker RSS for {seconds:.0f}s")
    samples = []
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        time.sleep(max(0.0, 1.0 - (time.monotonic() - t0) % 1.0))
        samples.append((round(time.monotonic() - t0, 1), round(rss_mb(worker.p.pid), 1)))
    counts = store.counts(sub.job)
    redis1 = rc.info("memory")["used_memory"] / 2**20
    rc.delete(settings.queue)
    rc.close()
    rss = [s[1] for s in samples]
    half = len(rss) // 2
    return {"refs": n_refs, "enqueue_s": enqueue_s, "enqueue_refs_s": n_refs / enqueue_s,
            "rss_before_mb": rss0, "rss_first_half_max_mb": max(rss[:half] or rss),
            "rss_second_half_max_mb": max(rss[half:]), "rss_last_mb": rss[-1],
            "done_during_window": counts["done"], "consumed_img_s": counts["done"] / seconds,
            "redis_used_mb_before": redis0, "redis_used_mb_after": redis1, "samples": samples}


# -- main -------------------------------------------------------------------------------------------

def load_model(kind: str, ckpt: Path, threads: int) -> Any:
    """The model the worker's runner for ``kind`` wraps, loaded in this process on the CPU."""
    if kind == "caption":
        from imgq.worker.model import CaptionModel as Model
    else:
        from imgq.worker.retrieval import RetrievalModel as Model  # type: ignore[assignment]
    model = Model(str(ckpt), device="cpu", threads=threads)
    model.load()
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.pipeline", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kind", choices=["caption", "embed"], default="caption",
                    help="the job kind for (a)-(c), the S3 run and the memory run (enqueue and writes: caption)")
    ap.add_argument("--arch", choices=["tiny", "base"], default="tiny")
    ap.add_argument("--images", type=int, default=None, help="default 1024 (tiny) / 32 (base)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="model batch = IMGQ_MAX_BATCH (default 32 / 8)")
    ap.add_argument("--refs", type=int, default=100_000, help="refs for the enqueue bench (0 = skip)")
    ap.add_argument("--write-rows", type=int, default=8192, help="rows per write bench (0 = skip)")
    ap.add_argument("--naive", action="store_true", help="also run the naive baseline side by side")
    ap.add_argument("--naive-images", type=int, default=None, help="images for the naive run (default --images)")
    ap.add_argument("--s3-images", type=int, default=0, help="also run e2e from moto S3 with this many images")
    ap.add_argument("--mem-refs", type=int, default=0, help="enqueue this many refs and watch worker RSS")
    ap.add_argument("--mem-seconds", type=float, default=60)
    ap.add_argument("--decode-threads", type=int, default=None)
    ap.add_argument("--torch-threads", type=int, default=None,
                    help="IMGQ_TORCH_THREADS, for the worker and the model-only pass alike")
    ap.add_argument("--in-flight", type=int, default=None, help="IMGQ_MESSAGES_IN_FLIGHT")
    ap.add_argument("--refs-per-message", type=int, default=None)
    ap.add_argument("--max-wait-ms", type=int, default=None)
    ap.add_argument("--no-e2e", action="store_true", help="skip (a)-(c)")
    ap.add_argument("--profile", action="store_true",
                    help="run the worker under bench.profile_worker (cProfile + stage timers); figures are slower")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the JSON object to this file")
    ap.add_argument("--corpus", choices=["synthetic", *CORPORA], default="synthetic",
                    help="images: synthetic 640x480 JPEGs (bench.common), or a bench.photos corpus")
    args = ap.parse_args(argv)

    tiny = args.arch == "tiny"
    n = args.images or (1024 if tiny else 32)
    batch = args.batch or (32 if tiny else 8)
    if args.naive and args.kind != "caption":
        ap.error("--naive is a captioning baseline: use it with --kind caption")
    command = "python -m bench.pipeline " + shlex.join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {"command": command, "kind": args.kind, "arch": args.arch, "images": n,
                              "batch": batch, "repeats": args.repeats, "machine": machine()}
    if args.kind == "caption":
        result["tokens"] = CAPTION_TOKENS
    timeout = 60 + n * (0.2 if tiny else 10)

    n_paths = max(n, args.naive_images or 0)
    paths = make_images(n_paths) if args.corpus == "synthetic" else corpus_paths(args.corpus, n_paths)
    result["corpus"] = args.corpus
    ckpt = checkpoint(args.arch, args.kind)
    svc = Services.start(s3=args.s3_images > 0)
    procs: list[Proc] = []
    try:
        from imgq.celeryconf import make_celery
        from imgq.db.store import Store

        # The worker serves exactly this kind with this checkpoint, and the task names the same
        # model (a worker dead-letters tasks for another model as wrong_model).
        model_setting = "caption_model" if args.kind == "caption" else "embed_model"
        overrides: dict[str, Any] = {"max_batch": batch, "kinds": [args.kind], model_setting: str(ckpt)}
        if args.corpus != "synthetic":
            overrides["local_roots"] = [PHOTOS_ROOT]
        for key, value in (("decode_threads", args.decode_threads), ("messages_in_flight", args.in_flight),
                           ("refs_per_message", args.refs_per_message), ("max_wait_ms", args.max_wait_ms),
                           ("torch_threads", args.torch_threads)):
            if value is not None:
                overrides[key] = value
        bucket = None
        if args.s3_images:
            bucket = "imgq-bench"
            overrides["allowed_buckets"] = [bucket]
        settings = svc.settings(**overrides)
        result["settings"] = {k: getattr(settings, k) for k in ("kinds", "max_batch", "max_wait_ms", "decode_threads",
                                                                "messages_in_flight", "refs_per_message",
                                                                "torch_threads")}
        store = Store.from_url(settings.sync_database_url, pool_size=2)
        app = make_celery(settings)
        svc.redis_client().delete(settings.queue)
        task = bench_task(args.kind, settings.model_for(args.kind))
        refs = [str(p) for p in paths[:n]]
        if args.kind == "embed":
            result["hnsw_indexes"] = hnsw_indexes(store)
            if not result["hnsw_indexes"]:
                raise RuntimeError("no HNSW index on embeddings: run the migrations (imgq db upgrade)")

        if args.refs:
            log(f"enqueue bench: {args.refs} refs x {args.repeats}")
            result["enqueue"] = bench_enqueue(svc, args.refs, args.repeats)
        if args.write_rows:
            log(f"write bench: {args.write_rows} rows at batch 32 and 512")
            result["writes"] = bench_writes(svc, args.write_rows, [32, 512], args.repeats)

        need_worker = not args.no_e2e or args.s3_images or args.mem_refs
        if need_worker:
            profile_dir = WORK / "profile" if args.profile else None
            worker = start_worker(settings, "imgq-worker", profile_dir)
            procs.append(worker)
            naive_worker = None
            if args.naive:
                naive_worker = start_naive(svc, ckpt)
                procs.append(naive_worker)
            log("loading the model in-process for model-only timing; preparing arrays")
            model = load_model(args.kind, ckpt, settings.torch_threads)
            arrays, prep = prepare_arrays(model, paths[:n], settings.decode_threads)
            result["prep"] = prep
            model_only(model, arrays[:batch], task, batch)  # warm-up
            log("warming the worker (first job pays model load)")
            svc.truncate(store)
            run_job(settings, store, app, refs[: max(batch, 16)], task, 600, worker)
            if naive_worker is not None:
                run_naive(svc, refs[:2], 600, naive_worker)
            watch = {"worker": [worker.p.pid], **svc.pids()}
            a_runs: list[float] = []
            a_cpu: list[float] = []
            a_others: list[float] = []
            a_idle: list[float] = []
            b_runs: list[dict[str, Any]] = []
            naive_runs: list[dict[str, Any]] = []
            nn = args.naive_images or n
            if not args.no_e2e:
                for r in range(args.repeats):
                    speed, cpu = model_only(model, arrays, task, batch, a_others, a_idle, watch)
                    a_runs.append(speed)
                    a_cpu.append(cpu)
                    svc.truncate(store)
                    b_runs.append(run_job(settings, store, app, refs, task, timeout, worker, watch))
                    msg = (f"repeat {r + 1}: model-only {a_runs[-1]:.2f} img/s, e2e {b_runs[-1]['img_s']:.2f} img/s "
                           f"(other tenants' cores: {a_others[-1]:.2f} / {b_runs[-1]['others_cores']:.2f}; "
                           f"our idle services during model-only: {a_idle[-1]:.2f})")
                    if naive_worker is not None:
                        naive_runs.append(run_naive(svc, [str(p) for p in paths[:nn]], timeout * 3, naive_worker))
                        msg += f", naive {naive_runs[-1]['img_s']:.2f} img/s"
                    log(msg)
                a = median(a_runs)
                b = median([x["img_s"] for x in b_runs])
                result["model_only_img_s"] = a
                result["e2e_img_s"] = b
                result["e2e_over_model"] = b / a
                # per-repeat pairs cancel slow drifts of a noisy shared machine
                result["e2e_over_model_paired"] = median([x["img_s"] / y for x, y in zip(b_runs, a_runs, strict=True)])
                result["e2e_submit_s"] = median([x["submit_s"] for x in b_runs])
                result["e2e_cpu_s"] = {k: median([x["cpu_s"][k] for x in b_runs]) for k in watch}
                result["model_only_cpu_ms_per_img"] = 1000 * median(a_cpu)
                result["e2e_cpu_ms_per_img"] = {k: 1000 * v / n for k, v in result["e2e_cpu_s"].items()}
                result["raw"] = {"model_only": a_runs, "e2e": [x["img_s"] for x in b_runs],
                                 "model_only_cpu_ms_per_img": [1000 * c for c in a_cpu],
                                 "e2e_worker_cpu_ms_per_img": [1000 * x["cpu_s"]["worker"] / n for x in b_runs],
                                 "others_cores_model_only": a_others,
                                 "own_idle_services_cores_model_only": a_idle,
                                 "others_cores_e2e": [x["others_cores"] for x in b_runs]}
                # What our own idle worker, Postgres and Redis used during the model-only passes.
                result["idle_services_cores_model_only"] = median(a_idle)
                # Each pass's rate per core left free by other tenants, e2e over model-only, paired
                # per repeat: a first-order correction for a shared machine (both are CPU-bound).
                result["e2e_over_model_per_free_core"] = median([
                    per_free_core(x["img_s"], x["others_cores"]) / per_free_core(y, o)
                    for x, y, o in zip(b_runs, a_runs, a_others, strict=True)])
                # Noise gauge: cores other tenants kept busy during each pass (2 = all of this machine).
                result["others_cores"] = {"model_only": median(a_others),
                                          "e2e": median([x["others_cores"] for x in b_runs])}
                if naive_runs:
                    result["naive_img_s"] = median([x["img_s"] for x in naive_runs])
                    result["naive_images"] = nn
                    result["imgq_over_naive"] = b / result["naive_img_s"]
                    result["raw"]["naive"] = [x["img_s"] for x in naive_runs]
            del model, arrays
            if args.s3_images:
                result["s3"] = bench_s3(svc, settings, store, app, worker, bucket or "", args, task, timeout)
            if args.mem_refs:
                svc.truncate(store)
                result["memory"] = bench_memory(svc, settings, store, app, worker, paths[:n], args.mem_refs,
                                                args.mem_seconds, task)
            worker.stop(60)
            if args.profile:
                result["profile_dir"] = str(profile_dir)
        store.engine.dispose()
    finally:
        for proc in procs:
            proc.stop()
        svc.stop()

    if args.json_out is not None:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(result, indent=1, default=str))
    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print_table(result)
    return 0


def bench_s3(svc: Services, settings: Any, store: Any, app: Any, worker: Proc, bucket: str, args: Any,
             task: Any, timeout: float) -> dict[str, Any]:
    from concurrent.futures import ThreadPoolExecutor

    import boto3

    s3 = boto3.client("s3", endpoint_url=svc.s3.url, region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    paths = make_images(args.s3_images)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: s3.put_object(Bucket=bucket, Key=f"img/{p.name}", Body=p.read_bytes()), paths))
    refs = [f"s3://{bucket}/img/{p.name}" for p in paths]
    # raw GET rate of the moto server with the worker's thread count, for reference
    t = time.perf_counter()
    with ThreadPoolExecutor(settings.decode_threads) as pool:
        list(pool.map(lambda r: s3.get_object(Bucket=bucket, Key=r.split("/", 3)[3])["Body"].read(), refs))
    get_s = len(refs) / (time.perf_counter() - t)
    runs = []
    for _ in range(args.repeats):
        svc.truncate(store)
        runs.append(run_job(settings, store, app, refs, task, timeout * 4, worker)["img_s"])
    log(f"s3: e2e {median(runs):.1f} img/s; raw moto GET {get_s:.1f}/s")
    return {"images": len(refs), "e2e_img_s": median(runs), "raw": runs, "moto_get_s": get_s}


def machine() -> str:
    import platform

    import torch

    return (f"{os.cpu_count()} CPU ({platform.processor() or platform.machine()}), torch {torch.__version__} "
            f"default threads={torch.get_num_threads()}, python {platform.python_version()}")


def print_table(r: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = []

    def add(name: str, value: Any, fmt: str = "{:,.1f}") -> None:
        rows.append((name, fmt.format(value) if isinstance(value, int | float) else str(value)))

    if "model_only_img_s" in r:
        call = "CaptionModel.caption" if r.get("kind", "caption") == "caption" else "RetrievalModel.embed_images"
        add(f"(a) model-only img/s, {call} (batch {r['batch']})", r["model_only_img_s"], "{:,.2f}")
        add("(b) end-to-end img/s (local folder)", r["e2e_img_s"], "{:,.2f}")
        add("(c) e2e / model-only (ratio of medians)", r["e2e_over_model"], "{:.3f}")
        if "e2e_over_model_paired" in r:
            add("    median of per-repeat ratios", r["e2e_over_model_paired"], "{:.3f}")
        if "e2e_over_model_per_free_core" in r:
            add("    the same per core left free by other tenants", r["e2e_over_model_per_free_core"], "{:.3f}")
        raw = r.get("raw", {})
        if raw:
            add("    raw per repeat: model-only / e2e", " / ".join(
                ", ".join(f"{v:.3g}" for v in raw[k]) for k in ("model_only", "e2e")), "")
            if "own_idle_services_cores_model_only" in raw:
                add("    our idle worker+Postgres+Redis during model-only, cores", ", ".join(
                    f"{v:.2f}" for v in raw["own_idle_services_cores_model_only"]), "")
            if "others_cores_e2e" in raw:
                add("    other tenants' busy cores per repeat: model-only / e2e", " / ".join(
                    ", ".join(f"{v:.2f}" for v in raw[k]) for k in ("others_cores_model_only", "others_cores_e2e")), "")
        for k, v in r.get("prep", {}).items():
            add(f"    decode+preprocess {k.replace('prep_', '').replace('_img_s', '')} img/s", v)
        cpu = r.get("e2e_cpu_s", {})
        if cpu:
            add("    CPU ms/image: model-only process "
                + f"{r['model_only_cpu_ms_per_img']:.1f}; e2e " + ", ".join(
                    f"{k} {v:.1f}" for k, v in r["e2e_cpu_ms_per_img"].items()), "")
    if "naive_img_s" in r:
        add(f"naive (celery task/image + pipeline), {r['naive_images']} images, img/s", r["naive_img_s"], "{:,.2f}")
        add("imgq e2e / naive", r["imgq_over_naive"], "{:.2f}")
    if "s3" in r:
        add(f"(b') end-to-end img/s from moto S3 ({r['s3']['images']} images)", r["s3"]["e2e_img_s"], "{:,.2f}")
        add("    raw moto GET/s (same threads)", r["s3"]["moto_get_s"])
    if "enqueue" in r:
        e = r["enqueue"]
        add(f"(d) enqueue refs/s via submit ({e['refs_per_message']} refs/msg)", e["submit_refs_s"], "{:,.0f}")
        add("    acceptance only (INSERT job + COPY items)", e["accept_copy_refs_s"], "{:,.0f}")
        add("    publish only (build + send messages)", e["publish_refs_s"], "{:,.0f}")
        add("    of which building messages (pydantic)", e["build_messages_refs_s"], "{:,.0f}")
    if "writes" in r:
        for k, v in r["writes"].items():
            if k.endswith("_rows_s"):
                add(f"(e) write_done (captions) rows/s, {k.split('_')[1]} rows/batch", v, "{:,.0f}")
    if "memory" in r:
        m = r["memory"]
        add(f"worker RSS MB with {m['refs']:,} refs queued: before / 1st half max / 2nd half max",
            f"{m['rss_before_mb']:.0f} / {m['rss_first_half_max_mb']:.0f} / {m['rss_second_half_max_mb']:.0f}")
        add("    enqueue of those refs, refs/s", m["enqueue_refs_s"], "{:,.0f}")
        add("    consumed during window, img/s", m["consumed_img_s"])
        add("    redis used_memory MB before / after",
            f"{m['redis_used_mb_before']:.0f} / {m['redis_used_mb_after']:.0f}")
    width = max(len(k) for k, _ in rows)
    print(f"# {r['command']}")
    tokens = f" tokens={r['tokens']}" if "tokens" in r else ""
    print(f"# {r['machine']}; kind={r.get('kind', 'caption')} arch={r['arch']} images={r['images']} "
          f"batch={r['batch']}{tokens} repeats={r['repeats']} (medians)")
    if r.get("hnsw_indexes"):
        print(f"# embeddings written with HNSW index(es) present: {', '.join(r['hnsw_indexes'])}")
    if "settings" in r:
        print(f"# worker settings: {r['settings']}")
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")


if __name__ == "__main__":
    raise SystemExit(main())
