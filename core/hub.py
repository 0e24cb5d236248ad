"""Where a model comes from, without loading it: a local checkpoint folder, the Hugging Face
cache, or the hub. Standard library only, so the demo and the GPU bench can ask before torch loads.

A lookup on an unreachable hub is retried with back-off (about 23 s per file here), so the hub is
probed first with one TCP connection and the cache alone is used when it does not answer.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

PROBE_TIMEOUT_S = 3.0

Source = Literal["local", "cached", "hub"]


def env_true(*names: str) -> bool:
    return any(os.environ.get(n, "").strip().lower() in {"1", "true", "yes", "on"} for n in names)


def offline_by_env() -> bool:
    return env_true("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def hub_reachable() -> bool:
    """A fast TCP check of the hub endpoint (no retries). Assumes reachable behind a proxy,
    where a direct connection says nothing about what the HTTP client can reach."""
    if any(os.environ.get(n) for n in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def model_source(name: str) -> Source | None:
    """Where ``from_pretrained(name)`` would find the model, or None where it cannot: a folder
    without a config.json, or a hub id neither cached nor downloadable (offline)."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return "local" if (folder / "config.json").exists() else None
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return "cached"
    except Exception:  # not a valid repo id, or no huggingface_hub (the light install)
        return None
    return None if offline_by_env() or not hub_reachable() else "hub"
