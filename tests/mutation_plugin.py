"""A pytest plugin for `make mutate` only (tests/mutate.py loads it with ``-p``; ordinary runs never do).

mutmut runs a fresh pytest session for every mutant, and each session would start its own
Postgres, migrate a template and start moto: seconds per mutant, most of a run. tests/mutate.py
starts one Postgres (template already migrated) and one moto for the whole run and names them in
``IMGQ_MUTATION_PG`` / ``IMGQ_MUTATION_S3``; here the session fixtures get those servers instead
of starting their own. Every test still gets its own database cloned from the template (named
after the pid, so concurrent mutants never share one) and its own bucket. Redis stays per
session: tests flush it.

Hypothesis runs derandomized, so that a mutant's verdict does not depend on the draw.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest


def pytest_configure(config: pytest.Config) -> None:
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
