"""Captions: one row per (image version, model, revision, params); the first stored text wins.

An explained caption (``explain`` in its params, so its own identity) also gets one
``caption_explanations`` row, written in the same transaction; the first stored wins, except that
overlays written by a later delivery fill in a location the first one lacked.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import text

from imgq.db.arrays import Binary
from imgq.ports import CaptionText, ResultRow

# DISTINCT ON keeps the upsert from touching one row twice; a no-op DO UPDATE returns the id of
# the row that won, so a redelivered item links to the first caption. The store links the items
# (one UPDATE of job_items for every kind at once).
_WRITE = text("""
INSERT INTO captions (image_id, model, model_revision, params_hash, params, text, lang, method, via, via_revision)
SELECT DISTINCT ON (image_id) image_id, :model, :rev, :phash, CAST(:params AS jsonb), txt, :lang, :method, :via,
       :via_rev
FROM unnest(CAST(:image_id AS bigint[]), CAST(:txt AS text[])) WITH ORDINALITY AS v(image_id, txt, n)
ORDER BY image_id, n
ON CONFLICT ON CONSTRAINT captions_identity DO UPDATE SET text = captions.text
RETURNING image_id, id
""")

# A caption's identity: BLIP's model, revision and params, and what made it another language.
IDENTITY = "image_id, model, model_revision, params_hash, lang, method, via, via_revision"


def how(value: Any) -> dict[str, str]:
    """The language columns of a caption value (a plain str is BLIP's own English)."""
    if isinstance(value, CaptionText):
        return {"lang": value.lang, "method": value.method, "via": value.via, "via_rev": value.via_revision}
    return {"lang": "en", "method": "native", "via": "", "via_rev": ""}


_WRITE_EXPLANATIONS = text("""
INSERT INTO caption_explanations (caption_id, grid_rows, grid_cols, input_size, heads, layers, tokens, words,
                                  maps, overlays)
SELECT DISTINCT ON (caption_id) caption_id, grid_rows, grid_cols, input_size, heads, layers, tokens, words,
       maps, overlays
FROM unnest(CAST(:caption_id AS bigint[]), CAST(:grid_rows AS int[]), CAST(:grid_cols AS int[]),
            CAST(:input_size AS int[]), CAST(:heads AS text[]), CAST(:layers AS text[]),
            CAST(:tokens AS jsonb[]), CAST(:words AS jsonb[]), CAST(:maps AS bytea[]), CAST(:overlays AS text[]))
     WITH ORDINALITY AS v(caption_id, grid_rows, grid_cols, input_size, heads, layers, tokens, words, maps,
                          overlays, n)
ORDER BY caption_id, n
ON CONFLICT (caption_id) DO UPDATE
SET overlays = coalesce(caption_explanations.overlays, EXCLUDED.overlays)
""")

# `imgq results --explain`: one row per item, with the explanation of its caption.
EXPLANATIONS = text("""
SELECT i.seq, i.ref, c.text AS caption, c.params->>'resize' AS resize, im.width, im.height,
       x.grid_rows, x.grid_cols, x.input_size, x.words, x.overlays
FROM job_items i
JOIN captions c ON c.id = i.caption_id
LEFT JOIN caption_explanations x ON x.caption_id = c.id
LEFT JOIN images im ON im.id = i.image_id
WHERE i.job_id = :job ORDER BY i.seq
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
    identity_columns = IDENTITY
    results_columns = "r_caption.text AS caption"

    def write(self, conn: Any, rows: Sequence[ResultRow]) -> dict[tuple[uuid.UUID, int], int]:
        ids: dict[tuple[uuid.UUID, int], int] = {}
        by_how: dict[tuple[Any, ...], list[ResultRow]] = {}
        for r in rows:
            # A params hash names an adapter, not its revision or language: an adapter registered
            # again between two batches that one write coalesces is two groups (found by review).
            by_how.setdefault((r.model, r.model_revision, r.params_hash, *how(r.value).values()), []).append(r)
        for (model, rev, phash, *_), group in by_how.items():
            by_image = dict(conn.execute(_WRITE, {
                "image_id": Binary(r.image_id for r in group), "txt": Binary(str(r.value) for r in group),
                "model": model, "rev": rev, "phash": phash, "params": json.dumps(group[0].params),
                **how(group[0].value),
            }).all())
            ids.update({(r.job, r.seq): by_image[r.image_id] for r in group})
            explained = [(by_image[r.image_id], r.value.summary) for r in group if hasattr(r.value, "summary")]
            if explained:
                conn.execute(_WRITE_EXPLANATIONS, {
                    "caption_id": [cid for cid, _ in explained],
                    **{col: [x[col] for _, x in explained]
                       for col in ("grid_rows", "grid_cols", "input_size", "heads", "layers", "maps", "overlays")},
                    "tokens": [json.dumps(x["tokens"]) for _, x in explained],
                    "words": [json.dumps(x["words"]) for _, x in explained],
                })
        return ids


def explanations(conn: Any, job: uuid.UUID) -> Iterator[dict[str, Any]]:
    """Each item of ``job`` with its caption's explanation: where the overlays are, and each word's
    top patch with its box on the original image (``explanation`` is null for a caption enqueued
    without ``--explain``)."""
    from imgq.explain import Geometry

    for row in conn.execute(EXPLANATIONS, {"job": job}).mappings():
        out: dict[str, Any] = {"seq": row["seq"], "ref": row["ref"], "caption": row["caption"],
                               "overlays": row["overlays"], "words": None}
        if row["words"] is not None:
            grid = (row["grid_rows"], row["grid_cols"])
            geometry = (Geometry.of(row["resize"] or "stretch", row["width"], row["height"], row["input_size"])
                        if row["width"] and row["height"] else None)
            out["words"] = [{"text": w["text"], "top_patch": w["top"],
                             "box": list(box) if geometry is not None
                             and (box := geometry.cell_box(*w["top"], grid)) is not None else None}
                            for w in row["words"]]
        yield out
