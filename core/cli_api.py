"""``imgq api`` and ``imgq apikey``: the HTTP API's server and its tenants' keys."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
