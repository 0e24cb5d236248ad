"""A pytest plugin for `make mutate` only (tests/mutate.py loads it with ``-p``; ordinary runs never do).

mutmut runs a fresh pytest session for every mutant (forked from a server that has collected
the suite once). Left alone, each session would start its own Postgres, migrate a template,
start moto and write the tiny model checkpoints: seconds per mutant, most of a run. So:

- tests/mutate.py starts one Postgres (template already migrated, tuned for throwaway data) and
  one moto for the whole run and names them in ``IMGQ_MUTATION_PG`` / ``IMGQ_MUTATION_S3``; the
  session fixtures get those servers instead of starting their own. Every test still gets its own
  database cloned from the template (named after the pid, so concurrent mutants never share one)
  and its own bucket. Redis stays per session: tests flush it.
- The tiny checkpoints (BLIP caption and retrieval, NLLB) are written once, into
  ``IMGQ_MUTATION_MODELS``, and every session reuses them (the writers already reuse a complete
  checkpoint and write atomically, so concurrent sessions are safe).
- A mutant's tests run **fastest first** (durations from mutmut's stats run): mutmut runs them
  with ``-x``, so a killed mutant costs its fastest killing test, not a random one. mutmut's
  fork-server runner passes them in set order; its plain fork runner sorts them the same way.
  Tests that share a module- or class-scoped fixture stay together, so that fixture is set up once.
- Only the fastest tests up to ``IMGQ_MUTATION_BUDGET_S`` seconds of stats-run time run for a
  mutant (tests/mutate.py ``--budget``; 0: all of them). A survivor otherwise runs every test that
  happens to call its function (110 tests, 84 s, for one of ``Store.claim``). A mutant only a
  slower test would kill counts as surviving: the score is a lower bound.
- Each test gets a time limit of its own (pytest-timeout), ten times its stats-run duration and at
  least 15 s (5 s for a unit test), instead of the suite's 300 s: a mutant that makes a test wait
  for ever (a job that never finishes) is a failure after seconds, not five minutes. mutmut's own
  limit is per mutant, fifteen times the sum of its tests' durations. Futures the tests expect to
  settle at once are awaited 1.5 s instead of 10 (``IMGQ_TEST_WAIT_S``, tests/waits.py).
- The heap the session inherits (torch, transformers, the collected suite: millions of objects) is
  frozen (``gc.freeze``) when the session starts. Without it every session spends most of its
  start-up and teardown walking that heap: pytest's unraisable-exception plugin runs ``gc.collect``
  at exit, 0.8 of the 1.3 s a one-file unit session took. The frozen objects are never freed, which
  a process that exits after one session does not need.
- ``IMGQ_MUTATION_TIMES``: one JSON line per mutant session (seconds since the fork, tests
  selected and run, exit status); ``IMGQ_MUTATION_FAILURES``: failures of the stats and clean runs,
  whose output mutmut swallows.

Hypothesis runs derandomized, so that a mutant's verdict does not depend on the draw.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

TIMEOUT_FACTOR = 10
MIN_TIMEOUT_S = 15.0
# A unit test takes milliseconds and starts no server: a floor of 5 s is still 50 times the
# slowest one's stats-run time, and a hanging mutant of the engine then costs 5 s, not 15.
MIN_UNIT_TIMEOUT_S = 5.0
# Futures that should settle at once are awaited this long (tests/waits.py), not 10 s.
os.environ.setdefault("IMGQ_TEST_WAIT_S", "1.5")


def pytest_configure(config: pytest.Config) -> None:
    gc.freeze()
    from hypothesis import settings

    settings.register_profile("mutation", derandomize=True, database=None, deadline=None)
    settings.load_profile("mutation")

    from imgq import embedded
    from imgq.db import migrate

    pg = os.environ.get("IMGQ_MUTATION_PG")
    if pg:
        class SharedPostgres(embedded.Postgres):
            def stop(self, timeout: float = 20) -> None:
                pass  # tests/mutate.py stops it after the run

        shared = SharedPostgres(datadir=Path(pg), url=f"postgresql+psycopg://postgres:@/imgq_template?host={pg}")
        upgrade = migrate.upgrade

        def start_postgres(datadir: Path, database: str = "imgq") -> embedded.Postgres:
            return shared if database == "imgq_template" else embedded_start_postgres(datadir, database)

        def migrated(database_url: str, revision: str = "head") -> None:
            if database_url != shared.url:  # the shared template is migrated once, before the run
                upgrade(database_url, revision)

        embedded_start_postgres = embedded.start_postgres
        embedded.start_postgres = start_postgres  # type: ignore[assignment]
        migrate.upgrade = migrated  # type: ignore[assignment]

    s3 = os.environ.get("IMGQ_MUTATION_S3")
    if s3:
        class SharedS3:
            url = s3

            def stop(self) -> None:
                pass

        start_s3 = embedded.start_s3

        def shared_s3(*args: Any, **kwargs: Any) -> Any:
            return SharedS3() if not args and set(kwargs) <= {"log"} else start_s3(*args, **kwargs)

        embedded.start_s3 = shared_s3  # type: ignore[assignment]

    models = os.environ.get("IMGQ_MUTATION_MODELS")
    if models:
        _share_checkpoints(Path(models))


# The session fixtures' folders (tests/fixtures/model.py): tmp_path_factory.mktemp(NAME) / "checkpoint".
# Only those are shared; a test that writes a checkpoint of its own (to check the writer) keeps it.
FIXTURE_CHECKPOINT = re.compile(r"(tiny-blip|tiny-blip-p16|tiny-blip-itm|tiny-nllb)\d+")


def _share_checkpoints(root: Path) -> None:
    """Point the tiny-checkpoint fixtures of tests/fixtures/model.py at one folder per kind and settings."""
    from imgq.worker import tiny, tiny_translate

    def shared(module: Any, name: str) -> None:
        write = getattr(module, name)

        @functools.wraps(write)
        def write_shared(directory: Path, **kwargs: Any) -> Path:
            directory = Path(directory)
            if directory.name == "checkpoint" and FIXTURE_CHECKPOINT.fullmatch(directory.parent.name):
                settings = "".join(f"-{k}{v}" for k, v in sorted(kwargs.items()))
                directory = root / f"{directory.parent.name.rstrip('0123456789')}{settings}"
            return write(directory, **kwargs)

        setattr(module, name, write_shared)

    shared(tiny, "write_tiny_checkpoint")
    shared(tiny, "write_tiny_retrieval_checkpoint")
    shared(tiny_translate, "write_tiny_translation_checkpoint")


@functools.cache
def _durations() -> dict[str, float]:
    try:  # mutmut runs the tests in mutants/, beside its stats
        return dict(json.loads(Path("mutmut-stats.json").read_text())["duration_by_test"])
    except (OSError, ValueError, KeyError):
        return {}


def _shares_fixture(item: pytest.Item) -> Any:
    """The module or class whose scoped fixture ``item`` uses, or None."""
    info = getattr(item, "_fixtureinfo", None)
    for defs in getattr(info, "name2fixturedefs", {}).values():
        if any(d.scope in ("module", "class", "package") for d in defs):
            return item.module if hasattr(item, "module") else None
    return None


def _mutant() -> str:
    """The mutant this session tests; "" (clean run), "stats", "fail" or "list_all_tests" otherwise."""
    return os.environ.get("MUTANT_UNDER_TEST", "")


def _testing_a_mutant() -> bool:
    return _mutant() not in ("", "stats", "fail", "list_all_tests", "mutant_generation")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    durations = _durations()
    if not durations or os.environ.get("IMGQ_MUTATION_ORDER") == "off":
        return

    def duration(item: pytest.Item) -> float:
        return durations.get(item.nodeid.removeprefix("mutants/"), durations.get(item.nodeid, 0.0))

    group_start: dict[Any, float] = {}
    for item in items:
        group = _shares_fixture(item)
        if group is not None:
            group_start[group] = min(group_start.get(group, float("inf")), duration(item))

    def key(item: pytest.Item) -> tuple[float, str, float]:
        group = _shares_fixture(item)
        if group is None:
            return (duration(item), "", 0.0)
        return (group_start[group], getattr(group, "__name__", ""), duration(item))

    items.sort(key=key)
    budget = float(os.environ.get("IMGQ_MUTATION_BUDGET_S", "0") or 0)
    if budget > 0 and _testing_a_mutant():
        # A mutant that the fastest tests covering it (up to ``budget`` seconds of their stats-run
        # time) do not kill is reported as surviving: a lower bound on the score, never a higher one.
        kept: list[pytest.Item] = []
        spent = 0.0
        for item in items:
            if kept and spent + duration(item) > budget:
                break
            kept.append(item)
            spent += duration(item)
        if len(kept) < len(items):
            config.hook.pytest_deselected(items=items[len(kept):])
            items[:] = kept
    for item in items:
        if item.get_closest_marker("timeout") is None:
            floor = MIN_UNIT_TIMEOUT_S if item.nodeid.startswith("tests/unit/") else MIN_TIMEOUT_S
            item.add_marker(pytest.mark.timeout(max(floor, TIMEOUT_FACTOR * duration(item))))


def _process_age() -> float:
    """Seconds since this process was forked (mutmut forks one per mutant)."""
    started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    return float(Path("/proc/uptime").read_text().split()[0]) - started / os.sysconf("SC_CLK_TCK")


_ran: list[str] = []


def pytest_runtest_logfinish(nodeid: str) -> None:
    _ran.append(nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """One line per mutant's session in ``IMGQ_MUTATION_TIMES``: where a run's time goes."""
    path = os.environ.get("IMGQ_MUTATION_TIMES")
    if path and _testing_a_mutant():
        with open(path, "a") as out:
            out.write(json.dumps({"mutant": _mutant(), "s": round(_process_age(), 2), "selected": len(session.items),
                                  "ran": len(_ran), "exit": int(exitstatus)}) + "\n")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """A failure in mutmut's stats or clean run (the suite must be green) goes to ``IMGQ_MUTATION_FAILURES``:
    those runs are forked from mutmut's process with their output swallowed."""
    path = os.environ.get("IMGQ_MUTATION_FAILURES")
    if path and report.failed and os.environ.get("MUTANT_UNDER_TEST", "") in ("", "stats", "list_all_tests"):
        with open(path, "a") as out:
            out.write(f"{report.nodeid} ({report.when})\n{report.longreprtext[-3000:]}\n\n")
