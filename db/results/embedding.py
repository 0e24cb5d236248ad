"""The ``embed`` kind's result writer: image embeddings into ``embeddings`` (pgvector).

Vectors travel in pgvector's binary format as one ``vector[]`` parameter. Measured on this 2-core
machine for 256 rows x 256-d (bench/embed_writes.py, docs/performance.md): text literals cost
~15 ms to format in Python plus ~17 ms for the server to parse; the binary array costs ~1 ms all
told, and round-trips float32 exactly.
"""

from __future__ import annotations

import json
import uuid
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
from pgvector.psycopg.vector import register_vector_info
from psycopg.types import TypeInfo

from imgq.ports import ResultRow

# One statement per (model, revision, params) group: insert the new vectors and link their items.
# DISTINCT ON keeps two items of one image from inserting twice. DO NOTHING rather than a no-op
# DO UPDATE: an update of an existing row is a new tuple version, which on a full heap page is a
# non-HOT update and so a new HNSW graph entry, as costly as the first insert (a re-run over
# images that are already embedded would pay the index twice and bloat it). Items whose identity
# already existed are linked by _LINK_EXISTING, a second statement that runs only when needed.
# The item's state is left alone: the store finishes items once every kind is written.
_INSERT = """
INSERT INTO embeddings (image_id, model, model_revision, params_hash, params, dim, embedding)
SELECT DISTINCT ON (image_id) image_id, %(model)s, %(rev)s, %(phash)s, %(params)s::jsonb,
       vector_dims(embedding), embedding
FROM unnest(%(image_id)s::bigint[], %(vec)b::vector[]) WITH ORDINALITY AS v(image_id, embedding, n)
ORDER BY image_id, n
ON CONFLICT ON CONSTRAINT embeddings_identity DO NOTHING
RETURNING image_id, id
"""

# A separate statement on purpose: in READ COMMITTED it takes a new snapshot, so it also sees a
# row that a concurrent transaction committed while our INSERT waited on it (the INSERT skipped
# that row as a conflict, but its own snapshot cannot read it). First stored wins.
_EXISTING = """
SELECT image_id, id FROM embeddings
WHERE image_id = ANY(%(image_id)s::bigint[]) AND model = %(model)s AND model_revision = %(rev)s
  AND params_hash = %(phash)s
"""

# The vector type's OID differs per database; looking it up is a round trip, so it is cached per
# driver connection (pooled connections live long).
_VECTOR_TYPE: weakref.WeakKeyDictionary[Any, TypeInfo] = weakref.WeakKeyDictionary()


def _vector_cursor(conn: Any) -> Any:
    """A psycopg cursor on ``conn``'s transaction that sends numpy arrays as binary vectors.

    The adapters are registered on the cursor only: registering them on the pooled connection
    would change what every later query on it gets back for vector columns."""
    raw = conn.connection.driver_connection
    info = _VECTOR_TYPE.get(raw)
    if info is None:
        info = TypeInfo.fetch(raw, "vector")
        if info is None:
            raise RuntimeError("the pgvector extension is not installed in this database (run imgq db upgrade)")
        _VECTOR_TYPE[raw] = info
    cur = raw.cursor()
    register_vector_info(cur, info)
    return cur


def _vector(row: ResultRow) -> np.ndarray:
    value = np.asarray(row.value, dtype=np.float32)
    if value.ndim != 1 or value.size == 0:
        raise ValueError(f"embedding of job {row.job} item {row.seq} has shape {value.shape}; want a 1-D vector")
    if not np.isfinite(value).all():
        # pgvector refuses NaN/inf and would fail the whole batch with a less specific error.
        raise ValueError(f"embedding of job {row.job} item {row.seq} has NaN or infinite values")
    return value


class EmbeddingWriter:
    """Writes ``embed`` results: one ``embeddings`` row per (image, model, revision, params), the
    first stored vector wins, and each item's ``job_items.embedding_id`` points at it.

    ``results_columns`` gives the revision and dimension, not the vector: 256 floats are ~3 kB of
    text per row, which would dominate an export of a large job. ``VECTOR_COLUMN`` is the
    opt-in select-list entry for the vector as pgvector text (``[0.1,0.2,...]``, float32-exact).
    """

    kind = "embed"
    table = "embeddings"
    link_column = "embedding_id"
    results_columns = "r_embed.model_revision AS embedding_revision, r_embed.dim AS embedding_dim"
    VECTOR_COLUMN = "CAST(r_embed.embedding AS text) AS embedding"

    def write(self, conn: Any, rows: Sequence[ResultRow]) -> dict[tuple[uuid.UUID, int], int]:
        """Store ``rows`` inside the caller's transaction (``conn``: a SQLAlchemy Connection);
        returns each item's embedding id (the store links the items)."""
        ids: dict[tuple[uuid.UUID, int], int] = {}
        if not rows:
            return ids
        groups: dict[tuple[str, str, str], list[ResultRow]] = {}
        for r in rows:
            groups.setdefault((r.model, r.model_revision, r.params_hash), []).append(r)
        with _vector_cursor(conn) as cur:
            for (model, rev, phash), group in groups.items():
                params = {"image_id": [r.image_id for r in group], "model": model, "rev": rev, "phash": phash}
                by_image = dict(cur.execute(
                    _INSERT, params | {"vec": [_vector(r) for r in group], "params": json.dumps(group[0].params)}
                ).fetchall())
                if len(by_image) < len({r.image_id for r in group}):
                    by_image |= dict(cur.execute(_EXISTING, params).fetchall())
                ids.update({(r.job, r.seq): by_image[r.image_id] for r in group})
        return ids
