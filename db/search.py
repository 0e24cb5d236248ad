"""Nearest-neighbour search over stored image embeddings (the SQL side; callers encode queries).

Similarity is cosine: ``1 - (a <=> b)``. A dimension N with a valid HNSW index of its own (the
partial expression index ``embeddings_hnsw_N`` on ``embedding::vector(N)`` where ``dim = N``:
migration 0003 makes the 256-d one, ``imgq db vector-index build --dim N`` any other) is searched
through it: the ORDER BY is written on ``embedding::vector(N)`` with ``dim = N`` in the WHERE
clause, the index's own expression and predicate. Other dimensions, and one whose index is
dropped or invalid, are an exact scan of the (model, revision, dim) rows. A bucket filter that
matches few images is searched exactly among them; other filters are applied during the index
scan with pgvector's iterative scan, so a selective filter still yields ``limit`` hits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
from sqlalchemy import Connection, Engine, TextClause, text

from imgq.db.jobs_view import CURRENT_VERSION_FIRST, SHARED_CAPTION
from imgq.errors import DimensionMismatch, EmptyQuery, NoEmbeddings, SearchError
from imgq.storable import unstorable

INDEXED_DIM = 256  # BLIP's dimension, indexed by migration 0003 (others: `imgq db vector-index build --dim N`)
MAX_LIMIT = 1000  # the most hits one search returns; also hnsw.ef_search's upper bound
# Iterative scans stop after this many index tuples: bounds the worst case of a filter that
# matches (almost) nothing, at the price of fewer than ``limit`` hits there.
MAX_SCAN_TUPLES = 50_000
# A bucket filter matching fewer images than this is searched exactly, not through HNSW. Exact
# costs ~3.5 us per matching image here, the filtered HNSW scan ~0.1 ms / selectivity, so the
# break-even is near sqrt(30 x stored rows) matches: ~1,700 at 100k, ~17,000 at 10M
# (docs/performance.md); raise this with the table.
EXACT_FILTER_MAX = 2_000


@dataclass(frozen=True)
class Hit:
    """One stored image close to the query."""

    image_id: int
    ref: str  # s3://bucket/key, or the local path
    similarity: float  # cosine similarity, 1 = same direction
    caption: str | None  # the image's newest BLIP (native) caption, else its newest translated one
    model_revision: str
    width: int
    height: int


_SPACES = text("""
SELECT model_revision, dim, count(*) AS n FROM embeddings WHERE model = :model
GROUP BY model_revision, dim ORDER BY n DESC, model_revision
""")


# Only an object's current version is found, the one a worker saw last (images.last_seen): images
# keeps a row per version (an overwritten S3 object, an edited file), and the old one's vector, of
# content that is gone, came back beside the new one (found by an analyst's walkthrough). One probe
# of images_object_version per candidate. A current version not embedded yet leaves the object out.
_IMAGE_FILTERS = """
  AND (CAST(:bucket AS text) IS NULL OR im.bucket = :bucket)
  AND (CAST(:prefix AS text) IS NULL OR im.key LIKE :prefix ESCAPE '\\')
  AND NOT EXISTS (SELECT 1 FROM images newer WHERE newer.source = im.source AND newer.bucket = im.bucket
                  AND newer.key = im.key AND (coalesce(newer.last_seen, newer.first_seen), newer.id)
                                             > (coalesce(im.last_seen, im.first_seen), im.id))"""
_EXCLUDE = """
  AND (CAST(:exclude AS bigint) IS NULL OR e.image_id <> :exclude)"""

# The inner queries find the nearest rows; the outer query sorts them again (relaxed_order: an
# iterative scan may return rows slightly out of order) and only then joins what is shown: the
# image's ref and size and its newest BLIP caption, or failing that its newest caption in
# another language (a LATERAL probe per hit): a search reads in English. The HTTP API asks for
# shared captions only (``:shared``), as /v1/images shows them. The sort is on
# ``distance + 0``: Postgres 17+ knows the CTE's rows come ordered by ``distance`` (its ORDER BY)
# and would trust that order (an Incremental Sort on image_id only), disorder included.
_OUTER = """
WITH {ctes}
SELECT nn.image_id, nn.model_revision, 1 - nn.distance AS similarity,
       CASE im.source WHEN 's3' THEN 's3://' || im.bucket || '/' || im.key ELSE im.key END AS ref,
       im.width, im.height, cap.text AS caption
FROM nn JOIN images im ON im.id = nn.image_id
LEFT JOIN LATERAL (
  SELECT c.text FROM captions c WHERE c.image_id = nn.image_id
    AND (NOT CAST(:shared AS boolean) OR ({shared}))
  ORDER BY c.method = 'native' DESC, c.created_at DESC, c.id DESC LIMIT 1
) cap ON true
ORDER BY nn.distance + 0, nn.image_id
"""

_SPACE = "e.model = :model AND e.model_revision = :rev"


def _hnsw(dim: int, gate: str = "") -> str:
    """What the HNSW index of ``dim`` answers: its expression, and its predicate as a literal (a
    partial index serves only a query whose WHERE clause implies it, which a parameter cannot).
    Image filters are checked as the index scan goes (iterative scan)."""
    distance = f"e.embedding::vector({int(dim)}) <=> CAST(:q AS vector({int(dim)}))"
    return f"""
  SELECT e.image_id, e.model_revision, {distance} AS distance
  FROM embeddings e JOIN images im ON im.id = e.image_id
  WHERE e.dim = {int(dim)} AND {_SPACE} {gate} {_IMAGE_FILTERS} {_EXCLUDE}
  ORDER BY {distance}
  LIMIT :limit"""


# Exact: written on the untyped column so that no HNSW index can serve the ORDER BY.
_EXACT = f"""
  SELECT e.image_id, e.model_revision, e.embedding <=> CAST(:q AS vector) AS distance
  FROM embeddings e JOIN images im ON im.id = e.image_id
  WHERE e.dim = :dim AND {_SPACE} {_IMAGE_FILTERS} {_EXCLUDE}
  ORDER BY e.embedding <=> CAST(:q AS vector)
  LIMIT :limit"""

# With a bucket filter, one statement picks its strategy by how many images match, counted up to
# EXACT_FILTER_MAX on images_bucket_key_prefix (cheap next to the search; a prefix is a range of
# it, migration 0017): that few are searched
# exactly (recall 1, cost in proportion to the matches); more go through the HNSW iterative scan,
# whose cost grows as 1 / selectivity (10 ms at 1 % of 100k here, where exact took 5 ms). The
# planner alone takes HNSW for both: its costing cannot tell. The count is an initplan, and the
# branch whose gate is false is never run. A prefix without a bucket has no index to count with
# (it would be a scan of images), so it always takes the HNSW scan.
_FILTERED_CTES = """f AS MATERIALIZED (
  SELECT im.id FROM images im WHERE true {filters} LIMIT :exact_max
), few AS (SELECT count(*) < :exact_max AS yes FROM f),
nn AS MATERIALIZED ((
  SELECT e.image_id, e.model_revision, e.embedding <=> CAST(:q AS vector) AS distance
  FROM f JOIN embeddings e ON e.image_id = f.id
  WHERE e.dim = {dim} AND {space} AND (SELECT yes FROM few) {exclude}
  ORDER BY e.embedding <=> CAST(:q AS vector)
  LIMIT :limit
) UNION ALL ({hnsw}
))"""


@lru_cache(maxsize=64)
def search_indexed(dim: int) -> TextClause:
    """The search of a ``dim``-d space through its HNSW index."""
    return text(_OUTER.format(ctes=f"nn AS MATERIALIZED ({_hnsw(dim)})", shared=SHARED_CAPTION))


@lru_cache(maxsize=64)
def search_filtered(dim: int) -> TextClause:
    """The search of a ``dim``-d space with a bucket filter: exact among few matches, else HNSW."""
    return text(_OUTER.format(ctes=_FILTERED_CTES.format(
        filters=_IMAGE_FILTERS, dim=int(dim), space=_SPACE, exclude=_EXCLUDE,
        hnsw=_hnsw(dim, "AND NOT (SELECT yes FROM few)")), shared=SHARED_CAPTION))


SEARCH_INDEXED = search_indexed(INDEXED_DIM)
SEARCH_FILTERED = search_filtered(INDEXED_DIM)
SEARCH_EXACT = text(_OUTER.format(ctes=f"nn AS MATERIALIZED ({_EXACT})", shared=SHARED_CAPTION))

# Runs before every search, in the same round trip:
# - two index probes on embeddings_model (not a count): is there a space of this dimension?
# - does the dimension have a valid HNSW cosine index of its own (its expression and predicate,
#   whatever its name)? An index being built CONCURRENTLY, or left invalid by an interrupted
#   build, is not: the planner would not use it, and the search is an exact scan.
# - the settings, with set_config(..., is_local => true): SET LOCAL with bind parameters, undone
#   at the end of the search's transaction, so pooled connections keep the server defaults.
# plan_cache_mode: psycopg prepares a statement server-side after 5 executions, and Postgres then
# may switch to a generic plan, which cannot see the LIMIT or which filters are NULL: it chose a
# full sort over the HNSW scan and took 8-9 ms instead of ~1 ms on 5k rows (docs/performance.md).
_PROBE = text("""
SELECT EXISTS (SELECT 1 FROM embeddings WHERE model = :model AND model_revision = :rev AND dim = :dim),
       (SELECT dim FROM embeddings WHERE model = :model AND model_revision = :rev LIMIT 1),
       EXISTS (SELECT 1 FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
               JOIN pg_am am ON am.oid = i.relam JOIN pg_opclass oc ON oc.oid = x.indclass[0]
               WHERE x.indrelid = CAST('embeddings' AS regclass) AND x.indisvalid AND x.indnatts = 1
                 AND am.amname = 'hnsw' AND oc.opcname = 'vector_cosine_ops'
                 AND pg_get_expr(x.indexprs, x.indrelid) = format('(embedding)::vector(%s)', CAST(:dim AS int))
                 AND pg_get_expr(x.indpred, x.indrelid) = format('(dim = %s)', CAST(:dim AS int))),
       set_config('plan_cache_mode', 'force_custom_plan', true),
       set_config('hnsw.ef_search', :ef, true), set_config('hnsw.iterative_scan', 'relaxed_order', true),
       set_config('hnsw.max_scan_tuples', :max_scan, true)
""")

_STORED = text(f"""
SELECT im.id, CAST(e.embedding AS text), e.model_revision
FROM images im JOIN embeddings e ON e.image_id = im.id
WHERE im.source = :source AND im.bucket = :bucket AND im.key = :key
  AND e.model = :model AND (CAST(:rev AS text) IS NULL OR e.model_revision = :rev)
ORDER BY {CURRENT_VERSION_FIRST}, e.created_at DESC, e.id DESC
LIMIT 1
""")


def ef_search(limit: int) -> int:
    """The HNSW candidate list for ``limit`` hits: 2x the hits, at least 64. On 100k clustered
    vectors, 64 rather than pgvector's default 40 took recall@10 from 0.957 to 0.967 for +0.3 ms,
    and made filtered (iterative) scans faster, as they need fewer rounds (docs/performance.md)."""
    return min(MAX_LIMIT, max(64, 2 * limit))


def like_prefix(prefix: str) -> str:
    """A LIKE pattern matching keys that start with ``prefix`` literally (``%`` and ``_`` too)."""
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def vector_literal(vector: np.ndarray) -> str:
    """pgvector text for a float32 vector; 9 significant digits round-trip every float32 exactly."""
    return "[" + ",".join([f"{v:.9g}" for v in vector.tolist()]) + "]"


def parse_vector(literal: str) -> np.ndarray:
    return np.array(literal.strip("[]").split(","), dtype=np.float32)


def query_vector(vector: Sequence[float] | np.ndarray) -> np.ndarray:
    """The query as a finite 1-D float32 array, or an EmptyQuery / SearchError."""
    q = np.asarray(vector, dtype=np.float32)
    if q.size == 0:
        raise EmptyQuery("the query vector is empty")
    if q.ndim != 1:
        raise SearchError(f"the query vector must be 1-D; got shape {q.shape}")
    if not np.isfinite(q).all():
        raise SearchError("the query vector has NaN or infinite values")
    if not q.any():
        raise EmptyQuery("the query vector is all zeros: cosine similarity is undefined")
    return q


def spaces(engine: Engine, model: str) -> list[tuple[str, int, int]]:
    """(model_revision, dim, count) of the embeddings stored for ``model``, largest first."""
    with engine.connect() as conn:
        return [(rev, int(dim), int(n)) for rev, dim, n in conn.execute(_SPACES, {"model": model})]


def _describe(conn: Connection, model: str) -> str:
    found = [(rev, int(dim), int(n)) for rev, dim, n in conn.execute(_SPACES, {"model": model})]
    if not found:
        return f"nothing is stored for model {model!r}"
    return "stored revisions: " + ", ".join(f"{rev} ({dim}-d, {n:,} images)" for rev, dim, n in found)


def _check_space_and_tune(conn: Connection, model: str, revision: str, dim: int, limit: int) -> bool:
    """Check the space exists; tune this transaction; whether ``dim`` has a valid HNSW index."""
    settings = {"ef": str(ef_search(limit)), "max_scan": str(MAX_SCAN_TUPLES)}
    match, stored_dim, indexed, *_ = conn.execute(
        _PROBE, {"model": model, "rev": revision, "dim": dim, **settings}).one()
    if match:
        return bool(indexed)
    if stored_dim is None:
        raise NoEmbeddings(f"no embeddings for model {model!r} revision {revision!r}; {_describe(conn, model)}")
    raise DimensionMismatch(
        f"query vector has {dim} dimensions but model {model!r} revision {revision!r} stores {stored_dim}"
    )


def _params(
    q: np.ndarray, model: str, revision: str, limit: int, bucket: str | None, prefix: str | None,
    exclude_image_id: int | None, shared_captions: bool = False,
) -> dict[str, Any]:
    if not 1 <= limit <= MAX_LIMIT:
        raise SearchError(f"limit must be between 1 and {MAX_LIMIT}; got {limit}")
    for name, value in (("bucket", bucket), ("prefix", prefix)):
        if value is not None and (reason := unstorable(value)) is not None:
            raise SearchError(f"{name} contains {reason}")
    return {
        "q": vector_literal(q),
        "model": model,
        "rev": revision,
        "dim": int(q.size),
        "limit": limit,
        "bucket": bucket,
        "prefix": like_prefix(prefix) if prefix else None,
        "exclude": exclude_image_id,
        "exact_max": EXACT_FILTER_MAX,
        "shared": shared_captions,
    }


def _run(conn: Connection, q: np.ndarray, params: dict[str, Any], *, explain: bool = False) -> Any:
    """Check the space, tune the planner and index scan for this transaction, run the search (or
    EXPLAIN it)."""
    indexed = _check_space_and_tune(conn, params["model"], params["rev"], q.size, params["limit"])
    if not indexed:
        sql = SEARCH_EXACT
    elif params["bucket"] is not None:
        sql = search_filtered(int(q.size))
    else:
        sql = search_indexed(int(q.size))
    if explain:
        sql = text("EXPLAIN (ANALYZE, BUFFERS) " + sql.text)
    return conn.execute(sql, params)


def search(
    engine: Engine,
    vector: Sequence[float] | np.ndarray,
    *,
    model: str,
    revision: str,
    limit: int = 20,
    bucket: str | None = None,
    prefix: str | None = None,
    exclude_image_id: int | None = None,
    shared_captions: bool = False,
) -> list[Hit]:
    """The ``limit`` stored images of (model, revision) most similar to ``vector``, best first.

    ``bucket`` matches exactly ('' for local files); ``prefix`` matches the start of the S3 key or
    local path. HNSW is approximate (recall@10 on 100k clustered vectors: docs/performance.md).
    A filter so selective that ``MAX_SCAN_TUPLES`` index tuples hold fewer than ``limit``
    matches may return fewer hits (the planner usually filters first and scans exactly there).
    With ``shared_captions`` each hit's caption is one no tenant's choices shaped
    (``SHARED_CAPTION``): the HTTP API's, for tenants who share a bucket."""
    q = query_vector(vector)
    params = _params(q, model, revision, limit, bucket, prefix, exclude_image_id, shared_captions)
    with engine.begin() as conn:  # a transaction, so set_config(..., true) applies to the search
        return [
            Hit(image_id=r.image_id, ref=r.ref, similarity=float(r.similarity), caption=r.caption,
                model_revision=r.model_revision, width=r.width, height=r.height)
            for r in _run(conn, q, params)
        ]


def explain(
    engine: Engine,
    vector: Sequence[float] | np.ndarray,
    *,
    model: str,
    revision: str,
    limit: int = 20,
    bucket: str | None = None,
    prefix: str | None = None,
    exclude_image_id: int | None = None,
) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of exactly what ``search`` runs with these arguments."""
    q = query_vector(vector)
    params = _params(q, model, revision, limit, bucket, prefix, exclude_image_id)
    with engine.begin() as conn:
        return "\n".join(line for (line,) in _run(conn, q, params, explain=True))


def stored_vector(
    engine: Engine, *, model: str, revision: str | None, source: str, bucket: str, key: str
) -> tuple[int, np.ndarray, str] | None:
    """(image_id, vector, revision) for the newest version of an object that has an embedding of
    ``model`` (at ``revision``, or the newest embedding of any revision), or None: "more like this"."""
    with engine.connect() as conn:
        row = conn.execute(
            _STORED, {"model": model, "rev": revision, "source": source, "bucket": bucket, "key": key}
        ).first()
    if row is None:
        return None
    image_id, literal, rev = row
    return int(image_id), parse_vector(literal), rev
