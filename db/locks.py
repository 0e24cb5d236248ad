"""imgq's Postgres advisory locks, in one place so no two uses share a key space.

Each is a two-key lock (class, hashtext of a name) except the reaper's, a single key. A lock class
shared by two uses made a cancel wait for hours on a backfill whose name hashed like its job
(found by review): every class is listed here once.
"""

from __future__ import annotations

REAPER = 74657302  # one reaper pass at a time (a single-key transaction lock)
FEED = 74657303  # (FEED, hashtext(queue)): one feed cycle at a time per queue
LEADER = 74657304  # (LEADER, hashtext(queue)): the worker that runs the queue's feed loop (session)
BACKFILL = 74657305  # (BACKFILL, hashtext(name)): one run of a backfill at a time (session)
ACCEPTANCE = 74657306  # (ACCEPTANCE, hashtext(job)): a job being loaded by side COPY streams
CANCEL = 74657307  # (CANCEL, hashtext(job)): one chunk of a job's cancel at a time

CLASSES = (REAPER, FEED, LEADER, BACKFILL, ACCEPTANCE, CANCEL)
