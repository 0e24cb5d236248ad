"""The API's readiness probe on real servers: a private redis-server that is stopped (SIGSTOP: no
library timeout fires) and a Postgres that refuses. /readyz says which, within its deadline and
without the driver's message; /healthz stays up; both need no key."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from imgq import embedded
from imgq.embedded import free_port
from imgq.probes import PROBE_DEADLINE_S
from imgq.producer.api.app import create_app
from imgq.producer.api.health import READY_TTL_S


def _get(client: TestClient, path: str) -> tuple[int, dict[str, Any], float]:
    started = time.monotonic()
    response = client.get(path)
    return response.status_code, response.json(), time.monotonic() - started


def test_readyz_names_a_stalled_redis_within_its_deadline_and_recovers(
    make_settings: Callable[..., Any], tmp_path: Path,
) -> None:
    redis = embedded.Redis(tmp_path / "redis", tmp_path / "redis.sock")
    redis.start()
    try:
        with TestClient(create_app(make_settings(broker_url=redis.url))) as client:
            assert _get(client, "/readyz")[:2] == (200, {"status": "ready"})
            redis.proc.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
            time.sleep(READY_TTL_S + 0.1)
            status, body, took = _get(client, "/readyz")
            assert (status, body) == (503, {"status": "not ready",
                                            "reasons": [f"redis: no answer within {PROBE_DEADLINE_S:g} s"]})
            assert took < PROBE_DEADLINE_S + 1.5
            assert _get(client, "/healthz")[:2] == (200, {"status": "ok"})
            redis.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
            time.sleep(READY_TTL_S + 0.1)
            assert _get(client, "/readyz")[:2] == (200, {"status": "ready"})
    finally:
        redis.proc.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        redis.stop()


def test_readyz_names_a_database_that_refuses_and_not_its_address(make_settings: Callable[..., Any]) -> None:
    port = free_port()  # nothing listens there
    settings = make_settings(database_url=f"postgresql+psycopg://imgq_api@127.0.0.1:{port}/imgq")
    with TestClient(create_app(settings)) as client:
        status, body, _ = _get(client, "/readyz")
    assert (status, body) == (503, {"status": "not ready", "reasons": ["database unavailable (OperationalError)"]})
