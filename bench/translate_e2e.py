"""Translation end to end vs model only, side by side in one run, medians over repeats.

    .venv/bin/python -m bench.translate_e2e [--images N] [--langs de,fr] [--repeats R] [--arch tiny|small]
        [--torch-threads T] [--json]

On embedded Postgres + Redis that this script starts and stops (under ``WORK/translate_e2e``):

1. ``imgq enqueue caption REFS --lang ja`` (the warm-up language, never timed) over N local JPEGs,
   served by one real ``imgq worker`` (IMGQ_KINDS=caption,translate, tiny BLIP + the translation
   checkpoint, IMGQ_AUTOTUNE off, explicit max_batch and torch threads): English captions are stored,
   and both models are loaded and warm.
2. Per repeat, a fresh set of languages (``--langs`` first, then de,fr,es,it,nl,pt and the rest of
   ``imgq.languages``: no repeat re-stores a translation another one wrote), alternating the order:

   (a) model only: ``TranslationModel.translate`` in this process on exactly the English captions
       job 1 stored (seq order), each language in turn, micro_batch 32, the worker's torch threads,
       called from a non-main thread as the worker's ``imgq-infer`` thread calls it. (Measured on the
       2-core dev machine, 2026-11-28, tiny checkpoint: with torch.set_num_threads(2) the same call
       from the main thread ran at ~7 sentences/s using ~8 CPU-s, from a second thread at ~50/s using
       ~1.2 CPU-s, single-core-like; a main-thread model-only pass would not be the worker's speed.)
   (b) end to end: ``imgq enqueue translate --job FIRST --lang L1,L2`` (a CLI subprocess) -> Redis ->
       the warm worker (English captions found stored: only translation runs) -> Postgres, timed from
       the enqueue call until ``Store.counts`` shows every item done. The worker's /metrics are
       scraped before and after: ``imgq_reused_results_total{kind="caption"}`` must rise by N and
       ``imgq_model_seconds_count{kind="caption"}`` (BLIP batches) by 0.

   sentences/s = N x languages / seconds for both; (c) = b / a.
3. Where the e2e time goes, in this process (1 thread, sequential): the worker's fetch of a local
   ref (read + sha256 of the bytes: the image version for the reuse check) and the
   ``Store.existing_caption`` lookup, per item; and from the worker's metrics, its translate model
   seconds and mean translate batch size.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from bench.common import CAPTION_TOKENS, WORK, Services, make_images, median, settings_env, wait_done
from bench.common import tiny_checkpoint as caption_checkpoint
from bench.pipeline import Proc, cpu_seconds, log
from bench.translate import small_checkpoint, tiny_checkpoint

PY = sys.executable
HOME = WORK / "translate_e2e"
WARM_LANG = "ja"
ROTATION = ["de", "fr", "es", "it", "nl", "pt"]
MICRO_BATCH = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """The worker's /metrics as {'name{labels}': value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    out: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def language_plan(first: list[str], repeats: int) -> list[list[str]]:
    """``repeats`` disjoint language sets of ``len(first)`` each, ``first`` first."""
    from imgq.languages import LANGUAGES, SOURCE

    pool = list(dict.fromkeys([*first, *ROTATION, *(c for c in LANGUAGES if c not in (SOURCE, WARM_LANG))]))
    pool = [c for c in pool if c != WARM_LANG]
    k = len(first)
    if k * repeats > len(pool):
        raise SystemExit(f"{repeats} repeats x {k} languages exceed the {len(pool)} languages available")
    return [pool[r * k : (r + 1) * k] for r in range(repeats)]


def cli(settings: Any, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PY, "-m", "imgq.cli", *args], env=settings_env(settings), capture_output=True, text=True,
                          timeout=300, cwd=str(WORK.parent.parent))


def enqueue(settings: Any, *args: str) -> uuid.UUID:
    out = cli(settings, "enqueue", *args)
    if out.returncode != 0:
        raise RuntimeError(f"imgq enqueue {' '.join(args[:3])}... failed ({out.returncode}): {out.stderr[-2000:]}")
    return uuid.UUID(out.stdout.strip().splitlines()[-1])


def stored_captions(store: Any, job: uuid.UUID) -> list[str]:
    """The English captions job ``job``'s items link, in seq order."""
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return list(conn.execute(text(
            "SELECT c.text FROM job_items j JOIN captions c ON c.id = j.caption_id "
            "WHERE j.job_id = :job AND c.lang = 'en' ORDER BY j.seq"), {"job": job}).scalars())


def translations_stored(store: Any, langs: list[str]) -> dict[str, int]:
    from sqlalchemy import text

    with store.engine.connect() as conn:
        rows = conn.execute(text("SELECT lang, count(*) FROM captions WHERE lang = ANY(:langs) "
                                 "AND method = 'translated' GROUP BY lang"), {"langs": langs}).all()
    return {lang: int(n) for lang, n in rows}


def stored_translations(store: Any, lang: str) -> dict[str, str]:
    """Image key -> the stored translation into ``lang``."""
    from sqlalchemy import text

    with store.engine.connect() as conn:
        return dict(conn.execute(text("SELECT im.key, c.text FROM captions c JOIN images im ON im.id = c.image_id "
                                      "WHERE c.lang = :lang AND c.method = 'translated'"), {"lang": lang}).all())


def pieces(settings: Any, store: Any, refs: list[str], caption_task: dict[str, Any], caption_ckpt: Path
           ) -> dict[str, float]:
    """Per item, in this process (1 thread): the worker's fetch (read + sha256 version) and its reuse lookup."""
    from imgq.worker.fetch import Fetcher
    from imgq.worker.loading import local_revision

    fetcher = Fetcher(settings)
    t = time.perf_counter()
    blobs = [fetcher.fetch(r) for r in refs]
    fetch_s = time.perf_counter() - t
    revision = local_revision(caption_ckpt)
    t = time.perf_counter()
    found = sum(store.existing_caption(b.source, b.bucket, b.key, b.version, caption_task["model"], revision,
                                       caption_task["params_hash"]) is not None for b in blobs)
    lookup_s = time.perf_counter() - t
    if found != len(refs):
        raise RuntimeError(f"the reuse lookup found {found} of {len(refs)} stored captions")
    return {"fetch_hash_ms_per_item": 1000 * fetch_s / len(refs), "lookup_ms_per_item": 1000 * lookup_s / len(refs),
            "mean_image_kb": sum(len(b.data) for b in blobs) / len(blobs) / 1024}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.translate_e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--langs", default="de,fr", help="the first repeat's languages; later repeats rotate to fresh ones")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arch", choices=["tiny", "small"], default="tiny",
                    help="translation checkpoint (bench.translate)")
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="IMGQ_TORCH_THREADS for the worker and the model-only pass (0: this process's torch default)")
    ap.add_argument("--max-batch", type=int, default=32, help="IMGQ_MAX_BATCH (autotune is off)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from transformers.utils import logging as hf_logging

    from imgq.languages import parse_langs

    hf_logging.disable_progress_bar()
    n = args.images
    first = parse_langs(args.langs)
    if not first or WARM_LANG in first:
        ap.error(f"--langs must name languages other than English and {WARM_LANG} (the warm-up language)")
    plan = language_plan(first, args.repeats)
    threads = args.torch_threads or torch.get_num_threads()
    command = "python -m bench.translate_e2e " + shlex.join(argv if argv is not None else sys.argv[1:])
    result: dict[str, Any] = {"command": command, "images": n, "repeats": args.repeats, "arch": args.arch,
                              "languages_per_repeat": plan, "torch_threads": threads, "max_batch": args.max_batch,
                              "micro_batch": MICRO_BATCH, "caption_tokens": CAPTION_TOKENS,
                              "cpus": os.cpu_count()}

    images = HOME / "images"
    paths = make_images(n, images)
    refs = [str(p) for p in paths]
    cap_ckpt = caption_checkpoint()
    tr_ckpt = tiny_checkpoint() if args.arch == "tiny" else small_checkpoint()
    port = free_port()
    svc = Services.start(home=HOME, fresh=True)
    worker: Proc | None = None
    try:
        from imgq.db.store import Store
        from imgq.worker.translate import TranslationModel

        settings = svc.settings(kinds=["caption", "translate"], caption_model=str(cap_ckpt),
                                translate_model=str(tr_ckpt), local_roots=[images], autotune=False,
                                max_batch=args.max_batch, torch_threads=threads, metrics_port=port)
        store = Store.from_url(settings.sync_database_url, pool_size=2)
        svc.redis_client().delete(settings.queue)
        worker = Proc([PY, "-m", "imgq.cli", "worker", "--loglevel", "WARNING", "--hostname", "translate-e2e@%h"],
                      settings_env(settings), HOME / "worker.log")

        log(f"job 1: imgq enqueue caption ({n} images, {CAPTION_TOKENS} tokens) --lang {WARM_LANG} (warm-up)")
        t0 = time.monotonic()
        listing = HOME / "refs.txt"
        listing.write_text("\n".join(refs))
        source = enqueue(settings, "caption", "-f", str(listing), "--lang", WARM_LANG, "--max-new-tokens",
                         str(CAPTION_TOKENS), "--min-new-tokens", str(CAPTION_TOKENS))
        _, counts = wait_done(store, source, n, 300 + 2 * n, poll=0.2, alive=worker.alive)
        if counts["dead"]:
            raise RuntimeError(f"job 1: {counts['dead']} dead; see {worker.log_path}\n{worker.tail()}")
        result["first_job_s"] = time.monotonic() - t0
        texts = stored_captions(store, source)
        if len(texts) != n:
            raise RuntimeError(f"job 1 stored {len(texts)} English captions for {n} items")
        caption_task, _ = store.captioned(source)  # type: ignore[misc]
        result["captions"] = {"distinct": len(set(texts)), "examples": texts[:3]}

        log("loading the translation model in-process (model-only)")
        model = TranslationModel(str(tr_ckpt), device="cpu", threads=threads)
        model.load()
        tokens = model.count_tokens(texts)
        result["mean_source_tokens"] = sum(tokens) / n
        # Decode steps the micro-batches' budgets allow (bench.translate._shape): model-only sorts all N
        # texts by length; the worker sorts only within each batch of max_batch, formed in arrival order
        # (~seq order), so each batch runs to the budget of its longest text.
        from bench.translate import _shape

        result["decode_steps"] = {"model_only_sorted": _shape(sorted(tokens, reverse=True), MICRO_BATCH)[1],
                                  "seq_order_batches": _shape(tokens, min(MICRO_BATCH, args.max_batch))[1]}
        model.translate(texts[:MICRO_BATCH], WARM_LANG, micro_batch=MICRO_BATCH)  # warm-up
        result["pieces"] = pieces(settings, store, refs, caption_task, cap_ckpt)

        watch = {"worker": [worker.p.pid], **svc.pids()}
        a_runs: list[dict[str, Any]] = []
        b_runs: list[dict[str, Any]] = []

        outputs: dict[str, list[str]] = {}

        def run_a(langs: list[str]) -> None:
            def work() -> None:
                for lang in langs:
                    outputs[lang] = model.translate(texts, lang, micro_batch=MICRO_BATCH)

            # On a thread of its own, as the worker's inference thread runs it: torch's intra-op
            # threading differs between the main thread and others (see the module docstring).
            c, t = time.process_time(), time.perf_counter()
            thread = threading.Thread(target=work, name="model-only")
            thread.start()
            thread.join()
            dt = time.perf_counter() - t
            a_runs.append({"langs": langs, "seconds": dt, "sentences_s": n * len(langs) / dt,
                           "cpu_ms_per_sentence": 1000 * (time.process_time() - c) / (n * len(langs))})

        def run_b(langs: list[str]) -> None:
            before = scrape(port)
            cpu0 = {k: cpu_seconds(v) for k, v in watch.items()}
            t0 = time.monotonic()
            job = enqueue(settings, "translate", "--job", str(source), "--lang", ",".join(langs))
            enqueue_s = time.monotonic() - t0
            end, counts = wait_done(store, job, n, 120 + 2 * n, alive=worker.alive)
            dt = end - t0
            cpu = {k: cpu_seconds(v) - cpu0[k] for k, v in watch.items()}
            time.sleep(0.3)  # counters are bumped just after the commit that wait_done saw
            after = scrape(port)
            if counts["dead"]:
                raise RuntimeError(f"{counts['dead']} items dead-lettered; see {worker.log_path}\n{worker.tail()}")
            stored = translations_stored(store, langs)
            if stored != {lang: n for lang in langs}:
                raise RuntimeError(f"translations stored {stored}, expected {n} per language")
            tr_batches = delta(after, before, 'imgq_batch_size_count{kind="translate"}')
            b_runs.append({
                "langs": langs, "job": str(job), "seconds": dt, "enqueue_cli_s": enqueue_s,
                "sentences_s": n * len(langs) / dt,
                "reused_captions": delta(after, before, 'imgq_reused_results_total{kind="caption"}'),
                "blip_batches": delta(after, before, 'imgq_model_seconds_count{kind="caption"}'),
                "translate_model_s": delta(after, before, 'imgq_model_seconds_sum{kind="translate"}'),
                "translate_batches": tr_batches,
                "mean_translate_batch": delta(after, before, 'imgq_batch_size_sum{kind="translate"}')
                / max(1, tr_batches),
                "cpu_s": cpu,
            })
            if b_runs[-1]["reused_captions"] != n or b_runs[-1]["blip_batches"] != 0:
                raise RuntimeError(f"expected {n} reused captions and no BLIP batch: {b_runs[-1]}")

        for r, langs in enumerate(plan):
            order = (run_a, run_b) if r % 2 == 0 else (run_b, run_a)
            for fn in order:
                fn(langs)
            log(f"repeat {r + 1} ({','.join(langs)}): model-only {a_runs[-1]['sentences_s']:.1f}/s, "
                f"e2e {b_runs[-1]['sentences_s']:.1f}/s ({b_runs[-1]['seconds']:.2f}s, enqueue CLI "
                f"{b_runs[-1]['enqueue_cli_s']:.2f}s, worker translate model {b_runs[-1]['translate_model_s']:.2f}s, "
                f"reused {b_runs[-1]['reused_captions']:.0f})")
        differing = 0
        for lang, out in outputs.items():  # the worker must have stored what the model-only pass produced
            stored = stored_translations(store, lang)
            differing += sum(stored.get(ref) != text_ for ref, text_ in zip(refs, out, strict=True))
        result["translations_differing"] = differing
        result["translations_compared"] = n * len(outputs)
        result["mean_output_words"] = median([len(t.split()) for out in outputs.values() for t in out])
        a = median([x["sentences_s"] for x in a_runs])
        b = median([x["sentences_s"] for x in b_runs])
        result.update({
            "model_only_sentences_s": a, "e2e_sentences_s": b, "e2e_over_model": b / a,
            "e2e_over_model_paired": median([y["sentences_s"] / x["sentences_s"]
                                             for x, y in zip(a_runs, b_runs, strict=True)]),
            "model_only_s": median([x["seconds"] for x in a_runs]),
            "model_only_cpu_ms_per_sentence": median([x["cpu_ms_per_sentence"] for x in a_runs]),
            "e2e_s": median([x["seconds"] for x in b_runs]),
            "e2e_enqueue_cli_s": median([x["enqueue_cli_s"] for x in b_runs]),
            "e2e_translate_model_s": median([x["translate_model_s"] for x in b_runs]),
            "e2e_mean_translate_batch": median([x["mean_translate_batch"] for x in b_runs]),
            "e2e_cpu_s": {k: median([x["cpu_s"][k] for x in b_runs]) for k in watch},
            "reused_captions": [x["reused_captions"] for x in b_runs],
            "blip_batches": [x["blip_batches"] for x in b_runs],
            "raw": {"model_only": a_runs, "e2e": b_runs},
        })
        store.engine.dispose()
    finally:
        if worker is not None:
            worker.stop(60)
        svc.stop()

    if args.json:
        print(json.dumps(result, indent=1, default=str))
    else:
        print_table(result)
    return 0


def print_table(r: dict[str, Any]) -> None:
    n, k = r["images"], len(r["languages_per_repeat"][0])
    p = r["pieces"]
    other = r["e2e_s"] - r["e2e_enqueue_cli_s"] - r["e2e_translate_model_s"]
    print(f"# {r['command']}")
    print(f"# {r['cpus']} CPUs; translate arch={r['arch']}, torch threads={r['torch_threads']}, worker max_batch="
          f"{r['max_batch']}, micro_batch={r['micro_batch']}; {n} images x {k} languages per repeat, "
          f"languages {' | '.join(','.join(x) for x in r['languages_per_repeat'])}; medians of {r['repeats']}")
    print(f"# English captions: {r['captions']['distinct']} distinct of {n}, mean {r['mean_source_tokens']:.1f} "
          f"source tokens, e.g. {r['captions']['examples'][0]!r}")
    print()
    print("| measure | value |")
    print("|---|---|")
    rows = [
        ("(a) model-only sentences/s (TranslationModel.translate, all captions per language)",
         f"{r['model_only_sentences_s']:.1f}"),
        ("(b) end-to-end sentences/s (enqueue translate --job -> worker -> Postgres)", f"{r['e2e_sentences_s']:.1f}"),
        ("(c) b / a (ratio of medians)", f"{r['e2e_over_model']:.3f}"),
        ("    median of per-repeat ratios", f"{r['e2e_over_model_paired']:.3f}"),
        ("raw per repeat: model-only / e2e sentences/s",
         ", ".join(f"{x['sentences_s']:.1f}" for x in r["raw"]["model_only"]) + " / "
         + ", ".join(f"{x['sentences_s']:.1f}" for x in r["raw"]["e2e"])),
        ("reused captions per e2e job (imgq_reused_results_total{kind=caption} delta)",
         ", ".join(f"{x:.0f}" for x in r["reused_captions"]) + f" (of {n})"),
        ("BLIP batches during e2e jobs (imgq_model_seconds_count{kind=caption} delta)",
         ", ".join(f"{x:.0f}" for x in r["blip_batches"])),
        ("model-only seconds per repeat", f"{r['model_only_s']:.2f}"),
        ("e2e seconds per repeat", f"{r['e2e_s']:.2f}"),
        ("    of which the `imgq enqueue translate` CLI call (start-up, lookup, accept, publish)",
         f"{r['e2e_enqueue_cli_s']:.2f}"),
        ("    of which worker translate model time (imgq_model_seconds_sum{kind=translate})",
         f"{r['e2e_translate_model_s']:.2f}"),
        ("    the rest (fetch+hash, lookups, batching waits, writes, polling)", f"{other:.2f}"),
        ("decode steps per language: all texts sorted (model-only) / seq-order batches (~worker)",
         f"{r['decode_steps']['model_only_sorted']} / {r['decode_steps']['seq_order_batches']}"),
        ("worker mean translate batch (items)", f"{r['e2e_mean_translate_batch']:.1f}"),
        ("e2e CPU seconds: " + ", ".join(r["e2e_cpu_s"]), ", ".join(f"{v:.2f}" for v in r["e2e_cpu_s"].values())),
        ("model-only CPU ms/sentence (this process)", f"{r['model_only_cpu_ms_per_sentence']:.2f}"),
        ("in-process, per item: fetch + sha256 version (ms)",
         f"{p['fetch_hash_ms_per_item']:.2f} ({p['mean_image_kb']:.0f} kB JPEG)"),
        ("in-process, per item: Store.existing_caption lookup (ms)", f"{p['lookup_ms_per_item']:.2f}"),
        ("worker-stored vs model-only translations differing",
         f"{r['translations_differing']} of {r['translations_compared']}"),
        ("job 1 (caption + ja, cold worker) seconds", f"{r['first_job_s']:.1f}"),
    ]
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    raise SystemExit(main())
