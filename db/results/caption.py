"""Captions: one row per (image version, model, revision, params); the first stored text wins."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text

from imgq.ports import ResultRow

# DISTINCT ON keeps the upsert from touching one row twice; a no-op DO UPDATE returns the id of
# the row that won, so a redelivered item links to the first caption. The store links the items
# (one UPDATE of job_items for every kind at once).
_WRITE = text("""
INSERT INTO captions (image_id, model, model_revision, params_hash, params, text)
SELECT DISTINCT ON (image_id) image_id, :model, :rev, :phash, CAST(:params AS jsonb), txt
FROM unnest(CAST(:image_id AS bigint[]), CAST(:txt AS text[])) WITH ORDINALITY AS v(image_id, txt, n)
ORDER BY image_id, n
ON CONFLICT ON CONSTRAINT captions_identity DO UPDATE SET text = captions.text
RETURNING image_id, id
""")


def groups(rows: Sequence[ResultRow]) -> dict[tuple[str, str, str], list[ResultRow]]:
    """Rows by (model, revision, params hash): one statement per group, constant SQL text."""
    out: dict[tuple[str, str, str], list[ResultRow]] = {}
    for row in rows:
        out.setdefault((row.model, row.model_revision, row.params_hash), []).append(row)
    return out


class CaptionWriter:
    """Writes the ``captions`` table and links ``job_items.caption_id``."""

    kind = "caption"
    table = "captions"
    link_column = "caption_id"
    results_columns = "r_caption.text AS caption"

    def write(self, conn: Any, rows: Sequence[ResultRow]) -> dict[tuple[uuid.UUID, int], int]:
        ids: dict[tuple[uuid.UUID, int], int] = {}
        for (model, rev, phash), group in groups(rows).items():
            by_image = dict(conn.execute(_WRITE, {
                "image_id": [r.image_id for r in group], "txt": [str(r.value) for r in group],
                "model": model, "rev": rev, "phash": phash, "params": json.dumps(group[0].params),
            }).all())
            ids.update({(r.job, r.seq): by_image[r.image_id] for r in group})
        return ids
