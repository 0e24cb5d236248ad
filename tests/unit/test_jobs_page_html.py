"""The jobs page's HTML (producer/api/ui_html.py): figures, escaping and the content policy."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import re
import uuid

import pytest

from imgq.db.jobs_page import JobSummary
from imgq.db.tenancy import Principal
from imgq.producer.api import ui_html

NOW = dt.datetime(2026, 11, 27, 23, 0, tzinfo=dt.UTC)


def _job(**changes: object) -> JobSummary:
    base: dict[str, object] = dict(id=uuid.UUID(int=1), kind="caption,embed", source="api", priority=0, total=100,
                                   purged=0, created_at=NOW, cancelled_at=None, queued=40, running=10, dead=5,
                                   cancelled=0, done=45, rate=2.0, dead_by_code={"empty": 5})
    base.update(changes)
    return JobSummary(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("seconds", "shown"), [
    (None, "—"), (0, "0s"), (59.4, "59s"), (60, "1m 00s"), (3599, "59m 59s"), (3600, "1h 00m"), (90061, "25h 01m"),
])
def test_durations(seconds: float | None, shown: str):
    assert ui_html.duration(seconds) == shown


@pytest.mark.parametrize(("changes", "rate", "eta"), [
    ({}, "2.0/s", "25s"),  # 50 pending at 2/s
    ({"rate": 0.0}, "0.0/s", "—"),  # nothing finished lately: no estimate
    ({"queued": 0, "running": 0, "done": 95, "rate": None}, "—", "finished"),
    ({"queued": 0, "running": 0, "done": 45, "cancelled": 50, "cancelled_at": NOW, "rate": None}, "—", "cancelled"),
])
def test_rate_and_eta(changes: dict[str, object], rate: str, eta: str):
    job = _job(**changes)
    assert (ui_html.rate(job), ui_html.eta(job)) == (rate, eta)


def test_the_bar_has_a_segment_per_state_in_proportion_and_the_counts_in_words():
    html = ui_html.progress(_job(purged=20, total=120))
    assert re.findall(r'class="(\w+) w(\d+)"', html) == [("done", "45"), ("dead", "5"), ("running", "10"),
                                                        ("queued", "40")]
    words = re.sub(r"<[^>]+>", "", html)
    assert "45 done · 5 dead · 10 running · 40 queued · 20 purged · of 120" in words


def test_everything_from_the_database_is_escaped():
    evil = "<script>alert(1)</script>"
    job = _job(kind=evil, source=evil, dead_by_code={evil: 1})
    letters = [{"seq": 0, "ref": evil, "code": evil, "message": evil, "attempts": 1, "created_at": NOW}]
    principal = Principal(tenant=evil, key_id=evil, buckets=(), roots=())
    for html in (ui_html.jobs_page([job], principal, "c" * 64), ui_html.job_page(job, letters, principal, "c" * 64),
                 ui_html.login_page(evil, evil), ui_html.message_page(evil, evil)):
        assert "<script>" not in html and "&lt;script&gt;" in html


def test_the_policy_allows_exactly_the_page_s_stylesheet():
    html = ui_html.jobs_page([_job()], Principal("acme", "k", (), ()), "c" * 64)
    css = re.search(r"<style>(.*?)</style>", html, re.S).group(1)  # type: ignore[union-attr]
    digest = base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()
    assert f"style-src 'sha256-{digest}'" in ui_html.CSP and "default-src 'none'" in ui_html.CSP
    assert " style=" not in html and "<script" not in html


def test_the_retry_button_carries_the_token_and_is_gone_for_a_cancelled_job():
    principal = Principal("acme", "k", (), ())
    html = ui_html.job_page(_job(), [], principal, "ab" * 32)
    assert f'action="/ui/jobs/{uuid.UUID(int=1)}/retry-dead"' in html and f'value="{"ab" * 32}"' in html
    assert "retry-dead" not in ui_html.job_page(_job(cancelled_at=NOW), [], principal, "ab" * 32)
    assert "retry-dead" not in ui_html.job_page(_job(dead=0, dead_by_code={}), [], principal, "ab" * 32)
