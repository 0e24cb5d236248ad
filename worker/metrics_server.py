"""The worker's HTTP listener: ``/metrics`` (Prometheus), ``/healthz`` and ``/readyz`` (probes).

``/metrics`` requires ``Authorization: Bearer $IMGQ_METRICS_TOKEN`` when a token is set, and the
settings refuse a non-loopback bind without one. The probes carry no data and need no token:
``/healthz`` answers while the process serves (503 once a model call is wedged: only a restart
helps), ``/readyz`` only once the models are loaded and
the broker and the database answer (checked at most every 2 s).

The probe and the queue-depth sample each get ``PROBE_DEADLINE_S``: a stalled Redis or Postgres
(a paused process, a silent network) answers nothing and fires no library timeout, and must not
hold a scrape or a probe. Past the deadline ``/readyz`` says not ready and ``/metrics`` has no
depth sample; the stalled call finishes (or not) in its own thread, and no second one is started
while it is out. The probe's answer names what failed, not the driver's message: it needs no
token, and a driver's message names hosts, sockets and roles.
"""

from __future__ import annotations

import hmac
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import REGISTRY, make_wsgi_app
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from imgq.errors import ConfigError
from imgq.probes import PROBE_DEADLINE_S, Deadline

log = logging.getLogger(__name__)

Probe = Callable[[], str | None]  # None when ready, else why not


class ProcessCollector(Collector):
    """Sampled at scrape time: queue depth, this process's RSS and the GPU memory it holds."""

    def __init__(self, queue_depths: Callable[[], dict[str, int]]) -> None:
        self._queue_depths = Deadline(queue_depths)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        depth = GaugeMetricFamily("imgq_queue_depth", "Messages waiting in the broker queue.", labels=["queue"])
        try:
            for queue, n in self._queue_depths().items():
                depth.add_metric([queue], n)
        except Exception as exc:  # the broker is down or stalled: no sample rather than a failed scrape
            log.debug("queue depth unavailable: %s", exc or type(exc).__name__)
        yield depth
        rss = GaugeMetricFamily("imgq_worker_rss_bytes", "Resident memory of this worker process.")
        rss.add_metric([], _rss_bytes())
        yield rss
        torch = sys.modules.get("torch")  # only a worker that loaded torch has GPU memory to report
        if torch is not None and torch.cuda.is_available():
            gpu = GaugeMetricFamily("imgq_gpu_memory_bytes", "GPU memory allocated by this process.",
                                    labels=["device"])
            for index in range(torch.cuda.device_count()):
                gpu.add_metric([str(index)], float(torch.cuda.memory_allocated(index)))
            yield gpu


def _rss_bytes() -> float:
    try:
        with open("/proc/self/statm") as statm:
            return float(int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE"))
    except OSError:
        import resource

        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


class _CachedProbe:
    def __init__(self, probe: Probe, ttl_s: float = 2.0) -> None:
        self._probe, self._ttl_s = Deadline(probe), ttl_s
        self._lock = threading.Lock()
        self._at, self._why = 0.0, "not checked yet"

    def __call__(self) -> str | None:
        with self._lock:
            if time.monotonic() - self._at > self._ttl_s:
                try:
                    self._why = self._probe()
                except TimeoutError:
                    self._why = f"no answer within {PROBE_DEADLINE_S:g} s (database or broker stalled)"
                except Exception as exc:
                    log.warning("readiness probe failed: %s", exc, extra={"action": "readyz"})
                    self._why = f"probe failed ({type(exc).__name__})"
                self._at = time.monotonic()
            return self._why


def make_app(token: str | None, ready: Probe, alive: Probe | None = None) -> Callable[..., Iterable[bytes]]:
    metrics = make_wsgi_app(REGISTRY)
    ready = _CachedProbe(ready)
    expected = f"Bearer {token}".encode() if token else None

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":
            # In memory, no I/O: what only a restart cures (a wedged model call), never an outage.
            why = alive() if alive is not None else None
            start_response("200 OK" if why is None else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ok\n" if why is None else f"not alive: {why}\n".encode()]
        if path == "/readyz":
            why = ready()
            start_response("200 OK" if why is None else "503 Service Unavailable", [("Content-Type", "text/plain")])
            return [b"ready\n" if why is None else f"not ready: {why}\n".encode()]
        if path != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found: /metrics, /healthz, /readyz\n"]
        given = environ.get("HTTP_AUTHORIZATION", "").encode()
        if expected is not None and not hmac.compare_digest(given, expected):
            start_response("401 Unauthorized", [("Content-Type", "text/plain"),
                                                ("WWW-Authenticate", 'Bearer realm="imgq"')])
            return [b"unauthorized: send Authorization: Bearer $IMGQ_METRICS_TOKEN\n"]
        return metrics(environ, start_response)

    return app


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds would flood the worker's log


class MetricsServer:
    def __init__(self, *, bind: str, port: int, token: str | None, ready: Probe,
                 queue_depths: Callable[[], dict[str, int]], alive: Probe | None = None) -> None:
        # The port first: one already taken must leave nothing registered behind it, and is a
        # configuration error (exit 2), not the bug that an OSError escaping would say (exit 70).
        try:
            self._server = make_server(bind, port, make_app(token, ready, alive), ThreadingWSGIServer,
                                       handler_class=_QuietHandler)
        except OSError as exc:
            raise ConfigError(f"IMGQ_METRICS_PORT={port} on {bind or '0.0.0.0'}: {exc.strerror or exc} (another "
                              "worker on this host? give each its own port, or 0 for none)") from exc
        self._collector = ProcessCollector(queue_depths)
        REGISTRY.register(self._collector)
        self.port = int(self._server.server_port)
        self._thread = threading.Thread(target=self._server.serve_forever, name="imgq-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        log.info("metrics on http://%s:%d/metrics", self._server.server_address[0], self.port,
                 extra={"action": "metrics", "port": self.port})
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        REGISTRY.unregister(self._collector)
