"""S3 misbehaving behind a fault-injecting proxy (tests/fixtures/faulty_s3.py) in front of moto.

The first test runs a real `imgq worker` subprocess whose IMGQ_S3_ENDPOINT_URL is the proxy. A
read timeout needs a delay beyond the worker's fixed 30 s read timeout (core/s3.py), too slow
for this suite, so the second test drives the worker's ``Fetcher`` in-process with a client
whose read timeout is 0.5 s.

boto3 retries on its own (core/s3.py: standard mode, ``max_attempts`` retries after the first
request); a worker attempt only fails once every one of those requests has failed, so the
expected request counts below are multiples of ``BOTO_TRIES``.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from imgq import errors
from imgq.db.store import Store
from imgq.s3 import make_s3_client
from imgq.worker.fetch import Fetcher
from tests.corpus import scene
from tests.e2e.helpers import run_cli, wait_finished, workers
from tests.fixtures.faulty_s3 import FaultyS3
from tests.jobs import caption_task, create_job, message

pytestmark = pytest.mark.integration

MAX_ATTEMPTS = 3


@pytest.fixture
def proxy(s3_server):
    with FaultyS3(s3_server.url) as faulty:
        yield faulty


def _boto_tries(settings) -> int:
    """HTTP requests one get_object may make: the first plus boto3's own retries."""
    return int(make_s3_client(settings).meta.config.retries["total_max_attempts"])


def test_worker_retries_transient_s3_errors_and_dead_letters_the_rest(
    make_settings, bucket, s3_client, proxy: FaultyS3, tiny_model_dir: Path, tmp_path: Path
):
    settings = make_settings(
        allowed_buckets=[bucket], s3_endpoint_url=proxy.url, max_attempts=MAX_ATTEMPTS,
        retry_base_s=0.1, retry_max_s=0.3,
    )
    tries = _boto_tries(settings)
    assert tries >= 2, "core/s3.py is expected to let boto3 retry"

    names = [f"good-{i}.jpg" for i in range(4)] + [
        "throttled-then-ok.jpg", "flaky-500-then-ok.jpg", "always-500.jpg", "denied.jpg",
    ]
    for i, name in enumerate(names):
        s3_client.put_object(Bucket=bucket, Key=f"f/{name}", Body=scene(64, 48, i))  # straight to moto
    # Exactly one worker attempt's worth of failures (every boto3 try), then the object is served.
    proxy.add(f"{bucket}/f/throttled-then-ok.jpg", "slow_down", times=tries)
    proxy.add(f"{bucket}/f/flaky-500-then-ok.jpg", "internal_error", times=tries)
    proxy.add(f"{bucket}/f/always-500.jpg", "internal_error")
    proxy.add(f"{bucket}/f/denied.jpg", "access_denied")
    names.append("missing.jpg")  # never uploaded: moto answers 404 through the proxy

    refs = [f"s3://{bucket}/f/{name}" for name in names]
    out = run_cli(settings, "enqueue", "caption", *refs, "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()

    store = Store.from_url(settings.database_url)
    with workers(settings, tiny_model_dir, tmp_path, 1) as procs:
        wait_finished(store, [job], timeout=60, procs=procs, log_dir=tmp_path)
    rows = {r["ref"].rsplit("/", 1)[1]: r for r in store.results(job)}
    store.engine.dispose()

    def hits(name: str) -> int:
        return proxy.hits[f"{bucket}/f/{name}"]

    expected = {  # name: (state, code, HTTP requests through the proxy)
        **{f"good-{i}.jpg": ("done", None, 1) for i in range(4)},
        # every boto3 try of one worker attempt fails, then the next attempt's first try succeeds
        "throttled-then-ok.jpg": ("done", None, tries + 1),
        "flaky-500-then-ok.jpg": ("done", None, tries + 1),
        "always-500.jpg": ("dead", "transient", hits("always-500.jpg")),  # counted exactly below
        "denied.jpg": ("dead", "access_denied", 1),  # 403 is neither retried by boto3 nor by the worker
        "missing.jpg": ("dead", "not_found", 1),
    }
    actual = {name: (rows[name]["state"], rows[name]["error_code"], hits(name)) for name in names}
    assert actual == expected
    attempts = {name: rows[name]["attempts"] for name in names}
    assert all(attempts[n] == 1 for n in names if n.startswith("good-") or n in ("denied.jpg", "missing.jpg"))
    assert attempts["throttled-then-ok.jpg"] > 1 and attempts["flaky-500-then-ok.jpg"] > 1
    assert attempts["always-500.jpg"] == MAX_ATTEMPTS
    # Every one of the MAX_ATTEMPTS worker attempts reached S3 and spent all of boto3's tries.
    assert hits("always-500.jpg") == MAX_ATTEMPTS * tries
    assert all(rows[n]["caption"] for n in names if expected[n][0] == "done")
    assert "InternalError" in rows["always-500.jpg"]["error"]
    assert f"after {MAX_ATTEMPTS} attempts" in rows["always-500.jpg"]["error"]

    out = run_cli(settings, "check", job)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "missing=0 duplicates=0" in out.stdout


def test_read_timeout_is_transient_then_recovers(make_settings, bucket, s3_client, proxy: FaultyS3):
    """In-process: the worker's Fetcher, with a 0.5 s read timeout instead of core/s3.py's 30 s."""
    import boto3
    from botocore.config import Config

    s3_client.put_object(Bucket=bucket, Key="slow.jpg", Body=scene(32, 32, 1))
    settings = make_settings(allowed_buckets=[bucket], s3_endpoint_url=proxy.url)
    client = boto3.client(
        "s3", endpoint_url=proxy.url, region_name="us-east-1",
        config=Config(connect_timeout=1, read_timeout=0.5, retries={"max_attempts": 1, "mode": "standard"}),
    )
    fetcher = Fetcher(settings, client)
    proxy.add(f"{bucket}/slow.jpg", "delay", times=2, delay_s=2.0)

    with pytest.raises(errors.Retryable) as info:
        fetcher.fetch(f"s3://{bucket}/slow.jpg")
    assert info.value.code == "transient"
    assert "ReadTimeout" in info.value.message
    assert proxy.hits[f"{bucket}/slow.jpg"] == 2  # boto3 retried the timeout once itself

    blob = fetcher.fetch(f"s3://{bucket}/slow.jpg")  # the delay has passed: served
    assert blob.data == scene(32, 32, 1)
    assert proxy.hits[f"{bucket}/slow.jpg"] == 3


class _AlwaysTransient:
    """Stands in for the worker's Engine: every item it is given fails with a transient S3 error
    (as always-500.jpg does above), and it counts how often each item was really tried."""

    worker_name = "stub-worker"

    def __init__(self) -> None:
        self.tries: Counter[int] = Counter()

    runners: dict = {}  # noqa: RUF012

    def in_flight(self, job, seqs) -> dict:  # newer Engine API: nothing is ever in flight here
        return {}

    def serves(self, task) -> bool:
        return True

    def submit(self, job, tasks, items):
        from imgq.worker.engine import Outcome, WorkItem

        work = []
        for seq, ref in items:
            self.tries[seq] += 1
            item = WorkItem(job, seq, ref, tuple(tasks))
            item.future.set_result(Outcome(seq, "retry", "transient", "S3 error InternalError"))
            work.append(item)
        return work


def test_grouped_transient_failures_get_every_attempt(database_url: str):
    """In-process: MessageService with the real Store and a stub engine; messages it publishes are
    delivered back to it in order, like a broker with one worker."""
    from imgq.contract import CaptionParams, TaskMessage
    from imgq.retry import RetryPolicy
    from imgq.worker.service import MessageService

    store = Store.from_url(database_url)
    refs = ["s3://b/always-500-a.jpg", "s3://b/always-500-b.jpg"]
    params = CaptionParams()
    tasks = [caption_task("m", params)]
    job = create_job(store, tasks, refs)
    broker: list[TaskMessage] = [message(job, tasks, refs)]
    engine = _AlwaysTransient()
    service = MessageService(store=store, engine=engine, policy=RetryPolicy(2, 0.01, 0.01),  # type: ignore[arg-type]
                             publish=lambda messages, delay: broker.extend(messages))
    for _ in range(20):
        if not broker:
            break
        service.handle(broker.pop(0).to_json())
    rows = list(store.results(job))
    store.engine.dispose()
    assert [(r["state"], r["error_code"]) for r in rows] == [("dead", "transient")] * 2
    assert engine.tries == {0: 2, 1: 2}, "each of IMGQ_MAX_ATTEMPTS=2 deliveries should really try the item"
