"""The registry of per-language LoRA adapters (table ``adapters``, migration 0008): what ``imgq finetune``
registers and what a worker looks up to serve ``--adapter NAME``.

Invariants:

- A name is one adapter: registering a name again replaces the row (a retrained adapter keeps its name
  and gets a new ``revision``, so captions it made before stay told apart by ``via_revision``). With
  ``replace=False`` (``imgq finetune`` and ``imgq adapter register`` without ``--replace``) only a row of the
  same location and language is replaced: another location or language under a taken name would change
  what jobs already accepted with that name get, so it raises AdapterExists, in the same statement.
- Names are path- and URL-safe (``[A-Za-z0-9][A-Za-z0-9._-]*``, at most 200 characters): a worker keeps
  an S3 adapter's copy in ``IMGQ_ADAPTER_DIR/<name>-<revision>``.
- ``revision`` is the hex SHA-256 (at least its first 16 characters) of ``adapter_model.safetensors``;
  a worker refuses files that do not hash to it.
- ``config_sha256`` (migration 0016) is the same for ``adapter_config.json`` (``lora_alpha``, ``r``, ...,
  which change captions as much as the weights do); a worker refuses a config that does not hash to it.
  NULL: registered before 0016, the config is not checked until the adapter is registered again.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, text

from imgq.errors import BadParams, UnknownAdapter


class AdapterExists(BadParams):
    """The name is registered for another location or language, and replacing it was not asked for."""

    code = "adapter_exists"


NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
REVISION = re.compile(r"^[0-9a-f]{16,64}$")

_COLUMNS = "name, lang, base_model, base_revision, location, revision, metrics, config_sha256"
_UPSERT = text(f"""
INSERT INTO adapters ({_COLUMNS})
VALUES (:name, :lang, :base_model, :base_revision, :location, :revision, CAST(:metrics AS jsonb), :config_sha256)
ON CONFLICT (name) DO UPDATE SET
  lang = EXCLUDED.lang, base_model = EXCLUDED.base_model, base_revision = EXCLUDED.base_revision,
  location = EXCLUDED.location, revision = EXCLUDED.revision, metrics = EXCLUDED.metrics,
  config_sha256 = EXCLUDED.config_sha256, created_at = now()
WHERE CAST(:replace AS boolean) OR (adapters.location = EXCLUDED.location AND adapters.lang = EXCLUDED.lang)
RETURNING name
""")
# A name nobody holds: FOR UPDATE on no row locks nothing, so a concurrent first registration is
# caught here (this waits for it to commit) and the write goes on as a replacement of it.
_INSERT_NEW = text(f"""
INSERT INTO adapters ({_COLUMNS})
VALUES (:name, :lang, :base_model, :base_revision, :location, :revision, CAST(:metrics AS jsonb), :config_sha256)
ON CONFLICT (name) DO NOTHING RETURNING name
""")
_GET = text(f"SELECT {_COLUMNS}, created_at FROM adapters WHERE name = :name")
_LOCK = text(f"SELECT {_COLUMNS}, created_at FROM adapters WHERE name = :name FOR UPDATE")
_LIST = text(f"SELECT {_COLUMNS}, created_at FROM adapters ORDER BY name")
_DELETE = text(f"DELETE FROM adapters WHERE name = :name RETURNING {_COLUMNS}, created_at")


@dataclass(frozen=True, slots=True)
class AdapterRecord:
    name: str
    lang: str  # ISO 639-1: the language its captions are stored under
    base_model: str  # IMGQ_CAPTION_MODEL it was trained on (hub id or local path, as the worker names it)
    base_revision: str  # that model's revision (hub commit or local-<sha>)
    location: str  # a local folder or s3://bucket/prefix holding adapter_config.json + adapter_model.safetensors
    revision: str  # hex SHA-256 of adapter_model.safetensors
    metrics: dict[str, Any] = field(default_factory=dict)  # held-out figures from imgq finetune
    config_sha256: str | None = None  # hex SHA-256 of adapter_config.json; None: registered before 0016, unchecked
    created_at: dt.datetime | None = field(default=None, compare=False)  # when registered (read back only)

    def check(self) -> None:
        """Raise BadParams if the record could not be served as written."""
        if not NAME.match(self.name):
            raise BadParams(f"adapter name {self.name!r} must be letters, digits, '.', '_' or '-' (starting with a "
                            "letter or digit), at most 200 characters")
        if not REVISION.match(self.revision):
            raise BadParams(f"adapter revision {self.revision!r} must be the hex SHA-256 of its weights "
                            "(at least 16 characters)")
        if self.config_sha256 is not None and not REVISION.match(self.config_sha256):
            raise BadParams(f"adapter config_sha256 {self.config_sha256!r} must be the hex SHA-256 of its "
                            "adapter_config.json (at least 16 characters)")
        for name in ("lang", "base_model", "base_revision", "location"):
            if not getattr(self, name):
                raise BadParams(f"adapter {self.name!r} has an empty {name}")


def _record(row: Any) -> AdapterRecord:
    return AdapterRecord(row.name, row.lang, row.base_model, row.base_revision, row.location, row.revision,
                         dict(row.metrics or {}), row.config_sha256, row.created_at)


def conflict(existing: AdapterRecord | None, location: str, lang: str) -> str | None:
    """Why registering ``location`` (``lang``) under ``existing``'s name would replace another adapter, or None
    when there is no such row or it is the same location and language (a re-registration)."""
    if existing is None or (existing.location == location and existing.lang == lang):
        return None
    return (f"adapter {existing.name!r} is registered for {existing.lang} at {existing.location}; registering "
            f"{location} ({lang}) under that name would change what jobs already accepted with it get: pass "
            "--replace to replace it, or choose another name")


class Adapters:
    """The ``adapters`` table over a SQLAlchemy engine (thread-safe as the engine is)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def register(self, record: AdapterRecord, *, replace: bool = True) -> AdapterRecord | None:
        """Insert ``record``, or replace the adapter of the same name; return the row it replaced (None: new).
        With ``replace=False`` a row of another location or language is kept and AdapterExists raised (the
        check and the write are one statement, so a concurrent registration cannot slip between them)."""
        record.check()
        params = {
            "name": record.name, "lang": record.lang, "base_model": record.base_model,
            "base_revision": record.base_revision, "location": record.location, "revision": record.revision,
            "metrics": json.dumps(record.metrics, sort_keys=True), "config_sha256": record.config_sha256,
            "replace": replace,
        }
        with self.engine.begin() as conn:
            row = conn.execute(_LOCK, {"name": record.name}).first()
            if row is None:
                if conn.execute(_INSERT_NEW, params).first() is not None:
                    return None
                # Registered meanwhile by another (committed now): that row is what this replaces.
                row = conn.execute(_LOCK, {"name": record.name}).first()
            written = conn.execute(_UPSERT, params).first()
            if written is None:  # the name was taken (perhaps just now) by another location or language
                taken = conn.execute(_GET, {"name": record.name}).first()
                reason = conflict(None if taken is None else _record(taken), record.location, record.lang)
                raise AdapterExists(reason or f"adapter {record.name!r} was registered concurrently; try again")
        return None if row is None else _record(row)

    def get(self, name: str) -> AdapterRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(_GET, {"name": name}).first()
        return None if row is None else _record(row)

    def list(self) -> list[AdapterRecord]:
        with self.engine.connect() as conn:
            return [_record(row) for row in conn.execute(_LIST)]

    def withdraw(self, name: str) -> AdapterRecord:
        """Delete the adapter ``name`` and return what it was; UnknownAdapter if there is none."""
        with self.engine.begin() as conn:
            row = conn.execute(_DELETE, {"name": name}).first()
        if row is None:
            raise self._unknown(name)
        return _record(row)

    def _unknown(self, name: str) -> UnknownAdapter:
        known = [r.name for r in self.list()]
        hint = (f"registered: {', '.join(known[:20])}" if known
                else "none is registered (`imgq finetune`, `imgq adapter register`)")
        return UnknownAdapter(f"no adapter named {name!r}; {hint}")

    def require(self, name: str, caption_model: str, base_revision: str | None = None) -> AdapterRecord:
        """The adapter ``name`` if it was trained on ``caption_model`` (and, when given, on that model
        revision); else UnknownAdapter saying which."""
        record = self.get(name)
        if record is None:
            raise self._unknown(name)
        if record.base_model != caption_model:
            raise UnknownAdapter(f"adapter {name!r} was trained on caption model {record.base_model!r}, not on "
                                 f"{caption_model!r} (IMGQ_CAPTION_MODEL); retrain it with `imgq finetune`")
        if base_revision is not None and record.base_revision != base_revision:
            raise UnknownAdapter(f"adapter {name!r} was trained on revision {record.base_revision!r} of "
                                 f"{caption_model!r}, not on {base_revision!r}; retrain it with `imgq finetune`, or "
                                 "register it again for this revision (`imgq adapter register`)")
        return record
