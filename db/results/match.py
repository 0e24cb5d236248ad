"""Image-text match scores (alt-text audit): one row per (image version, model, revision, params,
text); the ITM head's match probability and the cosine of the projected embeddings."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text

from imgq.db.results.caption import groups
from imgq.ports import ResultRow

_WRITE = text("""
WITH v AS (
  SELECT * FROM unnest(CAST(:job AS uuid[]), CAST(:seq AS int[]), CAST(:image_id AS bigint[]),
                       CAST(:txt AS text[]), CAST(:thash AS text[]), CAST(:itm AS float8[]),
                       CAST(:cos AS float8[])) AS v(job_id, seq, image_id, txt, thash, itm, cos)
), r AS (
  INSERT INTO matches (image_id, model, model_revision, params_hash, params, text_hash, text, itm_score, cosine)
  SELECT DISTINCT ON (image_id, thash) image_id, :model, :rev, :phash, CAST(:params AS jsonb), thash, txt, itm, cos
  FROM v ORDER BY image_id, thash, seq
  ON CONFLICT ON CONSTRAINT matches_identity DO UPDATE SET itm_score = matches.itm_score
  RETURNING id, image_id, text_hash
)
UPDATE job_items AS j SET match_id = r.id
FROM v JOIN r ON r.image_id = v.image_id AND r.text_hash = v.thash
WHERE j.job_id = v.job_id AND j.seq = v.seq AND j.state IN ('queued', 'running')
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

    def write(self, conn: Any, rows: Sequence[ResultRow]) -> None:
        for (model, rev, phash), group in groups(rows).items():
            texts = [r.text or "" for r in group]
            conn.execute(_WRITE, {
                "job": [r.job for r in group], "seq": [r.seq for r in group],
                "image_id": [r.image_id for r in group], "txt": texts, "thash": [text_hash(t) for t in texts],
                "itm": [float(r.value[0]) for r in group], "cos": [float(r.value[1]) for r in group],
                "model": model, "rev": rev, "phash": phash, "params": json.dumps(group[0].params),
            })
