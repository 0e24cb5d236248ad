"""``imgq adapter``: list, register and withdraw per-language LoRA adapters (the ``adapters`` registry,
imgq.db.adapters; README, 'Route 2: per-language LoRA adapters').

``register`` reads an adapter's two files the way a worker does (imgq.worker.adapters.AdapterFiles: S3 in
IMGQ_ALLOWED_BUCKETS, or a folder under IMGQ_LOCAL_ROOTS read beneath its root), checks the config is imgq's
LoRA layout as a worker's bank does, and registers both digests for the configured caption model at the
revision a worker would load. ``list`` and ``withdraw`` need only the light install."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

adapter_app = typer.Typer(help="Per-language LoRA adapters: list, register a folder or s3:// prefix, withdraw.",
                          no_args_is_help=True)

_WITHDRAWN = ("jobs already queued with it are dead-lettered adapter_unavailable by the workers (`imgq dlq retry "
              "--code adapter_unavailable` once it is registered again)")


@contextmanager
def _registry(settings: Any) -> Iterator[Any]:
    from imgq.db.adapters import Adapters
    from imgq.db.store import make_engine

    engine = make_engine(settings.sync_database_url)
    try:
        yield Adapters(engine)
    finally:
        engine.dispose()


def _row(record: Any) -> dict[str, Any]:
    return {"name": record.name, "lang": record.lang, "base_model": record.base_model,
            "base_revision": record.base_revision, "location": record.location, "revision": record.revision,
            "config_sha256": record.config_sha256, "metrics": record.metrics,
            "created_at": None if record.created_at is None else record.created_at.astimezone(dt.UTC).isoformat()}


@adapter_app.command("list")
def adapter_list(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line, with the full digests and "
                                          "the metrics.")] = False,
) -> None:
    """Registered adapters, one row each, by name.

    Columns: language, base model and its revision, the first 16 hex digits of the SHA-256 of the
    weights (REVISION, the captions' via_revision) and of the config (CONFIG; `-`: registered before
    migration 0016, not checked), when it was registered, and its location."""
    from imgq.cli import _settings

    settings = _settings()
    with _registry(settings) as registry:
        records = registry.list()
    if as_json:
        for record in records:
            typer.echo(json.dumps(_row(record), sort_keys=True))
        return
    if not records:
        typer.echo("no adapters registered (`imgq finetune`, `imgq adapter register`)", err=True)
        return
    table = [("NAME", "LANG", "BASE MODEL", "BASE REVISION", "REVISION", "CONFIG", "CREATED (UTC)", "LOCATION")]
    table += [(r.name, r.lang, r.base_model, r.base_revision, r.revision[:16],
               "-" if r.config_sha256 is None else r.config_sha256[:16],
               "-" if r.created_at is None else f"{r.created_at.astimezone(dt.UTC):%Y-%m-%d %H:%M:%S}",
               r.location) for r in records]
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)) + "  " + row[-1])


def _layout_problem(name: str, config: bytes, weights: bytes) -> str | None:
    """Why the files are not an adapter a worker's bank loads (its own check of the config,
    imgq.worker.adapters.lora_config, and LoRA tensors in a safetensors file), or None."""
    from safetensors.torch import load as load_safetensors

    from imgq import errors
    from imgq.worker.adapters import WEIGHTS_FILE, lora_config

    try:
        lora_config(name, config)
    except errors.AdapterUnavailable as exc:
        return exc.message
    try:
        keys = load_safetensors(weights).keys()
    except Exception:
        return f"adapter {name!r}: {WEIGHTS_FILE} is not a safetensors file"
    if not any("lora_" in key for key in keys):
        return f"adapter {name!r}: {WEIGHTS_FILE} holds no LoRA weights"
    return None


def _base_revision(settings: Any) -> str:
    """The revision of IMGQ_CAPTION_MODEL a worker would load, found as a worker finds it
    (imgq.worker.loading.load_checkpoint) from the checkpoint's config alone: a local folder's
    local_revision, or the hub's answer for IMGQ_MODEL_REVISION, without loading the weights."""
    from types import SimpleNamespace

    from transformers import BlipConfig

    from imgq.worker.loading import load_checkpoint
    from imgq.worker.model import CaptionModel

    def config_only(source: str, *, local_files_only: bool, revision: str | None) -> Any:
        config = BlipConfig.from_pretrained(source, revision=revision, local_files_only=local_files_only)
        return SimpleNamespace(config=config)  # load_checkpoint reads the revision from `.config`

    _, revision = load_checkpoint(settings.caption_model, CaptionModel.kind, CaptionModel.hint,
                                  settings.model_revision, config_only)
    return revision


@adapter_app.command("register")
def adapter_register(
    name: Annotated[str, typer.Argument(help="The name jobs use (`--adapter NAME`): letters, digits, '.', '_', "
                                        "'-'.")],
    location: Annotated[str, typer.Argument(help="A folder under IMGQ_LOCAL_ROOTS, or s3://bucket/prefix in "
                                            "IMGQ_ALLOWED_BUCKETS, holding adapter_config.json and "
                                            "adapter_model.safetensors.")],
    lang: Annotated[str, typer.Option(help="ISO 639-1 code of the adapter's captions (de, fr, ...): the "
                                      "language they are stored under. Required: never guessed.")],
    replace: Annotated[bool, typer.Option("--replace", help="Replace an adapter registered under NAME at "
                                          "another location or for another language (jobs already accepted "
                                          "with NAME then get this one).")] = False,
) -> None:
    """Register an adapter's files (a folder, or a copy in S3) for the configured caption model.

    The files are read as a worker reads them and must be imgq's LoRA layout (`imgq finetune`
    writes it); the SHA-256 of the weights (its revision) and of the config are registered with
    IMGQ_CAPTION_MODEL and the revision of it a worker loads now. Registering NAME again at the
    same location and language updates the digests and the base revision (e.g. after the caption
    model changed), keeping the metrics if the weights are the same; another location or language
    needs --replace. Needs the worker extra (transformers, peft).

    \b
      imgq adapter register de-news /data/adapters/de-news --lang de
      imgq adapter register de-news s3://models/adapters/de-news --lang de --replace
    """
    from imgq import errors
    from imgq.cli import _fail, _settings

    settings = _settings()
    try:
        import peft  # noqa: F401  (the config is checked as a worker's bank reads it)

        from imgq.worker.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterFiles, sha256_hex
        from imgq.worker.loading import first_line  # torch and transformers: the model's revision
    except ImportError as exc:
        _fail("missing_extra", "registering an adapter reads the caption model's revision and checks the LoRA "
              f"config with peft: it needs the worker extra: pip install 'imgq[worker]' ({exc})")
    from imgq.db.adapters import NAME, AdapterExists, AdapterRecord, conflict
    from imgq.languages import language

    try:
        code = language(lang).code
    except errors.ImgqError as exc:
        _fail(exc.code, exc.message)
    if not NAME.match(name):
        _fail("bad_params", f"adapter name {name!r} must be letters, digits, '.', '_' or '-' (starting with a letter "
              "or digit), at most 200 characters")

    # A provisional record: AdapterFiles reads by a record's name and location, exactly as a worker does.
    probe = AdapterRecord(name, code, settings.caption_model, "-", location.strip(), "0" * 64)
    files = AdapterFiles(settings)
    try:
        where = files._where(probe)  # the allow-lists and the confinement of a worker
    except errors.AdapterUnavailable as exc:
        _fail("bad_ref", exc.message)
    canonical = f"s3://{where[0]}/{where[1]}" if isinstance(where, tuple) else str(where)
    with _registry(settings) as registry:
        existing = registry.get(name)
    taken = None if replace else conflict(existing, canonical, code)
    if taken:  # before reading the files: an S3 copy may be large
        _fail("adapter_exists", taken)
    try:
        data = files._read(probe, where)
    except errors.AdapterUnavailable as exc:
        _fail("adapter_unavailable", exc.message)
    problem = _layout_problem(name, data[CONFIG_FILE], data[WEIGHTS_FILE])
    if problem:
        _fail("adapter_unavailable", f"{problem} (at {canonical})")
    try:
        base_revision = _base_revision(settings)
    except errors.ImgqError as exc:
        _fail(exc.code, exc.message, 1)
    except Exception as exc:  # a config transformers refuses: the model's, said in one line
        _fail("model_unavailable", f"cannot read the revision of caption model {settings.caption_model!r}: "
              f"{first_line(exc)}", 1)
    if settings.model_revision is None and not Path(settings.caption_model).expanduser().exists():
        typer.echo(f"warning: caption model {settings.caption_model!r} is a hub id with no IMGQ_MODEL_REVISION: "
                   f"the adapter is registered on {base_revision}, the commit it names now; workers that loaded "
                   "another commit refuse it until it is registered again. Pin IMGQ_MODEL_REVISION.", err=True)
    revision = sha256_hex(data[WEIGHTS_FILE])
    same_weights = existing is not None and existing.location == canonical and existing.revision == revision
    record = AdapterRecord(name, code, settings.caption_model, base_revision, canonical, revision,
                           dict(existing.metrics) if same_weights else {},
                           config_sha256=sha256_hex(data[CONFIG_FILE]))
    with _registry(settings) as registry:
        try:
            previous = registry.register(record, replace=replace)
        except AdapterExists as exc:
            _fail("adapter_exists", exc.message)
    how, was = "registered", ""
    if previous is not None and conflict(previous, canonical, code) is None:
        how = "re-registered"
    elif previous is not None:
        how, was = "replaced", f" (was {previous.lang} at {previous.location})"
    typer.echo(f"{how} adapter {name!r}{was}: lang={code} location={canonical} revision={revision[:16]} "
               f"config={record.config_sha256[:16] if record.config_sha256 else '-'} "
               f"base={settings.caption_model}@{base_revision}")


@adapter_app.command("withdraw")
def adapter_withdraw(
    name: Annotated[str, typer.Argument(help="The registered name.")],
) -> None:
    """Delete an adapter's registration (its files are left where they are).

    Jobs already queued with it are dead-lettered `adapter_unavailable` by the workers, and new
    ones naming it are refused (`unknown_adapter`)."""
    from imgq import errors
    from imgq.cli import _fail, _settings

    settings = _settings()
    with _registry(settings) as registry:
        try:
            record = registry.withdraw(name)
        except errors.UnknownAdapter as exc:
            _fail(exc.code, exc.message)
    typer.echo(f"withdrew adapter {name!r} ({record.lang} at {record.location}, revision {record.revision[:16]}); "
               f"{_WITHDRAWN}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(adapter_app, name="adapter")
