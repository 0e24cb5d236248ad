"""A bad-input corpus mixed into one job with good images: one `imgq worker` must dead-letter each
bad item with its own stable code, caption every good batchmate, and stay small in memory while
decompression bombs go by."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from imgq.db.store import Store
from tests.corpus import Case, e2e_cases, ordinary_cases
from tests.e2e.helpers import run_cli, wait_finished, workers

pytestmark = pytest.mark.e2e

MAX_PIXELS = 4_000_000  # small, so that a real 2048x2048 PNG is refused by the setting alone
MAX_OBJECT_BYTES = 1 << 20
PER_MESSAGE = 16
RSS_LIMIT = int(2.5 * 2**30)


def _peak_rss(pid: int) -> int:
    """VmHWM (peak resident set) of a live process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmHWM for pid {pid}")


def _check(settings, job: str) -> None:
    out = run_cli(settings, "check", job)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "missing=0 duplicates=0" in out.stdout, out.stdout


def test_bad_inputs_dead_letter_and_good_batchmates_caption(make_settings, bucket, s3_client, image_root: Path,
                                                             tiny_model_dir: Path, tmp_path: Path):
    settings = make_settings(
        allowed_buckets=[bucket], max_pixels=MAX_PIXELS, max_object_bytes=MAX_OBJECT_BYTES,
        refs_per_message=PER_MESSAGE,
        # Nothing here is transient; if something is misclassified as such, fail fast and visibly.
        max_attempts=2, retry_base_s=0.1, retry_max_s=0.2,
    )
    cases: list[Case] = e2e_cases(max_pixels=MAX_PIXELS, max_object_bytes=MAX_OBJECT_BYTES) + ordinary_cases(20)
    # Both stores see every kind of failure that depends on where the bytes live.
    both = {"missing.jpg", "too-large.jpg", "zero-bytes.jpg"}
    placed: list[tuple[Case, str]] = []
    for i, case in enumerate(cases):
        places = ["s3", "local"] if case.name in both else ["s3" if i % 2 else "local"]
        placed += [(case, place) for place in places]
    random.Random(5).shuffle(placed)

    refs: list[str] = []
    for n, (case, place) in enumerate(placed):
        name = f"{n:02d}-{case.name}"
        if place == "s3":
            if case.data is not None:
                s3_client.put_object(Bucket=bucket, Key=f"corpus/{name}", Body=case.data())
            refs.append(f"s3://{bucket}/corpus/{name}")
        else:
            if case.data is not None:
                (image_root / name).write_bytes(case.data())
            refs.append(str(image_root / name))
    bad_kinds = {c.name for c, _ in placed if c.code}
    assert len(bad_kinds) >= 15
    # Every message carries both kinds, so bad items share messages (and batches) with good ones.
    messages = [placed[i : i + PER_MESSAGE] for i in range(0, len(placed), PER_MESSAGE)]
    assert all(any(c.code for c, _ in m) and any(c.code is None for c, _ in m) for m in messages)

    listing = tmp_path / "refs.txt"
    listing.write_text("\n".join(refs) + "\n")
    out = run_cli(settings, "enqueue", "caption", "--from-file", str(listing), "--max-new-tokens", "8")
    assert out.returncode == 0, out.stderr
    assert f"accepted {len(refs)} items in {len(messages)} messages" in out.stderr
    job = out.stdout.strip()

    store = Store.from_url(settings.database_url)
    with workers(settings, tiny_model_dir, tmp_path, 1) as procs:
        totals = wait_finished(store, [job], timeout=90, procs=procs, log_dir=tmp_path)
        peak = _peak_rss(procs[0].pid)
    assert procs[0].returncode == 0, "SIGTERM must shut the worker down cleanly"
    print(f"\nworker peak RSS (VmHWM): {peak / 2**20:.0f} MiB")

    rows = {r["seq"]: r for r in store.results(job)}
    listed = run_cli(settings, "dlq", "list", "--job", job, "--json", "--limit", "1000")
    assert listed.returncode == 0, listed.stderr
    dlq = {d["seq"]: d for d in map(json.loads, listed.stdout.splitlines())}
    problems = []
    for seq, (case, place) in enumerate(placed):
        row = rows[seq]
        label = f"seq {seq} {case.name} ({place})"
        if case.code is None:
            if row["state"] != "done" or not (row["caption"] or "").strip():
                problems.append(f"{label}: expected a caption, got {row['state']} {row['error_code']} "
                                f"{row['error']}")
            elif case.size is not None and (row["width"], row["height"]) != case.size:
                problems.append(f"{label}: size {(row['width'], row['height'])}, expected {case.size}")
        else:
            got = dlq.get(seq, {}).get("code")
            if row["state"] != "dead" or row["error_code"] != case.code or got != case.code:
                problems.append(f"{label}: expected dead letter {case.code}, got {row['state']} "
                                f"{row['error_code']} (dlq {got}) {row['error'] or row['caption']!r}")
            elif row["attempts"] != 1:
                problems.append(f"{label}: permanent error took {row['attempts']} attempts")
    assert not problems, "\n".join(problems)

    good = sum(c.code is None for c, _ in placed)
    assert totals == {"queued": 0, "running": 0, "done": good, "dead": len(placed) - good}
    assert len(dlq) == len(placed) - good
    # Every good batchmate of every message was captioned (checked per message for the report).
    for m, message in enumerate(messages):
        seqs = range(m * PER_MESSAGE, m * PER_MESSAGE + len(message))
        assert all(rows[s]["state"] == "done" for s in seqs if placed[s][0].code is None), f"message {m}"

    assert peak < RSS_LIMIT, f"worker peak RSS {peak / 2**20:.0f} MiB"
    store.engine.dispose()
    _check(settings, job)
