"""Translated captions (``imgq enqueue caption --lang de,fr``): rows of ``captions`` with
``method = 'translated'``, the translation model and its revision in ``via``/``via_revision``, and
``source_id`` pointing at the English caption they translate. Each keeps its source's image, BLIP
model, revision and params, so one identity is (English caption, language, translation model).

An item links to its translations through ``item_translations`` (one row per language): there is
no single link column, and ``imgq check`` counts one row per language the job asked for.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import text

from imgq.db.arrays import Binary
from imgq.db.results.caption import IDENTITY
from imgq.db.store import PENDING
from imgq.ports import ResultRow

# DISTINCT ON: two items of one image in one write translate to one row; the no-op DO UPDATE returns
# the id of a translation stored before (the first stored text wins, as for every result).
_WRITE = text("""
INSERT INTO captions (image_id, model, model_revision, params_hash, params, text, lang, method, via, via_revision,
                      source_id)
SELECT DISTINCT ON (s.id, v.lang) s.image_id, s.model, s.model_revision, s.params_hash, s.params, v.txt, v.lang,
       'translated', :via, :via_rev, s.id
FROM unnest(CAST(:source AS bigint[]), CAST(:lang AS text[]), CAST(:txt AS text[])) WITH ORDINALITY
     AS v(source, lang, txt, n)
JOIN captions s ON s.id = v.source
ORDER BY s.id, v.lang, v.n
ON CONFLICT ON CONSTRAINT captions_identity DO UPDATE SET text = captions.text
RETURNING source_id, lang, id
""")

# Only items still pending get links: a late duplicate of a finished or dead item adds nothing
# (the same guard as the store's finishing UPDATE). The guard locks the items it passes, so that
# UPDATE, later in this transaction, finishes every item linked here: another worker's dead letter
# committed in between would leave a dead item with links. Key order, so that two writes of the
# same items lock them in one order; one that waits re-reads the state and links nothing.
_LINK = text(f"""
INSERT INTO item_translations (job_id, seq, lang, caption_id)
SELECT v.job_id, v.seq, v.lang, v.caption_id
FROM unnest(CAST(:job AS uuid[]), CAST(:seq AS int[]), CAST(:lang AS text[]), CAST(:caption_id AS bigint[]))
     AS v(job_id, seq, lang, caption_id)
JOIN job_items j ON j.job_id = v.job_id AND j.seq = v.seq
WHERE {PENDING}
ORDER BY v.job_id, v.seq
FOR UPDATE OF j
ON CONFLICT (job_id, seq, lang) DO NOTHING
""")


class TranslationWriter:
    kind = "translate"
    table = "captions"
    link_column = None  # item_translations, one row per language
    after = "caption"  # the store passes the caption ids written in the same transaction
    identity_columns = IDENTITY
    results_columns = ("(SELECT jsonb_object_agg(t.lang, c.text) FROM item_translations t "
                       "JOIN captions c ON c.id = t.caption_id WHERE t.job_id = i.job_id AND t.seq = i.seq) "
                       "AS translations")

    def write(self, conn: Any, rows: Sequence[ResultRow],
              sources: dict[tuple[uuid.UUID, int], int]) -> dict[tuple[uuid.UUID, int], int]:
        by_via: dict[tuple[str, str], list[tuple[ResultRow, str, str]]] = {}
        for row in rows:
            for lang, value in row.value.items():
                by_via.setdefault((row.model, row.model_revision), []).append((row, lang, str(value)))
        for (via, via_rev), group in by_via.items():
            ids = {(source, lang): id_ for source, lang, id_ in conn.execute(_WRITE, {
                "source": Binary(sources[(r.job, r.seq)] for r, _, _ in group),
                "lang": Binary(lang for _, lang, _ in group), "txt": Binary(t for _, _, t in group),
                "via": via, "via_rev": via_rev,
            })}
            conn.execute(_LINK, {
                "job": Binary(r.job for r, _, _ in group), "seq": Binary(r.seq for r, _, _ in group),
                "lang": Binary(lang for _, lang, _ in group),
                "caption_id": Binary(ids[(sources[(r.job, r.seq)], lang)] for r, lang, _ in group),
            })
        return {}
