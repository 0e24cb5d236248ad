"""Code blocks of the docs that tests execute, so the docs cannot drift from what works."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def python_block(doc: str, defines: str) -> dict[str, object]:
    """Run the ```python block of ``docs/<doc>`` that defines ``defines``; return its namespace."""
    text = (DOCS / doc).read_text(encoding="utf-8")
    for block in re.findall(r"```python\n(.*?)```", text, flags=re.S):
        if f"def {defines}(" in block:
            namespace: dict[str, object] = {}
            exec(compile(block, f"docs/{doc}", "exec"), namespace)
            return namespace
    raise AssertionError(f"docs/{doc} has no python block defining {defines}")


def documented_verifier() -> Callable[[str, str, bytes], bool]:
    """``verify_imgq_signature`` exactly as docs/callbacks.md shows it to receivers."""
    return python_block("callbacks.md", "verify_imgq_signature")["verify_imgq_signature"]  # type: ignore[return-value]
