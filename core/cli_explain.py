"""``imgq explain``: caption one image and show where the decoder looked for each word
(imgq.worker.explainer)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from imgq import cli_caption, errors
from imgq.cli_common import _fail, _flag, _params_json, _settings


def explain(
    ref: Annotated[str, typer.Argument(help="One image: s3://bucket/key or a local file under IMGQ_LOCAL_ROOTS.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the overlays (word-NN-*.png), contact_sheet.png "
                                      "and explain.json, created once the caption is made; an earlier run's "
                                      "files there are replaced, other files are left alone.")],
    layer: Annotated[int | None, typer.Option(help="Only this cross-attention layer (0-based; default: the mean "
                                              "of every layer).")] = None,
    all_layers: Annotated[bool, typer.Option("--all-layers", help="Also one map and overlay per layer.")] = False,
    heads: Annotated[str, typer.Option(help="How a layer's heads are reduced: mean or max.")] = "mean",
    max_new_tokens: cli_caption.MaxNewTokens = None,
    min_new_tokens: cli_caption.MinNewTokens = None,
    num_beams: cli_caption.NumBeams = None,
    do_sample: cli_caption.Sample = False,
    top_p: cli_caption.TopP = None,
    top_k: cli_caption.TopK = None,
    temperature: cli_caption.Temperature = None,
    repetition_penalty: cli_caption.RepetitionPenalty = None,
    seed: cli_caption.Seed = None,
    prompt: cli_caption.Prompt = None,
    resize: cli_caption.Resize = None,
    params_json: Annotated[str | None, typer.Option("--params", help="Caption parameters as one JSON object "
                                                    "(the flags above win over it).")] = None,
) -> None:
    """Caption one image and show where the decoder looked for each word: a PNG overlay per word on
    the original image, a contact sheet, and explain.json (tokens, words, one grid per token).

    \b
      imgq explain photos/dog.jpg --out explain/dog
      imgq explain s3://photos/2026/0001.jpg --out x --layer 11 --heads max --resize letterbox
    """
    from imgq.kinds import spec
    from imgq.refs import parse_ref

    if layer is not None and all_layers:
        _fail("bad_request", "--layer picks one layer and --all-layers keeps every one: give one of them")
    if heads not in ("mean", "max"):
        _fail("bad_params", f"--heads must be mean or max, not {heads!r}")
    given_flags = dict(locals())
    _check_out(out)
    settings = _settings()
    raw = _params_json(params_json)
    raw.update(cli_caption.given(given_flags, spec("caption").params.model_fields))
    raw.pop("explain", None)  # a job option; explaining is what this command does
    try:
        from imgq.worker.decode import decode
        from imgq.worker.explainer import check_layer, explain_image, write_files
        from imgq.worker.fetch import Fetcher
        from imgq.worker.runners import CaptionRunner
    except ImportError as exc:
        _fail("missing_extra", f"explaining needs the worker extra: pip install 'imgq[worker]' ({exc})")
    try:
        # Every mistake of the caller is found before the model loads (seconds, and its log lines).
        cli_caption.check_names(raw, ["caption"])
        params = spec("caption").parse(raw, name=_flag)
        # Refused here first, like enqueue's refs (exit 2); the fetcher checks again.
        parse_ref(ref.strip(), allowed_buckets=settings.allowed_buckets, local_roots=settings.local_roots)
        blob = Fetcher(settings).fetch(ref.strip())
        image = decode(blob.data, max_pixels=settings.max_pixels).image  # full size: overlays are drawn on it
        runner = CaptionRunner(CaptionRunner.make_model(settings))
        runner.load()
        check_layer(runner.model, layer)
        doc, files = explain_image(runner.model, image, runner.prepare(image, params), params, ref=ref.strip(),
                                   heads="max" if heads == "max" else "mean", layer=layer, keep_layers=all_layers)
    except errors.ImgqError as exc:  # as every command: refused requests exit 2, everything else 1
        _fail(exc.code, exc.message, 2 if isinstance(exc, errors.InvalidRequest) else 1)
    try:  # only now that the request is valid and explained: a refused one leaves no folder behind
        out.mkdir(parents=True, exist_ok=True)
        _clear_earlier_run(out)
        write_files(out, files)
    except OSError as exc:
        _fail("bad_file", f"cannot write {exc.filename or out}: {exc.strerror or exc}")
    typer.echo(f"wrote {len(files)} files to {out} ({len(doc['words'])} words)", err=True)
    typer.echo(doc["caption"])


# What `imgq explain` writes into --out (imgq.worker.overlay's names): a word's overlay, word-NN-SLUG.png or
# word-NN-SLUG-layerNN.png, the contact sheet and explain.json. Only these are cleared before a rerun.
_OWN_FILE = re.compile(r"word-\d+-[a-z0-9-]+\.png|contact_sheet\.png|explain\.json")


def _check_out(out: Path) -> None:
    """Refuse an --out that is a file, or lies under one, before anything is done (bad_file)."""
    if out.exists():
        if not out.is_dir():
            _fail("bad_file", f"--out {out} is not a folder")
        return
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                _fail("bad_file", f"--out {out}: {parent} is not a folder")
            return


def _clear_earlier_run(out: Path) -> None:
    """Delete an earlier run's own files from ``out`` (a rerun with fewer words would leave its extra
    overlays beside the new ones); any other file or folder there is left as it is."""
    for entry in out.iterdir():
        if _OWN_FILE.fullmatch(entry.name) and (entry.is_symlink() or entry.is_file()):
            entry.unlink()


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("explain")(explain)
