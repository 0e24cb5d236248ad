"""How long a test waits for a future that should settle at once.

Ten seconds in the suite, so a loaded CI machine never fails a healthy test. The mutation run
lowers it (`IMGQ_TEST_WAIT_S`, tests/mutation_plugin.py): there a mutant that stops the engine
settling is killed when the wait runs out, and every such mutant costs the whole wait.
"""

from __future__ import annotations

import os

SETTLE_S = float(os.environ.get("IMGQ_TEST_WAIT_S", "10"))
