"""The notifier's request, without a network: pinned address, Host and SNI kept, no redirects, every
resolved address checked (httpx.MockTransport and a recording store)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from imgq.callbacks import verify
from imgq.db.callbacks import DueCallback
from imgq.worker.notifier import Notifier

JOB = uuid.UUID("0b5e6c1e-9f38-4d55-8a3b-2f1c6f0f8f49")


class RecordingStore:
    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def record(self, job: uuid.UUID, attempt: int, **outcome: Any) -> bool:
        self.records.append({"job": job, "attempt": attempt, **outcome})
        return True


def _due(url: str, attempt: int = 1, secret: str | None = "sek") -> DueCallback:
    return DueCallback(job=JOB, url=url, tenant="acme", secret=secret, attempt=attempt,
                       summary={"job": str(JOB), "total": 1})


def _notifier(handler: Any, addresses: list[str], hosts: list[str], **kwargs: Any) -> tuple[Notifier, RecordingStore]:
    store = RecordingStore()
    client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    notifier = Notifier(store=store, hosts=hosts, max_attempts=3, timeout_s=1, client=client,  # type: ignore[arg-type]
                        resolver=lambda host, port: addresses, clock=lambda: 1_700_000_000, **kwargs)
    return notifier, store


def test_https_goes_to_the_checked_address_with_the_name_in_host_and_sni():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    notifier, store = _notifier(handler, ["93.184.216.34", "2606:2800:220:1::1"], ["hooks.example.com"])
    assert notifier.deliver(_due("https://hooks.example.com/cb?x=1")) == "delivered"
    [request] = seen
    assert str(request.url) == "https://93.184.216.34/cb?x=1"  # httpx drops the default port
    assert request.headers["Host"] == "hooks.example.com"
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert request.headers["Imgq-Job"] == str(JOB) and request.headers["Imgq-Delivery"] == "1"
    assert verify("sek", request.headers["Imgq-Signature"], request.content, now=1_700_000_000)
    assert json.loads(request.content) == {"job": str(JOB), "total": 1}
    assert store.records[0]["state"] == "delivered" and store.records[0]["status"] == 204


def test_an_ipv6_address_is_bracketed_and_a_port_kept():
    seen: list[httpx.Request] = []
    notifier, _ = _notifier(lambda r: seen.append(r) or httpx.Response(200), ["2606:2800:220:1::1"],
                            ["hooks.example.com"])
    notifier.deliver(_due("http://hooks.example.com:8080/cb"))
    assert str(seen[0].url) == "http://[2606:2800:220:1::1]:8080/cb"
    assert seen[0].headers["Host"] == "hooks.example.com:8080" and "sni_hostname" not in seen[0].extensions


def test_a_redirect_is_not_followed_and_counts_as_a_failure():
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})

    notifier, store = _notifier(handler, ["93.184.216.34"], ["hooks.example.com"], schedule=(7.0,))
    assert notifier.deliver(_due("https://hooks.example.com/cb")) == "pending"
    assert len(seen) == 1
    assert store.records == [{"job": JOB, "attempt": 1, "state": "pending", "delay_s": 7.0, "status": 302,
                              "error": None, "ms": store.records[0]["ms"]}]


@pytest.mark.parametrize("addresses", [["93.184.216.34", "10.0.0.5"], ["169.254.169.254"], ["::ffff:127.0.0.1"], []])
def test_one_refused_address_refuses_the_attempt_before_any_request(addresses: list[str]):
    def handler(request: httpx.Request) -> httpx.Response:
        raise AssertionError("no request may be sent")

    notifier, store = _notifier(handler, addresses, ["hooks.example.com"])
    assert notifier.deliver(_due("https://hooks.example.com/cb")) == "pending"
    assert store.records[0]["error"].startswith("refused: ") and store.records[0]["status"] is None


def test_a_url_no_longer_on_the_list_is_refused_at_send_time():
    notifier, store = _notifier(lambda r: httpx.Response(200), ["93.184.216.34"], ["other.example.com"])
    assert notifier.deliver(_due("https://hooks.example.com/cb")) == "pending"
    assert "not on IMGQ_CALLBACK_HOSTS" in store.records[0]["error"]


def test_connection_errors_are_recorded_and_the_last_attempt_fails():
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused")

    notifier, store = _notifier(handler, ["93.184.216.34"], ["hooks.example.com"])
    assert notifier.deliver(_due("https://hooks.example.com/cb", attempt=3)) == "failed"
    assert store.records[0]["error"] == "ConnectError: connection refused"


def test_no_secret_fails_at_once_without_a_request():
    notifier, store = _notifier(lambda r: pytest.fail("no request"), ["93.184.216.34"], ["hooks.example.com"])
    assert notifier.deliver(_due("https://hooks.example.com/cb", secret=None)) == "failed"
    assert store.records[0]["error"] == "tenant has no callback secret"
