"""``imgq backfill``: enqueue what an S3 prefix holds that has no result yet."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
