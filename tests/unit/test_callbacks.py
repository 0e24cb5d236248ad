"""Callback policy, signature and backoff: pure tables (core/callbacks.py)."""

from __future__ import annotations

import time

import pytest

from imgq.callbacks import (
    BACKOFF_S,
    HostPolicy,
    address_refusal,
    backoff_s,
    check_addresses,
    check_callback_url,
    next_delay,
    parse_callback_url,
    sign,
    signature_header,
    verify,
)
from imgq.config import Settings
from imgq.errors import CallbackRefused, InvalidRequest
from tests.snippets import documented_verifier

SECRET = "s3cret"
BODY = b'{"job":"x"}'


# -- signature ---------------------------------------------------------------------------------

def test_sign_is_hmac_sha256_over_timestamp_dot_body():
    import hashlib
    import hmac

    assert sign(SECRET, 1700000000, BODY) == hmac.new(b"s3cret", b"1700000000." + BODY, hashlib.sha256).hexdigest()
    assert signature_header(SECRET, 1700000000, BODY) == f"t=1700000000,v1={sign(SECRET, 1700000000, BODY)}"


@pytest.mark.parametrize(("secret", "header_t", "body", "now", "ok"), [
    (SECRET, 1000, BODY, 1000, True),
    (SECRET, 1000, BODY, 1300, True),  # at the tolerance
    (SECRET, 1000, BODY, 700, True),  # a receiver clock behind
    (SECRET, 1000, BODY, 1301, False),  # stale: a replay
    (SECRET, 1000, BODY, 699, False),
    ("other", 1000, BODY, 1000, False),
    (SECRET, 1000, BODY + b" ", 1000, False),
])
def test_verify(secret: str, header_t: int, body: bytes, now: float, ok: bool):
    header = signature_header(SECRET, header_t, BODY)
    assert verify(secret, header, body, now=now) is ok


@pytest.mark.parametrize("header", ["", "t=abc,v1=00", "v1=00", "t=1000", "t=1000,v1=", "garbage"])
def test_verify_refuses_malformed_headers(header: str):
    assert not verify(SECRET, header, BODY, now=1000)


def test_verify_accepts_any_of_several_v1_and_ignores_unknown_fields():
    good = sign(SECRET, 1000, BODY)
    assert verify(SECRET, f"t=1000, v0=zz, v1={'0' * 64}, v1={good}", BODY, now=1000)


def test_the_documented_snippet_agrees_with_verify():
    snippet = documented_verifier()
    now = int(time.time())
    assert snippet(SECRET, signature_header(SECRET, now, BODY), BODY)
    assert not snippet(SECRET, signature_header(SECRET, now - 301, BODY), BODY)
    assert not snippet("other", signature_header(SECRET, now, BODY), BODY)


# -- backoff -----------------------------------------------------------------------------------

def test_backoff_is_monotone_and_capped():
    waits = [backoff_s(n) for n in range(1, 20)]
    assert waits == sorted(waits)
    assert waits[:6] == [10, 30, 120, 600, 1800, 3600]
    assert max(waits) == BACKOFF_S[-1] == 3600


@pytest.mark.parametrize(("attempt", "max_attempts", "expected"), [
    (1, 8, 10), (2, 8, 30), (7, 8, 3600), (8, 8, None), (9, 8, None), (1, 1, None),
])
def test_next_delay_fails_after_the_last_attempt(attempt: int, max_attempts: int, expected: float | None):
    assert next_delay(attempt, max_attempts) == expected


def test_a_shorter_schedule_can_be_passed():
    assert next_delay(1, 3, (0.1,)) == 0.1 and next_delay(2, 3, (0.1,)) == 0.1 and next_delay(3, 3, (0.1,)) is None


# -- URLs at submission --------------------------------------------------------------------------

def _settings(hosts: str) -> Settings:
    return Settings(callback_hosts=hosts)


ALLOW = "hooks.example.com,*.acme.io,203.0.113.7,10.20.0.0/16,2001:db8::/32"


@pytest.mark.parametrize(("url", "normalized"), [
    ("https://hooks.example.com/cb", "https://hooks.example.com/cb"),
    ("HTTPS://Hooks.Example.COM:443/cb?x=1#frag", "https://hooks.example.com/cb?x=1"),
    ("http://hooks.example.com:8080", "http://hooks.example.com:8080/"),
    ("https://a.acme.io/x", "https://a.acme.io/x"),
    ("https://a.b.acme.io/x", "https://a.b.acme.io/x"),
    ("http://203.0.113.7/cb", "http://203.0.113.7/cb"),
    ("http://10.20.3.4:9000/cb", "http://10.20.3.4:9000/cb"),
    ("http://[2001:db8::1]:8443/cb", "http://[2001:db8::1]:8443/cb"),
    ("https://hooks.example.com./cb", "https://hooks.example.com/cb"),
])
def test_allowed_urls_are_normalized(url: str, normalized: str):
    assert check_callback_url(url, _settings(ALLOW)) == normalized


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://hooks.example.com/cb", "scheme"),
    ("file:///etc/passwd", "scheme"),
    ("hooks.example.com/cb", "scheme"),
    ("https://user:pw@hooks.example.com/cb", "userinfo"),
    ("https://user@hooks.example.com/cb", "userinfo"),
    ("https://evil.com/cb", "not on IMGQ_CALLBACK_HOSTS"),
    ("https://acme.io/cb", "not on IMGQ_CALLBACK_HOSTS"),  # *.acme.io: subdomains only
    ("https://hooks.example.com.evil.com/cb", "not on IMGQ_CALLBACK_HOSTS"),
    ("http://127.0.0.1/cb", "not covered"),
    ("http://10.21.0.1/cb", "not covered"),
    ("http://[::1]/cb", "not covered"),
    ("http://2130706433/cb", "not a valid host"),
    ("http://0x7f.1/cb", "not a valid host"),
    ("http:///cb", "no host"),
    ("https://hooks.example.com/c b", "whitespace"),
    ("https://hooks.example.com:99999/", "malformed"),
    ("", "empty"),
])
def test_refused_urls_say_why(url: str, why: str):
    with pytest.raises(CallbackRefused, match=why) as info:
        check_callback_url(url, _settings(ALLOW))
    assert info.value.code == "callback_not_allowed" and isinstance(info.value, InvalidRequest)


def test_an_empty_allow_list_refuses_every_callback():
    with pytest.raises(CallbackRefused, match="IMGQ_CALLBACK_HOSTS is empty"):
        check_callback_url("https://hooks.example.com/cb", _settings(""))


def test_the_setting_is_comma_separated():
    assert Settings(callback_hosts="a.com, *.b.com ,10.0.0.0/8").callback_hosts == ["a.com", "*.b.com", "10.0.0.0/8"]


def test_parse_keeps_the_parts_the_notifier_needs():
    target = parse_callback_url("https://Hooks.Example.com:8443/cb", HostPolicy.parse(["hooks.example.com"]))
    assert (target.scheme, target.host, target.port, target.ip) == ("https", "hooks.example.com", 8443, None)


# -- addresses at send time ----------------------------------------------------------------------

PUBLIC_ONLY = HostPolicy.parse(["hooks.example.com"])


@pytest.mark.parametrize("address", [
    "8.8.8.8", "93.184.216.34", "2606:4700:4700::1111",
    "64:ff9b::808:808",  # DNS64's translation of 8.8.8.8: how IPv6-only networks reach IPv4 receivers
    "::ffff:93.184.216.34",  # an IPv4-mapped answer
])
def test_public_addresses_pass(address: str):
    assert address_refusal(address, PUBLIC_ONLY) is None


@pytest.mark.parametrize(("address", "reason"), [
    ("10.0.0.1", "private"),
    ("172.16.5.4", "private"),
    ("192.168.1.1", "private"),
    ("127.0.0.1", "loopback"),
    ("127.8.9.10", "loopback"),
    ("::1", "loopback"),
    ("::ffff:127.0.0.1", "loopback"),
    ("::ffff:10.0.0.1", "private"),
    ("169.254.169.254", "link-local"),
    ("0.0.0.0", "unspecified"),
    ("::", "unspecified"),
    ("fe80::1", "link-local"),
    ("fc00::1", "private"),
    ("100.64.0.1", "shared"),
    ("224.0.0.1", "multicast"),
    ("ff02::1", "multicast"),
    ("240.0.0.1", "reserved"),
    ("192.0.2.1", "private"),  # documentation range: not global
    ("2002:7f00:1::", "loopback"),  # 6to4 of 127.0.0.1
    ("64:ff9b::a9fe:a9fe", "link-local"),  # NAT64 of 169.254.169.254
    ("2001:0:4136:e378:8000:63bf:f5ff:fffe", "private"),  # Teredo, client 10.0.0.1
    # Not globally reachable, though Python 3.11.7's tables say otherwise (IANA special-purpose):
    ("192.0.0.100", "not globally routable"),
    ("64:ff9b::c000:64", "not globally routable"),  # NAT64 of 192.0.0.100
    ("3fff::1", "not globally routable"),  # documentation (RFC 9637)
    ("5f00::1", "reserved"),  # SRv6 SIDs (RFC 9602)
    ("64:ff9b:1::a00:1", "reserved"),  # local-use NAT64 (RFC 8215)
])
def test_special_addresses_are_refused(address: str, reason: str):
    refusal = address_refusal(address, PUBLIC_ONLY)
    assert refusal is not None and reason in refusal


@pytest.mark.parametrize(("entry", "address"), [
    ("10.0.0.1", "10.0.0.1"),
    ("10.0.0.0/8", "10.0.0.1"),
    ("127.0.0.1", "127.0.0.1"),
    ("127.0.0.1", "::ffff:127.0.0.1"),  # the same address, IPv4-mapped
    ("::1", "::1"),
    ("169.254.169.254/32", "169.254.169.254"),
    ("fe80::/10", "fe80::1"),
    ("100.64.0.0/10", "100.64.0.1"),
])
def test_an_explicit_ip_or_cidr_entry_allows_a_special_address(entry: str, address: str):
    assert address_refusal(address, HostPolicy.parse([entry])) is None


@pytest.mark.parametrize(("entry", "address"), [
    ("10.0.0.0/24", "10.0.1.1"),
    ("localhost", "127.0.0.1"),  # a name entry never allows a special address
    ("127.0.0.1", "127.0.0.2"),
    ("127.0.0.1", "2002:7f00:1::"),  # 6to4 goes to a relay, not to 127.0.0.1
])
def test_entries_that_do_not_cover_the_address_allow_nothing(entry: str, address: str):
    assert address_refusal(address, HostPolicy.parse([entry])) is not None


def test_every_resolved_address_must_pass():
    assert [str(a) for a in check_addresses("h", ["8.8.8.8", "1.1.1.1"], PUBLIC_ONLY)] == ["8.8.8.8", "1.1.1.1"]
    with pytest.raises(CallbackRefused, match=r"127\.0\.0\.1 is loopback"):
        check_addresses("h", ["8.8.8.8", "127.0.0.1"], PUBLIC_ONLY)
    with pytest.raises(CallbackRefused, match="no address"):
        check_addresses("h", [], PUBLIC_ONLY)


def test_bad_allow_list_entries_are_refused():
    with pytest.raises(CallbackRefused):
        HostPolicy.parse(["bad host"])
    with pytest.raises(ValueError, match="IMGQ_CALLBACK_HOSTS entry"):
        Settings(callback_hosts="ok.example.com,bad_host!")
