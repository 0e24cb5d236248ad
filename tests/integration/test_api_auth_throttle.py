"""Unknown keys from one address are refused before a database lookup once it fails too often;
keys that work, verified before, still pass (real Postgres and Redis, the app in process)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import event

from imgq.db.tenancy import create_key
from imgq.producer.api.app import KEY_TTL_S, create_app


def test_an_address_failing_too_often_gets_429_without_a_lookup_and_good_keys_still_pass(
    make_settings: Callable[..., Any],
) -> None:
    app = create_app(make_settings(api_auth_failures_per_minute=3))
    engine = app.state.imgq.engine
    good, _ = create_key(engine, "acme")
    fresh, _ = create_key(engine, "globex")
    lookups: list[str] = []
    event.listen(engine, "before_cursor_execute",
                 lambda conn, cursor, statement, *rest: lookups.append(statement) if "api_keys" in statement else None)
    wrong = "imgq_" + "0" * 16 + "_" + "x" * 43
    with TestClient(app) as client:
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {good}"}).status_code == 200
        for _ in range(3):
            assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
        before = len(lookups)
        refused = client.get("/v1/jobs", headers={"Authorization": f"Bearer {wrong}"})
        assert refused.status_code == 429 and refused.json()["code"] == "rate_limited"
        assert 1 <= int(refused.headers["retry-after"]) <= 60
        assert len(lookups) == before, "refused before the key was looked up"
        # A key verified here goes on working (past the 1 s cache of verified keys: looked up again);
        # one never seen from this address waits like a guess.
        time.sleep(KEY_TTL_S + 0.1)
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {good}"}).status_code == 200
        assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {fresh}"}).status_code == 429
