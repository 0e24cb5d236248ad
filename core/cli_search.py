"""``imgq search``: the nearest images by cosine similarity of their BLIP embeddings, to a text or to
an image (imgq.db.search)."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from imgq import errors
from imgq.cli_common import _fail, _settings
from imgq.config import Settings


def _image_vector(settings: Settings, engine: Any, ref: str, model: str,
                  from_flag: bool = False) -> tuple[Any, str, int | None]:
    """The query vector for ``search --image``: the stored embedding of the image's newest version
    if there is one (no torch needed), else one computed now. Returns (vector, revision, image id)."""
    from imgq.db.search import stored_vector
    from imgq.refs import S3Ref, parse_ref

    parsed = parse_ref(ref.strip(), allowed_buckets=settings.allowed_buckets, local_roots=settings.local_roots)
    source, bucket, key = ("s3", parsed.bucket, parsed.key) if isinstance(parsed, S3Ref) else ("local", "", str(parsed))
    found = stored_vector(engine, model=model, revision=None, source=source, bucket=bucket, key=key)
    if found is not None:
        image_id, vector, revision = found
        return vector, revision, image_id
    try:
        from imgq.worker.decode import decode
        from imgq.worker.fetch import Fetcher
    except ImportError as exc:
        _fail("missing_extra", f"encoding a query needs the worker extra: pip install 'imgq[worker]' ({exc})")
    blob = Fetcher(settings).fetch(str(parsed))  # a missing image is refused before the model loads
    runner = _embed_runner(settings, model, from_flag=from_flag)
    image = decode(blob.data, max_pixels=settings.max_pixels, target=runner.input_size).image
    return runner.model.embed_images(runner.prepare(image, runner.kind_params())[None])[0], runner.revision, None


def _embed_runner(settings: Settings, model: str, *, from_flag: bool = False) -> Any:
    """The retrieval model, loaded. transformers' load report (a table of every missing and unexpected
    weight, tens of lines) is not printed: a checkpoint of the wrong kind is one ModelUnavailable line,
    which names ``--model`` when the model came from it (``from_flag``) instead of the setting."""
    try:
        from transformers.utils import logging as hf_logging

        from imgq.worker.retrieval import RetrievalModel
        from imgq.worker.runners import EmbedRunner
    except ImportError as exc:
        _fail("missing_extra", f"encoding a query needs the worker extra: pip install 'imgq[worker]' ({exc})")
    runner = EmbedRunner(EmbedRunner.make_model(settings.model_copy(update={"embed_model": model})))
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        runner.load()
    except errors.ModelUnavailable as exc:
        if from_flag and exc.message.endswith(RetrievalModel.hint):
            raise errors.ModelUnavailable(exc.message.removesuffix(RetrievalModel.hint) + _MODEL_HINT) from None
        raise
    finally:
        hf_logging.set_verbosity(verbosity)
    return runner


_MODEL_HINT = "Give --model a retrieval checkpoint (e.g. one written by `imgq dev tiny-model --kind retrieval DIR`)."


def search(
    query: Annotated[str | None, typer.Argument(help="Text to search for, e.g. 'a dog on a beach'.")] = None,
    image: Annotated[str | None, typer.Option("--image", help="Find images similar to this ref instead.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Number of results.")] = 20,
    bucket: Annotated[str | None, typer.Option(help="Only images in this S3 bucket.")] = None,
    prefix: Annotated[str | None, typer.Option(help="Only keys (or local paths) starting with this.")] = None,
    model: Annotated[str | None, typer.Option(help="Retrieval model (hub id or checkpoint folder) whose vectors "
                                              "to search and that encodes the query (default: "
                                              "IMGQ_EMBED_MODEL).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Nearest images by cosine similarity of BLIP embeddings (pgvector HNSW), with their captions.

    A text query is encoded with the same retrieval model (and revision) that embedded the images,
    which needs the worker extra. `--image` uses the image's stored embedding when there is one."""
    from imgq.db.search import search as nearest
    from imgq.db.store import make_engine

    settings = _settings()
    name = model or settings.embed_model
    if (query is None) == (image is None):
        _fail("bad_request", "give a text query or --image REF (one of them)")
    engine = make_engine(settings.sync_database_url)
    try:
        exclude = None
        if image is not None:
            vector, revision, exclude = _image_vector(settings, engine, image, name, from_flag=model is not None)
        else:
            if not query or not query.strip():
                raise errors.EmptyQuery("the search text is empty")
            runner = _embed_runner(settings, name, from_flag=model is not None)
            vector, revision = runner.model.embed_query(query), runner.revision
        hits = nearest(engine, vector, model=name, revision=revision, limit=limit, bucket=bucket, prefix=prefix,
                       exclude_image_id=exclude)
    except errors.ImgqError as exc:
        _fail(exc.code, exc.message, 1 if isinstance(exc, errors.Permanent | errors.ModelUnavailable) else 2)
    finally:
        engine.dispose()
    if not hits:  # the model and revision have embeddings (else NoEmbeddings): the filters left none
        from imgq.db.search import EXACT_FILTER_MAX, MAX_SCAN_TUPLES

        where = [f"in bucket {bucket!r}"] * (bucket is not None) + [f"under prefix {prefix!r}"] * (prefix is not None)
        what = " ".join([f"no image{' other than the query image' if exclude is not None else ''} embedded by "
                         f"{name}", " and ".join(where)]).strip()
        # The index scan is approximate and bounded: with a selective filter over many images it can
        # stop before it meets a match that exists (db.search.search).
        typer.echo(f"no hits: {what} was found (the index scan reads at most {MAX_SCAN_TUPLES:,} entries; "
                   f"a --bucket of fewer than {EXACT_FILTER_MAX:,} images is searched exactly)", err=True)
    for hit in hits:
        if as_json:
            typer.echo(json.dumps({"ref": hit.ref, "similarity": round(hit.similarity, 6), "caption": hit.caption,
                                   "image_id": hit.image_id, "model_revision": hit.model_revision}))
        else:
            typer.echo(f"{hit.similarity:7.4f}  {hit.ref}  {hit.caption or ''}")


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("search")(search)
