"""The memory mark's warning, said when the hold starts and at most once a minute (Feeder._log_held)."""

import logging

from imgq.worker.feeder import HELD_LOG_S, Feeder


def test_a_hold_that_flips_every_cycle_is_said_once_a_minute(caplog) -> None:
    feeder = Feeder(admin=None, app=None, queue="q", window=1, per_message=1)  # type: ignore[arg-type]
    caplog.set_level(logging.INFO, logger="imgq.worker.feeder")

    def said() -> tuple[int, int]:
        texts = [r.getMessage() for r in caplog.records]
        return (sum("of its maxmemory" in t for t in texts), sum("has room again" in t for t in texts))

    for held in [False, True, False, True, True, False, True]:  # near the mark, cycle after cycle
        feeder._log_held(held)
    assert said() == (1, 1)
    feeder._held_said_at -= HELD_LOG_S  # a minute later
    feeder._log_held(True)
    feeder._log_held(True)
    assert said() == (2, 1)
    feeder._log_held(False)
    assert said() == (2, 2)
