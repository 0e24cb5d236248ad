"""kombu's Redis transport, made to ride out a full Redis and a failover.

Two conditions leave Redis up but refusing writes, and kombu filed both under channel errors,
which Celery treats as unrecoverable: every worker exited 1, and again at each start while they
lasted (found by review; celery/celery#7946 for the second).

- **A full Redis**: at ``maxmemory`` (with ``noeviction``, the only policy that cannot drop
  messages) Redis refuses every command that needs memory, and every command inside MULTI, where
  kombu acknowledged messages (ZREM and HDEL of their unacked entry).
- **A demoted primary**: after a failover, connections still open to the old primary (now a
  replica; a managed Redis' endpoint moves by DNS) get ``READONLY`` for every write, the BRPOP that
  consumes included. Reconnecting reaches the new primary, which is why clients such as Ruby's
  redis-client treat READONLY as a connection error.

So, in subclasses rather than a fork:

- **Acknowledgements are never refused for memory.** They only free memory, so they go out as a
  plain pipeline, which Redis runs even when full. One refused anyway (by a replica), and a
  requeue refused (by either), still frees its prefetch slot: it had held it for good, and with
  every slot taken the worker stopped consuming without a word.
- **Both are connection errors, and no channel opens while either lasts** (Redis over its
  ``maxmemory``, or a replica): Celery's reconnection then backs off (2 s, 4 s, ... up to 30 s
  between tries, ``broker_connection_max_retries`` of them) instead of restarting the consumer six
  times a second, and the worker resumes once Redis has room or a primary answers. A message
  popped as Redis filled (its unacked entry refused), or written to a primary that lost it in the
  failover, is gone from Redis only; Postgres still holds its items and the feeder's lost-message
  sweep re-publishes them (imgq.feeding.PushLog).

Registered for ``redis://``, ``rediss://`` and ``redis+socket://`` URLs by :func:`install`.
"""

from __future__ import annotations

from typing import Any

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError

from imgq import metrics

SCHEMES = ("redis", "rediss")
# The label of imgq_broker_refusing for each refusal a channel meets.
REASONS = {OutOfMemoryError: "maxmemory", ReadOnlyError: "replica"}


class QoS(kombu_redis.QoS):
    def ack(self, delivery_tag: str) -> None:
        # The worker's own bookkeeping goes whatever Redis answers: an acknowledgement a demoted
        # primary refused kept its prefetch slot for good, and with every slot taken the worker
        # stopped consuming, so never reached the BRPOP whose error would reconnect it. The
        # unacked entry comes back after the visibility timeout; a redelivery is settled idempotently.
        try:
            super().ack(delivery_tag)
        except Exception:
            virtual.QoS.ack(self, delivery_tag)
            raise

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        # The same for a requeue, which a full Redis or a replica refuses (LPUSH in a MULTI): the
        # worker requeues a message on every outage, so each refusal would cost it a slot.
        try:
            super().reject(delivery_tag, requeue=requeue)
        except Exception:
            virtual.QoS.ack(self, delivery_tag)
            raise

    def _remove_from_indices(self, delivery_tag: str, pipe: Any = None) -> Any:
        if pipe is None:  # an acknowledgement; a restore passes its own (transactional) pipe
            with self.channel.conn_or_acquire() as client:
                pipe = client.pipeline(transaction=False)
        return super()._remove_from_indices(delivery_tag, pipe)


class Channel(kombu_redis.Channel):
    QoS = QoS

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            info = self.client.info()  # the default sections: memory and replication among them
        except Exception:  # INFO renamed or refused by a managed Redis: nothing to go by
            return
        refused = unwritable(info)
        for error, reason in REASONS.items():
            metrics.BROKER_REFUSING.labels(reason).set(1 if isinstance(refused, error) else 0)
        if refused is not None:
            self.close()
            raise refused

    def _connparams(self, asynchronous: bool = False) -> Any:
        if self.connection.client is None:
            # Celery's reconnect collects the connection (the transport lets go of its client),
            # then closes it again, closing the channel a second time; with a message still
            # unacknowledged that close needs a new client, and kombu's AttributeError on None
            # ended the worker (exit 1 after a Redis restart, once in a full run). As a connection
            # error the close ignores it; the sweep re-publishes what Redis no longer holds.
            raise RedisConnectionError("the broker connection was already closed")
        return super()._connparams(asynchronous=asynchronous)

    def _brpop_read(self, **options: Any) -> Any:
        try:
            return super()._brpop_read(**options)
        except ResponseError as exc:
            # A primary turning replica unblocks every waiting BRPOP with a plain error reply
            # ("UNBLOCKED ... instance state changed (master -> replica?)"): a failover too.
            if isinstance(exc, self.connection_errors) or not str(exc).startswith("UNBLOCKED"):
                raise
            self.client.connection.disconnect()
            raise ReadOnlyError(f"{exc}: waiting for a primary") from exc


def unwritable(info: dict[str, Any]) -> Exception | None:
    """Why a Redis refuses writes now, from ``INFO``, as the error its writes raise; None if it
    takes them."""
    if info.get("role") == "slave":
        return ReadOnlyError(f"Redis is a read-only replica of {info.get('master_host')}:{info.get('master_port')} "
                             "(a failover?): waiting for a primary")
    if over_maxmemory(info):
        return OutOfMemoryError(f"Redis is at maxmemory ({info['used_memory']} bytes used of {info['maxmemory']}): "
                                "waiting for room (make room, or raise maxmemory)")
    return None


def counted_memory(memory: dict[str, Any]) -> int:
    """What Redis counts against ``maxmemory``, from ``INFO memory``: replication and AOF buffers
    excepted."""
    return int(memory.get("used_memory", 0) or 0) - int(memory.get("mem_not_counted_for_evict", 0) or 0)


def over_maxmemory(memory: dict[str, Any]) -> bool:
    """Whether Redis refuses writes for memory now, from ``INFO`` (its memory section). Under an
    ``allkeys-*`` policy it evicts and takes them; under ``volatile-*`` it does only while keys
    with a TTL remain, which INFO does not tell, so that counts as refusing."""
    limit = int(memory.get("maxmemory", 0) or 0)
    policy = str(memory.get("maxmemory_policy") or "noeviction")
    return limit > 0 and counted_memory(memory) > limit and not policy.startswith("allkeys-")


class Transport(kombu_redis.Transport):
    Channel = Channel
    connection_errors = (*kombu_redis.Transport.connection_errors, OutOfMemoryError, ReadOnlyError)


def install() -> None:
    """Make imgq's transport the one kombu resolves for Redis URLs (idempotent)."""
    path = f"{__name__}:Transport"
    for scheme in SCHEMES:
        if kombu_transport.TRANSPORT_ALIASES.get(scheme) != path:
            kombu_transport.TRANSPORT_ALIASES[scheme] = path
            kombu_transport._transport_cache.pop(scheme, None)
