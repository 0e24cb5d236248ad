"""`imgq enqueue -f FILE` and `-` (stdin) stream their refs into the store's COPY: the listing is
read as the job's items are written, never held whole (100M refs would be ~10 GB)."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from imgq.cli import app
from imgq.db.store import Store

pytestmark = pytest.mark.integration

REFS = 20_000  # four of the store's COPY chunks


def _env(database_url: str, broker_url: str) -> dict[str, str]:
    return {"IMGQ_DATABASE_URL": database_url, "IMGQ_BROKER_URL": broker_url, "IMGQ_ALLOWED_BUCKETS": "photos"}


def _listing() -> bytes:
    lines = ["# exported 2026-01-01", ""] + [f"s3://photos/img-{i:06d}.jpg" for i in range(REFS)]
    return ("\n".join(lines) + "\n").encode()


def test_stdin_is_copied_into_the_job_while_it_is_read(store: Store, database_url: str, broker_url: str,
                                                       monkeypatch) -> None:
    listing = _listing()
    read_at_first_ref: list[int] = []
    create_job = Store.create_job

    def watched(self: Store, *, refs: Any, **kwargs: Any) -> uuid.UUID:
        def first_noted() -> Any:
            for ref in refs:
                if not read_at_first_ref:
                    stdin = sys.stdin.buffer  # the runner's stdin, over the listing; closed: read to its end
                    read_at_first_ref.append(len(listing) if stdin.closed else stdin.tell())
                yield ref

        return create_job(self, refs=first_noted(), **kwargs)

    monkeypatch.setattr(Store, "create_job", watched)
    out = CliRunner().invoke(app, ["enqueue", "caption", "-"], input=listing, env=_env(database_url, broker_url))
    assert out.exit_code == 0, (out.output, out.exception)
    job = uuid.UUID(out.stdout.strip())
    assert store.counts(job)["queued"] == REFS
    assert read_at_first_ref and read_at_first_ref[0] < len(listing) // 4, (read_at_first_ref, len(listing))


def test_a_listing_that_stops_being_utf8_midway_accepts_nothing(store: Store, database_url: str, broker_url: str,
                                                               tmp_path: Path) -> None:
    listing = tmp_path / "refs.txt"
    listing.write_bytes(_listing() + b"s3://photos/caf\xe9.jpg\n")  # Latin-1, past the first COPY chunks
    out = CliRunner().invoke(app, ["enqueue", "caption", "-f", str(listing)], env=_env(database_url, broker_url))
    assert out.exit_code == 2, (out.output, out.exception)
    assert out.stderr == (f"error[bad_file]: cannot read {listing}: not UTF-8 text (bytes e9: invalid "
                          "continuation byte)\n")
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT (SELECT count(*) FROM jobs) + (SELECT count(*) FROM job_items)")
                            ).scalar_one() == 0


def test_a_pairs_file_that_is_not_utf8_is_bad_file_and_accepts_nothing(store: Store, database_url: str,
                                                                      broker_url: str, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_bytes(b"ref,text\ns3://photos/a.jpg,a dog\ns3://photos/b.jpg,caf\xe9 au lait\n")  # Latin-1
    out = CliRunner().invoke(app, ["enqueue", "validate", "--pairs", str(pairs)], env=_env(database_url, broker_url))
    assert out.exit_code == 2, (out.output, out.exception)
    assert out.stderr == (f"error[bad_file]: cannot read {pairs}: not UTF-8 text (bytes e9: invalid "
                          "continuation byte)\n")
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT (SELECT count(*) FROM jobs) + (SELECT count(*) FROM job_items)")
                            ).scalar_one() == 0


def test_a_feed_lock_held_elsewhere_is_said_not_blamed_on_the_window(store: Store, database_url: str,
                                                                     broker_url: str) -> None:
    from imgq.db import locks

    with store.engine.connect() as feeder:  # a worker's feeder, mid-cycle on the default queue
        tx = feeder.begin()
        feeder.execute(text(f"SELECT pg_advisory_xact_lock({locks.FEED}, hashtext('imgq'))"))
        out = CliRunner().invoke(app, ["enqueue", "caption", "s3://photos/a.jpg"], env=_env(database_url, broker_url))
        tx.rollback()
    assert out.exit_code == 0, (out.output, out.exception)
    assert out.stderr.splitlines()[-1] == ("accepted 1 item; the workers' feeder holds the queue's feed lock and "
                                           "publishes them (nothing published from here)")
    assert store.counts(uuid.UUID(out.stdout.strip()))["queued"] == 1
