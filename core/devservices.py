"""`imgq dev up|down|status`: the embedded services for a user's own session.

`up` starts Postgres + pgvector, Redis and (with ``s3``) a moto S3 endpoint in the background,
records each by PID in ``DIR/services.json`` and returns the ``IMGQ_*`` variables that point at
them. `down` stops exactly the processes recorded there, after checking that each PID still runs
the program we started (a PID can be reused once its process has gone).
"""

from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from imgq import embedded

STATE = "services.json"
BUCKET = "imgq-dev"
S3_KEYS = {"AWS_ACCESS_KEY_ID": "imgq-dev", "AWS_SECRET_ACCESS_KEY": "imgq-dev", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass(frozen=True)
class Service:
    name: str
    pid: int
    url: str
    marker: str  # a string in /proc/PID/cmdline that identifies the program we started
    log: str


class DevServicesError(Exception):
    """A service could not be started or stopped; the message names it."""


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def running(service: Service) -> bool:
    """The recorded PID is alive and still runs the program we started."""
    return service.marker in _cmdline(service.pid) and _state(service.pid) not in ("Z", "X", "")


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


def load(directory: Path) -> list[Service]:
    path = directory / STATE
    if not path.exists():
        return []
    return [Service(**entry) for entry in json.loads(path.read_text())["services"]]


def _save(directory: Path, services: list[Service]) -> None:
    tmp = directory / (STATE + ".tmp")
    tmp.write_text(json.dumps({"services": [asdict(s) for s in services]}, indent=2))
    tmp.replace(directory / STATE)


def exports(services: list[Service]) -> dict[str, str]:
    """The environment that points imgq at these services."""
    env: dict[str, str] = {}
    for service in services:
        if service.name == "postgres":
            env["IMGQ_DATABASE_URL"] = service.url
        elif service.name == "redis":
            env["IMGQ_BROKER_URL"] = service.url
        elif service.name == "s3":
            env.update({"IMGQ_S3_ENDPOINT_URL": service.url, "IMGQ_ALLOWED_BUCKETS": BUCKET, **S3_KEYS})
    return env


def up(directory: Path, *, s3: bool) -> list[Service]:
    """Start what is not already running (reusing what is) and migrate the database."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    kept = {s.name: s for s in load(directory) if running(s)}
    wanted = ["postgres", "redis", *(["s3"] if s3 else [])]
    services: list[Service] = []
    try:
        for name in wanted:
            services.append(kept.get(name) or _START[name](directory))
            _save(directory, services + [s for n, s in kept.items() if n not in wanted])
    except Exception as exc:
        raise DevServicesError(f"cannot start {name} in {directory}: {exc} (logs in {directory})") from exc
    from imgq.db.migrate import upgrade

    upgrade(services[0].url, "head")
    return services + [s for n, s in kept.items() if n not in wanted]


def _start_postgres(directory: Path) -> Service:
    pg = embedded.start_postgres(directory / "pg")
    if pg.pid is None:
        raise DevServicesError("postgres started but wrote no postmaster.pid")
    return Service("postgres", pg.pid, pg.url, f"postgres -D {pg.datadir} ", str(pg.datadir / "log"))


def _start_redis(directory: Path) -> Service:
    redis = embedded.start_redis(directory / "redis", detach=True)
    assert redis.proc is not None
    return Service("redis", redis.proc.pid, redis.url, str(redis.socket_path), str(redis.datadir / "redis.log"))


def _start_s3(directory: Path) -> Service:
    log = directory / "moto.log"
    server = embedded.start_s3(log=log, detach=True)
    import boto3

    client = boto3.client("s3", endpoint_url=server.url, region_name=S3_KEYS["AWS_DEFAULT_REGION"],
                          aws_access_key_id=S3_KEYS["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=S3_KEYS["AWS_SECRET_ACCESS_KEY"])
    client.create_bucket(Bucket=BUCKET)
    return Service("s3", server.proc.pid, server.url, f"moto.server -H 127.0.0.1 -p {server.port} ", str(log))


_START = {"postgres": _start_postgres, "redis": _start_redis, "s3": _start_s3}


def down(directory: Path, timeout: float = 20) -> list[tuple[Service, str]]:
    """Stop every recorded service that still runs; returns (service, what happened)."""
    directory = directory.resolve()
    outcomes = []
    for service in reversed(load(directory)):
        if not running(service):
            outcomes.append((service, "was not running"))
            continue
        # Postgres: SIGINT is its "fast" shutdown (pg_ctl refuses to run as root).
        os.kill(service.pid, signal.SIGINT if service.name == "postgres" else signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while running(service) and time.monotonic() < deadline:
            time.sleep(0.05)
        if running(service):
            os.kill(service.pid, signal.SIGKILL)
            outcomes.append((service, "killed (it ignored SIGTERM)"))
        else:
            outcomes.append((service, "stopped"))
    (directory / STATE).unlink(missing_ok=True)
    return outcomes
