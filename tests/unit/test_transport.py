"""When Redis refuses writes, read off INFO memory (imgq.transport.over_maxmemory)."""

import pytest

from imgq.transport import over_maxmemory


@pytest.mark.parametrize(("memory", "full"), [
    ({"used_memory": 10_000_000, "maxmemory": 0}, False),  # no limit
    ({"used_memory": 10_000_000, "maxmemory": 9_999_999}, True),
    ({"used_memory": 10_000_000, "maxmemory": 10_000_000}, False),  # Redis refuses above, not at
    ({"used_memory": 10_000_000, "maxmemory": 9_000_000, "mem_not_counted_for_evict": 2_000_000}, False),
    ({"used_memory": 10_000_000, "maxmemory": 7_000_000, "mem_not_counted_for_evict": 2_000_000}, True),
    ({"used_memory": 10_000_000}, False),  # a Redis that does not say
])
def test_over_maxmemory(memory: dict, full: bool) -> None:
    assert over_maxmemory(memory) is full
