"""Dynamic batching policy. Pure: no celery, redis or torch; time comes from an injected clock.

Items are grouped by key (task kind, model, generation params, resize mode): only items with
equal keys can share one ``generate`` call. A group is flushed when it reaches its size limit
or when its oldest item has waited ``max_wait`` seconds.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


@dataclass(slots=True)
class Batch(Generic[K, T]):
    key: K
    items: list[T]
    opened: float = 0.0  # clock time its first item arrived (the batch-wait metric)


@dataclass(slots=True)
class _Group(Generic[T]):
    oldest: float
    items: list[T] = field(default_factory=list)


class Batcher(Generic[K, T]):
    def __init__(
        self,
        max_batch: int,
        max_wait: float,
        clock: Callable[[], float],
        limit: Callable[[K], int] | None = None,
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_wait < 0:
            raise ValueError("max_wait must be >= 0")
        self.max_batch = max_batch
        self.max_wait = max_wait
        self._clock = clock
        # Beam search multiplies memory per image: callers may cap some keys lower.
        self._limit = limit or (lambda _key: max_batch)
        self._groups: dict[K, _Group[T]] = {}

    def __len__(self) -> int:
        return sum(len(g.items) for g in self._groups.values())

    def add(self, key: K, item: T) -> list[Batch[K, T]]:
        """Add one item; returns the batch it completed, if any."""
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _Group(oldest=self._clock())
        group.items.append(item)
        if len(group.items) >= max(1, min(self.max_batch, self._limit(key))):
            del self._groups[key]
            return [Batch(key, group.items, group.oldest)]
        return []

    def due(self) -> list[Batch[K, T]]:
        """Groups whose oldest item has waited long enough, oldest first."""
        now = self._clock()
        # The same sum as next_deadline: with `now - oldest >= max_wait` a group could be not yet due
        # at the very time next_deadline named (0.1875 + 0.1 == now, but now - 0.1875 < 0.1).
        ready = [k for k, g in self._groups.items() if g.oldest + self.max_wait <= now]
        ready.sort(key=lambda k: self._groups[k].oldest)
        return [self._pop(k) for k in ready]

    def next_deadline(self) -> float | None:
        """Clock time at which the next group falls due; None when empty."""
        if not self._groups:
            return None
        return min(g.oldest for g in self._groups.values()) + self.max_wait

    def drain(self) -> list[Batch[K, T]]:
        """Everything pending, oldest first (shutdown, or an idle device with nothing arriving)."""
        keys = sorted(self._groups, key=lambda k: self._groups[k].oldest)
        return [self._pop(k) for k in keys]

    def _pop(self, key: K) -> Batch[K, T]:
        group = self._groups.pop(key)
        return Batch(key, group.items, group.oldest)
