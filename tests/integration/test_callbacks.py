"""Job-finished callbacks against real Postgres and a real HTTP receiver on loopback: one signed POST
per finished job, retries after a failure, the address policy at send time, nothing early."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from imgq.callbacks import check_callback_url
from imgq.config import Settings
from imgq.db.callbacks import CallbackStore
from imgq.db.store import Store
from imgq.worker.notifier import Notifier
from tests.callback_receiver import Receiver, tls_pair
from tests.jobs import caption_task, create_job
from tests.snippets import documented_verifier

pytestmark = pytest.mark.integration

SECRET = "whsec-test-1"


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    s = Store.from_url(database_url)
    with s.engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (name, callback_secret) VALUES ('acme', :s)"), {"s": SECRET})
    yield s
    s.engine.dispose()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    with Receiver() as r:
        yield r


def _job(store: Store, url: str, hosts: str, *, items: int = 3, tenant: str = "acme") -> uuid.UUID:
    """A job submitted with a callback, as the API stores it."""
    job = create_job(store, [caption_task("m")], [f"/d/{i}.jpg" for i in range(items)])
    normalized = check_callback_url(url, Settings(callback_hosts=hosts))
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE jobs SET tenant = :t, callback_url = :u, callback_state = 'pending', "
                          "callback_next_at = now() WHERE id = :j"), {"t": tenant, "u": normalized, "j": job})
    return job


def _finish(store: Store, job: uuid.UUID, *, dead: int = 0, cancelled: int = 0) -> None:
    """Settle every item: the first ``dead`` dead-lettered (not_found), the next ``cancelled`` cancelled."""
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET state = CASE WHEN seq < :d THEN 'dead' WHEN seq < :d + :c "
                          "THEN 'cancelled' ELSE 'done' END WHERE job_id = :j"), {"j": job, "d": dead, "c": cancelled})
        conn.execute(text("INSERT INTO dead_letters (job_id, seq, ref, code, message, attempts) "
                          "SELECT job_id, seq, ref, 'not_found', 'gone', 1 FROM job_items "
                          "WHERE job_id = :j AND state = 'dead'"), {"j": job})


def _state(store: Store, job: uuid.UUID) -> tuple[str | None, bool]:
    with store.engine.connect() as conn:
        state, due = conn.execute(text("SELECT callback_state, callback_next_at <= now() FROM jobs WHERE id = :j"),
                                  {"j": job}).one()
    return state, bool(due)


@pytest.fixture
def notifiers(store: Store) -> Iterator[list[Notifier]]:
    made: list[Notifier] = []
    yield made
    for notifier in made:
        notifier.stop()


@pytest.fixture
def make_notifier(store: Store, notifiers: list[Notifier]) -> Any:
    def make(hosts: list[str], **kwargs: Any) -> Notifier:
        kwargs.setdefault("max_attempts", 8)
        notifiers.append(Notifier(store=CallbackStore(store.engine), hosts=hosts, **{"timeout_s": 5, **kwargs}))
        return notifiers[-1]

    return make


def _wait(predicate: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_finished_job_gets_exactly_one_post_that_the_documented_snippet_verifies(
    store: Store, receiver: Receiver, make_notifier: Any,
):
    url = f"http://127.0.0.1:{receiver.port}/hooks/imgq?x=1"
    job = _job(store, url, "127.0.0.1", items=4)
    _finish(store, job, dead=1, cancelled=1)
    notifier = make_notifier(["127.0.0.1"], interval_s=0.05).start()  # the worker's thread
    try:
        _wait(lambda: _state(store, job)[0] == "delivered")
        time.sleep(0.2)  # a few more cycles: nothing more is sent
    finally:
        notifier.stop()
    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    headers = request["headers"]
    assert request["path"] == "/hooks/imgq?x=1"
    assert headers["Host"] == f"127.0.0.1:{receiver.port}"
    assert headers["Content-Type"] == "application/json"
    assert headers["Imgq-Job"] == str(job) and headers["Imgq-Delivery"] == "1"
    assert documented_verifier()(SECRET, headers["Imgq-Signature"], request["body"])
    assert not documented_verifier()("another-secret", headers["Imgq-Signature"], request["body"])
    summary = json.loads(request["body"])
    assert summary["job"] == str(job) and summary["tenant"] == "acme" and summary["kinds"] == ["caption"]
    assert summary["total"] == 4 and summary["purged"] == 0 and summary["cancelled"] is False
    assert summary["counts"] == {"queued": 0, "running": 0, "done": 2, "dead": 1, "cancelled": 1}
    assert summary["dead_letters"] == {"not_found": 1}
    assert summary["created_at"].endswith("Z") and summary["finished_at"] >= summary["created_at"]
    attempts = CallbackStore(store.engine).attempts(job)
    assert [(a["attempt"], a["status"], a["error"]) for a in attempts] == [(1, 200, None)]
    assert attempts[0]["ms"] is not None
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT callback_next_at FROM jobs WHERE id = :j"), {"j": job}).scalar() is None


def test_a_failed_post_is_retried_after_the_backoff_then_delivered(store: Store, make_notifier: Any):
    with Receiver([500]) as receiver:
        job = _job(store, f"http://127.0.0.1:{receiver.port}/cb", "127.0.0.1")
        _finish(store, job)
        # 2 s: long enough that the two checks below run before it is due on a loaded host.
        notifier = make_notifier(["127.0.0.1"], schedule=(2.0,))
        assert notifier.run_once() == 1
        assert _state(store, job) == ("pending", False)
        assert notifier.run_once() == 0  # not due yet
        _wait(lambda: _state(store, job)[1])
        assert notifier.run_once() == 1
    assert _state(store, job)[0] == "delivered"
    assert [r["headers"]["Imgq-Delivery"] for r in receiver.requests] == ["1", "2"]
    attempts = CallbackStore(store.engine).attempts(job)
    assert [(a["attempt"], a["status"]) for a in attempts] == [(1, 500), (2, 200)]


def test_a_callback_fails_after_the_last_attempt(store: Store, make_notifier: Any):
    with Receiver([503, 503, 503]) as receiver:
        job = _job(store, f"http://127.0.0.1:{receiver.port}/cb", "127.0.0.1")
        _finish(store, job)
        notifier = make_notifier(["127.0.0.1"], schedule=(0.0,), max_attempts=2)
        assert notifier.run_once() == 2 and notifier.run_once() == 0  # no backoff: due again at once
    assert _state(store, job)[0] == "failed" and len(receiver.requests) == 2


def test_a_host_allowed_by_name_that_resolves_to_loopback_is_refused_at_send_time(
    store: Store, receiver: Receiver, make_notifier: Any,
):
    job = _job(store, f"http://localhost:{receiver.port}/cb", "localhost")  # accepted at submission
    _finish(store, job)
    assert make_notifier(["localhost"]).run_once() == 1
    assert receiver.requests == []
    [attempt] = CallbackStore(store.engine).attempts(job)
    assert attempt["status"] is None
    assert "refused" in attempt["error"] and "loopback" in attempt["error"], attempt["error"]
    assert _state(store, job) == ("pending", False)  # tried again later, in case DNS or the list changes


def test_the_resolved_address_is_pinned_and_the_name_kept_in_host(store: Store, receiver: Receiver, make_notifier: Any):
    job = _job(store, f"http://hooks.example.test:{receiver.port}/cb", "hooks.example.test")
    _finish(store, job)
    asked: list[tuple[str, int]] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append((host, port))
        return ["127.0.0.1"]

    # The notifier lists the address explicitly (an IP entry) besides the name; no real DNS involved.
    assert make_notifier(["hooks.example.test", "127.0.0.1"], resolver=resolver).run_once() == 1
    assert asked == [("hooks.example.test", receiver.port)]
    assert receiver.requests[0]["headers"]["Host"] == f"hooks.example.test:{receiver.port}"
    assert _state(store, job)[0] == "delivered"


@pytest.mark.parametrize(("certificate_for", "state"), [("hooks.example.test", "delivered"),
                                                       ("other.example.test", "pending")])
def test_https_to_the_pinned_address_verifies_the_certificate_for_the_name(
    store: Store, make_notifier: Any, tmp_path: Path, certificate_for: str, state: str,
):
    server_tls, client_tls = tls_pair(certificate_for, tmp_path)
    with Receiver(tls=server_tls) as receiver:
        job = _job(store, f"https://hooks.example.test:{receiver.port}/cb", "hooks.example.test")
        _finish(store, job)
        notifier = make_notifier(["hooks.example.test", "127.0.0.1"], verify=client_tls,
                                 resolver=lambda host, port: ["127.0.0.1"])
        assert notifier.run_once() == 1
    assert _state(store, job)[0] == state
    [attempt] = CallbackStore(store.engine).attempts(job)
    if state == "delivered":
        assert receiver.requests[0]["headers"]["Host"] == f"hooks.example.test:{receiver.port}"
        assert attempt["status"] == 200
    else:  # the certificate names another host: nothing is sent
        assert receiver.requests == [] and "ConnectError" in attempt["error"], attempt["error"]


def test_a_job_with_items_still_queued_or_running_gets_no_callback_yet(
    store: Store, receiver: Receiver, make_notifier: Any,
):
    job = _job(store, f"http://127.0.0.1:{receiver.port}/cb", "127.0.0.1", items=3)
    notifier = make_notifier(["127.0.0.1"])
    assert notifier.run_once() == 0
    with store.engine.begin() as conn:
        # A running item was claimed, and a claim marks it published.
        conn.execute(text("UPDATE job_items SET state = CASE WHEN seq = 0 THEN 'running' ELSE 'done' END, "
                          "published_at = now() WHERE job_id = :j"), {"j": job})
    assert notifier.run_once() == 0
    assert receiver.requests == [] and CallbackStore(store.engine).attempts(job) == []
    assert _state(store, job)[0] == "pending"
    _finish(store, job)
    assert notifier.run_once() == 1 and len(receiver.requests) == 1


def test_a_tenant_without_a_secret_fails_at_once(store: Store, receiver: Receiver, make_notifier: Any):
    job = _job(store, f"http://127.0.0.1:{receiver.port}/cb", "127.0.0.1", tenant="nobody")
    _finish(store, job)
    assert make_notifier(["127.0.0.1"]).run_once() == 1
    assert receiver.requests == []
    assert _state(store, job)[0] == "failed"
    assert [a["error"] for a in CallbackStore(store.engine).attempts(job)] == ["tenant has no callback secret"]


def test_a_leased_callback_is_not_claimed_twice(store: Store, receiver: Receiver):
    job = _job(store, f"http://127.0.0.1:{receiver.port}/cb", "127.0.0.1")
    _finish(store, job)
    callbacks = CallbackStore(store.engine)
    [due] = callbacks.claim(limit=10, lease_s=60)
    assert due.job == job and due.attempt == 1 and due.secret == SECRET
    assert callbacks.claim(limit=10, lease_s=60) == []  # another worker's notifier finds nothing


class Trickle:
    """A receiver on loopback that reads the request, then sends its answer's status line one byte
    every 0.2 s (for at most ``for_s``): no single read waits long, the answer never completes."""

    def __init__(self, for_s: float = 8.0) -> None:
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self._for_s = for_s
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                conn.recv(65536)
                end = time.monotonic() + self._for_s
                try:
                    for byte in b"HTTP/1.1 200 OK\r\n" * 100:
                        if time.monotonic() > end:
                            break
                        conn.sendall(bytes([byte]))
                        time.sleep(0.2)
                except OSError:  # the notifier hung up: what it should do at its deadline
                    pass

    def __enter__(self) -> Trickle:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.close()


def test_a_receiver_that_trickles_its_answer_is_cut_off_at_the_attempt_deadline(store: Store, make_notifier: Any):
    with Trickle() as trickle:
        job = _job(store, f"http://127.0.0.1:{trickle.port}/cb", "127.0.0.1")
        _finish(store, job)
        notifier = make_notifier(["127.0.0.1"], timeout_s=1, schedule=(60.0,))
        started = time.monotonic()
        assert notifier.run_once() == 1
        took = time.monotonic() - started
    assert trickle.connections == 1
    assert took < 4, f"the attempt took {took:.1f} s; IMGQ_CALLBACK_TIMEOUT_S is 1 s"
    [attempt] = CallbackStore(store.engine).attempts(job)
    assert attempt["status"] is None and "timed out" in attempt["error"]
    assert _state(store, job) == ("pending", False)  # tried again after the backoff


def test_a_slow_callback_holds_only_its_own_lease(store: Store, make_notifier: Any):
    """While one notifier waits on a slow receiver, another sends the next due callback: each is
    leased just before its attempt, so none is sent twice however long a batch takes."""
    release = threading.Event()
    with Receiver() as fast:
        slow_seen = threading.Event()

        class Slow(Receiver):
            pass

        with Slow() as slow:
            original = slow.server.RequestHandlerClass.do_POST  # type: ignore[attr-defined]

            def held(handler: Any) -> None:
                slow_seen.set()
                release.wait(10)
                original(handler)

            slow.server.RequestHandlerClass.do_POST = held  # type: ignore[attr-defined]
            first = _job(store, f"http://127.0.0.1:{slow.port}/cb", "127.0.0.1")
            _finish(store, first)
            with store.engine.begin() as conn:  # due first
                conn.execute(text("UPDATE jobs SET callback_next_at = now() - interval '1 minute' WHERE id = :j"),
                             {"j": first})
            second = _job(store, f"http://127.0.0.1:{fast.port}/cb", "127.0.0.1")
            _finish(store, second)
            busy, other = make_notifier(["127.0.0.1"]), make_notifier(["127.0.0.1"])
            sending = threading.Thread(target=busy.run_once)
            sending.start()
            assert slow_seen.wait(10)
            assert other.run_once() == 1, "the second callback was leased with the first"
            release.set()
            sending.join(10)
    assert len(slow.requests) == 1 and len(fast.requests) == 1
    assert [r["headers"]["Imgq-Job"] for r in fast.requests] == [str(second)]
    for job in (first, second):
        assert _state(store, job)[0] == "delivered"
        assert len(CallbackStore(store.engine).attempts(job)) == 1
