"""The API's OpenAPI document tells the truth about errors: every error is a Problem
(application/problem+json), each route lists only the statuses it can answer, and a 405 names
every method its path serves. Checked against the real app over real HTTP (tests/e2e/test_api.py's
server, Postgres, Redis and S3)."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pytest

from imgq.producer.api.problems import Problem
from imgq.producer.api.schemas import UiSession
from tests.e2e.test_api import Api, _problem, _submit
from tests.e2e.test_api import api as api  # the fixture: "as api" marks it used (a re-export)

pytestmark = pytest.mark.e2e

PROBLEM_CONTENT = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
KEYED = {"401", "429", "500", "503"}  # every /v1 route: its key is looked up in Postgres and rate-limited

# What each route can answer, read from its code and its dependencies (auth, body limit, sources).
STATUSES = {
    ("post", "/v1/jobs"): {"200", "202", "409", "413", "422"} | KEYED,
    ("get", "/v1/jobs"): {"200", "422"} | KEYED,
    ("get", "/v1/jobs/{job_id}"): {"200", "404"} | KEYED,
    ("delete", "/v1/jobs/{job_id}"): {"200", "404", "413"} | KEYED,
    ("get", "/v1/jobs/{job_id}/results"): {"200", "404", "422"} | KEYED,
    ("post", "/v1/jobs/{job_id}/retry-dead"): {"200", "404", "409", "413", "422"} | KEYED,
    ("get", "/v1/images"): {"200", "404", "422"} | KEYED,
    ("post", "/v1/search"): {"200", "413", "422", "501"} | KEYED,
    ("post", "/v1/ui-sessions"): {"201", "413"} | KEYED,
}


def _doc(api: Api) -> dict[str, Any]:
    with api.client() as c:
        r = c.get("/openapi.json")
    assert r.status_code == 200, r.text
    return dict(r.json())


def _operations(doc: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(method, path): op for path, ops in doc["paths"].items() if path.startswith("/v1/")
            for method, op in ops.items()}


def test_every_error_of_every_v1_route_is_a_problem_and_only_the_statuses_it_can_answer(api: Api) -> None:
    doc = _doc(api)
    schemas = doc["components"]["schemas"]
    assert set(schemas["Problem"]["properties"]) == {"type", "title", "status", "detail", "code", "errors"}
    assert set(schemas["Problem"]["required"]) == {"type", "title", "status", "detail", "code"}
    assert set(schemas["ProblemError"]["properties"]) == {"loc", "msg", "type"}
    # FastAPI's own 422 (an application/json HTTPValidationError) is no answer of this API.
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas
    operations = _operations(doc)
    assert {key: set(op["responses"]) for key, op in operations.items()} == STATUSES
    for (method, path), op in operations.items():
        for status, response in op["responses"].items():
            if not status.startswith("2"):
                assert response["content"] == PROBLEM_CONTENT, (method, path, status)
                assert "`" in response["description"], (method, path, status)  # names its code(s)


def test_a_404_is_listed_only_where_it_can_happen_with_its_own_code(api: Api) -> None:
    operations = _operations(_doc(api))
    for key in (("get", "/v1/jobs"), ("post", "/v1/jobs"), ("post", "/v1/search")):
        assert "404" not in operations[key]["responses"], key
    images = operations["get", "/v1/images"]["responses"]["404"]["description"]
    assert "image_not_found" in images and "job_not_found" not in images
    for key, op in operations.items():
        if key[1].startswith("/v1/jobs/{job_id}"):
            assert "`job_not_found`" in op["responses"]["404"]["description"], key


def test_503_501_and_the_headers_clients_wait_by_are_listed(api: Api) -> None:
    operations = _operations(_doc(api))
    for key, op in operations.items():  # every /v1 route reads Postgres (the key, at least)
        unavailable = op["responses"]["503"]
        assert "db_unavailable" in unavailable["description"], key
        assert "Retry-After" in unavailable["headers"] and "Retry-After" in op["responses"]["429"]["headers"]
        assert "WWW-Authenticate" in op["responses"]["401"]["headers"], key
    assert "s3_unavailable" in operations["post", "/v1/jobs"]["responses"]["503"]["description"]
    assert "missing_extra" in operations["post", "/v1/search"]["responses"]["501"]["description"]
    creating = operations["post", "/v1/jobs"]["responses"]["422"]["description"]
    assert "`unknown_adapter`" in creating


def test_ui_sessions_documents_its_body_and_still_answers_what_it_did(api: Api) -> None:
    doc = _doc(api)
    created = _operations(doc)["post", "/v1/ui-sessions"]["responses"]["201"]
    assert created["content"] == {"application/json": {"schema": {"$ref": "#/components/schemas/UiSession"}}}
    assert created["headers"]["Cache-Control"]["description"] == "no-store"
    assert set(doc["components"]["schemas"]["UiSession"]["properties"]) == {"login_url", "login_path", "expires_at"}
    with api.client("acme") as c:
        r = c.post("/v1/ui-sessions")
    assert r.status_code == 201, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert set(body) == {"login_url", "login_path", "expires_at"}
    assert body["login_url"] == api.url + body["login_path"] and body["login_path"].startswith("/ui/login?token=")
    # The JSON is the one sent before the model documented it: isoformat() with +00:00, not "Z".
    assert body["expires_at"].endswith("+00:00")
    assert dt.timedelta(0) < dt.datetime.fromisoformat(body["expires_at"]) - dt.datetime.now(dt.UTC) <= \
        dt.timedelta(minutes=5)
    UiSession.model_validate(body)


def test_real_errors_are_what_the_problem_schema_says(api: Api) -> None:
    job = _submit(api, "acme")
    with api.client("acme") as c:
        answers = [
            (c.get(f"/v1/jobs/{job}", headers={"Authorization": "Bearer nope"}), 401, "unauthorized"),
            (c.get(f"/v1/jobs/{uuid.uuid4()}"), 404, "job_not_found"),
            (c.get("/v1/images", params={"ref": f"s3://{api.buckets['acme']}/none.jpg"}), 404, "image_not_found"),
            (c.get("/v1/images", params={"ref": f"s3://{api.buckets['acme']}/x.jpg", "lang": "xx"}), 422,
             "unknown_language"),
            (c.get("/v1/jobs", params={"limit": 201}), 422, "validation_error"),
            (c.post("/v1/jobs", json={"kinds": ["caption"], "refs": [f"s3://{api.buckets['acme']}/a.jpg"],
                                      "params": {"adapter": "nobody-registered-this"}}), 422, "unknown_adapter"),
            (c.put("/v1/jobs"), 405, "method_not_allowed"),
        ]
    for r, status, code in answers:
        body = _problem(r, status, code)
        Problem.model_validate(body)  # extra="forbid": a field the document does not describe fails
    assert answers[4][0].json()["errors"][0]["loc"] == ["query", "limit"]
    # RFC 9110's name whatever the Python (3.11 and 3.12 say "Unprocessable Entity").
    assert answers[4][0].json()["title"] == "Unprocessable Content"


def test_a_405_names_every_method_its_path_serves(api: Api) -> None:
    job = _submit(api, "acme")
    with api.client("acme") as c:
        cases = {("PUT", "/v1/jobs"): "GET, POST", ("POST", f"/v1/jobs/{job}"): "DELETE, GET",
                 ("PATCH", f"/v1/jobs/{job}"): "DELETE, GET", ("GET", "/v1/search"): "POST",
                 ("DELETE", f"/v1/jobs/{job}/results"): "GET"}
        for (method, path), allow in cases.items():
            r = c.request(method, path)
            _problem(r, 405, "method_not_allowed")
            assert r.headers["allow"] == allow, (method, path)


def test_a_database_that_is_gone_is_503_and_a_read_does_not_claim_to_have_refused_anything(
        make_settings: Any, tmp_path: Any) -> None:
    from fastapi.testclient import TestClient

    from imgq.producer.api.app import create_app

    settings = make_settings(database_url=f"postgresql+psycopg://postgres@/imgq?host={tmp_path}")  # no server
    with TestClient(create_app(settings)) as client:
        bearer = {"Authorization": "Bearer imgq_0123456789abcdef_" + "x" * 43}
        read = client.get("/v1/jobs", headers=bearer)
        write = client.post("/v1/jobs", headers=bearer, json={"kinds": ["caption"], "refs": ["s3://b/k.jpg"]})
    for r in (read, write):
        assert (r.status_code, r.json()["code"], r.headers["retry-after"]) == (503, "db_unavailable", "5"), r.text
    assert read.json()["detail"] == "the database is unavailable"
    assert write.json()["detail"] == "the database is unavailable; nothing was accepted"
