"""/v1/images (an object's latest caption and embedding) and /v1/search, within the tenant's sources.

Tenants may share a bucket, so what these show of an object is what any of them may see: its
embedding, and captions made without a prompt or an adapter (a tenant's own choices, which the
text or its params would show). A job's own results are at /v1/jobs/{id}/results.

A ref outside the caller's sources is a 422 ``source_not_allowed`` whether or not anything is
stored for it. Search runs once per source of the tenant (each bucket, each root as a path
prefix; db/search.py filters by bucket and prefix) and merges the hits, so one tenant's search
never returns another's images. A text query is encoded in this process by the retrieval model
(the worker extra), loaded on the first text search; an image query uses the image's stored
embedding and needs no model.
"""

from __future__ import annotations

import threading
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from imgq.db import jobs_view
from imgq.languages import language
from imgq.producer.api.auth import Caller
from imgq.producer.api.problems import BODY_TOO_LARGE, KEYED, ApiProblem, documented, not_found
from imgq.producer.api.schemas import ImageResult, SearchRequest, SearchResult
from imgq.producer.api.sources import not_allowed, parse_scoped, tenant_settings
from imgq.refs import S3Ref

router = APIRouter(prefix="/v1", tags=["images"])

_encoder_lock = threading.Lock()


def _object(ref: Any) -> tuple[str, str, str]:
    """(source, bucket, key) as the images table stores a ref."""
    return ("s3", ref.bucket, ref.key) if isinstance(ref, S3Ref) else ("local", "", str(ref))


@router.get("/images", response_model=ImageResult, responses={
    **KEYED,
    404: documented("Neither a caption nor an embedding is stored for that object (`image_not_found`)"),
    422: documented("Refused: `validation_error`, `unknown_language` (`lang`), `source_not_allowed`, `bad_ref`")})
def image(request: Request, caller: Caller, ref: Annotated[str, Query(min_length=1, max_length=2048)],
          vector: bool = False,
          lang: Annotated[str, Query(min_length=2, max_length=8, description="The caption's language: en (BLIP's "
                                     "own) or a language captions were translated into.")] = "en") -> ImageResult:
    """The latest shared caption (in ``lang``) and the latest embedding stored for one object (its
    newest version that has each). Shared: made without a prompt or an adapter, which are one
    tenant's choices; a job's own results, those included, are at /v1/jobs/{id}/results. The
    embedding's vector only with ``vector=true``."""
    context = request.app.state.imgq
    code = language(lang).code
    parsed = parse_scoped(ref, tenant_settings(context.settings, caller))
    source, bucket, key = _object(parsed)
    found = jobs_view.latest_image(context.engine, source=source, bucket=bucket, key=key, vector=vector, lang=code)
    if found is None:
        raise not_found("image")
    return ImageResult(ref=str(parsed), **found)


def _scopes(body: SearchRequest, scoped: Any) -> list[tuple[str, str | None]]:
    """(bucket, prefix) filters that together cover exactly the tenant's sources asked for."""
    if body.bucket is not None:
        if body.bucket not in scoped.allowed_buckets:
            raise not_allowed(f"s3://{body.bucket}/", submitting=False)
        return [(body.bucket, body.prefix)]
    scopes: list[tuple[str, str | None]] = [(b, body.prefix) for b in scoped.allowed_buckets]
    for root in scoped.local_roots:
        inside = str(root).rstrip("/") + "/"
        if body.prefix is None:
            scopes.append(("", inside))
        elif body.prefix.startswith(inside):
            scopes.append(("", body.prefix))
        elif inside.startswith(body.prefix):
            scopes.append(("", inside))
    return scopes


def _encode_text(context: Any, text: str) -> tuple[Any, str]:
    from imgq.errors import EmptyQuery

    if not text.strip():
        raise EmptyQuery("the search text is empty")
    with _encoder_lock:
        if getattr(context, "encoder", None) is None:
            try:
                from imgq.worker.runners import EmbedRunner
            except ImportError as exc:
                raise ApiProblem(501, "missing_extra", "text search needs the worker extra on the API host "
                                 f"(pip install 'imgq[worker]'): {exc}; search by image works without it") from None
            runner = EmbedRunner(EmbedRunner.make_model(context.settings))
            runner.load()
            context.encoder = runner
        runner = context.encoder
        return runner.model.embed_query(text), runner.revision


@router.post("/search", response_model=SearchResult, responses={
    **KEYED,
    413: BODY_TOO_LARGE,
    422: documented("Refused: `validation_error`, `source_not_allowed`, `bad_ref`, `image_not_embedded`, "
                    "`empty_query`, `no_embeddings`, `dim_mismatch`, `search_error`"),
    500: documented("A bug (`internal_error`; it is logged), or a text search whose retrieval model cannot be "
                    "loaded (`model_unavailable`)"),
    501: documented("A text search on an API host without the worker extra (`missing_extra`)")})
def search(body: SearchRequest, request: Request, caller: Caller) -> SearchResult:
    """Nearest images to a text or to an image's stored embedding (cosine, IMGQ_EMBED_MODEL's
    vectors), within this tenant's sources, best first; each hit with its newest shared caption
    (as /v1/images: none made with a prompt or an adapter)."""
    from imgq.db.search import search as nearest
    from imgq.db.search import stored_vector

    context = request.app.state.imgq
    settings = context.settings
    scoped = tenant_settings(settings, caller)
    exclude = None
    if body.image is not None:
        source, bucket, key = _object(parse_scoped(body.image, scoped))
        found = stored_vector(context.engine, model=settings.embed_model, revision=None, source=source,
                              bucket=bucket, key=key)
        if found is None:
            raise ApiProblem(422, "image_not_embedded", f"{body.image!r} has no stored embedding of "
                             f"{settings.embed_model}: embed it first (a job of kind embed)")
        exclude, vector, revision = found
    else:
        vector, revision = _encode_text(context, body.text or "")
    hits: dict[int, Any] = {}
    for bucket_filter, prefix in _scopes(body, scoped):
        for hit in nearest(context.engine, vector, model=settings.embed_model, revision=revision, limit=body.limit,
                           bucket=bucket_filter, prefix=prefix, exclude_image_id=exclude, shared_captions=True):
            hits.setdefault(hit.image_id, hit)
    best = sorted(hits.values(), key=lambda h: (-h.similarity, h.image_id))[: body.limit]
    return SearchResult(hits=[{"ref": h.ref, "similarity": round(h.similarity, 6), "caption": h.caption,
                               "model_revision": h.model_revision, "width": h.width, "height": h.height}
                              for h in best])
