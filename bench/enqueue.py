"""Acceptance from a file, the way an operator runs a backfill: `imgq enqueue caption -f FILE`
as a subprocess (Python start-up, ref validation, COPY into Postgres, the first broker window
published to Redis), at 16, 64 and 256 refs per message.

Each repeat runs every (variant, message size) once, alternating, on the same empty tables:

* ``after``: the CLI as it is.
* ``before``: the same CLI with the ref-validation path of before issue 14 put back
  (:func:`before_cli`): every ref through ``parse_ref`` and a list. Only the validation is put
  back: both variants run today's acceptance (``--variants before,after``; docs/performance.md's
  table E1 measured them on the schema of before migration 0009).
* ``before-0009``: the acceptance of before migration 0009 put back (:func:`window_cli`,
  :func:`schema_before_0009`): ``job_items`` with its foreign key to ``jobs`` and the index of
  every pending item, and enqueue publishing the job's whole first window itself.
* ``before-0010``: the CLI as it is on ``job_items`` with the four foreign keys of its result links
  put back (image, caption, embedding, match), as before migration 0010.
* ``streams-1``: the CLI as it is with ``IMGQ_COPY_STREAMS=1``: the items in one COPY, as before
  the side streams (``after`` runs the default, 2).

    .venv/bin/python -m bench.enqueue [--refs 100000] [--repeats 3] [--variants before-0009,after]

It uses its own embedded Postgres and Redis (``.imgq/bench-enqueue``): it truncates the tables
between runs, which must not hit another bench's services.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from typing import Any

import bench.common as common
from bench.common import ITEM_LINKS, ROOT, median, settings_env

PER_MESSAGE = (16, 64, 256)


def before_cli() -> None:
    """`imgq` with the enqueue paths of before issue 14 (run as ``python -c``, argv as the CLI's)."""
    from imgq.producer import expand
    from imgq.refs import parse_ref

    def expand_before(self: Any, raw: str, on_bad: Any = None) -> list[str]:
        # The signature of today's ``Expander.__call__`` (``accept_refs`` passes ``on_bad``).
        raw = raw.strip()
        if not raw or raw.startswith("#"):
            return []
        settings = self._settings
        if raw.lower().startswith("s3://"):
            if raw.endswith("/"):
                return list(self.list_prefix(raw, on_bad))
            return [str(parse_ref(raw, allowed_buckets=settings.allowed_buckets, local_roots=[]))]
        return expand_now(self, raw, on_bad)

    expand_now = expand.Expander.__call__
    expand.Expander.__call__ = expand_before  # type: ignore[method-assign]
    expand.Expander.object_ref = lambda self, raw: None  # type: ignore[method-assign]
    from imgq.cli import main

    main()


def window_cli() -> None:
    """`imgq` publishing the job's whole first window itself, as before migration 0009."""
    import imgq.producer.submit as submit

    submit.PRODUCER_MESSAGES = None  # type: ignore[assignment]
    from imgq.cli import main

    main()


# What migration 0009 changed in job_items, for the before-0009 variant (on emptied tables: instant).
_SCHEMA = {
    "before-0010": [f"ALTER TABLE job_items ADD CONSTRAINT job_items_{column}_fkey FOREIGN KEY ({column}) "
                    f"REFERENCES {table} (id)" for column, table in ITEM_LINKS.items()],
    "before-0009": [
        "ALTER TABLE job_items ADD CONSTRAINT job_items_job_id_fkey FOREIGN KEY (job_id) REFERENCES jobs (id) "
        "ON DELETE CASCADE",
        "CREATE INDEX job_items_pending ON job_items (state, updated_at) WHERE state in ('queued', 'running')",
    ],
}


def schema_before_0009(store: Any, variant: str) -> None:
    """Put ``job_items`` as ``variant`` had it: that of before 0009 or 0010, or today's."""
    from sqlalchemy import text

    with store.engine.begin() as conn:
        conn.execute(text("ALTER TABLE job_items DROP CONSTRAINT IF EXISTS job_items_job_id_fkey"))
        conn.execute(text("DROP INDEX IF EXISTS job_items_pending"))
        for column in ITEM_LINKS:
            conn.execute(text(f"ALTER TABLE job_items DROP CONSTRAINT IF EXISTS job_items_{column}_fkey"))
        for statement in _SCHEMA.get(variant, []):
            conn.execute(text(statement))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refs", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="before-0009,after")
    ap.add_argument("--per-message", default=",".join(map(str, PER_MESSAGE)))
    args = ap.parse_args()
    variants = args.variants.split(",")
    sizes = [int(n) for n in args.per_message.split(",")]
    common.WORK = ROOT / ".imgq" / "bench-enqueue"
    svc = common.Services.start()
    try:
        settings = svc.settings(allowed_buckets=["archive"])
        env = settings_env(settings)
        listing = common.WORK / f"refs-{args.refs}.txt"
        if not listing.exists():
            listing.write_text("".join(f"s3://archive/2024/{i:08d}.jpg\n" for i in range(args.refs)))
        rc = svc.redis_client()
        from imgq.db.store import Store

        store = Store.from_url(svc.database_url)
        commands = {
            "before": [sys.executable, "-c", "from bench.enqueue import before_cli; before_cli()"],
            "after": [sys.executable, "-m", "imgq.cli"],
            "before-0009": [sys.executable, "-c", "from bench.enqueue import window_cli; window_cli()"],
            "streams-1": [sys.executable, "-m", "imgq.cli"],
            "before-0010": [sys.executable, "-m", "imgq.cli"],
        }
        envs = {variant: env for variant in commands} | {"streams-1": env | {"IMGQ_COPY_STREAMS": "1"}}
        results: dict[tuple[str, int], list[float]] = {(v, n): [] for n in sizes for v in variants}
        # The CLI's own CPU seconds (user + system): on a shared machine less noisy than the wall.
        cpu: dict[tuple[str, int], list[float]] = {key: [] for key in results}
        for _ in range(args.repeats):
            for variant, per_message in results:
                svc.truncate(store)  # the same starting table for every variant
                schema_before_0009(store, variant)
                rc.flushdb()
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t = time.perf_counter()
                out = subprocess.run([*commands[variant], "enqueue", "caption", "-f", str(listing),
                                      "--refs-per-message", str(per_message)],
                                     env=envs[variant], cwd=ROOT, capture_output=True, text=True)
                elapsed = time.perf_counter() - t
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu[variant, per_message].append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
                if out.returncode != 0:
                    raise SystemExit(out.stderr)
                results[variant, per_message].append(args.refs / elapsed)
        print(f"# {' '.join(sys.argv)}")
        for (variant, per_message), values in results.items():
            print(f"imgq enqueue -f ({args.refs:,} refs, {per_message:>3} refs/message) {variant:>6}: "
                  f"{median(values):>8,.0f} refs/s  raw {[round(v) for v in values]}; "
                  f"CLI CPU {median(cpu[variant, per_message]):.2f} s")
        for base in ("before", "before-0009", "before-0010", "streams-1"):
            if {base, "after"} <= set(variants):
                for per_message in sizes:
                    ratio = [a / b for a, b in zip(results["after", per_message], results[base, per_message],
                                                   strict=True)]
                    print(f"after / {base} at {per_message:>3} refs/message: x{median(ratio):.2f} "
                          f"(per repeat {[round(r, 2) for r in ratio]})")
        schema_before_0009(store, "after")
    finally:
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
