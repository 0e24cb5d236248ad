"""imgq's kombu transport against a real Redis at maxmemory (imgq.transport)."""

from __future__ import annotations

import contextlib
import threading
import uuid

import pytest
import redis
from kombu import Connection

from imgq.celeryconf import make_celery
from imgq.config import Settings
from imgq.transport import Transport
from tests.fixtures.services import redis_demoted, redis_full

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://example.invalid:6380/0",
                                 "redis+socket:///run/redis.sock"])
def test_every_redis_url_gets_imgq_transport(url: str) -> None:
    app = make_celery(Settings(_env_file=None, broker_url=url))
    assert app.connection_for_read().get_transport_cls() is Transport
    assert redis.exceptions.OutOfMemoryError in Connection(url).connection_errors


def _one_delivered(broker_url: str, queue: str) -> tuple[Connection, object]:
    conn = Connection(broker_url)
    q = conn.SimpleQueue(queue)
    q.put({"n": 1}, serializer="json")
    return conn, q.get(timeout=5)


def test_an_acknowledgement_goes_through_on_a_full_redis(broker_url: str, redis_server) -> None:
    queue = f"ack-{uuid.uuid4().hex[:8]}"
    conn, message = _one_delivered(broker_url, queue)
    client = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    try:
        assert client.hlen("unacked") == 1
        with redis_full(redis_server):
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                client.set("probe", b"x")  # the block really refuses writes
            message.ack()  # kombu's MULTI was refused here: the worker exited, or stopped consuming
        assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    finally:
        conn.release()
        client.close()


def test_no_channel_opens_on_a_full_redis_and_one_does_once_it_has_room(broker_url: str, redis_server) -> None:
    with redis_full(redis_server):
        _no_channel(broker_url, r"Redis is at maxmemory .* waiting for room")
        assert (_refusing("maxmemory"), _refusing("replica")) == (1, 0)
    _a_channel(broker_url)
    assert (_refusing("maxmemory"), _refusing("replica")) == (0, 0)


def _refusing(reason: str) -> float | None:
    """imgq_broker_refusing{reason}, as this process's /metrics would show it."""
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("imgq_broker_refusing", {"reason": reason})


def _no_channel(broker_url: str, says: str) -> None:
    """A channel is refused with a connection error, so Celery's consumer reconnects with back-off
    instead of exiting."""
    conn = Connection(broker_url)
    try:
        with pytest.raises(conn.connection_errors, match=says):
            conn.channel()
    finally:
        conn.release()


def _a_channel(broker_url: str) -> None:
    conn = Connection(broker_url)
    try:
        conn.channel().close()
    finally:
        conn.release()


def test_a_publish_that_redis_refuses_is_an_outage_not_a_bug(broker_url: str, redis_server) -> None:
    """A worker publishing its retries on a full Redis: kombu's batch raises BatchPublishError,
    which must send the message back (an outage), not dead-letter its items as internal_error."""
    from imgq.classify import is_outage
    from imgq.contract import TaskMessage
    from imgq.publish import publish
    from tests.jobs import caption_task

    app = make_celery(Settings(_env_file=None, broker_url=broker_url, queue="full-test"))
    message = TaskMessage(job=str(uuid.uuid4()), tasks=[caption_task("m")], items=[(0, "/d/0.jpg")])
    publish(app, [message], queue="full-test")  # the worker's pooled producer channel is open
    with redis_full(redis_server), pytest.raises(Exception) as refused:
        publish(app, [message], queue="full-test")
    assert is_outage(refused.value), repr(refused.value)


def test_a_failover_is_a_connection_error_from_the_waiting_brpop_and_at_the_next_channel(
        broker_url: str, redis_server) -> None:
    """The primary turns replica (celery/celery#7946): the consumer's waiting BRPOP is unblocked
    with a plain error reply and every write gets READONLY. Both must reach Celery as connection
    errors (reconnect with back-off), not as channel errors (the worker exited 1)."""
    conn = Connection(broker_url)
    queue = conn.SimpleQueue(f"failover-{uuid.uuid4().hex[:8]}")
    with contextlib.ExitStack() as failover:
        timer = threading.Timer(0.5, failover.enter_context, [redis_demoted(redis_server)])
        timer.start()
        try:
            # UNBLOCKED when the demotion catches a BRPOP waiting; READONLY at the next one.
            with pytest.raises(conn.connection_errors, match=r"UNBLOCKED|read only replica"):
                queue.get(timeout=20)
        finally:
            timer.join()
            queue.close()
            conn.release()
        _no_channel(broker_url, r"read-only replica of 127\.0\.0\.1:[0-9]+")
        assert (_refusing("maxmemory"), _refusing("replica")) == (0, 1)
    _a_channel(broker_url)  # a primary again
    assert _refusing("replica") == 0


@pytest.mark.parametrize(("refusing", "settle", "says"), [
    # Else, with every slot held by refused acknowledgements, the worker stopped consuming and
    # never met the READONLY that would have made it reconnect.
    (redis_demoted, lambda message: message.ack(), "read only replica"),
    # The worker requeues a message on every outage (Reject(requeue=True)), and a full Redis
    # refuses the requeue (LPUSH in a MULTI): each cost a slot for good (found by review).
    (redis_full, lambda message: message.reject(requeue=True), "maxmemory"),
], ids=["ack-on-a-replica", "requeue-on-a-full-redis"])
def test_a_settlement_redis_refuses_still_frees_its_prefetch_slot(broker_url: str, redis_server, refusing, settle,
                                                                   says: str) -> None:
    conn, message = _one_delivered(broker_url, f"slot-{uuid.uuid4().hex[:8]}")
    channel = message.channel
    channel.basic_qos(0, 1, False)
    try:
        assert not channel.qos.can_consume()
        with refusing(redis_server), pytest.raises(conn.connection_errors, match=says):
            settle(message)
        assert channel.qos.can_consume()
    finally:
        conn.release()


def test_closing_a_collected_connections_channel_with_a_message_unacknowledged_ends_nothing(
        broker_url: str, redis_server) -> None:
    """Celery's reconnect after a Redis restart collects the connection (the transport drops its
    client), then closes it again: the channel's second close restores its unacknowledged message
    with a new client, and kombu's AttributeError on the dropped client ended the worker (exit 1,
    once in a full run of tests/e2e/test_faults.py). Now a connection error, which the close ignores."""
    conn, message = _one_delivered(broker_url, f"collected-{uuid.uuid4().hex[:8]}")
    channel = message.channel
    try:
        channel.client.connection_pool.disconnect()  # the restart: the open sockets are gone
        channel._disconnect_pools()
        conn._do_close_transport()  # what Connection.collect() leaves behind
        conn.maybe_close_channel(channel)  # raised AttributeError: 'NoneType' ... 'hostname'
    finally:
        conn.release()
