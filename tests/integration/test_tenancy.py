"""Tenants and API keys (db/tenancy.py, `imgq apikey`), and cancelled items in the store and in
`imgq check`, against a real Postgres."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from imgq.cli import app
from imgq.db import jobs_view
from imgq.db.admin import Admin
from imgq.db.store import DeadRow, DoneItem, ObjectInfo, Store
from imgq.db.tenancy import (
    check_sources,
    create_key,
    effective_sources,
    list_keys,
    parse_key,
    principal_for_key_id,
    revoke_key,
    verify_key,
)
from tests.jobs import caption_task, create_job

pytestmark = pytest.mark.integration


def test_a_key_is_shown_once_stored_as_a_hash_and_verified(store: Store) -> None:
    key, secret = create_key(store.engine, "acme", buckets=["photos"], roots=["/srv/acme"], label="cms")
    assert secret and parse_key(key) is not None
    key_id = parse_key(key)[0]  # type: ignore[index]
    with store.engine.connect() as conn:
        stored = conn.execute(text("SELECT secret_sha256, last_used_at FROM api_keys WHERE id = :i"),
                              {"i": key_id}).one()
    assert key.split("_", 2)[2].encode() not in bytes(stored[0]) and stored[1] is None
    principal = verify_key(store.engine, key)
    assert principal is not None
    assert (principal.tenant, principal.key_id, principal.buckets, principal.roots) == (
        "acme", key_id, ("photos",), ("/srv/acme",))
    assert principal_for_key_id(store.engine, key_id) == principal
    with store.engine.connect() as conn:
        assert conn.execute(text("SELECT last_used_at FROM api_keys WHERE id = :i"), {"i": key_id}).scalar()


@pytest.mark.parametrize("mangle", [
    lambda k: k[:-1] + ("A" if k[-1] != "A" else "B"),  # wrong secret
    lambda k: k.replace("imgq_", "imgx_"),
    lambda k: "imgq_0123456789abcdef_" + k.split("_", 2)[2],  # unknown id
    lambda k: "",
    lambda k: k + "\n\x00",
])
def test_a_wrong_key_is_refused(store: Store, mangle) -> None:  # type: ignore[no-untyped-def]
    key, _ = create_key(store.engine, "acme")
    assert verify_key(store.engine, mangle(key)) is None


def test_revoked_keys_stop_and_a_second_key_extends_the_tenant(store: Store) -> None:
    first, secret = create_key(store.engine, "acme", buckets=["a"])
    second, again = create_key(store.engine, "acme", buckets=["b"], roots=["/r"], label="second")
    assert secret and again is None, "the callback secret is shown only when the tenant is created"
    assert verify_key(store.engine, first).buckets == ("a", "b")  # type: ignore[union-attr]
    first_id = parse_key(first)[0]  # type: ignore[index]
    assert revoke_key(store.engine, first_id) is True
    assert revoke_key(store.engine, first_id) is False
    assert verify_key(store.engine, first) is None
    assert principal_for_key_id(store.engine, first_id) is None
    assert verify_key(store.engine, second) is not None
    keys = list_keys(store.engine, "acme")
    assert [(k["label"], k["revoked_at"] is not None) for k in keys] == [("", True), ("second", False)]
    assert list_keys(store.engine, "other") == []


def test_sources_must_lie_within_the_global_allow_lists(tmp_path: Path) -> None:
    (tmp_path / "root" / "acme").mkdir(parents=True)
    roots = [tmp_path / "root"]
    buckets, found, problems = check_sources(["a"], [tmp_path / "root" / "acme"], allowed_buckets=["a"],
                                             local_roots=roots)
    assert (buckets, found, problems) == (["a"], [str(tmp_path / "root" / "acme")], [])
    _, _, problems = check_sources(["z"], [tmp_path, "/etc"], allowed_buckets=["a"], local_roots=roots)
    assert len(problems) == 3
    from imgq.db.tenancy import Principal

    principal = Principal("t", "k", ("a", "gone"), (str(tmp_path / "root" / "acme"), "/etc"), {})
    assert effective_sources(principal, allowed_buckets=["a"], local_roots=roots) == (
        ["a"], [tmp_path / "root" / "acme"])
    # IMGQ_LOCAL_ROOTS narrowed below the tenant's root since: the tenant keeps the narrower folders
    # (it lost every local path), and a global root beside its root gives it nothing.
    narrowed = [tmp_path / "root" / "acme" / "2026", tmp_path / "root" / "other", tmp_path / "root" / "acme" / "x"]
    assert effective_sources(principal, allowed_buckets=[], local_roots=narrowed) == (
        [], [tmp_path / "root" / "acme" / "2026", tmp_path / "root" / "acme" / "x"])


def test_the_apikey_commands(database_url: str, tmp_path: Path) -> None:
    (tmp_path / "acme").mkdir()
    env = {"IMGQ_DATABASE_URL": database_url, "IMGQ_ALLOWED_BUCKETS": "photos", "IMGQ_LOCAL_ROOTS": str(tmp_path)}
    runner = CliRunner()
    made = runner.invoke(app, ["apikey", "create", "--tenant", "acme", "--bucket", "photos", "--root",
                               str(tmp_path / "acme"), "--label", "cms"], env=env)
    assert made.exit_code == 0, made.output
    key = made.stdout.strip()
    assert parse_key(key) and "callback signing secret" in made.stderr
    scripted = runner.invoke(app, ["apikey", "create", "--tenant", "globex", "--json"], env=env)
    made_json = json.loads(scripted.stdout)
    assert scripted.exit_code == 0 and scripted.stderr == "" and made_json["tenant"] == "globex"
    assert parse_key(made_json["key"])[0] == made_json["key_id"]  # type: ignore[index]
    assert len(made_json["callback_secret"]) >= 32, "a new tenant's secret, on stdout with the key"
    second = json.loads(runner.invoke(app, ["apikey", "create", "--tenant", "globex", "--json"], env=env).stdout)
    assert second["callback_secret"] is None, "an existing tenant keeps its secret, never shown again"
    refused = runner.invoke(app, ["apikey", "create", "--tenant", "acme", "--bucket", "other"], env=env)
    assert refused.exit_code == 2 and "error[bad_source]" in refused.stderr
    # The tenant of every job enqueued without --tenant: a key for it would see the operators' jobs.
    for name, extra in (("default", {}), ("ops", {"IMGQ_TENANT": "ops"})):
        operators = runner.invoke(app, ["apikey", "create", "--tenant", name, "--bucket", "photos"], env=env | extra)
        assert operators.exit_code == 2 and "error[bad_request]" in operators.stderr, operators.output
        assert "IMGQ_TENANT" in operators.stderr
    listed = runner.invoke(app, ["apikey", "list"], env=env)
    assert parse_key(key)[0] in listed.stdout and "s3://photos" in listed.stdout  # type: ignore[index]
    assert key.split("_", 2)[2] not in listed.stdout
    revoked = runner.invoke(app, ["apikey", "revoke", parse_key(key)[0]], env=env)  # type: ignore[index]
    assert revoked.exit_code == 0
    again = runner.invoke(app, ["apikey", "revoke", parse_key(key)[0]], env=env)  # type: ignore[index]
    assert again.exit_code == 1 and "error[not_found]" in again.stderr


def test_tenant_limits_are_set_and_unset_from_the_cli_and_reach_the_verified_key(database_url: str) -> None:
    from imgq.db.store import make_engine
    from imgq.db.tenancy import verify_key

    env = {"IMGQ_DATABASE_URL": database_url, "IMGQ_ALLOWED_BUCKETS": "photos"}
    runner = CliRunner()
    key = runner.invoke(app, ["apikey", "create", "--tenant", "acme", "--bucket", "photos"], env=env).stdout.strip()
    shown = runner.invoke(app, ["apikey", "limits", "acme"], env=env | {"IMGQ_API_MAX_REFS": "77"})
    assert shown.exit_code == 0, shown.output
    # A fresh tenant sets nothing: every limit is shown with the setting its value comes from.
    assert "max_refs             77         default (IMGQ_API_MAX_REFS)" in shown.stdout.splitlines()
    assert len(shown.stdout.splitlines()) == 6 and "own" not in shown.stdout.replace("(", " ").split()
    changed = runner.invoke(app, ["apikey", "limits", "acme", "--json", "--set", "num_beams=4", "--set",
                                  "item_cost=2.5", "--set", "requests_per_minute=30"], env=env)
    assert changed.exit_code == 0, changed.output
    assert json.loads(changed.stdout)["own"] == {"num_beams": 4, "item_cost": 2.5, "requests_per_minute": 30}
    assert json.loads(changed.stdout)["limits"] == {"num_beams": 4, "item_cost": 2.5, "requests_per_minute": 30,
                                                    "max_refs": 10_000, "max_priority": 10, "max_new_tokens": 128}
    unset = runner.invoke(app, ["apikey", "limits", "acme", "--unset", "num_beams"], env=env)
    assert "num_beams            8          default (IMGQ_MAX_NUM_BEAMS)" in unset.stdout.splitlines()
    assert "item_cost            2.5        own" in unset.stdout.splitlines()
    engine = make_engine(database_url)
    try:
        principal = verify_key(engine, key)
        assert principal is not None and principal.limits == {"item_cost": 2.5, "requests_per_minute": 30}
    finally:
        engine.dispose()
    for args, code in ((["acme", "--set", "num_beams=lots"], "bad_request"), (["acme", "--set", "speed=3"],
                       "bad_request"), (["acme", "--set", "max_refs=0"], "bad_request"),
                       (["acme", "--unset", "speed"], "bad_request"), (["nobody"], "not_found")):
        refused = runner.invoke(app, ["apikey", "limits", *args], env=env)
        assert refused.exit_code in (1, 2) and f"error[{code}]" in refused.stderr, (args, refused.output)


# -- cancelled items ------------------------------------------------------------------------------

def _done(job: uuid.UUID, seq: int) -> DoneItem:
    task = caption_task("m")
    return DoneItem(job, seq, ObjectInfo("local", "", f"/d/{seq}.jpg", "v1", 10, 4, 4), "w1",
                    {"caption": (task.model, "rev", task.params.digest(), task.params.canonical(), f"c{seq}")})


def test_cancel_leaves_running_items_and_the_worker_never_claims_a_cancelled_one(store: Store,
                                                                                database_url: str) -> None:
    job = create_job(store, [caption_task("m")], [f"/d/{i}.jpg" for i in range(6)])
    with store.engine.begin() as conn:
        conn.execute(text("INSERT INTO tenants (name, callback_secret) VALUES ('default', 's')"))
    store.claim(job, [0, 1, 2], "w1")
    store.write_done([_done(job, 0)])
    store.write_dead([DeadRow(job, 2, "not_an_image", "no", "w1")])
    assert jobs_view.cancel_job(store.engine, "other", job) is None, "another tenant's job is not found"
    assert jobs_view.cancel_job(store.engine, "default", job) == 3
    assert jobs_view.cancel_job(store.engine, "default", job) == 0, "repeating a cancel is harmless"
    assert store.claim(job, [3, 4, 5], "w2") == {}, "a cancelled item in a message is skipped, not run"
    store.write_done([_done(job, 1)])  # the running item finishes normally
    assert store.counts(job) == {"queued": 0, "running": 0, "done": 2, "dead": 1, "cancelled": 3}
    report = Admin(store.engine).check(job)
    assert report is not None and report.ok and (report.cancelled, report.pending) == (3, 0)
    env = {"IMGQ_DATABASE_URL": database_url}
    out = CliRunner().invoke(app, ["check", str(job), "--require-finished"], env=env)
    assert out.exit_code == 0 and "pending=0 purged=0 cancelled=3 missing=0" in out.stdout, out.output
    status = CliRunner().invoke(app, ["status", str(job), "--json"], env=env)
    assert '"cancelled": 3' in status.stdout
    waited = CliRunner().invoke(app, ["wait", str(job), "--timeout", "5"], env=env)
    assert waited.exit_code == 0 and "cancelled=3" in waited.stdout
    # Its dead letter stays, whoever retries: requeued, the item would run in a cancelled job.
    assert Admin(store.engine).take_dead_letters(code=None, job=job, seq=None) == []
    assert all(b.job != job for b in Admin(store.engine).take_dead_letters(code=None, job=None, seq=None))
    assert store.counts(job) == {"queued": 0, "running": 0, "done": 2, "dead": 1, "cancelled": 3}
    summary = jobs_view.job_summary(store.engine, "default", job)
    assert summary is not None and summary["finished"] and summary["progress"] == 1.0
    assert summary["counts"] == {"queued": 0, "running": 0, "done": 2, "dead": 1, "cancelled": 3, "purged": 0}


def test_check_flags_a_cancelled_item_with_a_result(store: Store) -> None:
    job = create_job(store, [caption_task("m")], ["/d/0.jpg", "/d/1.jpg"])
    store.claim(job, [0], "w1")
    store.write_done([_done(job, 0)])
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET state = 'cancelled' WHERE job_id = :j"), {"j": job})
        conn.execute(text("UPDATE jobs SET cancelled_at = now(), cancelled_items = 2 WHERE id = :j"), {"j": job})
    report = Admin(store.engine).check(job)
    assert report is not None and not report.ok
    assert report.offenders == ["seq 0 /d/0.jpg: cancelled item with a result or dead letter"]
