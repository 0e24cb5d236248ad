"""The worker's listener on loopback when the database or broker stalls: a probe or a scrape that
would wait for ever answers at the deadline instead (a SIGSTOPped Redis fires no library timeout)."""

from __future__ import annotations

import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from imgq.errors import ConfigError
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


def test_the_workers_probes_answer_while_its_models_load_and_a_taken_port_fails_first(tmp_path) -> None:
    """The listener starts before the models load (minutes from the hub): /healthz answers and
    /readyz says why not; a port already taken fails the start before any load."""
    import socket

    from imgq.config import Settings
    from imgq.embedded import free_port
    from imgq.worker.app import WorkerRuntime

    loading, release = threading.Event(), threading.Event()

    class SlowToLoad:
        name, revision, input_size = "slow", "r", 384

        def load(self) -> None:
            loading.set()
            release.wait(30)
            raise RuntimeError("stop here: the test is about the listener")

    port = free_port()
    settings = Settings(_env_file=None, metrics_port=port, database_url="postgresql+psycopg://u@127.0.0.1:9/x")
    runtime = WorkerRuntime(settings, runners={"caption": SlowToLoad()})  # type: ignore[dict-item]
    def start() -> None:
        with pytest.raises(RuntimeError, match="stop here"):
            runtime.start(None)  # type: ignore[arg-type]

    starting = threading.Thread(target=start, daemon=True)
    starting.start()
    try:
        assert loading.wait(30)
        assert get(f"http://127.0.0.1:{port}/healthz")[0] == 200
        status, body, _ = get(f"http://127.0.0.1:{port}/readyz")
        assert status == 503 and "models not loaded" in body
    finally:
        release.set()
        starting.join(30)
        assert runtime.metrics is not None
        runtime.metrics.stop()

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = Settings(_env_file=None, metrics_port=taken.getsockname()[1],
                        database_url="postgresql+psycopg://u@127.0.0.1:9/x")
        loads: list[int] = []

        class Counted(SlowToLoad):
            def load(self) -> None:
                loads.append(1)

        # A configuration error naming the variable (exit 2), not an OSError escaping as a bug (exit 70).
        with pytest.raises(ConfigError, match=rf"^IMGQ_METRICS_PORT={busy.metrics_port} on .*: Address already in use"):
            WorkerRuntime(busy, runners={"caption": Counted()}).start(None)  # type: ignore[dict-item, arg-type]
        assert loads == [], "the models loaded before the port was found taken"


def test_healthz_is_503_with_the_reason_while_the_alive_probe_has_one():
    reason: list[str] = []
    server = MetricsServer(bind="127.0.0.1", port=0, token=None, ready=lambda: None, queue_depths=lambda: {},
                           alive=lambda: reason[0] if reason else None).start()
    try:
        assert get(f"http://127.0.0.1:{server.port}/healthz")[:2] == (200, "ok\n")
        reason.append("one model call has run for 700 s, over 600 s: inference is wedged")
        assert get(f"http://127.0.0.1:{server.port}/healthz")[:2] == (503, f"not alive: {reason[0]}\n")
        assert get(f"http://127.0.0.1:{server.port}/readyz")[0] == 200
    finally:
        server.stop()
