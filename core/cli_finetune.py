"""``imgq finetune``: train a per-language LoRA adapter on the caption model's text decoder and register it
(imgq.worker.finetune; README, 'Captions in other languages')."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Annotated, Any

import typer


def finetune(
    pairs: Annotated[Path, typer.Option(help="CSV of ref,caption rows (UTF-8; an optional first row "
                                        "`ref,caption` is a header). Refs as in jobs: s3://bucket/key in "
                                        "IMGQ_ALLOWED_BUCKETS or paths under IMGQ_LOCAL_ROOTS.")],
    out: Annotated[Path, typer.Option(help="ADAPTER_DIR: checkpoints, cached image features and the final "
                                      "adapter (adapter_config.json + adapter_model.safetensors).")],
    lang: Annotated[str, typer.Option(help="ISO 639-1 code of the captions (de, fr, ...): the language its "
                                      "captions are stored under. Required: it is part of each caption's "
                                      "identity, so it is never guessed.")],
    name: Annotated[str | None, typer.Option(help="Registered name, used by `--adapter NAME` (default: the "
                                             "--out folder's name).")] = None,
    epochs: Annotated[int, typer.Option(min=1, help="Passes over the training pairs (a resumed run trains up "
                                        "to this many in all).")] = 10,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the checkpoint in --out (same pairs "
                                         "and settings).")] = False,
    rank: Annotated[int, typer.Option(min=1, max=256, help="LoRA rank (alpha is twice the rank).")] = 8,
    lr: Annotated[float, typer.Option(min=1e-7, max=1.0, help="AdamW learning rate.")] = 1e-3,
    holdout: Annotated[float, typer.Option(min=0.0, max=0.9, help="Share of pairs held out (a seeded "
                                           "split) for the held-out loss and chrF; 0 holds none out.")] = 0.25,
    batch: Annotated[int, typer.Option(min=1, max=4096, help="Pairs per optimizer step.")] = 16,
    seed: Annotated[int, typer.Option(min=0, help="Seeds the split, the LoRA init and the order of each "
                                      "epoch.")] = 0,
    resize: Annotated[str, typer.Option(help="Resize mode of the images, as the jobs that will use the "
                                        "adapter: stretch, center_crop or letterbox.")] = "stretch",
    do_register: Annotated[bool, typer.Option("--register/--no-register", help="Register the adapter in "
                                           "Postgres (IMGQ_DATABASE_URL) when done.")] = True,
    replace: Annotated[bool, typer.Option("--replace", help="Replace an adapter registered under the name at "
                                          "another location or for another language (jobs already accepted "
                                          "with the name then get this one); without it that is refused "
                                          "before training.")] = False,
) -> None:
    """Train a LoRA adapter on the caption model's text decoder from (image, caption) pairs, so that
    `imgq enqueue caption --adapter NAME` captions in another language.

    The images go through the worker's own fetch, decode and preprocessing; the vision encoder is
    frozen and its features are computed once (cached in --out). Each epoch is checkpointed in --out
    (--resume continues), a seeded share of the pairs is held out for the loss and chrF of greedy
    captions, and the final adapter is written in peft's format and registered under --name with
    the SHA-256 of its weights and of its config. A name registered for another folder or
    language is refused before training unless --replace. Prints one summary line. BLIP's English
    WordPiece vocabulary lower-cases, strips accents and cannot write other scripts (README).

    \b
      imgq finetune --pairs de.csv --out /data/adapters/blip-de --lang de --epochs 20
      imgq finetune --pairs de.csv --out /data/adapters/blip-de --lang de --epochs 30 --resume
    """
    from tqdm import tqdm

    from imgq import errors
    from imgq.cli import _fail, _settings
    from imgq.db.adapters import NAME, AdapterExists, AdapterRecord
    from imgq.languages import language
    from imgq.worker.finetune import FinetuneOptions, Trainer, iter_pairs_warnings, read_pairs, split
    from imgq.worker.model import CaptionModel

    settings = _settings()
    try:
        lang_info = language(lang)
    except errors.ImgqError as exc:
        _fail(exc.code, exc.message)
    if resize not in ("stretch", "center_crop", "letterbox"):
        _fail("bad_params", f"--resize must be stretch, center_crop or letterbox, not {resize!r}")
    if str(out).startswith("s3:"):
        _fail("bad_params", "--out must be a local folder; to serve the adapter from S3, copy the folder to "
              "s3://bucket/prefix and register that location (`imgq adapter register NAME s3://bucket/prefix "
              "--lang L`)")
    out = out.expanduser().resolve()
    adapter_name = name or out.name
    if not NAME.match(adapter_name):
        _fail("bad_params", f"adapter name {adapter_name!r} must be letters, digits, '.', '_' or '-' (pass --name)")
    try:  # bad_file (unreadable) or bad_pairs (a malformed row, by file:line), as `imgq enqueue` names them
        rows = read_pairs(pairs)
    except errors.ImgqError as exc:
        _fail(exc.code, exc.message)
    if do_register and not replace:  # before training: hours of it would be wasted on a refused name
        taken = _taken(settings, adapter_name, str(out), lang_info.code)
        if taken:
            _fail("adapter_exists", taken)
    if not lang_info.latin:
        typer.echo(f"warning: {lang_info.name} is not written in Latin script; BLIP's WordPiece vocabulary cannot "
                   "write it, so its captions come out as [UNK] or are dropped (README)", err=True)
    if do_register and not any(out == root or root in out.parents for root in settings.local_roots):
        typer.echo(f"warning: {out} is not under IMGQ_LOCAL_ROOTS; workers read a local adapter only from there",
                   err=True)
    options = FinetuneOptions(pairs=pairs, out=out, lang=lang_info.code, name=adapter_name, epochs=epochs, rank=rank,
                              lr=lr, holdout=holdout, batch=batch, seed=seed, resize=resize)
    model = CaptionModel(settings.caption_model, revision=settings.model_revision, attention=settings.attention,
                         device=settings.device, dtype=settings.dtype, threads=settings.torch_threads)
    try:
        model.load()
    except errors.ImgqError as exc:
        _fail(exc.code, exc.message, 1)
    for line in iter_pairs_warnings(model, rows):
        typer.echo(f"warning: {line}", err=True)

    train, _ = split(len(rows), holdout, seed)
    total = epochs * math.ceil(len(train) / batch)
    bar = tqdm(total=total, desc=f"finetune {adapter_name}", unit="step", file=sys.stderr, disable=None,
               mininterval=0.5)

    def show(step: int, epoch: int, loss: float) -> None:
        bar.update(step - bar.n)
        bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", refresh=False)

    try:
        report = Trainer(settings, model, options).run(rows, resume=resume, progress=show)
    except errors.ImgqError as exc:
        _fail(exc.code, exc.message)
    finally:
        bar.close()
    if do_register:
        try:  # checked again: the name may have been taken while it trained
            _register(settings, AdapterRecord(adapter_name, lang_info.code, model.name, model.revision, str(out),
                                              report.revision, report.metrics(), config_sha256=report.config_sha256),
                      replace=replace)
        except AdapterExists as exc:
            _fail("adapter_exists", f"{exc.message}; the trained adapter is in {out}, not registered: `imgq adapter "
                  f"register {adapter_name} {out} --lang {lang_info.code} --replace`, or another name")
    typer.echo(report.summary() + ("" if do_register else " (not registered)"))


def _register(settings: Any, record: Any, *, replace: bool) -> None:
    from imgq.db.adapters import Adapters
    from imgq.db.store import make_engine

    engine = make_engine(settings.sync_database_url)
    try:
        Adapters(engine).register(record, replace=replace)
    finally:
        engine.dispose()


def _taken(settings: Any, name: str, location: str, lang: str) -> str | None:
    """Why registering ``location`` (``lang``) as ``name`` would replace another adapter, or None."""
    from imgq.db.adapters import Adapters, conflict
    from imgq.db.store import make_engine

    engine = make_engine(settings.sync_database_url)
    try:
        return conflict(Adapters(engine).get(name), location, lang)
    finally:
        engine.dispose()


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("finetune")(finetune)
