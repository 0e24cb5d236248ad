"""The HTTP API over real HTTP: uvicorn on a free loopback port, httpx, real Postgres, Redis and S3.

Items are finished with the store's own methods (as a worker would), so no worker process runs."""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pytest
import uvicorn
from sqlalchemy import text
from typer.testing import CliRunner

from imgq.cli import app as cli
from imgq.db.store import DeadRow, DoneItem, ObjectInfo, Store
from imgq.db.tenancy import create_key
from imgq.producer.api.app import KEY_TTL_S

pytestmark = pytest.mark.e2e


@dataclass
class Api:
    url: str
    settings: Any
    store: Store
    keys: dict[str, str]  # tenant -> key
    buckets: dict[str, str]  # tenant -> its bucket

    def client(self, tenant: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.keys[tenant]}"} if tenant else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kw)

    def sql(self, statement: str, **params: Any) -> Any:
        with self.store.engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return result.all() if result.returns_rows else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def api(make_settings: Callable[..., Any], s3_client: Any, image_root: Any) -> Iterator[Api]:
    from imgq.producer.api.app import create_app

    buckets = {t: f"imgq-api-{t}-{uuid.uuid4().hex[:8]}" for t in ("acme", "globex")}
    for name in buckets.values():
        s3_client.create_bucket(Bucket=name)
    settings = make_settings(allowed_buckets=list(buckets.values()), api_max_body_bytes=64 * 1024,
                             api_max_refs=40, api_requests_per_minute=10_000, callback_hosts=["hooks.example.com"])
    store = Store.from_url(settings.sync_database_url)
    keys = {t: create_key(store.engine, t, buckets=[b])[0] for t, b in buckets.items()}
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=_free_port(),
                                           log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    yield Api(f"http://127.0.0.1:{port}", settings, store, keys, buckets)
    server.should_exit = True
    thread.join(10)
    store.engine.dispose()


def _refs(api: Api, tenant: str, n: int) -> list[str]:
    return [f"s3://{api.buckets[tenant]}/img/{i:03d}.jpg" for i in range(n)]


def _submit(api: Api, tenant: str, n: int = 3, **body: Any) -> str:
    with api.client(tenant) as c:
        r = c.post("/v1/jobs", json={"kinds": ["caption"], "refs": _refs(api, tenant, n), **body})
    assert r.status_code == 202, r.text
    return str(r.json()["job"])


def _problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == code and body["status"] == status
    assert {"type", "title", "detail"} <= set(body)
    return body


def _finish(api: Api, job: str, done: list[int], dead: list[int] = (), embed: bool = False) -> None:  # type: ignore[assignment]
    """Finish items as a worker would: results (caption, or caption+embedding) and dead letters."""
    from tests.jobs import caption_task

    job_id = uuid.UUID(job)
    tasks = api.store.job_tasks(job_id) or []
    api.store.claim(job_id, [*done, *dead], "w1")
    refs = {seq: ref for seq, ref in api.sql("SELECT seq, ref FROM job_items WHERE job_id = :j", j=job_id)}
    items = []
    for seq in done:
        bucket, key = refs[seq][5:].split("/", 1)
        results = {}
        for t in tasks:
            value: Any = f"caption {seq}" if t["kind"] == "caption" else np.eye(256, dtype=np.float32)[seq]
            results[t["kind"]] = (t["model"], "rev", t["params_hash"], t["params"], value)
        items.append(DoneItem(job_id, seq, ObjectInfo("s3", bucket, key, "v1", 10, 4, 4), "w1", results))
    assert caption_task  # the task records come from the job itself
    api.store.write_done(items)
    api.store.write_dead([DeadRow(job_id, seq, "not_an_image", "no", "w1") for seq in dead])


# -- the document and authentication -------------------------------------------------------------

def test_openapi_lists_the_routes_and_healthz_needs_no_key(api: Api) -> None:
    with api.client() as c:
        doc = c.get("/openapi.json").json()
        assert c.get("/healthz").json() == {"status": "ok"}
        assert c.get("/docs").status_code == 200
    assert {"/v1/jobs", "/v1/jobs/{job_id}", "/v1/jobs/{job_id}/results", "/v1/jobs/{job_id}/retry-dead",
            "/v1/images", "/v1/search"} <= set(doc["paths"])
    assert set(doc["paths"]["/v1/jobs/{job_id}"]) == {"get", "delete"}
    assert doc["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"


def test_no_key_a_wrong_key_and_a_revoked_key_are_401(api: Api) -> None:
    job = _submit(api, "acme")
    with api.client() as c:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic abc"},
                        {"Authorization": f"Bearer {api.keys['acme'][:-2]}xx"}):
            r = c.get(f"/v1/jobs/{job}", headers=headers)
            _problem(r, 401, "unauthorized")
            assert r.headers["www-authenticate"].startswith("Bearer")
    key_id = api.keys["acme"].split("_")[1]
    assert CliRunner().invoke(cli, ["apikey", "revoke", key_id],
                              env={"IMGQ_DATABASE_URL": api.settings.database_url}).exit_code == 0
    time.sleep(KEY_TTL_S + 0.1)  # a verified key is remembered this long by each API process
    with api.client("acme") as c:
        _problem(c.get(f"/v1/jobs/{job}"), 401, "unauthorized")


# -- tenants -------------------------------------------------------------------------------------

def test_tenants_are_isolated_both_ways(api: Api) -> None:
    mine, theirs = _submit(api, "acme", 3), _submit(api, "globex", 2)
    _finish(api, mine, done=[0, 1], dead=[2])
    _finish(api, theirs, done=[0, 1])
    for tenant, own, other in (("acme", mine, theirs), ("globex", theirs, mine)):
        with api.client(tenant) as c:
            assert c.get(f"/v1/jobs/{own}").status_code == 200
            for method, path in (("GET", ""), ("GET", "/results"), ("DELETE", ""), ("POST", "/retry-dead")):
                _problem(c.request(method, f"/v1/jobs/{other}{path}"), 404, "job_not_found")
            _problem(c.get(f"/v1/jobs/{uuid.uuid4()}"), 404, "job_not_found")
            _problem(c.get("/v1/jobs/not-a-uuid"), 404, "job_not_found")
            assert [j["job"] for j in c.get("/v1/jobs").json()["jobs"]] == [own]
            other_tenant = "globex" if tenant == "acme" else "acme"
            foreign = _refs(api, other_tenant, 1)[0]
            r = c.post("/v1/jobs", json={"kinds": "caption", "refs": [foreign]})
            _problem(r, 422, "source_not_allowed")
            _problem(c.post("/v1/jobs", json={"kinds": "caption", "prefix": f"s3://{api.buckets[other_tenant]}/"}),
                     422, "source_not_allowed")
            _problem(c.get("/v1/images", params={"ref": foreign}), 422, "source_not_allowed")
            own_image = c.get("/v1/images", params={"ref": _refs(api, tenant, 1)[0]})
            assert own_image.status_code == 200, own_image.text
            assert own_image.json()["caption"]["text"] == "caption 0"
    # Nothing leaked into the other tenant's job counts either.
    assert api.sql("SELECT tenant, source, count(*) FROM jobs GROUP BY 1, 2 ORDER BY 1") == [
        ("acme", "api", 1), ("globex", "api", 1)]


def test_images_and_search_by_image_stay_within_the_tenant(api: Api) -> None:
    mine = _submit(api, "acme", 3, kinds=["caption", "embed"])
    theirs = _submit(api, "globex", 3, kinds=["caption", "embed"])
    _finish(api, mine, done=[0, 1, 2])
    _finish(api, theirs, done=[0, 1, 2])
    with api.client("acme") as c:
        r = c.get("/v1/images", params={"ref": _refs(api, "acme", 1)[0], "vector": "true"})
        assert r.status_code == 200, r.text
        assert r.json()["embedding"]["dim"] == 256 and len(r.json()["embedding"]["vector"]) == 256
        assert "vector" not in c.get("/v1/images", params={"ref": _refs(api, "acme", 1)[0]}).json()["embedding"] \
            or c.get("/v1/images", params={"ref": _refs(api, "acme", 1)[0]}).json()["embedding"]["vector"] is None
        _problem(c.get("/v1/images", params={"ref": f"s3://{api.buckets['acme']}/nothing.jpg"}), 404,
                 "image_not_found")
        hits = c.post("/v1/search", json={"image": _refs(api, "acme", 1)[0], "limit": 10})
        assert hits.status_code == 200, hits.text
        found = [h["ref"] for h in hits.json()["hits"]]
        assert sorted(found) == _refs(api, "acme", 3)[1:], "only the tenant's images, not the query itself"
        _problem(c.post("/v1/search", json={"image": _refs(api, "globex", 1)[0]}), 422, "source_not_allowed")
        _problem(c.post("/v1/search", json={"image": _refs(api, "acme", 1)[0], "bucket": api.buckets["globex"]}),
                 422, "source_not_allowed")


def test_tenants_sharing_a_bucket_see_only_captions_no_tenants_choices_shaped(api: Api) -> None:
    """A prompt (which the caption continues) and an adapter are one tenant's choices: another tenant
    of the same bucket saw them through /v1/images' caption and params, and search hits (found by
    review). Both now show shared captions only, in the language asked for; the job's own results
    still have everything."""
    shared = api.buckets["acme"]
    api.keys["initech"] = create_key(api.store.engine, "initech", buckets=[shared])[0]
    ref, other = _refs(api, "acme", 2)
    prompted = _submit(api, "acme", 2, kinds=["caption", "embed"], params={"prompt": "acme secret launch"})
    _finish(api, prompted, done=[0, 1])
    with api.client("initech") as c:
        seen = c.get("/v1/images", params={"ref": ref})
        assert seen.status_code == 200, seen.text
        assert seen.json()["caption"] is None and seen.json()["embedding"]["dim"] == 256
        hits = c.post("/v1/search", json={"image": ref, "limit": 5}).json()["hits"]
        assert [(h["ref"], h["caption"]) for h in hits] == [(other, None)]
    with api.client("acme") as c:
        own = c.get(f"/v1/jobs/{prompted}/results").json()
        assert {i["caption"] for i in own["items"]} == {"caption 0", "caption 1"}
    plain = _submit(api, "acme", 1)
    _finish(api, plain, done=[0])
    first_caption = "SELECT caption_id FROM job_items WHERE job_id = :j AND seq = 0"
    prompted_id, plain_id = (api.sql(first_caption, j=uuid.UUID(j))[0][0] for j in (prompted, plain))
    for source in (prompted_id, plain_id):  # each English caption's German translation
        api.sql("INSERT INTO captions (image_id, model, model_revision, params_hash, params, text, lang, method, via, "
                "via_revision, source_id) SELECT image_id, model, model_revision, params_hash, params, 'de ' || text, "
                "'de', 'translated', 'nllb', 'r', id FROM captions WHERE id = :id", id=source)
    for tenant in ("initech", "acme"):
        with api.client(tenant) as c:
            caption = c.get("/v1/images", params={"ref": ref}).json()["caption"]
            assert (caption["text"], caption["lang"], caption["method"]) == ("caption 0", "en", "native")
            assert caption["params"]["prompt"] is None
            german = c.get("/v1/images", params={"ref": ref, "lang": "de"}).json()["caption"]
            assert (german["text"], german["lang"], german["method"]) == ("de caption 0", "de", "translated")
            assert c.get("/v1/images", params={"ref": ref, "lang": "fr"}).json()["caption"] is None
            _problem(c.get("/v1/images", params={"ref": ref, "lang": "xx"}), 422, "unknown_language")
            hits = c.post("/v1/search", json={"image": other, "limit": 5}).json()["hits"]
            assert [(h["ref"], h["caption"]) for h in hits] == [(ref, "caption 0")]


def test_text_postgres_cannot_store_and_odd_values_are_refused_by_name(api: Api) -> None:
    """NUL characters, lone surrogates, priorities past the integer column and Unicode digits in a
    cursor were each a 500 (found by review); each is now a 4xx naming what is wrong, and nothing is
    kept of a refused job."""
    mine = _submit(api, "acme", 2, kinds=["caption", "embed"])
    _finish(api, mine, done=[0, 1])
    ref = _refs(api, "acme", 1)[0]
    with api.client("acme") as c:
        before = api.sql("SELECT count(*) FROM jobs")
        nul = {"kinds": ["caption"], "refs": [ref], "params": {"prompt": "a\x00b"}}
        prompt = _problem(c.post("/v1/jobs", json=nul), 422, "bad_params")
        assert "prompt: Value error, contains a NUL character" in prompt["detail"]
        _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "refs": [ref], "params": {"adapter": "a\x00"}}),
                 422, "bad_params")
        pair = _problem(c.post("/v1/jobs", json={"kinds": ["validate"], "refs": [{"ref": ref, "text": "a\x00b"}]}),
                        422, "bad_pairs")
        assert pair["detail"] == "refs[0]: the text contains a NUL character"
        for body in ('{"kinds": ["caption"], "refs": ["' + ref + '\\ud800.jpg"]}',
                     '{"kinds": ["caption"], "refs": ["' + ref + '"], "params": {"prompt": "a\\ud800"}}'):
            r = c.post("/v1/jobs", content=body, headers={"Content-Type": "application/json"})
            assert r.status_code == 422 and r.json()["code"] in ("bad_ref", "bad_params", "validation_error"), r.text
        for value in (-(10**12), 2**31, 1_000_001):
            _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "refs": [ref], "priority": value}), 422,
                     "validation_error")
        for refs in ([ref, ""], [ref, "   "], [ref, "#" + ref]):
            _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "refs": refs}), 422, "bad_ref")
        assert api.sql("SELECT count(*) FROM jobs") == before
        skipped = c.post("/v1/jobs", json={"kinds": ["caption"], "refs": [ref, ""], "skip_invalid": True})
        assert skipped.status_code == 202 and skipped.json()["items"] == 1
        assert skipped.json()["rejected"] == [{"ref": "", "reason": "empty reference"}]
        _problem(c.post("/v1/search", json={"image": ref, "prefix": "img/\x00"}), 422, "search_error")
        cursor = __import__("base64").urlsafe_b64encode("²".encode()).decode().rstrip("=")
        _problem(c.get(f"/v1/jobs/{mine}/results", params={"cursor": cursor}), 422, "bad_cursor")


def test_a_tenant_capped_below_the_default_priority_submits_without_naming_one(api: Api) -> None:
    api.sql("UPDATE tenants SET limits = '{\"max_priority\": 5}' WHERE name = 'acme'")
    time.sleep(KEY_TTL_S + 0.1)  # a tenant's limits are read with its key
    job = _submit(api, "acme", 1)
    assert api.sql("SELECT priority FROM jobs WHERE id = :j", j=uuid.UUID(job)) == [(5,)]
    with api.client("acme") as c:
        _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "refs": _refs(api, "acme", 1), "priority": 6}), 422,
                 "priority_not_allowed")


def test_skip_invalid_lists_a_bad_key_of_a_prefix_and_keeps_the_keys_after_it(api: Api) -> None:
    s3 = __import__("boto3").client("s3", endpoint_url=api.settings.s3_endpoint_url, region_name="us-east-1")
    for key in ("p/a.jpg", "p/b.jpg", "p/c\x01.jpg", "p/d.jpg", "p/e.jpg"):
        s3.put_object(Bucket=api.buckets["acme"], Key=key, Body=b"x")
    prefix = f"s3://{api.buckets['acme']}/p/"
    with api.client("acme") as c:
        _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "prefix": prefix}), 422, "bad_ref")
        r = c.post("/v1/jobs", json={"kinds": ["caption"], "prefix": prefix, "skip_invalid": True})
        assert r.status_code == 202 and r.json()["items"] == 4, r.text
        assert [x["ref"] for x in r.json()["rejected"]] == [f"s3://{api.buckets['acme']}/'p/c\\x01.jpg'"]
        # A tenant's own ref outside its sources, skipped: the reason does not claim nothing was accepted.
        mixed = c.post("/v1/jobs", json={"kinds": ["caption"], "refs": [_refs(api, "acme", 1)[0],
                                                                        _refs(api, "globex", 1)[0]],
                                         "skip_invalid": True})
        assert mixed.status_code == 202 and "nothing was accepted" not in mixed.json()["rejected"][0]["reason"]
    refs = [ref for (ref,) in api.sql("SELECT ref FROM job_items WHERE job_id = :j ORDER BY seq",
                                      j=uuid.UUID(r.json()["job"]))]
    assert refs == [f"{prefix}{k}.jpg" for k in "abde"]


def test_a_replay_is_the_same_request_however_its_defaults_are_spelled(api: Api) -> None:
    refs = _refs(api, "acme", 2)
    with api.client("acme") as c:
        first = c.post("/v1/jobs", json={"kinds": ["caption"], "refs": refs}, headers={"Idempotency-Key": "k-norm"})
        assert first.status_code == 202, first.text
        for body in ({"kinds": "caption", "refs": refs}, {"kinds": ["caption"], "refs": refs, "priority": 10},
                     {"kinds": ["caption"], "refs": refs, "params": {"num_beams": 1, "max_new_tokens": 30}}):
            again = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "k-norm"})
            assert again.status_code == 200 and again.json()["job"] == first.json()["job"], (body, again.text)
        _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "refs": refs, "params": {"num_beams": 2}},
                        headers={"Idempotency-Key": "k-norm"}), 409, "idempotency_conflict")


# -- idempotency ---------------------------------------------------------------------------------

def test_concurrent_repeats_of_an_idempotency_key_make_one_job(api: Api) -> None:
    body = {"kinds": ["caption"], "refs": _refs(api, "acme", 5)}
    barrier = threading.Barrier(8)

    def post(_: int) -> httpx.Response:
        with api.client("acme") as c:
            barrier.wait()
            return c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-42"})

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(post, range(8)))
    assert all(r.status_code in (200, 202) for r in answers), [r.text for r in answers]
    assert sorted(r.status_code for r in answers) == [200] * 7 + [202]
    assert len({r.json()["job"] for r in answers}) == 1
    assert all(r.json()["items"] == 5 for r in answers)
    assert api.sql("SELECT count(*) FROM jobs") == [(1,)]
    assert api.sql("SELECT count(*) FROM job_items") == [(5,)]
    with api.client("acme") as c:
        again = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "order-42"})
        assert again.status_code == 200 and again.json()["replayed"] is True
        _problem(c.post("/v1/jobs", json={**body, "refs": _refs(api, "acme", 4)}, headers={"Idempotency-Key":
                        "order-42"}), 409, "idempotency_conflict")
    with api.client("globex") as c:  # keys are per tenant
        r = c.post("/v1/jobs", json={**body, "refs": _refs(api, "globex", 5)}, headers={"Idempotency-Key": "order-42"})
        assert r.status_code == 202


def test_a_replay_answers_with_the_refs_the_first_request_skipped(api: Api) -> None:
    """The case an Idempotency-Key is for: the first answer was lost. The refs it skipped are stored
    nowhere else, so the replay must carry them."""
    good = _refs(api, "acme", 2)
    bad = ["http://169.254.169.254/latest/meta-data", "s3://"]
    body = {"kinds": ["caption"], "refs": good + bad, "skip_invalid": True}
    with api.client("acme") as c:
        first = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "import-7"})
        assert first.status_code == 202, first.text
        assert first.json()["items"] == 2 and [r["ref"] for r in first.json()["rejected"]] == bad
        assert all(r["reason"] for r in first.json()["rejected"])
        again = c.post("/v1/jobs", json=body, headers={"Idempotency-Key": "import-7"})
        assert again.status_code == 200 and again.json()["replayed"] is True
        assert (again.json()["job"], again.json()["items"]) == (first.json()["job"], 2)
        assert again.json()["rejected"] == first.json()["rejected"]


# -- limits and refusals ---------------------------------------------------------------------------

def test_each_limit_answers_with_its_code(api: Api) -> None:
    with api.client("acme") as c:
        big = {"kinds": ["caption"], "refs": [f"s3://{api.buckets['acme']}/{'k' * 2000}{i}" for i in range(40)]}
        _problem(c.post("/v1/jobs", json=big), 413, "body_too_large")

        def chunks() -> Iterator[bytes]:  # no Content-Length: the streamed body is counted
            yield b'{"kinds": ["caption"], "refs": ['
            for _ in range(100):
                yield b'"' + b"x" * 1000 + b'",'
            yield b'"y"]}'

        _problem(c.post("/v1/jobs", content=chunks(), headers={"Content-Type": "application/json"}), 413,
                 "body_too_large")
        _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "refs": _refs(api, "acme", 41)}), 413, "too_many_refs")
        problem = _problem(c.post("/v1/jobs", json={"kinds": ["caption"]}), 422, "validation_error")
        assert problem["errors"]
        _problem(c.post("/v1/jobs", json={"kinds": ["nope"], "refs": _refs(api, "acme", 1)}), 422, "bad_params")
        _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "refs": _refs(api, "acme", 1),
                                          "params": {"num_beams": 0}}), 422, "bad_params")
        _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "refs": ["https://example.com/a.jpg"]}), 422,
                 "bad_ref")
        _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "refs": _refs(api, "acme", 1), "priority": 11}),
                 422, "priority_not_allowed")
        _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "refs": _refs(api, "acme", 1),
                                          "callback_url": "https://evil.example.net/x"}), 422, "callback_not_allowed")
        ok = c.post("/v1/jobs", json={"kinds": ["caption"], "refs": _refs(api, "acme", 1),
                                      "callback_url": "https://hooks.example.com/done"})
        assert ok.status_code == 202, ok.text
        assert api.sql("SELECT callback_url, callback_state, callback_next_at IS NOT NULL, priority FROM jobs") == [
            ("https://hooks.example.com/done", "pending", True, 10)]
    # A prefix that expands past the tenant's limit, and the tenant's own rate limit.
    s3 = __import__("boto3").client("s3", endpoint_url=api.settings.s3_endpoint_url, region_name="us-east-1")
    for i in range(3):
        s3.put_object(Bucket=api.buckets["acme"], Key=f"p/{i}.jpg", Body=b"x")
    api.sql("UPDATE tenants SET limits = '{\"max_refs\": 2}' WHERE name = 'acme'")
    time.sleep(KEY_TTL_S + 0.1)  # a tenant's limits are read with its key
    with api.client("acme") as c:
        _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "prefix": f"s3://{api.buckets['acme']}/p"}), 413,
                 "too_many_refs")
        assert api.sql("SELECT count(*) FROM jobs") == [(1,)], "nothing of a refused job is kept"
    api.keys["initech"] = create_key(api.store.engine, "initech")[0]
    api.sql("UPDATE tenants SET limits = '{\"requests_per_minute\": 3}' WHERE name = 'initech'")
    if time.time() % 60 > 50:  # the window is the clock's minute: keep the four requests within one
        time.sleep(60 - time.time() % 60 + 0.1)
    with api.client("initech") as c:
        answers = [c.get("/v1/jobs") for _ in range(4)]
        assert [r.status_code for r in answers[:3]] == [200] * 3
        limited = _problem(answers[-1], 429, "rate_limited")
        assert int(answers[-1].headers["retry-after"]) >= 1 and "3 requests per minute" in limited["detail"]
    with api.client("globex") as c:
        assert c.get("/v1/jobs").status_code == 200, "the limit is per key"


def test_a_prefix_job_is_accepted_whole(api: Api) -> None:
    s3 = __import__("boto3").client("s3", endpoint_url=api.settings.s3_endpoint_url, region_name="us-east-1")
    for key in ("2026/a.jpg", "2026/b.jpg", "2026x/c.jpg", "other/d.jpg"):
        s3.put_object(Bucket=api.buckets["acme"], Key=key, Body=b"x")
    with api.client("acme") as c:
        r = c.post("/v1/jobs", json={"kinds": "caption,embed", "prefix": f"s3://{api.buckets['acme']}/2026"})
        assert r.status_code == 202, r.text
        assert r.json()["items"] == 3 and r.headers["location"] == f"/v1/jobs/{r.json()['job']}"
        status = c.get(r.headers["location"]).json()
    assert status["kinds"] == ["caption", "embed"] and status["total"] == 3 and status["source"] == "api"
    assert status["counts"]["queued"] == 3 and not status["finished"]


# -- results, retry, cancel -------------------------------------------------------------------------

def test_results_pages_cover_every_item_exactly_once(api: Api) -> None:
    job = _submit(api, "acme", 23)
    _finish(api, job, done=list(range(0, 20, 2)), dead=[1, 3])
    spellings = []
    for accept, params in ((None, {}), ("application/x-ndjson", {}), (None, {"format": "jsonl"})):
        seen, cursor = [], None
        with api.client("acme") as c:
            while True:
                query = {"limit": 5, **params, **({"cursor": cursor} if cursor else {})}
                r = c.get(f"/v1/jobs/{job}/results", params=query, headers={"Accept": accept} if accept else {})
                assert r.status_code == 200, r.text
                if accept or params:
                    assert r.headers["content-type"].startswith("application/x-ndjson")
                    import json

                    rows = [json.loads(line) for line in r.text.splitlines()]
                    cursor = r.headers.get("x-next-cursor")
                else:
                    rows, cursor = r.json()["items"], r.json()["next_cursor"]
                seen += rows
                if cursor is None:
                    break
        assert [row["seq"] for row in seen] == list(range(23))
        states = {row["seq"]: (row["state"], row.get("caption"), row.get("error_code")) for row in seen}
        assert states[0] == ("done", "caption 0", None) and states[1] == ("dead", None, "not_an_image")
        assert states[21][0] == "queued"
        spellings.append(seen)
    assert spellings[0] == spellings[1] == spellings[2], "JSON and JSON Lines spell every value alike"
    with api.client("acme") as c:
        b64 = __import__("base64").urlsafe_b64encode
        # Not as encode_cursor writes a seq: a sign (answered with a page before), a leading zero, past
        # Postgres' integer.
        for forged in ("!!", *(b64(s.encode()).decode().rstrip("=") for s in ("-5", "05", "99999999999"))):
            _problem(c.get(f"/v1/jobs/{job}/results", params={"cursor": forged}), 422, "bad_cursor")
        summary = c.get(f"/v1/jobs/{job}").json()
    assert summary["counts"] == {"queued": 11, "running": 0, "done": 10, "dead": 2, "cancelled": 0, "purged": 0}
    assert summary["dead_letters"] == {"not_an_image": 2} and summary["progress"] == round(12 / 23, 4)


def test_retry_dead_requeues_the_jobs_dead_letters(api: Api) -> None:
    job = _submit(api, "acme", 4)
    _finish(api, job, done=[0, 3], dead=[1, 2])
    with api.client("acme") as c:
        # A cancel that lands after the job finished leaves it open: its dead letters stay retryable.
        r = c.delete(f"/v1/jobs/{job}")
        assert r.status_code == 200 and r.json()["cancelled"] == 0 and r.json()["status"]["cancelled_at"] is None
        _problem(c.post(f"/v1/jobs/{job}/retry-dead", params={"code": "nope"}), 422, "bad_filter")
        r = c.post(f"/v1/jobs/{job}/retry-dead", params={"code": "not_an_image"})
        assert r.status_code == 200, r.text
        assert r.json()["requeued"] == 2
        counts = c.get(f"/v1/jobs/{job}").json()["counts"]
        assert counts["dead"] == 0 and counts["queued"] == 2
        _finish(api, job, done=[], dead=[1])
        r = c.post(f"/v1/jobs/{job}/retry-dead?code=")  # empty: every code, as the parameter left out
        assert r.status_code == 200 and r.json()["requeued"] == 1, r.text


def test_retry_dead_leaves_refs_outside_the_tenants_sources_as_they_narrowed(api: Api) -> None:
    """The workers check refs against every tenant's sources together: a tenant whose buckets were
    narrowed could requeue dead letters of a bucket it had lost and read their results (found by
    review). Those now stay dead letters, counted in outside_sources."""
    kept, lost = api.buckets["acme"], api.buckets["globex"]
    api.keys["initech"] = create_key(api.store.engine, "initech", buckets=[kept, lost])[0]
    refs = [f"s3://{kept}/a.jpg", f"s3://{lost}/b.jpg", f"s3://{kept}/c.jpg"]
    with api.client("initech") as c:
        r = c.post("/v1/jobs", json={"kinds": ["caption"], "refs": refs})
    assert r.status_code == 202, r.text
    job = str(r.json()["job"])
    _finish(api, job, done=[], dead=[0, 1, 2])
    api.sql("UPDATE tenants SET buckets = ARRAY[:b] WHERE name = 'initech'", b=kept)
    time.sleep(KEY_TTL_S + 0.1)  # a tenant's sources are read with its key
    with api.client("initech") as c:
        r = c.post(f"/v1/jobs/{job}/retry-dead")
        assert r.status_code == 200, r.text
        assert (r.json()["requeued"], r.json()["outside_sources"]) == (2, 1)
        assert c.post(f"/v1/jobs/{job}/retry-dead").json() == {
            "job": job, "requeued": 0, "published": 0, "outside_sources": 1}
    assert api.sql("SELECT seq, state FROM job_items WHERE job_id = :j ORDER BY seq", j=uuid.UUID(job)) == [
        (0, "queued"), (1, "dead"), (2, "queued")]
    assert api.sql("SELECT seq FROM dead_letters WHERE job_id = :j", j=uuid.UUID(job)) == [(1,)]


def test_cancel_then_check_balances(api: Api) -> None:
    job = _submit(api, "acme", 8)
    job_id = uuid.UUID(job)
    api.store.claim(job_id, [0, 1], "w1")  # two items running
    _finish(api, job, done=[0])
    with api.client("acme") as c:
        r = c.delete(f"/v1/jobs/{job}")
        assert r.status_code == 200, r.text
        assert r.json()["cancelled"] == 6 and r.json()["status"]["cancelled_at"]
        assert c.delete(f"/v1/jobs/{job}").json()["cancelled"] == 0
        _problem(c.post(f"/v1/jobs/{job}/retry-dead"), 409, "job_cancelled")
    assert api.store.claim(job_id, [2, 3, 4], "w2") == {}, "cancelled items are never run"
    _finish(api, job, done=[1])  # the running item finishes normally
    env = {"IMGQ_DATABASE_URL": api.settings.database_url}
    check = CliRunner().invoke(cli, ["check", job, "--require-finished"], env=env)
    assert check.exit_code == 0, check.output
    assert "done=2 dead=0 pending=0 purged=0 cancelled=6 missing=0 duplicates=0" in check.stdout
    with api.client("acme") as c:
        status = c.get(f"/v1/jobs/{job}").json()
    assert status["counts"] == {"queued": 0, "running": 0, "done": 2, "dead": 0, "cancelled": 6, "purged": 0}
    assert status["finished"] and status["progress"] == 1.0


def test_validate_pairs_text_search_and_unknown_routes(api: Api) -> None:
    with api.client("acme") as c:
        pairs = [{"ref": ref, "text": f"a photo {i}"} for i, ref in enumerate(_refs(api, "acme", 2))]
        r = c.post("/v1/jobs", json={"kinds": ["validate"], "refs": pairs})
        assert r.status_code == 202 and r.json()["items"] == 2, r.text
        _problem(c.post("/v1/jobs", json={"kinds": ["validate"], "refs": _refs(api, "acme", 1)}), 422, "bad_request")
        _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "refs": pairs}), 422, "bad_request")
        _problem(c.post("/v1/jobs", json={"kinds": ["validate"], "refs": [{"ref": _refs(api, "globex", 1)[0],
                                                                          "text": "x"}]}), 422, "source_not_allowed")
        # An empty text is the pair's own refusal (it was a validation_error reading the object as a
        # failed plain-string ref too), and a prefix is named as the request names it (not "row 1").
        empty = _problem(c.post("/v1/jobs", json={"kinds": ["validate"], "refs": [pairs[0], {**pairs[1], "text": ""}]}),
                         422, "bad_pairs")
        assert empty["detail"].startswith("refs[1]: empty text for ")
        folder = [pairs[0], {"ref": f"s3://{api.buckets['acme']}/", "text": "x"}]
        prefix = _problem(c.post("/v1/jobs", json={"kinds": ["validate"], "refs": folder}), 422, "bad_ref")
        assert prefix["detail"].startswith(f"refs[1]: 's3://{api.buckets['acme']}/' must name one image"), prefix
        # The text encoder loads in the API process; nothing is embedded by its revision yet.
        _problem(c.post("/v1/search", json={"text": "a dog"}), 422, "no_embeddings")
        _problem(c.post("/v1/search", json={"text": "a dog", "image": _refs(api, "acme", 1)[0]}), 422,
                 "validation_error")
        _problem(c.get("/v1/nothing"), 404, "not_found")
        _problem(c.put("/v1/jobs"), 405, "method_not_allowed")


def test_the_job_list_pages_newest_first(api: Api) -> None:
    jobs = [_submit(api, "acme", 1) for _ in range(5)]
    seen, cursor = [], None
    with api.client("acme") as c:
        while True:
            page = c.get("/v1/jobs", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
            seen += [j["job"] for j in page["jobs"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
        _problem(c.get("/v1/jobs", params={"cursor": "bm9wZQ"}), 422, "bad_cursor")
    assert seen == jobs[::-1]


def test_errors_name_no_other_tenants_adapter_nor_the_services_hosts(api: Api, make_settings: Any) -> None:
    """An operator's message lists every registered adapter and the caption model's path, and a
    publish failure names the broker's host and port: a tenant gets a summary, the log the rest."""
    from imgq.db.adapters import AdapterRecord, Adapters
    from imgq.producer.api.app import create_app

    Adapters(api.store.engine).register(AdapterRecord(
        "globex-private-de", "de", "/models/other-blip", "local-0", "/models/adapters/globex", "0" * 64))
    with api.client("acme") as c:
        for adapter in ("nope", "globex-private-de"):  # unknown, and one for another caption model's path
            body = _problem(c.post("/v1/jobs", json={"kinds": ["caption"], "refs": _refs(api, "acme", 1),
                                                     "params": {"adapter": adapter}}), 422, "unknown_adapter")
            assert "globex-private-de" not in body["detail"].replace(adapter, "") and "/" not in body["detail"]

    down = make_settings(allowed_buckets=list(api.buckets.values()), broker_url="redis://127.0.0.1:9/0")
    app = create_app(down)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while not server.started:
            assert time.monotonic() < deadline and thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                          headers={"Authorization": f"Bearer {api.keys['acme']}"}) as c:
            r = c.post("/v1/jobs", json={"kinds": ["caption"], "refs": _refs(api, "acme", 1)})
        assert r.status_code == 202, r.text
        error = r.json()["publish_error"]
        assert error and "broker" in error and "127.0.0.1" not in error and ":9" not in error
    finally:
        server.should_exit = True
        thread.join(10)
