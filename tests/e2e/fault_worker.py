"""`imgq worker` with test-only faults injected, chosen by IMGQ_TEST_FAULTS (comma-separated):

- ``poison``: an image whose bytes contain b"IMGQ-POISON" kills the process (SIGKILL) when decoded;
- ``kill_before_commit``: the first result write after the file named by IMGQ_TEST_MARKER
  appears kills the process after inference, before the commit (the file is removed first);
- ``broken_model``: every caption batch fails as a dead CUDA context would;
- ``slow_model``: every caption batch first sleeps IMGQ_TEST_SLOW_S seconds (default 3), so
  that work is surely in flight when a test signals the worker, however fast the machine;
- ``hung_model``: every caption batch blocks for ever, as a hung device or a deadlocked kernel
  would (no exception, no return).

Everything else is the real CLI entry point, unchanged.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

faults = set(filter(None, os.environ.get("IMGQ_TEST_FAULTS", "").split(",")))

if "poison" in faults:
    import imgq.worker.app as worker_app

    real_decode = worker_app.decode

    def decode(data: bytes, **kwargs):  # type: ignore[no-untyped-def]
        if b"IMGQ-POISON" in data:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_decode(data, **kwargs)

    worker_app.decode = decode

if "kill_before_commit" in faults:
    from imgq.db.store import Store

    marker = Path(os.environ["IMGQ_TEST_MARKER"])
    real_write = Store.write_done

    def write_done(self, items):  # type: ignore[no-untyped-def]
        if items and marker.exists():
            marker.unlink()
            os.kill(os.getpid(), signal.SIGKILL)
        return real_write(self, items)

    Store.write_done = write_done

if "broken_model" in faults:
    from imgq.worker.model import CaptionModel

    def caption(self, pixel_values, params):  # type: ignore[no-untyped-def]
        raise RuntimeError("CUDA error: device-side assert triggered")

    CaptionModel.caption = caption

if "slow_model" in faults:
    import time

    from imgq.worker.model import CaptionModel

    real_caption = CaptionModel.caption
    pause = float(os.environ.get("IMGQ_TEST_SLOW_S", "3"))

    def slow_caption(self, pixel_values, params):  # type: ignore[no-untyped-def]
        time.sleep(pause)
        return real_caption(self, pixel_values, params)

    CaptionModel.caption = slow_caption

if "hung_model" in faults:
    import threading

    from imgq.worker.model import CaptionModel

    never = threading.Event()

    def hung_caption(self, pixel_values, params):  # type: ignore[no-untyped-def]
        never.wait()

    CaptionModel.caption = hung_caption

if __name__ == "__main__":
    from imgq.cli import main

    main()
