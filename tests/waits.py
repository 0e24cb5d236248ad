"""How long a test waits for a future that should settle at once.

Ten seconds in the suite, so a loaded CI machine never fails a healthy test. The mutation run
lowers it (`IMGQ_TEST_WAIT_S`, tests/mutation_plugin.py): there a mutant that stops the engine
settling is killed when the wait runs out, and every such mutant costs the whole wait.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

SETTLE_S = float(os.environ.get("IMGQ_TEST_WAIT_S", "10"))


def lock_waited(engine: Any, *, event_type: str = "Lock", event: str | None = None, sessions: int = 1,
                running: Callable[[], bool] = lambda: True) -> bool:
    """Whether ``sessions`` sessions of ``engine``'s database come to wait on a lock (``event``:
    that wait_event only, e.g. ``advisory``), polled for up to SETTLE_S while ``running()``."""
    from sqlalchemy import text

    waiting = text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                   "AND wait_event_type = :type AND (CAST(:event AS text) IS NULL OR wait_event = :event)")
    deadline = time.monotonic() + SETTLE_S
    while running() and time.monotonic() < deadline:
        with engine.connect() as conn:
            if conn.execute(waiting, {"type": event_type, "event": event}).scalar_one() >= sessions:
                return True
        time.sleep(0.02)
    return False
