"""`make mutate`: mutation testing (mutmut 3) of the modules that hold imgq's guarantees, with the
unit and integration tiers as the test command. Not part of `make test`; see docs/testing.md.

mutmut names each mutant after its file path (``core/batching.py`` -> ``core.batching``) but
switches mutants on by the imported module's name (``imgq.batching``), and puts ``./mutants`` on
sys.path so that the tests import the mutated copy. Our folders install under other names
(``core/`` is ``imgq``), so run in place every mutant would be silently inert. So the package is
first laid out under its import names in ``.mutate/`` (``imgq/``, ``imgq/worker/``, ``imgq/db/``
...), with the tests and pyproject.toml beside it, and mutmut runs there: ``mutants/imgq`` then
shadows the editable install, and the names agree. The run aborts if a deliberately broken
build passes (mutmut's forced-fail check), so an inert setup cannot report a score.

    python -m tests.mutate                 # the whole scope (pyproject [tool.mutmut])
    python -m tests.mutate imgq.retry.*    # only mutants whose names match (fnmatch)
    python -m tests.mutate --report        # the summary of the last run, again
    python -m tests.mutate --keep PATTERN  # again, reusing the last run's stats (new tests get theirs)
    python -m tests.mutate --budget 0      # every covering test for each mutant (default: 5 s worth)

The run's own services (tests/mutation_plugin.py says what each session gets): one Postgres, its
template migrated by the staged code, without fsync; one moto; the tiny checkpoints written once;
a thread that drops the test databases of finished mutant sessions. It prints the load average
while it ran; ``.mutate/times.jsonl`` has one line per mutant session.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGE = REPO / ".mutate"
# Folder -> where it sits in the import tree (pyproject's package-dir, as folders).
LAYOUT = {"core": "imgq", "worker": "imgq/worker", "producer": "imgq/producer", "db": "imgq/db"}
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc")

# What is measured: every mutant of the files in [tool.mutmut] only_mutate, except the feeder's
# queries in db/admin.py (Admin.feeding and the Feeding class), which are being rewritten and
# tested separately. fnmatch patterns over mutmut's mutant names.
SCOPE = [
    "imgq.batching.*", "imgq.retry.*", "imgq.refs.*", "imgq.classify.*", "imgq.errors.*", "imgq.contract.*",
    "imgq.params.*", "imgq.kinds.*", "imgq.ages.*", "imgq.cost.*", "imgq.feeding.*", "imgq.languages.*",
    "imgq.pacing.*", "imgq.tuning.*", "imgq.callbacks.*", "imgq.nightly.*",
    "imgq.db.store.*", "imgq.db.copy_stream.*", "imgq.db.arrays.*",
    "imgq.db.admin.x_*", "imgq.db.admin.xǁCheckReportǁ*", "imgq.db.admin.xǁAdminǁ[!f]*",
    "imgq.worker.service.*", "imgq.worker.engine.*", "imgq.worker.beneath.*", "imgq.worker.fetch.*",
    "imgq.worker.decode.*",
]

# A mutant's tests run fastest first, and only up to this many seconds of their stats-run time
# (tests/mutation_plugin.py): a survivor then costs seconds, not minutes of every test that happens
# to call the function. A mutant only a slower test would kill counts as surviving: the score is a
# lower bound. ``--budget 0`` runs them all.
BUDGET_S = 5.0

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          37: "type check", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def stage(keep: bool = False) -> None:
    """A fresh copy of the package under its import names, the tests and the project config.
    ``keep``: leave mutmut's mutants/ (its stats, the mutated files and verdicts) as they are, so
    that only new tests are measured again (for trying tests against survivors)."""
    if STAGE.exists():
        for child in STAGE.iterdir():
            if keep and child.name == "mutants":
                continue
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    for folder, target in sorted(LAYOUT.items(), key=lambda kv: kv[1].count("/")):
        shutil.copytree(REPO / folder, STAGE / target, ignore=IGNORE, dirs_exist_ok=True)
    shutil.copytree(REPO / "tests", STAGE / "tests", ignore=IGNORE)
    shutil.copy2(REPO / "pyproject.toml", STAGE / "pyproject.toml")
    # Some tests read the repository itself (README, compose file, source folders): the tests run
    # in mutants/, so the working tree goes there as it is. mutmut adds imgq/ and tests/ beside it.
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file() and not name.startswith("tests/"):
            (STAGE / "mutants" / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, STAGE / "mutants" / name)


def run(patterns: list[str], children: int, addopts: str, baseline: bool = False, budget: float = 0) -> int:
    env = dict(os.environ)
    if addopts:  # e.g. --ignore a test that is red for reasons outside the measured scope
        env["PYTEST_ADDOPTS"] = f"{env.get('PYTEST_ADDOPTS', '')} {addopts}".strip()
    # Pytest's numbered temp dirs of its own: other pytest runs on the machine rotate theirs.
    env["PYTEST_DEBUG_TEMPROOT"] = str(STAGE / "tmp")
    (STAGE / "tmp").mkdir(exist_ok=True)
    mutmut = Path(sys.executable).with_name("mutmut")
    cmd = ["nice", "-n", "10", str(mutmut), "run", "--max-children", str(children), *patterns]
    # One Postgres (template migrated) and one moto for every mutant's session: tests/mutation_plugin.py.
    from imgq import embedded

    pg = embedded.start_postgres(STAGE / "pg" / "data", database="imgq_template")
    s3 = None
    try:
        if not baseline:
            # Every database of the run is thrown away: no fsync, no full-page images, no waiting for
            # the WAL at commit. Each test clones the template, thousands of times a run.
            _psql(pg, "ALTER SYSTEM SET fsync = off", "ALTER SYSTEM SET full_page_writes = off",
                  "ALTER SYSTEM SET synchronous_commit = off", "SELECT pg_reload_conf()")
        # The template is migrated by the staged code (run in STAGE, ``imgq`` is .mutate/imgq), not by
        # whatever the venv's editable install points at: a working tree with a migration of its own
        # would give every test a schema the staged models do not have.
        subprocess.run([sys.executable, "-c", "import sys; from imgq.db.migrate import upgrade; upgrade(sys.argv[1])",
                        pg.url], cwd=STAGE, check=True)
        s3 = embedded.start_s3(log=STAGE / "moto.log")
        env |= {"IMGQ_MUTATION_PG": str(pg.datadir), "IMGQ_MUTATION_S3": s3.url,
                "IMGQ_MUTATION_FAILURES": str(STAGE / "failures.log")}
        env["IMGQ_MUTATION_TIMES"] = str(STAGE / "times.jsonl")  # one line per mutant: seconds, tests run
        if baseline:  # the plugin as it was: tests in mutmut's order, checkpoints per session
            env["IMGQ_MUTATION_ORDER"] = "off"
        else:
            env["IMGQ_MUTATION_BUDGET_S"] = str(budget)
            env["IMGQ_MUTATION_MODELS"] = str(STAGE / "models")
            (STAGE / "models").mkdir(exist_ok=True)
        print("+", " ".join(cmd), f"(in {STAGE})", flush=True)
        load = _LoadAverage()
        reaper = _Reaper(pg)
        try:
            return subprocess.call(cmd, cwd=STAGE, env=env)
        finally:
            print(f"load average during the run: {load.stop()}", flush=True)
            print(f"test databases dropped during the run: {reaper.stop()}", flush=True)
    finally:
        if s3 is not None:
            s3.stop()
        try:
            # No shutdown checkpoint (a minute after thousands of test databases): the cluster is deleted.
            pg.stop(timeout=300, immediate=True)
        except TimeoutError:
            print(f"warning: the mutation run's Postgres (pid {pg.pid}) is still shutting down", file=sys.stderr)
        else:
            # A database per test of every mutant: gigabytes. The verdicts live in mutants/.
            shutil.rmtree(STAGE / "pg", ignore_errors=True)
            shutil.rmtree(STAGE / "tmp", ignore_errors=True)


def _psql(pg: object, *statements: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(pg.url, isolation_level="AUTOCOMMIT")  # type: ignore[attr-defined]
    with engine.connect() as conn:
        for sql in statements:
            conn.execute(text(sql))
    engine.dispose()


class _Reaper:
    """Drops the test databases of finished mutant sessions. Each test clones the template (8 MB)
    into ``t_<pid>_<n>`` (tests/fixtures/services.py) and nothing drops it: thousands of mutants
    filled 19 GB in 20 minutes. A database whose session's process has exited is dropped here, off
    the tests' path."""

    def __init__(self, pg: object, every_s: float = 10) -> None:
        import threading

        from sqlalchemy import create_engine

        self.engine = create_engine(pg.url.replace("/imgq_template?", "/postgres?"),  # type: ignore[attr-defined]
                                    isolation_level="AUTOCOMMIT")
        self.dropped = 0
        self.done = threading.Event()
        self.every_s = every_s
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.done.wait(self.every_s):
            try:
                self.sweep()
            except Exception as exc:  # a sweep that fails is retried; the run must not stop for it
                print(f"warning: dropping finished test databases failed: {exc}", file=sys.stderr)

    def sweep(self) -> None:
        from sqlalchemy import text

        with self.engine.connect() as conn:
            names = conn.execute(text("SELECT datname FROM pg_database WHERE datname LIKE 't\\_%'")).scalars().all()
            for name in names:
                pid = name.split("_")[1]
                if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                    self.dropped += 1

    def stop(self) -> int:
        self.done.set()
        self.thread.join()
        self.engine.dispose()
        return self.dropped


class _LoadAverage:
    """The 1-minute load average, sampled every 15 s while mutmut runs: the machine is shared."""

    def __init__(self) -> None:
        import threading

        self.samples: list[float] = []
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self.done.wait(15):
                return

    def stop(self) -> str:
        self.done.set()
        self.thread.join()
        s = self.samples
        return f"mean {sum(s) / len(s):.2f}, min {min(s):.2f}, max {max(s):.2f} ({len(s)} samples, 1-min)"


def report() -> dict[str, Counter[str]]:
    """Per module: how many mutants were killed, survived, ...; and the survivors by name."""
    by_module: dict[str, Counter[str]] = defaultdict(Counter)
    survivors: list[str] = []
    import fnmatch

    for meta in sorted((STAGE / "mutants").rglob("*.py.meta")):
        data = json.loads(meta.read_text())
        for name, code in data["exit_code_by_key"].items():
            if not any(fnmatch.fnmatch(name, p) for p in SCOPE):
                continue
            status = STATUS.get(code, "suspicious")
            module = name.split(".x")[0]
            by_module[module][status] += 1
            if status in ("survived", "no tests", "timeout", "suspicious"):
                survivors.append(f"{status:9} {name}")
    total: Counter[str] = Counter()
    print(f"\n{'module':28} {'killed':>7} {'total':>6} {'score':>7}  other")
    for module, counts in sorted(by_module.items()):
        total.update(counts)
        _line(module, counts)
    _line("ALL", total)
    if survivors:
        print("\nnot killed (see one with: cd .mutate && mutmut show NAME):")
        print("\n".join(f"  {s}" for s in survivors))
    return by_module


def _line(module: str, counts: Counter[str]) -> None:
    n = sum(v for k, v in counts.items() if k != "not checked")
    others = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k != "killed")
    score = f"{100 * counts['killed'] / n:.1f}%" if n else "-"
    print(f"{module:28} {counts['killed']:>7} {n:>6} {score:>7}  {others}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("patterns", nargs="*", help="mutant name patterns (default: the whole scope)")
    parser.add_argument("--children", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--report", action="store_true", help="only summarise the last run")
    parser.add_argument("--pytest-addopts", default="", help="extra pytest options for every test run")
    parser.add_argument("--keep", action="store_true",
                        help="reuse the last run's mutants/ (stats, mutants): only new tests get a stats run")
    parser.add_argument("--budget", type=float, default=BUDGET_S,
                        help="run a mutant's fastest tests up to this many seconds of their stats-run time "
                             f"(default {BUDGET_S:g}; 0: every test that covers it)")
    parser.add_argument("--baseline", action="store_true",
                        help="without the speed-ups (for comparison): tests in mutmut's order, per-session "
                             "checkpoints, Postgres with fsync")
    args = parser.parse_args()
    if not args.report:
        started = time.monotonic()
        stage(keep=args.keep)
        rc = run(args.patterns or SCOPE, args.children, args.pytest_addopts, baseline=args.baseline,
                 budget=args.budget)
        print(f"mutmut exited {rc} after {time.monotonic() - started:.0f} s")
        if rc and (STAGE / "failures.log").exists():
            print(f"tests that failed in mutmut's stats or clean run: {STAGE / 'failures.log'}")
        if rc:
            sys.exit(rc)
    report()


if __name__ == "__main__":
    main()
