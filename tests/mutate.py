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
    "imgq.params.*", "imgq.kinds.*",
    "imgq.db.store.*",
    "imgq.db.admin.x_*", "imgq.db.admin.xǁCheckReportǁ*", "imgq.db.admin.xǁAdminǁ[!f]*",
    "imgq.worker.service.*", "imgq.worker.engine.*", "imgq.worker.beneath.*", "imgq.worker.fetch.*",
    "imgq.worker.decode.*",
]

STATUS = {1: "killed", 3: "killed", 0: "survived", 5: "no tests", 33: "no tests", 34: "skipped", 36: "timeout",
          37: "type check", 24: "timeout", -24: "timeout", 152: "timeout", 255: "timeout", None: "not checked"}


def stage() -> None:
    """A fresh copy of the package under its import names, the tests and the project config."""
    if STAGE.exists():
        shutil.rmtree(STAGE)
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


def run(patterns: list[str], children: int, addopts: str) -> int:
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
    from imgq.db.migrate import upgrade

    pg = embedded.start_postgres(STAGE / "pg" / "data", database="imgq_template")
    s3 = None
    try:
        upgrade(pg.url)
        s3 = embedded.start_s3(log=STAGE / "moto.log")
        env |= {"IMGQ_MUTATION_PG": str(pg.datadir), "IMGQ_MUTATION_S3": s3.url}
        print("+", " ".join(cmd), f"(in {STAGE})", flush=True)
        return subprocess.call(cmd, cwd=STAGE, env=env)
    finally:
        if s3 is not None:
            s3.stop()
        try:
            pg.stop(timeout=300)  # a shutdown checkpoint after thousands of test databases is slow
        except TimeoutError:
            print(f"warning: the mutation run's Postgres (pid {pg.pid}) is still shutting down", file=sys.stderr)
        else:
            # A database per test of every mutant: gigabytes. The verdicts live in mutants/.
            shutil.rmtree(STAGE / "pg", ignore_errors=True)
            shutil.rmtree(STAGE / "tmp", ignore_errors=True)


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
    args = parser.parse_args()
    if not args.report:
        started = time.monotonic()
        stage()
        rc = run(args.patterns or SCOPE, args.children, args.pytest_addopts)
        print(f"mutmut exited {rc} after {time.monotonic() - started:.0f} s")
        if rc:
            sys.exit(rc)
    report()


if __name__ == "__main__":
    main()
