"""The deployment's least-privilege roles (deploy/postgres/10-roles.sh), run for real: a fresh
database set up by the script's own SQL and migrated as ``imgq_owner``, then each service's code
paths run as its role. A migration that forgets a grant fails here, not in production. PUBLIC keeps
no advisory lock, large object or temporary table: only the roles whose code takes a lock may."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError

from imgq.db import locks
from imgq.db.admin import LEADER_LOCK, LEADER_UNLOCK, Admin
from imgq.db.backfills import Backfills
from imgq.db.cancelling import cancel_job, cancel_waiting
from imgq.db.migrate import upgrade
from imgq.db.store import DeadRow, DoneItem, ObjectInfo, Store
from tests.fixtures.services import TEMPLATE, _admin

pytestmark = pytest.mark.integration

ROLES_SH = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "10-roles.sh"
TASK = {"kind": "caption", "model": "m", "params": {}, "params_hash": "h"}
CHUNK = 5_000  # create_job's COPY chunk: a third chunk opens the side stream
# The lock functions each role's code calls (10-roles.sh grants them back; PUBLIC has none): a two-key
# lock of db/locks.py is (integer, integer), the reaper's single key bigint.
LOCK_FUNCTIONS = {
    "producer": {"pg_advisory_xact_lock(integer,integer)", "pg_try_advisory_xact_lock(integer,integer)",
                 "pg_try_advisory_lock(integer,integer)", "pg_advisory_unlock(integer,integer)"},
    "api": {"pg_advisory_xact_lock(integer,integer)", "pg_try_advisory_xact_lock(integer,integer)"},
    "worker": {"pg_try_advisory_xact_lock(integer,integer)", "pg_try_advisory_lock(integer,integer)",
               "pg_advisory_unlock(integer,integer)", "pg_try_advisory_xact_lock(bigint)",
               "pg_advisory_xact_lock(bigint)"},
    "owner": set(),
    "reader": set(),
}


def roles_sql() -> str:
    """The script's SQL, with its psql variables filled in (every password 'pw')."""
    body = ROLES_SH.read_text().split("<<'SQL'\n", 1)[1].rsplit("\nSQL", 1)[0]
    return re.sub(r":'\w+_pw'", "'pw'", body)


@pytest.fixture
def deployed(pg_server) -> dict[str, str]:
    """A database as compose sets it up: the roles script, then the migrations run by imgq_owner.
    Returns a URL per role (the role set at connection start, as its own login would be)."""
    name = f"roles_{uuid.uuid4().hex[:8]}"
    _admin(pg_server, f'CREATE DATABASE "{name}" TEMPLATE template0')
    url = pg_server.url.replace(f"/{TEMPLATE}?", f"/{name}?")
    engine = Store.from_url(url).engine
    with engine.connect() as conn:
        exists = conn.execute(text("SELECT count(*) FROM pg_roles WHERE rolname = 'imgq_owner'")).scalar_one()
        sql = roles_sql()
        if exists:  # roles are the cluster's: a second database of this session only sets up its own
            sql = "\n".join(line for line in sql.splitlines() if not line.startswith("CREATE ROLE"))
        conn.exec_driver_sql(sql)
        conn.commit()
    engine.dispose()
    as_role = {role: f"{url}&options=-crole%3Dimgq_{role}" for role in ("owner", "producer", "worker", "reader",
                                                                         "api")}
    upgrade(as_role["owner"])
    return as_role


def test_each_role_can_do_its_services_work(deployed: dict[str, str]):
    producer = Store.from_url(deployed["producer"])
    with producer.engine.connect() as conn:
        assert conn.execute(text("SELECT current_user")).scalar_one() == "imgq_producer"
    # A job big enough for a side stream: the producer records and deletes its acceptance.
    refs = [f"s3://b/{i}.jpg" for i in range(2 * CHUNK + 10)]
    job = producer.create_job(tasks=[TASK], refs=refs, copy_streams=2)
    assert producer.counts(job)["queued"] == len(refs)
    with Admin(producer.engine).feeding("imgq") as feeding:  # enqueue publishes its first window
        assert feeding is not None
        assert len(feeding.take(job, 4)) == 4

    # What a failed acceptance leaves, dropped by the producer that saw it fail.
    stranded = uuid.uuid4()
    owner = Store.from_url(deployed["owner"])
    with owner.engine.begin() as conn:
        conn.execute(text("INSERT INTO job_items (job_id, seq, ref) VALUES (:j, 0, 's3://b/x.jpg')"), {"j": stranded})
        conn.execute(text("INSERT INTO acceptances (job_id) VALUES (:j)"), {"j": stranded})
    producer._drop_items(stranded)
    with owner.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM job_items WHERE job_id = :j"), {"j": stranded}).scalar_one() == 0

    worker = Store.from_url(deployed["worker"])
    assert set(worker.claim(job, [0, 1], "w")) == {0, 1}
    worker.write_done([DoneItem(job, 0, ObjectInfo("s3", "b", "0.jpg", "v1", 10, 64, 48), "w",
                                {"caption": ("m", "rev", "h", {}, "a cat")})])
    worker.write_dead([DeadRow(job, 1, "truncated", "ends early", "w")])
    admin = Admin(worker.engine)
    admin.heartbeat("w", "host", 1)
    admin.retire("w")
    assert admin.drop_abandoned() == (0, 0)
    assert worker.counts(job)["done"] == 1

    # The operators' CLI runs as the producer: `imgq dlq retry` and `imgq dlq purge`.
    operator = Admin(producer.engine)
    [retried] = operator.take_dead_letters(code="truncated", job=job, seq=None)
    assert retried.items == [(1, "s3://b/1.jpg")]
    worker.claim(job, [1], "w")
    worker.write_dead([DeadRow(job, 1, "truncated", "ends early", "w")])
    assert operator.purge(dt.timedelta(0)) == 1
    with producer.engine.connect() as conn:
        assert conn.execute(text("SELECT purged FROM jobs WHERE id = :j"), {"j": job}).scalar_one() == 1

    api = Store.from_url(deployed["api"])  # the HTTP API accepts jobs as big as the CLI's
    assert api.counts(api.create_job(tasks=[TASK], refs=refs, copy_streams=2))["queued"] == len(refs)

    reader = Store.from_url(deployed["reader"])
    with reader.engine.connect() as conn:
        assert conn.execute(text("SELECT text FROM captions")).scalars().all() == ["a cat"]
        with pytest.raises(ProgrammingError, match="permission denied"):
            conn.execute(text("SELECT * FROM api_keys"))
    with reader.engine.begin() as conn, pytest.raises(ProgrammingError, match="permission denied"):
        conn.execute(text("DELETE FROM acceptances"))
    for store in (producer, owner, worker, api, reader):
        store.engine.dispose()


def test_every_service_role_reads_the_schema_revision_it_checks_at_start(deployed: dict[str, str]):
    """`imgq worker`, `imgq api` and `imgq beat` check the revision before they start, as their own role."""
    from imgq.db.schema import schema_state

    for role in ("producer", "worker", "api"):
        engine = Store.from_url(deployed[role]).engine
        try:
            state = schema_state(engine)
        finally:
            engine.dispose()
        assert state.current == (state.head,) and state.describe() is None, (role, state)


def test_the_reader_takes_no_lock_and_makes_no_large_object_or_temporary_table(deployed: dict[str, str]):
    """PostgreSQL's defaults let any role do these: an analyst's session took the feeder's lock and
    stalled feeding until it ended, and large objects outlive the session that made them."""
    reader = Store.from_url(deployed["reader"])
    allowed = []
    try:
        for statement in (
            f"SELECT pg_advisory_lock({locks.FEED}, hashtext('imgq'))",  # the feeder's, as the review took it
            f"SELECT pg_advisory_xact_lock({locks.CANCEL}, hashtext('job'))",
            f"SELECT pg_try_advisory_xact_lock({locks.REAPER})",
            "SELECT pg_advisory_lock_shared(1)",
            "SELECT lo_creat(-1)",
            "SELECT lo_create(0)",
            "SELECT lo_from_bytea(0, 'x')",
            "CREATE TEMP TABLE scratch (x int)",
        ):
            with reader.engine.begin() as conn:
                try:
                    conn.execute(text(statement))
                except ProgrammingError as exc:
                    assert "permission denied" in str(exc.orig), (statement, exc)
                else:
                    allowed.append(statement)
    finally:
        reader.engine.dispose()
    assert allowed == []


def test_only_the_roles_whose_code_locks_may_lock_and_none_makes_large_objects_or_temp_tables(
    deployed: dict[str, str],
):
    owner = Store.from_url(deployed["owner"])
    with owner.engine.connect() as conn:
        rows = conn.execute(text("""
            SELECT r.rolname, p.oid::regprocedure::text
            FROM pg_proc p CROSS JOIN pg_roles r
            WHERE p.pronamespace = 'pg_catalog'::regnamespace
              AND (p.proname ~ '^pg_(try_)?advisory_' OR p.proname ~ '^lo_' OR p.proname IN ('loread', 'lowrite'))
              AND r.rolname IN ('imgq_owner', 'imgq_producer', 'imgq_worker', 'imgq_reader', 'imgq_api')
              AND has_function_privilege(r.oid, p.oid, 'EXECUTE')
        """)).all()
        temp = conn.execute(text(
            "SELECT rolname FROM pg_roles WHERE rolname IN ('imgq_owner', 'imgq_producer', 'imgq_worker', "
            "'imgq_reader', 'imgq_api') AND has_database_privilege(oid, current_database(), 'TEMPORARY')"
        )).scalars().all()
    owner.engine.dispose()
    granted: dict[str, set[str]] = {role: set() for role in LOCK_FUNCTIONS}
    for role, function in rows:
        granted[role.removeprefix("imgq_")].add(function)
    assert granted == LOCK_FUNCTIONS
    assert temp == []


def test_each_service_role_takes_the_locks_its_code_takes(deployed: dict[str, str]):
    producer, api, worker = (Store.from_url(deployed[role]) for role in ("producer", "api", "worker"))
    refs = ["s3://b/0.jpg", "s3://b/1.jpg"]
    try:
        # Producer (enqueue, imgq backfill, the operators' CLI) and API: a first window's feed,
        # waiting for the lock, and a cancel (imgq cancel, DELETE /v1/jobs/{id}).
        for store in (producer, api):
            with Admin(store.engine).feeding("imgq", wait_s=1) as feeding:
                assert feeding is not None
            job = store.create_job(tasks=[TASK], refs=refs)
            assert cancel_job(store.engine, "default", job) == len(refs)
        # A backfill's run holds its session lock (imgq backfill, imgq beat).
        with Backfills(producer.engine).lock("nightly"):
            pass

        # Worker: the feed cycle's tries (its lock, a cut-short cancel's take-over), the reaper
        # (waiting at start, then trying), and the leader's session lock.
        admin = Admin(worker.engine)
        with admin.feeding("imgq") as feeding:
            assert feeding is not None
            assert cancel_waiting(feeding.conn, job, after_s=0) == 0
        assert admin.take_orphans(dead_after_s=None, gone=["gone"], wait_s=1) == []
        assert admin.take_orphans(dead_after_s=None, gone=["gone"]) == []
        with worker.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            assert conn.execute(LEADER_LOCK, {"queue": "imgq"}).scalar_one() is True
            assert conn.execute(LEADER_UNLOCK, {"queue": "imgq"}).scalar_one() is True
    finally:
        for store in (producer, api, worker):
            store.engine.dispose()


def test_an_analysts_forgotten_transaction_or_runaway_query_ends(deployed: dict[str, str]):
    """The reader's defaults, as its own login gets them (ALTER ROLE ... SET applies at login, not to
    the fixture's SET ROLE)."""
    login = deployed["reader"].split("&options=", 1)[0].replace("://postgres:@", "://imgq_reader:pw@", 1)
    reader = Store.from_url(login)
    try:
        with reader.engine.connect() as conn:
            assert conn.execute(text("SELECT session_user")).scalar_one() == "imgq_reader"
            assert conn.execute(text("SHOW statement_timeout")).scalar_one() == "5min"
            assert conn.execute(text("SHOW idle_in_transaction_session_timeout")).scalar_one() == "10min"
    finally:
        reader.engine.dispose()
