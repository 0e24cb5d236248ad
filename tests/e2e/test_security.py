"""Untrusted input at both doors: refs and parameters are refused at enqueue (nothing committed),
forged refs are refused again by a real `imgq worker` (nothing read), and pickle messages are never
deserialized (no code runs) while the worker keeps serving."""

from __future__ import annotations

import http.server
import os
import pickle
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import text
from typer.testing import CliRunner

from imgq.celeryconf import make_celery
from imgq.cli import app as cli_app
from imgq.contract import TASK_NAME, CaptionParams
from imgq.db.store import Store
from imgq.publish import chunk_messages, publish
from tests.corpus import scene
from tests.e2e.helpers import run_cli, wait_finished, workers
from tests.fixtures.services import settings_env
from tests.jobs import caption_task, create_job

pytestmark = pytest.mark.e2e

OLD = 978_307_200  # 2001-01-01: an atime any read would move forward (relatime updates atime < mtime)


def _check(settings, job: str) -> None:
    out = run_cli(settings, "check", job)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "missing=0 duplicates=0" in out.stdout, out.stdout


def _count(store: Store, sql: str, **params) -> int:
    with store.engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar_one())


def _layout(root: Path, outside: Path) -> dict[str, Path]:
    """A root with a good image, and ways out of it: a symlinked file and a symlinked folder to a
    secret (a valid JPEG, so a worker that read it would caption it), and a sibling folder whose
    name merely starts with the root's name."""
    outside.mkdir()
    secret = outside / "passwd.jpg"
    secret.write_bytes(scene(32, 32, 99))
    sibling = root.parent / (root.name + "-evil")
    sibling.mkdir()
    (sibling / "x.jpg").write_bytes(scene(32, 32, 98))
    (root / "ok.jpg").write_bytes(scene(48, 32, 1))
    (root / "sub").mkdir()
    (root / "escape.jpg").symlink_to(secret)
    (root / "linked-dir").symlink_to(outside, target_is_directory=True)
    return {"secret": secret, "sibling": sibling / "x.jpg", "ok": root / "ok.jpg"}


def _refused_refs(root: Path, files: dict[str, Path], bucket: str, canary: str) -> list[str]:
    return [
        f"{root}/../{files['secret'].parent.name}/passwd.jpg",
        f"{root}/sub/../../{files['secret'].parent.name}/passwd.jpg",
        str(files["sibling"]),  # /x/images-evil is not inside /x/images
        str(root / "escape.jpg"),  # symlink to a file outside
        str(root / "linked-dir" / "passwd.jpg"),  # through a symlinked folder
        str(root / "linked-dir") + "/",
        "/etc/passwd",
        "~/.ssh/id_rsa",
        f"{canary}/x.jpg",
        "https://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "HTTP://169.254.169.254/latest/meta-data/",
        "file:///etc/passwd",
        "ftp://127.0.0.1/x.jpg",
        "gs://bucket/x.jpg",
        "data:image/png;base64,iVBORw0KGgo=",
        f"s3://not-{bucket}/x.jpg",  # bucket not allow-listed
        f"s3://{bucket}.attacker/x.jpg",
        f"s3://{bucket}",  # no key
    ]


def test_enqueue_refuses_refs_and_params_and_commits_nothing(make_settings, bucket, image_root: Path,
                                                            redis_server, tmp_path: Path, monkeypatch):
    import redis

    settings = make_settings(allowed_buckets=[bucket])
    files = _layout(image_root, tmp_path / "outside")
    refused = _refused_refs(image_root, files, bucket, "http://127.0.0.1:9")
    ok = str(files["ok"])

    def enqueue(*args: str, subprocess: bool = False) -> tuple[int, str, str]:
        """`imgq enqueue caption ARGS` from inside the root: a real subprocess, or in-process
        through Click's runner (same command, exit code and stderr; no interpreter start-up)."""
        if subprocess:
            out = run_cli(settings, "enqueue", "caption", *args, cwd=image_root)
            return out.returncode, out.stdout, out.stderr
        monkeypatch.chdir(image_root)
        result = CliRunner().invoke(cli_app, ["enqueue", "caption", *args], env=settings_env(settings))
        return result.exit_code, result.stdout, result.stderr

    # (a) each bad ref, next to a good one, sinks the whole request; one relative traversal too.
    bad_refs = [*refused, "../outside/passwd.jpg"]
    outcomes = [(ref, enqueue(ok, ref)) for ref in bad_refs]
    # (d) invalid generation parameters: refused, naming the parameter.
    bad_params = [
        (["--max-new-tokens", "0"], "max_new_tokens"),
        (["--num-beams", "17"], "num_beams"),
        (["--top-p", "0.5"], "top_p"),  # without --sample
        (["--sample", "--temperature", "0"], "temperature"),
        (["--min-new-tokens", "20", "--max-new-tokens", "10"], "min_new_tokens"),
        (["--resize", "squash"], "resize"),
        (["--prompt", "   "], "prompt"),
        (["--repetition-penalty", "0"], "repetition_penalty"),
        (["--sample", "--seed", "-1"], "seed"),
        (["--params", '{"bogus_param": 1}'], "bogus_param"),
        (["--params", '{"max_new_tokens": "many"}'], "max_new_tokens"),
    ]
    param_outcomes = [(args, name, enqueue(*args, ok)) for args, name in bad_params]
    # The same through real `imgq` processes, for one of each.
    with ThreadPoolExecutor(2) as pool:
        outcomes.append((refused[0], pool.submit(enqueue, ok, refused[0], subprocess=True).result()))
        args, name = bad_params[0]
        param_outcomes.append((args, name, pool.submit(enqueue, *args, ok, subprocess=True).result()))

    for ref, (code, stdout, stderr) in outcomes:
        assert code == 2, (ref, code, stderr)
        assert "error[bad_ref]:" in stderr, (ref, stderr)
        assert "Traceback" not in stderr and stdout == "", (ref, stdout, stderr)
    for args, name, (code, stdout, stderr) in param_outcomes:
        assert code == 2, (args, code, stderr)
        # Named as the CLI spells the flag (--max-new-tokens); an unknown --params key as given.
        assert "error[bad_params]:" in stderr and (name in stderr or f"--{name.replace('_', '-')}" in stderr), \
            (args, stderr)
        assert "Traceback" not in stderr and stdout == "", (args, stderr)

    store = Store.from_url(settings.database_url)
    assert _count(store, "SELECT count(*) FROM jobs") == 0
    assert _count(store, "SELECT count(*) FROM job_items") == 0
    broker = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    assert broker.llen(settings.queue) == 0, "nothing may be published for a refused request"

    # --skip-invalid: the valid refs (a file, and the root folder, whose walk must not follow the
    # symlinks out) are accepted and every refused one is listed.
    code, stdout, stderr = enqueue("--skip-invalid", ok, str(image_root), *bad_refs, subprocess=True)
    assert code == 0, stderr
    for ref in bad_refs:
        assert f"refused[bad_ref]: {ref}: " in stderr, (ref, stderr)
    job = uuid.UUID(stdout.strip())
    assert "accepted 2 items in 1 message" in stderr, stderr
    with store.engine.connect() as conn:
        items = conn.execute(text("SELECT ref FROM job_items WHERE job_id = :j ORDER BY seq"), {"j": job}).scalars()
        assert list(items) == [ok, ok]  # the walk found ok.jpg only: escape.jpg and linked-dir/ stay out
    assert broker.llen(settings.queue) == 1
    broker.close()
    store.engine.dispose()
    _check(settings, str(job))


def test_enqueue_refuses_malformed_params_json(make_settings, image_root: Path):
    settings = make_settings()
    good = image_root / "ok.jpg"
    good.write_bytes(scene(32, 32, 1))
    for raw in ("{not json", "[1, 2]"):
        out = run_cli(settings, "enqueue", "caption", "--params", raw, str(good))
        assert out.returncode == 2 and "error[bad_params]:" in out.stderr and "--params" in out.stderr, out.stderr
    store = Store.from_url(settings.database_url)
    assert _count(store, "SELECT count(*) FROM jobs") == 0
    store.engine.dispose()


class _TouchOnUnpickle:
    """A pickle payload: unpickling it creates ``marker`` (a harmless stand-in for os.system)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


class _Canary(http.server.BaseHTTPRequestHandler):
    hits = 0

    def do_GET(self) -> None:
        type(self).hits += 1
        self.send_error(404)

    def log_message(self, *args: object) -> None:
        pass


def _publish_pickle(broker_url: str, queue: str, marker_v2: Path, marker_v1: Path) -> None:
    """What an attacker with broker access would send: Celery messages for imgq.process, pickled,
    in task protocol 2 (task name in the headers) and protocol 1 (task name in the body)."""
    from kombu import Connection

    with Connection(broker_url) as conn:
        producer = conn.Producer()
        tid = str(uuid.uuid4())
        producer.publish(
            ((), {"msg": _TouchOnUnpickle(marker_v2)}, {"callbacks": None, "errbacks": None, "chain": None,
                                                        "chord": None}),
            exchange="", routing_key=queue, serializer="pickle", delivery_mode=2,
            headers={"lang": "py", "task": TASK_NAME, "id": tid, "root_id": tid, "parent_id": None,
                     "group": None, "retries": 0, "eta": None, "expires": None, "timelimit": [None, None],
                     "argsrepr": "()", "kwargsrepr": "{'msg': ...}", "origin": "attacker", "ignore_result": True},
        )
        tid = str(uuid.uuid4())
        producer.publish(
            {"task": TASK_NAME, "id": tid, "args": [], "kwargs": {"msg": _TouchOnUnpickle(marker_v1)},
             "retries": 0, "eta": None, "expires": None},
            exchange="", routing_key=queue, serializer="pickle", delivery_mode=2,
        )


def test_forged_refs_and_pickle_messages_are_refused_by_the_worker(
    make_settings, bucket, s3_client, image_root: Path, redis_server, tiny_model_dir: Path, tmp_path: Path
):
    settings = make_settings(allowed_buckets=[bucket], max_attempts=2, retry_base_s=0.1, retry_max_s=0.2)
    files = _layout(image_root, tmp_path / "outside")
    secret = files["secret"]
    forbidden = f"not-{bucket}"
    s3_client.create_bucket(Bucket=forbidden)
    s3_client.put_object(Bucket=forbidden, Key="x.jpg", Body=scene(32, 32, 97))  # exists, but off-limits
    s3_client.put_object(Bucket=bucket, Key="ok.jpg", Body=scene(40, 30, 2))

    _Canary.hits = 0
    canary = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Canary)
    threading.Thread(target=canary.serve_forever, daemon=True).start()
    canary_url = f"http://127.0.0.1:{canary.server_address[1]}"

    # An old atime on the secret: any read would move it. A control file shows the filesystem
    # does update atimes (relatime); where it does not, the caption/dead-letter checks remain.
    control = tmp_path / "outside" / "control.jpg"
    control.write_bytes(b"x")
    for path in (secret, control):
        os.utime(path, (OLD, path.stat().st_mtime))
    control.read_bytes()
    atime_works = control.stat().st_atime > OLD

    # (c) the payload is live: unpickling it does create the marker.
    marker_v2, marker_v1 = tmp_path / "PWNED-v2", tmp_path / "PWNED-v1"
    pickle.loads(pickle.dumps(_TouchOnUnpickle(marker_v2)))
    assert marker_v2.exists()
    marker_v2.unlink()
    _publish_pickle(settings.broker_url, settings.queue, marker_v2, marker_v1)

    # (b) forged refs, published straight to the broker for a job created without the producer.
    forged = [r for r in _refused_refs(image_root, files, bucket, canary_url) if r != f"s3://{bucket}"]
    forged += ["../outside/passwd.jpg", f"s3://{forbidden}/x.jpg"]
    good = [str(files["ok"]), f"s3://{bucket}/ok.jpg"]
    refs = good[:1] + forged + good[1:]  # the good ones share the forged ones' message
    params = CaptionParams(max_new_tokens=8)
    store = Store.from_url(settings.database_url)
    tasks = [caption_task(settings.caption_model, params)]
    forged_job = create_job(store, tasks, refs, published=True)
    app = make_celery(settings)
    publish(app, chunk_messages(job=str(forged_job), tasks=tasks,
                                items=list(enumerate(refs)), per_message=len(refs)), queue=settings.queue)

    import redis

    broker = redis.Redis(unix_socket_path=str(redis_server.socket_path))
    assert broker.llen(settings.queue) == 3, "two pickle messages and the forged one, waiting in the worker's queue"
    with workers(settings, tiny_model_dir, tmp_path, 1) as procs:
        wait_finished(store, [forged_job], timeout=60, procs=procs, log_dir=tmp_path)
        # The worker survived all of it and still serves an ordinary job.
        out = run_cli(settings, "enqueue", "caption", str(files["ok"]), f"s3://{bucket}/ok.jpg",
                      "--max-new-tokens", "8")
        assert out.returncode == 0, out.stderr
        valid_job = out.stdout.strip()
        wait_finished(store, [uuid.UUID(valid_job)], timeout=60, procs=procs, log_dir=tmp_path)
        assert procs[0].poll() is None, "the worker must survive pickle and forged messages"
    assert procs[0].returncode == 0
    canary.shutdown()
    canary.server_close()

    assert not marker_v2.exists() and not marker_v1.exists(), "a pickle payload was deserialized"
    rows = {r["ref"]: r for r in store.results(forged_job)}
    wrong = {ref: (rows[ref]["state"], rows[ref]["error_code"], rows[ref]["caption"])
             for ref in forged if (rows[ref]["state"], rows[ref]["error_code"]) != ("dead", "bad_ref")}
    assert not wrong, wrong
    assert all(rows[ref]["caption"] is None and rows[ref]["attempts"] == 1 for ref in forged)
    assert all(rows[ref]["state"] == "done" and rows[ref]["caption"] for ref in good)
    assert store.counts(uuid.UUID(valid_job)) == {"queued": 0, "running": 0, "done": 2, "dead": 0}
    # Nothing outside the allow-lists was read: no image row, no HTTP request, no new atime.
    assert _count(store, "SELECT count(*) FROM images WHERE key = :k OR bucket = :b",
                  k=str(secret), b=forbidden) == 0
    assert _Canary.hits == 0
    if atime_works:
        assert secret.stat().st_atime == OLD, "the secret outside IMGQ_LOCAL_ROOTS was read"
    # The pickle messages were refused undecoded, and did not stay behind to be redelivered.
    log = "".join(p.read_text(errors="replace") for p in tmp_path.glob("worker*.log"))
    assert log.count("Refusing to deserialize untrusted content of type pickle") >= 2, log[-3000:]
    assert broker.llen(settings.queue) == 0
    assert broker.hlen("unacked") == 0
    broker.close()
    store.engine.dispose()
    _check(settings, str(forged_job))
    _check(settings, valid_job)
