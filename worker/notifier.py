"""The notifier: every worker POSTs the signed summaries of finished jobs to their callback URLs.

Each ``IMGQ_CALLBACK_INTERVAL_S`` the thread leases due callbacks (``db/callbacks.py``: the row lock
is held only to lease them), and for each one:

1. checks the URL against ``IMGQ_CALLBACK_HOSTS`` again (the list may have changed since submission);
2. resolves the host and checks *every* address (``imgq.callbacks.check_addresses``), then connects
   to the first one, pinned: the URL names the IP, ``Host`` (and TLS SNI and certificate check) the
   original name. A DNS answer that changes between the check and the connection is never used;
3. POSTs the summary, signed with the tenant's secret; redirects are not followed and the response
   body is not read. ``IMGQ_CALLBACK_TIMEOUT_S`` bounds the whole attempt (resolution, connection,
   request and the response's headers), not each read: a receiver that trickles its answer a
   byte at a time is cut off at the deadline like one that never answers;
4. records the attempt (HTTP status, or the error, and the time taken): a 2xx is ``delivered``;
   anything else is tried again after the backoff (``imgq.callbacks.BACKOFF_S``) until
   ``IMGQ_CALLBACK_MAX_ATTEMPTS``, then ``failed``.

A job whose tenant has no ``tenants`` row (no secret to sign with) fails at once.

Callbacks are leased one at a time, each just before its attempt, so a lease covers one attempt
however slow the callbacks before it were: a lease that ran out mid-batch let another notifier
send the same callback again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from imgq.callbacks import (
    BACKOFF_S,
    SIGNATURE_HEADER,
    HostPolicy,
    IPAddress,
    Target,
    check_addresses,
    next_delay,
    parse_callback_url,
    signature_header,
)
from imgq.db.callbacks import CallbackStore, DueCallback
from imgq.errors import CallbackRefused

log = logging.getLogger(__name__)

NO_SECRET = "tenant has no callback secret"
USER_AGENT = "imgq-callbacks/1"
Resolver = Callable[[str, int], Sequence[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address the host resolves to, in the resolver's order, without duplicates."""
    found: list[str] = []
    for *_, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        address = str(sockaddr[0]).split("%", 1)[0]  # a scoped link-local address is refused anyway
        if address not in found:
            found.append(address)
    return found


def pinned_url(target: Target, address: IPAddress) -> str:
    parts = urlsplit(target.url)
    host = f"[{address}]" if address.version == 6 else str(address)
    return urlunsplit((parts.scheme, f"{host}:{target.port}", parts.path, parts.query, ""))


class Notifier:
    """Sends due callbacks from its own thread; :meth:`run_once` is one cycle (tests call it)."""

    def __init__(
        self, *, store: CallbackStore, hosts: Sequence[str], max_attempts: int, timeout_s: float,
        interval_s: float = 1.0, schedule: tuple[float, ...] = BACKOFF_S, batch: int = 16,
        resolver: Resolver = resolve, clock: Callable[[], float] = time.time,
        client: httpx.AsyncClient | None = None, verify: ssl.SSLContext | bool = True,
    ) -> None:
        self._store = store
        self._policy = HostPolicy.parse(hosts)
        self._max_attempts = max_attempts
        self._timeout_s = timeout_s
        self._interval_s = interval_s
        self._schedule = schedule
        self._batch = batch
        self._resolve = resolver
        self._clock = clock
        # trust_env=False: an HTTP(S)_PROXY from the environment would connect for us, unpinned. No
        # keep-alive: the pool is keyed by IP, so a connection verified for one host's name (TLS) must
        # not carry another host's callback that resolves to the same address.
        self._client = client or httpx.AsyncClient(
            follow_redirects=False, trust_env=False, timeout=timeout_s, verify=verify,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        # Attempts run on this loop, one at a time (the notifier's thread, or a test's).
        self._aio = asyncio.new_event_loop()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imgq-notifier", daemon=True)
        self.sent = 0

    @classmethod
    def from_settings(cls, settings: Any, store: CallbackStore, **kwargs: Any) -> Notifier:
        return cls(store=store, hosts=settings.callback_hosts, max_attempts=settings.callback_max_attempts,
                   timeout_s=settings.callback_timeout_s, interval_s=settings.callback_interval_s, **kwargs)

    def start(self) -> Notifier:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._timeout_s + 5)
        if not self._thread.is_alive() and not self._aio.is_closed():
            self._aio.run_until_complete(self._client.aclose())
            self._aio.close()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                while self.run_once() == self._batch and not self._stop.is_set():
                    pass  # a full batch: more may be due
            except Exception as exc:  # the database is down: try again next cycle
                log.warning("callback cycle failed: %s", exc, extra={"action": "callback_cycle"})

    def run_once(self) -> int:
        """Lease due callbacks one by one and try each once, up to a batch; returns how many were tried."""
        tried = 0
        while tried < self._batch and not self._stop.is_set():
            # Longer than one attempt can take (its deadline, then recording it); a notifier that
            # died mid-send frees the callback after it.
            due = self._store.claim(limit=1, lease_s=self._timeout_s + 30)
            if not due:
                break
            self.deliver(due[0])
            tried += 1
        return tried

    def deliver(self, callback: DueCallback) -> str:
        """One attempt; records it and returns the callback's new state."""
        if callback.secret is None:
            self._store.record(callback.job, callback.attempt, state="failed", error=NO_SECRET)
            log.warning("callback of job %s failed: %s (%s)", callback.job, NO_SECRET, callback.tenant,
                        extra={"action": "callback", "job_id": str(callback.job), "state": "failed"})
            return "failed"
        started = time.monotonic()
        status: int | None = None
        error: str | None = None
        try:
            status = self._aio.run_until_complete(self._attempt(callback))
        except CallbackRefused as exc:
            error = f"refused: {exc.message}"
        except TimeoutError:
            error = f"timed out: no answer within IMGQ_CALLBACK_TIMEOUT_S ({self._timeout_s:g} s)"
        except (httpx.HTTPError, OSError) as exc:  # OSError: the name did not resolve
            error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        ms = int((time.monotonic() - started) * 1000)
        if status is not None and 200 <= status < 300:
            state, delay = "delivered", 0.0
        else:
            wait = next_delay(callback.attempt, self._max_attempts, self._schedule)
            state, delay = ("failed", 0.0) if wait is None else ("pending", wait)
        self._store.record(callback.job, callback.attempt, state=state, delay_s=delay, status=status,
                           error=error, ms=ms)
        self.sent += 1
        log.log(logging.INFO if state == "delivered" else logging.WARNING,
                "callback of job %s attempt %d: %s -> %s", callback.job, callback.attempt,
                status if status is not None else error, state,
                extra={"action": "callback", "job_id": str(callback.job), "attempt": callback.attempt,
                       "status": status, "state": state, "ms": ms})
        return state

    async def _attempt(self, callback: DueCallback) -> int:
        # httpx's timeouts apply to each read; this one to the whole attempt. The resolver runs in a
        # thread (getaddrinfo cannot be cancelled): past the deadline it is left to finish alone.
        async with asyncio.timeout(self._timeout_s):
            return await self._post(callback)

    async def _post(self, callback: DueCallback) -> int:
        target = parse_callback_url(callback.url, self._policy)
        if target.ip is not None:
            addresses: Sequence[IPAddress | str] = [target.ip]
        else:
            addresses = await asyncio.get_running_loop().run_in_executor(None, self._resolve, target.host, target.port)
        address = check_addresses(target.host, addresses, self._policy)[0]
        body = json.dumps(callback.summary, separators=(",", ":"), sort_keys=True).encode()
        assert callback.secret is not None
        headers = {
            "Host": urlsplit(target.url).netloc,
            "Content-Type": "application/json",
            "User-Agent": USER_AGENT,
            SIGNATURE_HEADER: signature_header(callback.secret, int(self._clock()), body),
            "Imgq-Job": str(callback.job),
            "Imgq-Delivery": str(callback.attempt),
        }
        extensions = {"sni_hostname": target.host} if target.scheme == "https" and target.ip is None else {}
        request = self._client.build_request("POST", pinned_url(target, address), content=body, headers=headers,
                                             extensions=extensions)
        response = await self._client.send(request, stream=True, follow_redirects=False)
        try:
            return response.status_code
        finally:
            await response.aclose()
