"""Job-finished callbacks: the URL and address policy, the signature, and the retry schedule.

Pure: no sockets, no database. ``worker/notifier.py`` is the glue that resolves, POSTs and records.

Invariants (docs/callbacks.md):

- A callback URL is ``http`` or ``https``, has no userinfo, and its host is on ``IMGQ_CALLBACK_HOSTS``
  (a hostname, exact or ``*.example.com`` for its subdomains; an IP; or a CIDR). An empty list refuses
  every callback. This is checked at submission (:func:`check_callback_url`).
- At send time the host is resolved and *every* address must pass :func:`address_refusal`: loopback,
  private, link-local (cloud metadata), multicast, reserved, unspecified, shared (100.64/10) and
  non-global addresses, also when embedded in IPv6 (IPv4-mapped, 6to4, Teredo, NAT64, IPv4-compatible),
  are refused unless an IP/CIDR entry covers the address. A *name* entry never allows such an
  address: a public name that resolves to 127.0.0.1 is refused (DNS rebinding).
- The body is signed with the tenant's secret: ``Imgq-Signature: t=<unix>,v1=<hex>``, the hex being
  HMAC-SHA256 over ``f"{t}.".encode() + body``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from imgq.errors import CallbackRefused

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SIGNATURE_HEADER = "Imgq-Signature"
MAX_URL_LENGTH = 2048
# Seconds to wait after attempt n fails (n = 1, 2, ...); the last value repeats.
BACKOFF_S = (10, 30, 120, 600, 1800, 3600)
_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598)
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_COMPAT = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible addresses
# IANA special-purpose ranges that are not globally reachable, listed here because Python's own
# tables (is_global, is_private) lag the registry in older patch releases: 3.11.7 passes
# 192.0.0.0/24, for one.
_NOT_GLOBAL = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.0.0.0/24", "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24",
    "203.0.113.0/24", "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "64:ff9b:1::/48", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20",
    "5f00::/16", "fc00::/7", "fe80::/10", "fec0::/10", "ff00::/8",
))
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


# -- the allow-list ------------------------------------------------------------------------------

@dataclass(frozen=True)
class HostPolicy:
    """``IMGQ_CALLBACK_HOSTS`` parsed: exact names, ``*.`` suffixes, and networks."""

    names: frozenset[str] = frozenset()
    suffixes: tuple[str, ...] = ()  # ".example.com" for "*.example.com"
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def parse(cls, entries: Iterable[str]) -> HostPolicy:
        names: set[str] = set()
        suffixes: list[str] = []
        networks: list[IPNetwork] = []
        for raw in entries:
            # No lower(): _hostname lower-cases names, and ip_network reads either case.
            entry = raw.strip().rstrip(".")
            if not entry:
                continue
            if entry.startswith("[") and entry.endswith("]"):
                entry = entry[1:-1]
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
                continue
            except ValueError:
                pass
            if entry.startswith("*."):
                suffixes.append("." + _hostname(entry[2:], what="IMGQ_CALLBACK_HOSTS entry"))
            else:
                names.add(_hostname(entry, what="IMGQ_CALLBACK_HOSTS entry"))
        return cls(frozenset(names), tuple(suffixes), tuple(networks))

    @property
    def empty(self) -> bool:
        return not (self.names or self.suffixes or self.networks)

    def allows_name(self, host: str) -> bool:
        return host in self.names or any(host.endswith(s) for s in self.suffixes)

    def covers(self, address: IPAddress) -> bool:
        """An IP/CIDR entry explicitly covers the address (or, IPv4-mapped, the IPv4 address it is)."""
        mapped = getattr(address, "ipv4_mapped", None)
        candidates = [address] if mapped is None else [address, mapped]
        return any(a in net for a in candidates for net in self.networks if net.version == a.version)


def _hostname(host: str, *, what: str) -> str:
    """An ASCII (IDNA) lower-case DNS name; numeric last labels (``2130706433``, ``0x7f.1``) refused."""
    try:
        ascii_host = host.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise CallbackRefused(f"{what}: {host!r} is not a valid host name") from None
    labels = ascii_host.split(".")
    if not all(_LABEL.match(label) for label in labels) or labels[-1].isdigit() or labels[-1].startswith("0x"):
        raise CallbackRefused(f"{what}: {host!r} is not a valid host name")
    return ascii_host


def _policy(settings: Any) -> HostPolicy:
    return HostPolicy.parse(getattr(settings, "callback_hosts", None) or [])


# -- the URL, at submission ----------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    """A checked callback URL, split for the notifier."""

    url: str
    scheme: str
    host: str  # lower-case name, or the IP literal without brackets
    port: int
    ip: IPAddress | None  # set when the URL names an address, not a name


def parse_callback_url(url: str, policy: HostPolicy) -> Target:
    """Check the URL against the policy (no DNS) and normalize it; raise :class:`CallbackRefused`."""
    if not isinstance(url, str) or not url:
        raise CallbackRefused("callback_url is empty")
    if len(url) > MAX_URL_LENGTH:
        raise CallbackRefused(f"callback_url is longer than {MAX_URL_LENGTH} characters")
    if any(ch.isspace() or ord(ch) < 32 or ord(ch) == 127 for ch in url):
        raise CallbackRefused("callback_url contains whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackRefused(f"callback_url is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise CallbackRefused(f"callback_url scheme {parts.scheme or '(none)'!r} is not allowed: use http or https")
    if "@" in parts.netloc:
        raise CallbackRefused("callback_url must not contain userinfo (user:password@)")
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise CallbackRefused("callback_url has no host")
    if "%" in host:
        raise CallbackRefused("callback_url must not name an IPv6 zone")
    if policy.empty:
        raise CallbackRefused("callbacks are disabled: IMGQ_CALLBACK_HOSTS is empty")
    ip: IPAddress | None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        if not policy.covers(ip):
            raise CallbackRefused(f"callback host {ip} is not covered by an IP/CIDR entry of IMGQ_CALLBACK_HOSTS")
        host = str(ip)
        netloc_host = f"[{host}]" if ip.version == 6 else host
    else:
        host = _hostname(host, what="callback_url")
        if not policy.allows_name(host):
            raise CallbackRefused(f"callback host {host!r} is not on IMGQ_CALLBACK_HOSTS")
        netloc_host = host
    default_port = 443 if scheme == "https" else 80
    port = port if port is not None else default_port
    if port == 0:
        raise CallbackRefused("callback_url port 0 is not allowed")
    netloc = netloc_host if port == default_port else f"{netloc_host}:{port}"
    normalized = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    return Target(url=normalized, scheme=scheme, host=host, port=port, ip=ip)


def check_callback_url(url: str, settings: Any) -> str:
    """The normalized callback URL; raises :class:`imgq.errors.CallbackRefused` saying why not.

    Scheme http/https, no userinfo, host on ``IMGQ_CALLBACK_HOSTS``. Addresses are checked again,
    after resolution, when the callback is sent.
    """
    return parse_callback_url(url, _policy(settings)).url


# -- addresses, at send time ---------------------------------------------------------------------

def _embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    if address.version == 4:
        return []
    assert isinstance(address, ipaddress.IPv6Address)
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if address in _NAT64 or (address in _COMPAT and int(address) > 1):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _special(address: IPAddress) -> str | None:
    checks = (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("reserved", address.is_reserved),
        ("shared (100.64.0.0/10)", address.version == 4 and address in _SHARED),
        ("private", address.is_private),
        ("site-local", address.version == 6 and address.is_site_local),  # type: ignore[union-attr]
        ("not globally routable", not address.is_global or any(address in n for n in _NOT_GLOBAL)),
    )
    return next((name for name, hit in checks if hit), None)


def address_refusal(address: IPAddress | str, policy: HostPolicy) -> str | None:
    """Why a resolved address must not be contacted, or None. Explicit IP/CIDR entries win."""
    ip = ipaddress.ip_address(address) if isinstance(address, str) else address
    if policy.covers(ip):
        return None
    for inner in _embedded_ipv4(ip):
        reason = _special(inner)
        if reason:
            return f"{ip} embeds {inner}, which is {reason}"
    if ip.version == 6 and (ip in _NAT64 or ip.ipv4_mapped is not None):  # type: ignore[union-attr]
        # A translation of the IPv4 address it embeds (DNS64, or a mapped answer), judged above by
        # that address alone: the prefix itself sits in ::/8, which Python calls reserved.
        return None
    reason = _special(ip)
    return f"{ip} is {reason}" if reason else None


def check_addresses(host: str, addresses: Iterable[IPAddress | str], policy: HostPolicy) -> list[IPAddress]:
    """All resolved addresses, if every one is allowed; else :class:`CallbackRefused`."""
    checked = [ipaddress.ip_address(a) if isinstance(a, str) else a for a in addresses]
    if not checked:
        raise CallbackRefused(f"callback host {host!r} resolved to no address")
    for ip in checked:
        reason = address_refusal(ip, policy)
        if reason:
            raise CallbackRefused(f"callback host {host!r} resolves to a refused address: {reason}")
    return checked


# -- signature -----------------------------------------------------------------------------------

def sign(secret: str, timestamp: int, body: bytes) -> str:
    """HMAC-SHA256 hex of ``f"{timestamp}.".encode() + body`` keyed with the tenant's secret."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={sign(secret, timestamp, body)}"


def verify(secret: str, header: str, body: bytes, *, now: float, tolerance_s: float = 300) -> bool:
    """The header is a valid, fresh signature of the body (constant-time comparison)."""
    fields: dict[str, list[str]] = {}
    for part in (header or "").split(","):
        key, sep, value = part.strip().partition("=")
        if sep:
            fields.setdefault(key, []).append(value)
    try:
        timestamp = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs(now - timestamp) > tolerance_s:
        return False
    expected = sign(secret, timestamp, body)
    return any(hmac.compare_digest(expected, candidate) for candidate in fields.get("v1", []))


# -- retries -------------------------------------------------------------------------------------

def backoff_s(attempt: int, schedule: tuple[float, ...] = BACKOFF_S) -> float:
    """Seconds to wait after failed attempt ``attempt`` (1-based); capped at the schedule's last step."""
    return float(schedule[min(max(attempt, 1), len(schedule)) - 1])


def next_delay(attempt: int, max_attempts: int, schedule: tuple[float, ...] = BACKOFF_S) -> float | None:
    """After failed attempt ``attempt``: seconds until the next one, or None when the callback has failed."""
    return None if attempt >= max_attempts else backoff_s(attempt, schedule)
