"""The worker's listener on loopback when the database or broker stalls: a probe or a scrape that
would wait for ever answers at the deadline instead (a SIGSTOPped Redis fires no library timeout)."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from imgq.worker.metrics_server import PROBE_DEADLINE_S, MetricsServer


def get(url: str) -> tuple[int, str, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read().decode(), time.monotonic() - started
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), time.monotonic() - started


@pytest.fixture
def stalled() -> Iterator[threading.Event]:
    released = threading.Event()
    yield released
    released.set()


def serve(ready: Callable[[], str | None], depths: Callable[[], dict[str, int]]) -> MetricsServer:
    return MetricsServer(bind="127.0.0.1", port=0, token=None, ready=ready, queue_depths=depths).start()


def test_a_stalled_database_or_broker_makes_readyz_503_at_the_deadline(stalled: threading.Event):
    server = serve(lambda: stalled.wait() and None, lambda: {"imgq": 0})
    try:
        status, body, took = get(f"http://127.0.0.1:{server.port}/readyz")
        assert status == 503 and "no answer within" in body
        assert took < PROBE_DEADLINE_S + 2
        assert get(f"http://127.0.0.1:{server.port}/healthz")[0] == 200
    finally:
        server.stop()


def test_a_stalled_broker_leaves_the_depth_out_of_a_scrape_that_still_answers(stalled: threading.Event):
    calls = []

    def depths() -> dict[str, int]:
        calls.append(1)
        stalled.wait()
        return {"imgq": 7}

    server = serve(lambda: None, depths)
    try:
        for _ in range(2):
            status, body, took = get(f"http://127.0.0.1:{server.port}/metrics")
            assert status == 200 and took < PROBE_DEADLINE_S + 2
            assert "imgq_worker_rss_bytes " in body and 'imgq_queue_depth{queue="imgq"}' not in body
        assert len(calls) == 1, "a second scrape waits on the stalled sample instead of starting another"
        stalled.set()
        time.sleep(0.1)
        assert 'imgq_queue_depth{queue="imgq"} 7.0' in get(f"http://127.0.0.1:{server.port}/metrics")[1]
    finally:
        server.stop()


def test_readyz_names_what_failed_and_not_the_drivers_message():
    def probe() -> str | None:
        raise ConnectionError('connection to server on socket "/run/postgresql/.s.PGSQL.5432" failed: '
                              'role "imgq_worker"')

    server = serve(probe, lambda: {})
    try:
        status, body, _ = get(f"http://127.0.0.1:{server.port}/readyz")
        assert status == 503 and "ConnectionError" in body
        assert "socket" not in body and "imgq_worker" not in body
    finally:
        server.stop()
