"""What a message points at, whatever else is wrong with it (pure)."""

import uuid

import pytest

from imgq.worker.service import pointer

JOB = uuid.uuid4()


@pytest.mark.parametrize(("payload", "expected"), [
    ({"job": str(JOB), "items": [[0, "/a"], [5, "/b", "t"]]}, (JOB, [0, 5])),
    ({"job": str(JOB), "items": [[3, "/a"], [3, "/a"]]}, (JOB, [3])),
    ({"job": str(JOB), "items": [[2**31 - 1, "/a"], [2**31, "/b"], [-1, "/c"], ["7", "/d"], [True, "/e"]]},
     (JOB, [2**31 - 1])),
    ({"job": str(JOB), "items": [[2**40, "/a"]]}, None),
    ({"job": "not-a-uuid", "items": [[0, "/a"]]}, None),
    ({"job": str(JOB), "items": "nope"}, None),
    ({"job": str(JOB)}, None),
    ({"items": [[0, "/a"]]}, None),
    ([1, 2, 3], None),
    (None, None),
])
def test_pointer(payload, expected):
    assert pointer(payload) == expected
