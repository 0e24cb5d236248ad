"""The jobs page (/ui) as a browser and an attacker see it: the real API under uvicorn on loopback,
the real Postgres, and Debian's headless Chromium for the rendered page and a screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from html import unescape
from pathlib import Path

import httpx
import pytest
from sqlalchemy import text

from imgq.db.store import DeadRow, Store, make_engine
from imgq.db.tenancy import create_key, revoke_key
from imgq.embedded import free_port
from imgq.producer.api.ui import COOKIE
from tests.jobs import caption_task, record

pytestmark = pytest.mark.e2e


# A link typed or pasted into the address bar (what chromium sends for a URL on its command line).
TYPED = {"Sec-Fetch-Site": "none"}


@dataclass
class Api:
    base: str
    store: Store

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, follow_redirects=False, timeout=10)

    def login_url(self, key: str, next_path: str | None = None) -> str:
        with self.client() as client:
            response = client.post("/v1/ui-sessions", headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 201, response.text
        body = response.json()
        assert body["login_url"] == self.base + body["login_path"]
        return body["login_url"] + (f"&next={next_path}" if next_path else "")

    @contextmanager
    def session(self, key: str) -> Iterator[httpx.Client]:
        """A client logged in through a one-time link."""
        with self.client() as client:
            response = client.get(self.login_url(key), headers=TYPED)
            assert response.status_code == 303 and response.headers["location"] == "/ui", response.text
            yield client


@pytest.fixture
def api(database_url: str, broker_url: str, image_root: Path) -> Iterator[Api]:
    import uvicorn

    from imgq.config import Settings
    from imgq.producer.api.app import create_app

    settings = Settings(database_url=database_url, broker_url=broker_url, local_roots=[image_root],
                        allowed_buckets=["photos"])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the API never started"
        time.sleep(0.05)
    store = Store(make_engine(settings.sync_database_url))
    try:
        yield Api(f"http://127.0.0.1:{port}", store)
    finally:
        server.should_exit = True
        thread.join(10)
        store.engine.dispose()


def _job(store: Store, tenant: str, *, done: int, dead: list[str], queued: int) -> uuid.UUID:
    """A job of ``tenant`` whose items are done, dead (one per code given) and still queued, in seq order."""
    n = done + len(dead) + queued
    job = store.create_job(tasks=[record(caption_task("tiny"))], refs=[f"s3://photos/{i}.jpg" for i in range(n)],
                           tenant=tenant)
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE job_items SET state = 'done', updated_at = now() WHERE job_id = :j AND seq < :n"),
                     {"j": job, "n": done})
    store.write_dead([DeadRow(job, done + i, code, f"<b>{code}</b> & co", "w1") for i, code in enumerate(dead)])
    return job


def _visible(html: str) -> str:
    return unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html)))


def _csrf(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]{64})"', html)
    assert found, html[:2000]
    return found.group(1)


def test_chromium_renders_the_jobs_of_the_tenant_with_counts_and_dead_letter_codes(api: Api, tmp_path: Path):
    key, _ = create_key(api.store.engine, "acme")
    job = _job(api.store, "acme", done=3, dead=["not_an_image", "not_an_image", "too_large"], queued=1)
    other = _job(api.store, "globex", done=1, dead=[], queued=0)

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is missing: `make test` installs it (make browser)")
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1400,900",
              "--virtual-time-budget=2000", f"--user-data-dir={tmp_path / 'profile'}"]

    def render(url: str, *extra: str) -> str:
        done = subprocess.run([*common, *extra, url], capture_output=True, text=True, timeout=60)
        return done.stdout if "--dump-dom" in extra else done.stderr

    page = _visible(render(api.login_url(key), "--dump-dom"))
    assert str(job) in page and str(other) not in page, page[:3000]
    assert "3 done" in page and "3 dead" in page and "1 queued" in page and "0 running" in page, page
    assert "not_an_image: 2" in page and "too_large: 1" in page, page
    assert "tenant acme" in page

    dom = render(api.login_url(key, f"/ui/jobs/{job}"), "--dump-dom")
    detail = _visible(dom)
    assert str(job) in detail and "Retry 3 dead letters" in detail, detail[:3000]
    # Each dead letter, its message escaped: shown as text, never parsed as markup.
    assert "s3://photos/3.jpg" in detail and "<b>not_an_image</b> & co" in detail
    assert "<b>not_an_image</b>" not in dom

    shot = tmp_path / "jobs-page.png"
    render(api.login_url(key), f"--screenshot={shot}")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000


def test_without_a_session_the_page_sends_to_the_login_form_and_posts_are_refused(api: Api):
    key, _ = create_key(api.store.engine, "acme")
    job = _job(api.store, "acme", done=1, dead=["empty"], queued=0)
    with api.client() as client:
        for path in ("/ui", f"/ui/jobs/{job}"):
            response = client.get(path)
            assert response.status_code == 303 and response.headers["location"].startswith("/ui/login?next=/ui")
        assert client.post(f"/ui/jobs/{job}/retry-dead", data={"csrf": "0" * 64}).status_code == 401
        form = client.get("/ui/login")
        assert form.status_code == 200 and 'name="key"' in form.text
        assert "frame-ancestors 'none'" in form.headers["content-security-policy"]
        assert client.post("/v1/ui-sessions").status_code == 401
        assert client.post("/v1/ui-sessions", headers={"Authorization": "Bearer imgq_0_nope"}).status_code == 401

        # The login form: a wrong key is refused, a post from another site too, the right key logs in.
        assert client.post("/ui/login", data={"key": key + "x"}).status_code == 401
        stuffed = {f"f{i}": "x" for i in range(11)}  # more fields than any form has: not a 500
        assert client.post("/ui/login", data=stuffed).status_code == 401
        for cross_site in ({"Origin": "https://evil.example"}, {"Sec-Fetch-Site": "cross-site"},
                           {"Sec-Fetch-Site": "same-site", "Origin": api.base}):
            cross = client.post("/ui/login", data={"key": key}, headers=cross_site)
            assert cross.status_code == 403 and "set-cookie" not in cross.headers, cross_site
        response = client.post("/ui/login", data={"key": key, "next": f"/ui/jobs/{job}"},
                               headers={"Sec-Fetch-Site": "same-origin", "Origin": api.base})
        assert response.status_code == 303 and response.headers["location"] == f"/ui/jobs/{job}"
        assert client.get(f"/ui/jobs/{job}").status_code == 200


def test_a_login_link_works_once_and_only_sends_to_the_page(api: Api):
    key, _ = create_key(api.store.engine, "acme")
    url = api.login_url(key, "https://evil.example/ui")
    with api.client() as client:
        response = client.get(url, headers=TYPED)
        assert response.status_code == 303 and response.headers["location"] == "/ui"
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie, cookie
        assert "Max-Age=28800" in cookie and "Secure" not in cookie  # plain http on loopback
        assert client.get("/ui").status_code == 200
    with api.client() as client:
        again = client.get(url, headers=TYPED)
        assert again.status_code == 401 and "set-cookie" not in again.headers
        assert client.get("/ui").status_code == 303

    # Behind a TLS proxy the cookie is Secure and the link https.
    with api.client() as client:
        link = client.post("/v1/ui-sessions", headers={"Authorization": f"Bearer {key}",
                                                       "X-Forwarded-Proto": "https"}).json()
        assert link["login_url"].startswith("https://127.0.0.1:")
        proxied = client.get(link["login_path"], headers={"X-Forwarded-Proto": "https", **TYPED})
        assert proxied.status_code == 303 and "Secure" in proxied.headers["set-cookie"]

    # Opened from another site, a mail or a browser that does not say: a confirm page naming the
    # tenant, whose same-site POST spends the link. Another site cannot log this browser into its
    # tenant unseen (login CSRF), and a mail scanner fetching the link does not use it up.
    with api.client() as client:
        link = api.login_url(key, "/ui/jobs/x")
        token = link.split("token=")[1].split("&")[0]
        for opened in ({"Sec-Fetch-Site": "cross-site"}, {}, {"Sec-Fetch-Site": "same-site"}):
            page = client.get(link, headers=opened)
            assert page.status_code == 200 and "set-cookie" not in page.headers, opened
            assert "tenant <b>acme</b>" in page.text and 'action="/ui/login/link"' in page.text
        for cross_site in ({"Sec-Fetch-Site": "cross-site"}, {"Origin": "https://evil.example"}):
            refused = client.post("/ui/login/link", data={"token": token}, headers=cross_site)
            assert refused.status_code == 403 and "set-cookie" not in refused.headers
        confirmed = client.post("/ui/login/link", data={"token": token, "next": "/ui/jobs/x"},
                                headers={"Sec-Fetch-Site": "same-origin", "Origin": api.base})
        assert confirmed.status_code == 303 and confirmed.headers["location"] == "/ui/jobs/x"
        assert "set-cookie" in confirmed.headers and client.get("/ui").status_code == 200
        assert client.post("/ui/login/link", data={"token": token}).status_code == 401  # once
        assert client.get(link, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 401

    # Expired links and sessions stop working.
    with api.session(key) as client:
        stale = api.login_url(key)
        with api.store.engine.begin() as conn:
            conn.execute(text("UPDATE ui_sessions SET expires_at = now() - interval '1 second'"))
        assert client.get(stale).status_code == 401
        assert client.get("/ui").status_code == 303


def test_another_tenant_sees_neither_the_job_nor_can_retry_it(api: Api):
    acme, _ = create_key(api.store.engine, "acme")
    globex, _ = create_key(api.store.engine, "globex")
    job = _job(api.store, "acme", done=1, dead=["empty"], queued=0)
    with api.session(globex) as client:
        page = client.get("/ui")
        assert page.status_code == 200 and str(job) not in page.text
        assert client.get(f"/ui/jobs/{job}").status_code == 404
        assert client.get("/ui/jobs/not-a-uuid").status_code == 404
        retry = client.post(f"/ui/jobs/{job}/retry-dead", data={"csrf": _csrf(page.text)})
        assert retry.status_code == 404
        assert client.get(f"/ui/jobs/{job}/cancel").status_code == 404
        assert client.post(f"/ui/jobs/{job}/cancel", data={"csrf": _csrf(page.text)}).status_code == 404
    assert api.store.counts(job)["dead"] == 1
    with api.session(acme) as client:
        assert client.get(f"/ui/jobs/{job}").status_code == 200


def test_retry_needs_the_session_token_and_sends_the_dead_letters_back(api: Api):
    key, _ = create_key(api.store.engine, "acme", buckets=["photos"])  # retry-dead checks the sources
    job = _job(api.store, "acme", done=2, dead=["transient_exhausted", "empty"], queued=0)
    with api.session(key) as client:
        page = client.get(f"/ui/jobs/{job}")
        assert page.status_code == 200 and f'action="/ui/jobs/{job}/retry-dead"' in page.text
        assert client.post(f"/ui/jobs/{job}/retry-dead").status_code == 403
        assert client.post(f"/ui/jobs/{job}/retry-dead", data={"csrf": "f" * 64}).status_code == 403
        csrf = _csrf(page.text)
        cross = client.post(f"/ui/jobs/{job}/retry-dead", data={"csrf": csrf},
                            headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403
        assert api.store.counts(job) == {"queued": 0, "running": 0, "done": 2, "dead": 2}

        retried = client.post(f"/ui/jobs/{job}/retry-dead", data={"csrf": csrf})
        assert retried.status_code == 303 and retried.headers["location"] == f"/ui/jobs/{job}?retried=2"
        assert api.store.counts(job) == {"queued": 2, "running": 0, "done": 2, "dead": 0}
        after = _visible(client.get(retried.headers["location"]).text)
        assert "2 dead letters sent back to the queue" in after and "2 queued" in after and "0 dead" in after

        # Logging out ends the session on the server, not only in this browser.
        cookie = client.cookies.get("imgq_ui")
        assert client.post("/ui/logout", data={"csrf": csrf}).status_code == 303
    with api.client() as client:
        client.cookies.set("imgq_ui", cookie, domain="127.0.0.1", path="/ui")
        assert client.get("/ui").status_code == 303


def test_a_cancelled_job_keeps_its_dead_letters(api: Api):
    key, _ = create_key(api.store.engine, "acme")
    job = _job(api.store, "acme", done=1, dead=["empty"], queued=2)
    with api.client() as client:
        cancel = client.delete(f"/v1/jobs/{job}", headers={"Authorization": f"Bearer {key}"})
        assert cancel.status_code == 200, cancel.text
    with api.session(key) as client:
        page = client.get(f"/ui/jobs/{job}")
        assert "retry-dead" not in page.text and "2 cancelled" in _visible(page.text)
        assert "cancelled" in _visible(client.get("/ui").text)
        retry = client.post(f"/ui/jobs/{job}/retry-dead", data={"csrf": _csrf(page.text)})
        assert retry.status_code == 409 and "cancelled" in retry.text
    assert api.store.counts(job)["dead"] == 1


def test_cancel_is_confirmed_on_a_page_of_its_own_and_needs_the_session_token(api: Api):
    key, _ = create_key(api.store.engine, "acme")
    job = _job(api.store, "acme", done=1, dead=["empty"], queued=3)
    with api.session(key) as client:
        assert f'href="/ui/jobs/{job}/cancel"' in client.get(f"/ui/jobs/{job}").text
        confirm = client.get(f"/ui/jobs/{job}/cancel")
        assert confirm.status_code == 200 and "refresh" not in confirm.text, "the confirmation must not reload"
        assert "Its 3 queued items will never run." in _visible(confirm.text)
        assert api.store.counts(job)["queued"] == 3, "showing the confirmation cancels nothing"
        assert client.post(f"/ui/jobs/{job}/cancel").status_code == 403
        assert client.post(f"/ui/jobs/{job}/cancel", data={"csrf": "f" * 64}).status_code == 403
        csrf = _csrf(confirm.text)
        cross = client.post(f"/ui/jobs/{job}/cancel", data={"csrf": csrf}, headers={"Origin": "https://evil.example"})
        assert cross.status_code == 403
        assert api.store.counts(job) == {"queued": 3, "running": 0, "done": 1, "dead": 1}

        cancelled = client.post(f"/ui/jobs/{job}/cancel", data={"csrf": csrf})
        assert cancelled.status_code == 303 and cancelled.headers["location"] == f"/ui/jobs/{job}?cancelled=3"
        assert api.store.counts(job) == {"queued": 0, "running": 0, "done": 1, "dead": 1, "cancelled": 3}
        after = _visible(client.get(cancelled.headers["location"]).text)
        assert "Job cancelled: 3 queued items will never run." in after and "3 cancelled" in after
        assert "Cancel this job" not in after
        assert "Already cancelled" in _visible(client.get(f"/ui/jobs/{job}/cancel").text)


def test_a_revoked_key_ends_its_sessions(api: Api):
    key, _ = create_key(api.store.engine, "acme")
    with api.session(key) as client:
        assert client.get("/ui").status_code == 200
        assert revoke_key(api.store.engine, key.split("_")[1])
        assert client.get("/ui").status_code == 303


@pytest.mark.parametrize(("next_path", "expected"), [
    ("/ui/jobs/1", "/ui/jobs/1"), ("/ui", "/ui"), ("/ui?x=1", "/ui?x=1"), (None, "/ui"), ("", "/ui"),
    ("https://evil.example/ui", "/ui"), ("//evil.example/ui", "/ui"), ("/uix", "/ui"), ("/v1/jobs", "/ui"),
    ("/ui\\@evil", "/ui"), ("/ui/\r\nSet-Cookie: x", "/ui"), ("javascript:alert(1)", "/ui"),
    ("/ui/../../openapi.json", "/ui"), ("/ui/%2e%2e/docs", "/ui"), ("/ui/./jobs", "/ui"),
    ("/ui/jobs/..x", "/ui/jobs/..x"),
])
def test_login_only_sends_the_browser_to_the_page(next_path: str | None, expected: str):
    from imgq.producer.api.ui import safe_next

    assert safe_next(next_path) == expected


def test_the_page_and_its_login_count_against_the_keys_rate_limit(api: Api):
    key, _ = create_key(api.store.engine, "slow")
    with api.store.engine.begin() as conn:
        conn.execute(text("""UPDATE tenants SET limits = '{"requests_per_minute": 3}' WHERE name = 'slow'"""))
    same_site = {"Sec-Fetch-Site": "same-origin"}
    if time.time() % 60 > 45:  # the window is the clock's minute: keep the five requests within one
        time.sleep(60 - time.time() % 60 + 0.1)
    with api.client() as client:
        logins = [client.post("/ui/login", data={"key": key}, headers=same_site).status_code for _ in range(2)]
        pages = [client.get("/ui").status_code for _ in range(2)]
        assert logins == [303, 303] and pages == [200, 429], (logins, pages)
        limited = client.get("/ui")
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        assert "text/html" in limited.headers["content-type"] and "Too many requests" in limited.text
    with api.store.engine.connect() as conn:
        sessions = conn.execute(text("SELECT count(*) FROM ui_sessions WHERE kind = 'session'")).scalar_one()
    assert sessions == 2


def test_a_key_of_imgq_tenant_made_before_create_refused_it_opens_nothing(api: Api):
    """`imgq apikey create` refuses IMGQ_TENANT (every CLI job's tenant), but a key made before it
    did still listed, read and cancelled the operators' jobs over HTTP and on the page."""
    from imgq.db import ui_sessions

    old, _ = create_key(api.store.engine, "default")  # as an older imgq made it
    session = ui_sessions.create_session(api.store.engine, old.split("_")[1])  # and a page session of it
    operators = _job(api.store, "default", done=1, dead=[], queued=1)
    good, _ = create_key(api.store.engine, "acme")
    with api.client() as client:
        for key, status in ((old, 401), (good, 200)):
            assert client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"}).status_code == status
        bearer = {"Authorization": f"Bearer {old}"}
        assert client.get(f"/v1/jobs/{operators}", headers=bearer).status_code == 401
        assert client.delete(f"/v1/jobs/{operators}", headers=bearer).status_code == 401
        assert client.post("/v1/ui-sessions", headers=bearer).status_code == 401
        login = client.post("/ui/login", data={"key": old}, headers={"Sec-Fetch-Site": "same-origin"})
        assert login.status_code == 401 and "set-cookie" not in login.headers
        link = ui_sessions.create_login(api.store.engine, old.split("_")[1])  # made before IMGQ_TENANT was set
        for site in ("none", "cross-site"):  # typed in, or followed from elsewhere (the confirm page)
            spent = client.get("/ui/login", params={"token": link}, headers={"Sec-Fetch-Site": site})
            assert spent.status_code == 401 and "set-cookie" not in spent.headers, site
        client.cookies.set(COOKIE, session)
        page = client.get(f"/ui/jobs/{operators}")
        assert page.status_code == 303 and page.headers["location"].startswith("/ui/login")
    with api.store.engine.connect() as conn:
        states = conn.execute(text("SELECT state, count(*) FROM job_items WHERE job_id = :j GROUP BY 1 ORDER BY 1"),
                              {"j": operators}).all()
    assert states == [("done", 1), ("queued", 1)]


def test_chromium_renders_the_api_docs_from_this_origin_under_their_csp(api: Api, tmp_path: Path):
    """/docs loaded Swagger UI from a CDN (blank without internet; the CDN could run anything on
    the page): now every asset comes from this process, under a policy that allows nothing else."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.fail("chromium is missing: `make test` installs it (make browser)")
    with api.client() as client:
        page = client.get("/docs")
    assert page.status_code == 200 and "script-src 'self'" in page.headers["content-security-policy"]
    assert "http" not in page.text and "<script>" not in page.text, "no outside asset, no inline script"
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", f"{api.base}/docs"],
                          capture_output=True, text=True, timeout=90)
    rendered = _visible(done.stdout)
    assert "POST /v1 /jobs /{job_id} /retry-dead Retry Dead" in rendered and "OAS 3.1" in rendered, rendered[:2000]
    assert "Refused to" not in done.stderr, "the page broke its own policy"
