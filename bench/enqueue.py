"""Acceptance from a file, the way an operator runs a backfill: `imgq enqueue caption -f FILE`
as a subprocess (Python start-up, ref validation, COPY into Postgres, publish to Redis), at 16,
64 and 256 refs per message, alternated within each repeat.

    .venv/bin/python -m bench.enqueue [--refs 100000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from bench.common import WORK, Services, median, settings_env


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refs", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    svc = Services.start()
    try:
        settings = svc.settings(allowed_buckets=["archive"])
        env = settings_env(settings)
        listing = WORK / f"refs-{args.refs}.txt"
        listing.write_text("".join(f"s3://archive/2024/{i:08d}.jpg\n" for i in range(args.refs)))
        rc = svc.redis_client()
        from imgq.db.store import Store

        store = Store.from_url(svc.database_url)
        results: dict[int, list[float]] = {16: [], 64: [], 256: []}
        for _ in range(args.repeats):
            for per_message in results:
                svc.truncate(store)  # the same starting table for every variant
                t = time.perf_counter()
                out = subprocess.run([sys.executable, "-m", "imgq.cli", "enqueue", "caption", "-f", str(listing),
                                      "--refs-per-message", str(per_message)], env=env, capture_output=True, text=True)
                elapsed = time.perf_counter() - t
                if out.returncode != 0:
                    raise SystemExit(out.stderr)
                results[per_message].append(args.refs / elapsed)
                rc.delete(settings.queue)
        print(f"# {' '.join(sys.argv)}")
        for per_message, values in results.items():
            print(f"imgq enqueue -f ({args.refs:,} refs, {per_message:>2} refs/message): "
                  f"{median(values):>8,.0f} refs/s  raw {[round(v) for v in values]}")
    finally:
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
