"""The naive system a user writes first: one Celery task per image, each calling the transformers
pipeline on one image and INSERTing one row. Used as the baseline beside imgq (bench.pipeline --naive).

Worker (started by bench.pipeline; solo pool, concurrency 1, model loaded once per process)::

    NAIVE_BROKER=redis+socket://... NAIVE_DB=postgresql://... NAIVE_MODEL=DIR \
        celery -A bench.naive worker --pool solo --concurrency 1 -Q naive

Producer: ``caption.apply_async((run, ref), queue="naive")`` once per image. Completion is read from
the ``naive_captions`` table.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery

MAX_NEW_TOKENS = int(os.environ.get("NAIVE_TOKENS", "20"))
QUEUE = "naive"

app = Celery("naive", broker=os.environ.get("NAIVE_BROKER", "redis://127.0.0.1:6379/0"), set_as_current=False)
app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                task_acks_late=True, worker_prefetch_multiplier=1, task_default_queue=QUEUE,
                broker_connection_retry_on_startup=True)

_pipe: Any = None
_conn: Any = None

DDL = ("CREATE TABLE IF NOT EXISTS naive_captions "
       "(run text, ref text, caption text, created_at timestamptz DEFAULT now())")


def _plain_dsn(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def get_pipe() -> Any:
    global _pipe
    if _pipe is None:
        from transformers import pipeline

        # transformers 5: "image-to-text" is gone; BLIP captioning is image-text-to-text with text="".
        _pipe = pipeline("image-text-to-text", model=os.environ["NAIVE_MODEL"], device="cpu")
    return _pipe


def get_conn() -> Any:
    global _conn
    if _conn is None:
        import psycopg

        _conn = psycopg.connect(_plain_dsn(os.environ["NAIVE_DB"]), autocommit=True)
    return _conn


def read_ref(ref: str) -> bytes:
    if ref.startswith("s3://"):
        import boto3

        bucket, _, key = ref[5:].partition("/")
        s3 = boto3.client("s3", endpoint_url=os.environ.get("NAIVE_S3"), region_name="us-east-1")
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    with open(ref, "rb") as fh:
        return fh.read()


def caption_one(data: bytes) -> str:
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data)).convert("RGB")
    out = get_pipe()(images=image, text="",
                     generate_kwargs={"max_new_tokens": MAX_NEW_TOKENS, "min_new_tokens": MAX_NEW_TOKENS})
    return str(out[0]["generated_text"]).strip()


@app.task(name="naive.caption")
def caption(run: str, ref: str) -> None:
    text = caption_one(read_ref(ref))
    get_conn().execute("INSERT INTO naive_captions (run, ref, caption) VALUES (%s, %s, %s)", (run, ref, text))


def ensure_table(database_url: str) -> None:
    import psycopg

    with psycopg.connect(_plain_dsn(database_url), autocommit=True) as conn:
        conn.execute(DDL)


def done_count(conn: Any, run: str) -> int:
    return int(conn.execute("SELECT count(*) FROM naive_captions WHERE run = %s", (run,)).fetchone()[0])


def enqueue(run: str, refs: list[str]) -> None:
    with app.producer_or_acquire() as producer:
        for ref in refs:
            caption.apply_async((run, ref), queue=QUEUE, producer=producer)


def wait(database_url: str, run: str, total: int, timeout: float, alive: Any = None) -> float:
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(_plain_dsn(database_url), autocommit=True) as conn:
        while True:
            if done_count(conn, run) >= total:
                return time.monotonic()
            if alive is not None and not alive():
                raise RuntimeError("naive worker exited")
            if time.monotonic() > deadline:
                raise TimeoutError(f"naive run unfinished after {timeout:.0f}s")
            time.sleep(0.05)
