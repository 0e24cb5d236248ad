"""Shared bench helpers: embedded services, deterministic images, tiny and full-size checkpoints,
and jobs built the way the producer builds them."""

from __future__ import annotations

import io
import json
import os
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / ".imgq" / "bench"

# Kept identical between runs so figures are comparable.
CAPTION_TOKENS = 20


# job_items' result links and their tables: foreign keys until migration 0010 (bench variants put them back).
ITEM_LINKS = {"image_id": "images", "caption_id": "captions", "embedding_id": "embeddings", "match_id": "matches"}


def median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


# -- images -------------------------------------------------------------------------------------

def image_bytes(index: int, width: int = 640, height: int = 480, quality: int = 90) -> bytes:
    """A deterministic 640x480 JPEG with structure: gradient sky, shapes, stripes and noise texture.

    Not flat: JPEG size (~100 kB: images 0-31 average 100.7 kB, 81-115 kB) and decode cost are close to
    a photo's at this size."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(index)
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    base = (c0[None, None, :] * (1 - y[..., None]) + c1[None, None, :] * y[..., None]) + 40 * np.sin(
        (x[..., None] * rng.uniform(4, 20) + y[..., None] * rng.uniform(2, 10)) * np.pi
    )
    base = base + rng.normal(0, 12, (height, width, 3))
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    r = rng.integers
    for _ in range(6):
        x0, y0 = int(r(0, width)), int(r(0, height))
        box = (x0, y0, x0 + int(r(30, width // 2)), y0 + int(r(30, height // 2)))
        fill = tuple(int(v) for v in r(0, 256, 3))
        (draw.ellipse if r(0, 2) else draw.rectangle)(box, fill=fill)
    for _ in range(3):
        draw.line([tuple(int(v) for v in (r(0, width), r(0, height))) for _ in range(4)],
                  fill=tuple(int(v) for v in r(0, 256, 3)), width=int(r(2, 12)))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def make_images(n: int, folder: Path | None = None) -> list[Path]:
    """``n`` JPEGs in ``folder`` (reused when already there)."""
    folder = folder or WORK / "images"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{i:06d}.jpg"
        if not path.exists():
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(image_bytes(i))
            os.replace(tmp, path)
        paths.append(path)
    return paths


# -- checkpoints ------------------------------------------------------------------------------------

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                    "preprocessor_config.json", "processor_config.json")


def tiny_checkpoint(patch_size: int | None = None) -> Path:
    """imgq's tiny checkpoint; ``patch_size=16`` gives the pre-2026-11-27 one (577 vision tokens)."""
    from imgq.worker.tiny import PATCH_SIZE, write_tiny_checkpoint

    patch = patch_size or PATCH_SIZE
    return write_tiny_checkpoint(WORK / ("tiny" if patch == PATCH_SIZE else f"tiny-p{patch}"), patch_size=patch)


def base_checkpoint() -> Path:
    """A full-size BLIP-base captioning architecture (BlipConfig defaults = blip-image-captioning-base
    dims: ViT-B/16 at 384 px, BERT-base 12-layer decoder with cross-attention, vocab 30524), random
    weights (seed 0), with the tiny checkpoint's tokenizer and image processor files."""
    out = WORK / "base"
    marker = out / "bench-base.json"
    if marker.exists():
        return out
    import torch
    from transformers import BlipConfig, BlipForConditionalGeneration, BlipProcessor, GenerationConfig

    tiny = tiny_checkpoint()
    processor = BlipProcessor.from_pretrained(tiny)
    tok = processor.tokenizer
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("[PAD]", "[SEP]", "[DEC]")}
    config = BlipConfig(text_config={"vocab_size": 30524, "bos_token_id": ids["[DEC]"], "sep_token_id": ids["[SEP]"],
                                     "eos_token_id": ids["[SEP]"], "pad_token_id": ids["[PAD]"]},
                        vision_config={"image_size": 384, "patch_size": 16})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BlipForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(bos_token_id=ids["[DEC]"], eos_token_id=ids["[SEP]"],
                                               pad_token_id=ids["[PAD]"], max_new_tokens=CAPTION_TOKENS)
    staging = WORK / "base.staging"
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    (staging / "bench-base.json").write_text(json.dumps({"params": sum(p.numel() for p in model.parameters())}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    return out


def retrieval_checkpoint(arch: str) -> Path:
    """The tiny retrieval checkpoint, or BLIP-base's retrieval architecture with random weights:
    ``bench.gpu_embed.retrieval_checkpoint`` (one builder for both benches), under ``WORK``."""
    from bench.gpu_embed import retrieval_checkpoint as build

    return build(arch, WORK)


def checkpoint(arch: str, kind: str = "caption") -> Path:
    """The checkpoint that serves ``kind``: captioning, or retrieval for embed and validate."""
    if kind != "caption":
        return retrieval_checkpoint(arch)
    return tiny_checkpoint() if arch == "tiny" else base_checkpoint()


# -- jobs ---------------------------------------------------------------------------------------------

def caption_params() -> Any:
    """The caption parameters every bench uses: exactly ``CAPTION_TOKENS`` tokens, greedy."""
    from imgq.contract import CaptionParams

    return CaptionParams(max_new_tokens=CAPTION_TOKENS, min_new_tokens=CAPTION_TOKENS)


def bench_task(kind: str, model: str) -> Any:
    """A message task for ``kind`` on ``model`` (caption: ``caption_params()``; others: defaults)."""
    from imgq.contract import make_task
    from imgq.kinds import spec

    params = caption_params() if kind == "caption" else spec(kind).params()
    return make_task(kind, model, params)


def task_record(task: Any) -> dict[str, Any]:
    """The ``jobs.tasks`` entry of a task, as ``producer.submit`` stores it (``Store.create_job``)."""
    return {"kind": task.kind, "model": task.model, "params": task.params.canonical(),
            "params_hash": task.params.digest()}


def create_job(store: Any, tasks: list[Any], refs: Any) -> Any:
    return store.create_job(tasks=[task_record(t) for t in tasks], refs=refs)


def caption_done(job: Any, seq: int, obj: Any, task: Any, text: str, *, worker: str = "w1:1",
                 revision: str = "local-0123456789ab") -> Any:
    """A ``DoneItem`` with one caption result, as the engine hands it to ``Store.write_done``."""
    from imgq.ports import DoneItem

    return DoneItem(job, seq, obj, worker,
                    {"caption": (task.model, revision, task.params.digest(), task.params.canonical(), text)})


# -- services ---------------------------------------------------------------------------------------

@dataclass
class Services:
    """Embedded Postgres + Redis (+ moto S3 on demand) that this bench started, stopped by PID."""

    database_url: str
    broker_url: str
    pg: Any
    redis: Any
    s3: Any = None
    _stops: list[Any] = field(default_factory=list)

    @classmethod
    def start(cls, *, s3: bool = False, fresh: bool = False, home: Path | None = None) -> Services:
        """``fresh``: a new database cluster, not the one earlier runs left (their WAL, bloat and
        statistics can change write plans and commit times). ``home``: where the servers keep
        their files (default ``WORK``), so that two benches can run at once."""
        from imgq import embedded
        from imgq.db.migrate import upgrade

        home = home or WORK
        home.mkdir(parents=True, exist_ok=True)
        if fresh:
            shutil.rmtree(home / "pg", ignore_errors=True)
        pg = embedded.start_postgres(home / "pg" / "data", database="imgq_bench")
        upgrade(pg.url)
        redis = embedded.start_redis(home / "redis")
        svc = cls(database_url=pg.url, broker_url=redis.url, pg=pg, redis=redis)
        svc._stops = [redis.stop, pg.stop]
        if s3:
            svc.start_s3()
        return svc

    def start_s3(self) -> Any:
        from imgq import embedded

        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
        os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
        self.s3 = embedded.start_s3(log=WORK / "moto.log")
        self._stops.insert(0, self.s3.stop)
        return self.s3

    def stop(self) -> None:
        for stop in self._stops:
            try:
                stop()
            except Exception as exc:  # keep stopping the rest
                print(f"warning: stopping a service failed: {exc}")
        self._stops = []

    def pids(self) -> dict[str, list[int]]:
        """Server PIDs (postgres: the postmaster; its backends are its children)."""
        out = {"postgres": [], "redis": []}
        if self.pg.pid:
            out["postgres"].append(self.pg.pid)
        if self.redis.proc is not None:
            out["redis"].append(self.redis.proc.pid)
        return out

    def settings(self, **overrides: Any) -> Any:
        from imgq.config import Settings

        base: dict[str, Any] = {"database_url": self.database_url, "broker_url": self.broker_url,
                                "local_roots": [WORK / "images"], "allowed_buckets": []}
        if self.s3 is not None:
            base["s3_endpoint_url"] = self.s3.url
        base.update(overrides)
        return Settings(**base)

    def truncate(self, store: Any) -> None:
        from sqlalchemy import text

        with store.engine.begin() as conn:
            conn.execute(text("TRUNCATE dead_letters, job_items, jobs, captions, embeddings, matches, images CASCADE"))

    def redis_client(self) -> Any:
        import redis

        return redis.Redis(unix_socket_path=str(self.redis.socket_path))


def settings_env(settings: Any, **extra: str) -> dict[str, str]:
    """The environment that reproduces ``settings`` in a subprocess (no stray IMGQ_* leaks in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMGQ_")} | settings.as_env() | extra
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def wait_done(store: Any, job: Any, total: int, timeout: float, poll: float = 0.05,
              alive: Any = None) -> tuple[float, dict[str, int]]:
    """Poll ``Store.counts`` until every item is done or dead; returns (monotonic end time, counts)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = store.counts(job)
        if counts["done"] + counts["dead"] >= total:
            return time.monotonic(), counts
        if alive is not None and not alive():
            raise RuntimeError(f"worker exited while {counts} were unfinished")
        if time.monotonic() > deadline:
            raise TimeoutError(f"unfinished after {timeout:.0f}s: {counts}")
        time.sleep(poll)
