"""Image-text match scores (alt-text audit): one row per (image version, model, revision, params,
text); the ITM head's match probability and the cosine of the projected embeddings."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text

from imgq.db.arrays import Binary
from imgq.db.results.caption import groups
from imgq.ports import ResultRow

_WRITE = text("""
INSERT INTO matches (image_id, model, model_revision, params_hash, params, text_hash, text, itm_score, cosine)
SELECT DISTINCT ON (image_id, thash) image_id, :model, :rev, :phash, CAST(:params AS jsonb), thash, txt, itm, cos
FROM unnest(CAST(:image_id AS bigint[]), CAST(:txt AS text[]), CAST(:thash AS text[]), CAST(:itm AS float8[]),
            CAST(:cos AS float8[])) WITH ORDINALITY AS v(image_id, txt, thash, itm, cos, n)
ORDER BY image_id, thash, n
ON CONFLICT ON CONSTRAINT matches_identity DO UPDATE SET itm_score = matches.itm_score
RETURNING image_id, text_hash, id
""")


def text_hash(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()[:32]


class MatchWriter:
    """Writes the ``matches`` table and links ``job_items.match_id``."""

    kind = "validate"
    table = "matches"
    link_column = "match_id"
    identity_columns = "image_id, model, model_revision, params_hash, text_hash"
    results_columns = "i.text AS text, r_validate.itm_score AS itm_score, r_validate.cosine AS cosine"

    def write(self, conn: Any, rows: Sequence[ResultRow]) -> dict[tuple[uuid.UUID, int], int]:
        ids: dict[tuple[uuid.UUID, int], int] = {}
        for (model, rev, phash), group in groups(rows).items():
            texts = [r.text or "" for r in group]
            hashes = [text_hash(t) for t in texts]
            found = {(image_id, th): rid for image_id, th, rid in conn.execute(_WRITE, {
                "image_id": Binary(r.image_id for r in group), "txt": Binary(texts), "thash": Binary(hashes),
                "itm": Binary(float(r.value[0]) for r in group), "cos": Binary(float(r.value[1]) for r in group),
                "model": model, "rev": rev, "phash": phash, "params": json.dumps(group[0].params),
            })}
            ids.update({(r.job, r.seq): found[(r.image_id, th)] for r, th in zip(group, hashes, strict=True)})
        return ids
