"""The HTTP API against the CLI, side by side in one run.

1. Acceptance: ``POST /v1/jobs`` with 10,000 refs (one request, JSON body, bearer key) against
   ``imgq enqueue caption -f FILE`` (a subprocess, as an operator runs it) and against the
   producer library in-process (``imgq.producer.submit.submit``, what both call). The variants
   alternate within each repeat, on the same emptied tables and queue.
2. Reads: ``GET /v1/jobs/{id}`` from 100 concurrent keep-alive clients (raw asyncio, one process)
   for ``--duration`` seconds against ``imgq api`` (uvicorn, one process), back to back and polling
   every 250 ms: requests/s, status codes (zero 5xx expected), p50/p90/p99 latency. The load
   generator shares this 2-core machine with the server.

    .venv/bin/python -m bench.api [--refs 10000] [--repeats 5] [--clients 100] [--duration 30]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import bench.common as common
from bench.common import Services, median, settings_env

common.WORK = common.ROOT / ".imgq" / "bench-api"  # apart from other benches' services


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_api(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    import httpx

    proc = subprocess.Popen([sys.executable, "-m", "imgq.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"imgq api exited: {log.read_text()[-2000:]}")
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("imgq api did not answer /healthz within 60 s")


def _clear_queue(rc: Any, queue: str) -> None:
    # The queue and its priority lanes: each variant starts with the window empty.
    for key in rc.scan_iter(match=f"{queue}*"):
        rc.delete(key)


def _percentile(sorted_xs: list[float], q: float) -> float:
    if not sorted_xs:
        return float("nan")
    return sorted_xs[min(len(sorted_xs) - 1, int(q * len(sorted_xs)))]


async def _client(host: str, port: int, request: bytes, stop_at: float, every: float,
                  latencies: list[float], codes: dict[int, int]) -> None:
    """One keep-alive HTTP/1.1 connection sending ``request`` back to back (``every`` = 0) or once
    per ``every`` seconds. Raw asyncio: an httpx AsyncClient tops out near 60 requests/s here by
    itself, and would measure the client, not the server."""
    import random

    await asyncio.sleep(random.random() * every)
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < stop_at:
            t = time.perf_counter()
            writer.write(request)
            try:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                length = next(int(h.split(":", 1)[1]) for h in head if h.lower().startswith("content-length:"))
                await reader.readexactly(length)
                status = int(head[0].split()[1])
            except (asyncio.IncompleteReadError, ConnectionError, StopIteration):
                status = 599  # no (complete) response: counted as a server failure
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
            latencies.append(time.perf_counter() - t)
            codes[status] = codes.get(status, 0) + 1
            if every:
                await asyncio.sleep(max(0.0, every - (time.perf_counter() - t)))
    finally:
        writer.close()


async def _load(port: int, path: str, key: str, clients: int, duration: float,
                every: float = 0.0) -> tuple[list[float], dict[int, int]]:
    latencies: list[float] = []
    codes: dict[int, int] = {}
    request = (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n\r\n").encode()
    stop_at = time.perf_counter() + duration
    await asyncio.gather(*(_client("127.0.0.1", port, request, stop_at, every, latencies, codes)
                           for _ in range(clients)))
    return latencies, codes


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--refs", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--duration", type=float, default=30.0)
    args = ap.parse_args()
    import httpx

    from imgq.db.store import Store
    from imgq.db.tenancy import create_key

    svc = Services.start(fresh=True)
    api = None
    try:
        settings = svc.settings(allowed_buckets=["archive"])
        refs = [f"s3://archive/2024/{i:08d}.jpg" for i in range(args.refs)]
        listing = common.WORK / f"refs-{args.refs}.txt"
        listing.write_text("".join(r + "\n" for r in refs))
        # Limits raised so that they do not shape what is measured (each is tested on its own).
        env = settings_env(settings, IMGQ_API_MAX_REFS=str(max(args.refs, 10_000)),
                           IMGQ_API_MAX_BODY_BYTES=str(64 * 2**20), IMGQ_API_REQUESTS_PER_MINUTE="1000000")
        store = Store.from_url(svc.database_url)
        key, _ = create_key(store.engine, "bench", buckets=["archive"])
        port = _free_port()
        api = _start_api(env, port, common.WORK / "api.log")
        base = f"http://127.0.0.1:{port}"
        headers = {"Authorization": f"Bearer {key}"}
        rc = svc.redis_client()
        body = {"kinds": ["caption"], "refs": refs}

        from imgq.celeryconf import make_celery
        from imgq.cli import _enqueue_params
        from imgq.producer.submit import submit

        app = make_celery(settings)
        tasks = _enqueue_params(settings, ["caption"], {})

        def via_api() -> None:
            r = httpx.post(f"{base}/v1/jobs", json=body, headers=headers | {"Idempotency-Key": uuid.uuid4().hex},
                           timeout=120)
            if r.status_code != 202:
                raise SystemExit(f"POST /v1/jobs: {r.status_code} {r.text[:500]}")

        def via_cli() -> None:
            out = subprocess.run([sys.executable, "-m", "imgq.cli", "enqueue", "caption", "-f", str(listing)],
                                 env=env, capture_output=True, text=True)
            if out.returncode != 0:
                raise SystemExit(out.stderr)

        def via_library() -> None:
            submit(settings=settings, store=store, app=app, refs=iter(refs), tasks=tasks)

        variants = {"POST /v1/jobs": via_api, "imgq enqueue -f (subprocess)": via_cli,
                    "producer library (in-process)": via_library}
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(args.repeats):
            for name, run in variants.items():
                svc.truncate(store)
                _clear_queue(rc, settings.queue)
                t = time.perf_counter()
                run()
                rates[name].append(args.refs / (time.perf_counter() - t))
        print(f"# {' '.join(sys.argv)}  (pid {os.getpid()}, medians of {args.repeats}, alternated)")
        api_rate = median(rates["POST /v1/jobs"])
        for name, values in rates.items():
            print(f"{name:<32} {median(values):>9,.0f} refs/s  x{api_rate / median(values):.2f} API/this  "
                  f"raw {[round(v) for v in values]}")

        # Reads: a job of --refs items, a third of them dead-lettered, as a dashboard would poll it.
        svc.truncate(store)
        _clear_queue(rc, settings.queue)
        r = httpx.post(f"{base}/v1/jobs", json=body, headers=headers, timeout=120)
        job = r.json()["job"]
        from sqlalchemy import text

        with store.engine.begin() as conn:
            conn.execute(text("UPDATE job_items SET state = 'dead' WHERE job_id = :j AND seq % 3 = 0"), {"j": job})
            conn.execute(text("INSERT INTO dead_letters (job_id, seq, ref, code, message, attempts) "
                              "SELECT job_id, seq, ref, 'not_found', 'bench', 1 FROM job_items "
                              "WHERE job_id = :j AND state = 'dead'"), {"j": job})
        # Closed loop (each client sends its next request as soon as the last one is answered: the
        # server's saturation) and paced (each client polls 4 times a second, as dashboards do).
        for label, every in (("back to back", 0.0), ("each polling every 250 ms", 0.25)):
            latencies, codes = asyncio.run(_load(port, f"/v1/jobs/{job}", key, args.clients, args.duration, every))
            latencies.sort()
            server_errors = sum(n for status, n in codes.items() if status >= 500)
            print(f"GET /v1/jobs/{{id}}  {args.clients} clients {label}, {args.duration:.0f} s: "
                  f"{len(latencies) / args.duration:,.0f} req/s, codes {dict(sorted(codes.items()))}, "
                  f"5xx {server_errors}, p50 {_percentile(latencies, 0.50) * 1000:.1f} ms, "
                  f"p90 {_percentile(latencies, 0.90) * 1000:.1f} ms, p99 {_percentile(latencies, 0.99) * 1000:.1f} ms")
    finally:
        if api is not None:
            api.terminate()
            try:
                api.wait(timeout=10)
            except subprocess.TimeoutExpired:
                api.kill()
        svc.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
