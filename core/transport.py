"""kombu's Redis transport, made to ride out a full Redis.

At ``maxmemory`` (with ``noeviction``, the only policy that cannot drop messages) Redis refuses
every command that needs memory, and every command inside MULTI. kombu acknowledges a message in
a MULTI (ZREM and HDEL of its unacked entry), and files Redis' refusal under channel errors,
which Celery treats as unrecoverable: every worker exited 1, and again at start while Redis stayed
full (found by review). Two changes, in subclasses rather than a fork:

- **Acknowledgements are never refused.** They only free memory, so they go out as a plain
  pipeline, which Redis runs even when full. A refused acknowledgement had also left its message
  counted against the worker's prefetch for good: with every slot taken, the worker stopped
  consuming without a word.
- **A full Redis is a broker that cannot serve for now**, a connection error, and a channel is
  not opened on a Redis that is full: Celery's reconnection then backs off (2 s, 4 s, ... up to
  30 s between tries, ``broker_connection_max_retries`` of them) instead of restarting the
  consumer six times a second, and the worker resumes once Redis has room. A message popped as
  Redis filled (its unacked entry refused) is gone from Redis only; Postgres still holds its
  items and the feeder's lost-message sweep re-publishes them (imgq.feeding.PushLog).

Registered for ``redis://``, ``rediss://`` and ``redis+socket://`` URLs by :func:`install`.
"""

from __future__ import annotations

from typing import Any

from kombu import transport as kombu_transport
from kombu.transport import redis as kombu_redis
from redis.exceptions import OutOfMemoryError

SCHEMES = ("redis", "rediss")


class QoS(kombu_redis.QoS):
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
            memory = self.client.info("memory")
        except Exception:  # INFO renamed or refused by a managed Redis: nothing to go by
            return
        if over_maxmemory(memory):
            self.close()
            raise OutOfMemoryError(
                f"Redis is at maxmemory ({memory['used_memory']} bytes used of {memory['maxmemory']}): "
                "waiting for room (make room, or raise maxmemory)")


def counted_memory(memory: dict[str, Any]) -> int:
    """What Redis counts against ``maxmemory``, from ``INFO memory``: replication and AOF buffers
    excepted."""
    return int(memory.get("used_memory", 0) or 0) - int(memory.get("mem_not_counted_for_evict", 0) or 0)


def over_maxmemory(memory: dict[str, Any]) -> bool:
    """Whether Redis refuses writes now, from ``INFO memory``."""
    limit = int(memory.get("maxmemory", 0) or 0)
    return limit > 0 and counted_memory(memory) > limit


class Transport(kombu_redis.Transport):
    Channel = Channel
    connection_errors = (*kombu_redis.Transport.connection_errors, OutOfMemoryError)


def install() -> None:
    """Make imgq's transport the one kombu resolves for Redis URLs (idempotent)."""
    path = f"{__name__}:Transport"
    for scheme in SCHEMES:
        if kombu_transport.TRANSPORT_ALIASES.get(scheme) != path:
            kombu_transport.TRANSPORT_ALIASES[scheme] = path
            kombu_transport._transport_cache.pop(scheme, None)
