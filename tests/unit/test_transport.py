"""When Redis refuses writes, read off INFO (imgq.transport.over_maxmemory, unwritable)."""

import pytest
from redis.exceptions import OutOfMemoryError, ReadOnlyError

from imgq.transport import over_maxmemory, unwritable


@pytest.mark.parametrize(("memory", "full"), [
    ({"used_memory": 10_000_000, "maxmemory": 0}, False),  # no limit
    ({"used_memory": 10_000_000, "maxmemory": 9_999_999}, True),
    ({"used_memory": 10_000_000, "maxmemory": 10_000_000}, False),  # Redis refuses above, not at
    ({"used_memory": 10_000_000, "maxmemory": 9_000_000, "mem_not_counted_for_evict": 2_000_000}, False),
    ({"used_memory": 10_000_000, "maxmemory": 7_000_000, "mem_not_counted_for_evict": 2_000_000}, True),
    ({"used_memory": 10_000_000}, False),  # a Redis that does not say
    # An evicting policy takes writes past maxmemory; volatile-* only while keys with a TTL last.
    ({"used_memory": 10_000_000, "maxmemory": 9_999_999, "maxmemory_policy": "allkeys-lru"}, False),
    ({"used_memory": 10_000_000, "maxmemory": 9_999_999, "maxmemory_policy": "volatile-lru"}, True),
    ({"used_memory": 10_000_000, "maxmemory": 9_999_999, "maxmemory_policy": "noeviction"}, True),
])
def test_over_maxmemory(memory: dict, full: bool) -> None:
    assert over_maxmemory(memory) is full


@pytest.mark.parametrize(("info", "error", "says"), [
    ({"role": "master", "used_memory": 5, "maxmemory": 0}, None, None),
    ({"role": "slave", "master_host": "10.0.0.7", "master_port": 6379, "used_memory": 5, "maxmemory": 0},
     ReadOnlyError, "read-only replica of 10.0.0.7:6379"),
    ({"role": "master", "used_memory": 1_000, "maxmemory": 999}, OutOfMemoryError,
     r"at maxmemory \(1000 bytes used of 999\)"),
    # A full replica is a replica first: reconnecting, not room, is what helps.
    ({"role": "slave", "used_memory": 1_000, "maxmemory": 999}, ReadOnlyError, "replica"),
])
def test_unwritable_names_why_as_the_error_a_write_would_raise(info: dict, error: type | None, says: str) -> None:
    found = unwritable(info)
    if error is None:
        assert found is None
    else:
        assert type(found) is error
        with pytest.raises(error, match=says):
            raise found
