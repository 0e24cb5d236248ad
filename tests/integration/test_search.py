"""Nearest-neighbour search (imgq.db.search) against a real Postgres with pgvector's HNSW index."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, text

from imgq import errors
from imgq.db import search as S
from imgq.db.results.embedding import EmbeddingWriter
from imgq.ports import ResultRow
from tests.fixtures.services import TEMPLATE, _admin

pytestmark = pytest.mark.integration

N = 3000
MODEL, REV = "blip-itm", "r1"
LOCAL = 7  # the one local file


def key_of(i: int) -> tuple[str, str, str]:
    """(source, bucket, key): 2 % in bucket 'rare', 2 % under 'cats/', and look-alike prefixes."""
    if i == LOCAL:
        return "local", "", f"/data/local/{i}.jpg"
    if i % 50 == 0:
        return "s3", "rare", f"img/{i}.jpg"
    if i % 50 == 1:
        return "s3", "photos", f"cats/{i}.jpg"
    if i % 50 == 2 and i < 500:
        return "s3", "photos", f"a_b/{i}.jpg"
    if i % 50 == 3 and i < 500:
        return "s3", "photos", f"axb/{i}.jpg"  # matched by an unescaped LIKE 'a_b/%'
    return "s3", "photos", f"img/{i}.jpg"


def clustered(n: int, dim: int, seed: int) -> np.ndarray:
    """Unit vectors around 60 Gaussian centres: real embeddings are clustered, not uniform."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((60, dim)).astype(np.float32)
    x = centres[rng.integers(0, 60, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_embeddings(engine: Engine, image_ids: list[int], x: np.ndarray, model: str, rev: str) -> None:
    job = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO jobs (id, kind, model, params, params_hash, total) "
                          "VALUES (:job, 'embed', :model, '{}', 'h', :n)"), {"job": job, "model": model, "n": len(x)})
        conn.execute(text("INSERT INTO job_items (job_id, seq, ref) "
                          "SELECT :job, g, 'x' FROM generate_series(0, :n - 1) g"), {"job": job, "n": len(x)})
    writer = EmbeddingWriter()
    for start in range(0, len(x), 500):
        with engine.begin() as conn:
            writer.write(conn, [ResultRow(job, i, image_ids[i], model, rev, "h", {}, x[i])
                                for i in range(start, min(start + 500, len(x)))])


@dataclass
class Seeded:
    engine: Engine
    url: str
    x: np.ndarray  # row i is image ids[i]
    ids: list[int]


@pytest.fixture(scope="module")
def seeded(pg_server) -> Iterator[Seeded]:  # type: ignore[no-untyped-def]
    """One database for the read-only tests: seeding 3,000 vectors through the index takes seconds."""
    # Unique per setup: pytest-xdist's work stealing may set a module fixture up twice in one process.
    name = f"t_search_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    _admin(pg_server, f'CREATE DATABASE "{name}" TEMPLATE {TEMPLATE}')
    url = pg_server.url.replace(f"/{TEMPLATE}?", f"/{name}?")
    engine = create_engine(url)
    with engine.begin() as conn:
        keys = [key_of(i) for i in range(N)]
        by_key = dict(conn.execute(text(
            "INSERT INTO images (source, bucket, key, version, bytes, width, height) "
            "SELECT source, bucket, key, 'v1', 100, 640, 480 "
            "FROM unnest(CAST(:source AS text[]), CAST(:bucket AS text[]), CAST(:key AS text[])) "
            "  AS t(source, bucket, key) "
            "RETURNING key, id"), {"source": [k[0] for k in keys], "bucket": [k[1] for k in keys],
                                   "key": [k[2] for k in keys]}).all())
        ids = [by_key[k[2]] for k in keys]
        conn.execute(text("INSERT INTO captions (image_id, model, model_revision, params_hash, params, text, "
                          "created_at) VALUES (:id, 'cap-a', 'r', 'h', '{}', 'older', now() - interval '1 day'), "
                          "(:id, 'cap-b', 'r', 'h', '{}', 'newer', now())"), {"id": ids[0]})
        # Translations are newer still: a search shows BLIP's own caption where there is one.
        conn.execute(text("INSERT INTO captions (image_id, model, model_revision, params_hash, params, text, "
                          "created_at, lang, method, via) VALUES "
                          "(:a, 'cap-b', 'r', 'h', '{}', 'neuer', now() + interval '1 minute', 'de', 'translated', "
                          "'mt'), "
                          "(:b, 'cap-b', 'r', 'h', '{}', 'nur deutsch', now(), 'de', 'adapter', 'de-news')"),
                     {"a": ids[0], "b": ids[1]})
    x = clustered(N, 256, seed=0)
    write_embeddings(engine, ids, x, MODEL, REV)
    write_embeddings(engine, ids[:40], clustered(40, 8, seed=1), "tiny8", "t1")  # an un-indexed dimension
    with engine.begin() as conn:
        conn.execute(text("ANALYZE"))
    yield Seeded(engine, url, x, ids)
    engine.dispose()
    _admin(pg_server, f'DROP DATABASE IF EXISTS "{name}"')


def ref_of(i: int) -> str:
    source, bucket, key = key_of(i)
    return key if source == "local" else f"s3://{bucket}/{key}"


def test_exact_nearest_vector_is_the_top_hit(seeded: Seeded):
    for i in (0, 123, 2999):
        hits = S.search(seeded.engine, seeded.x[i], model=MODEL, revision=REV, limit=10)
        assert len(hits) == 10
        assert hits[0].image_id == seeded.ids[i] and hits[0].similarity == pytest.approx(1.0, abs=1e-5)
        assert hits[0].ref == ref_of(i) and (hits[0].width, hits[0].height) == (640, 480)
        assert [h.similarity for h in hits] == sorted((h.similarity for h in hits), reverse=True)
        # Similarities are cosines: check them against numpy for every hit.
        pos = {image_id: n for n, image_id in enumerate(seeded.ids)}
        want = [float(seeded.x[pos[h.image_id]] @ seeded.x[i]) for h in hits]
        assert [h.similarity for h in hits] == pytest.approx(want, abs=1e-5)


def test_hit_carries_newest_caption_and_local_path(seeded: Seeded):
    assert S.search(seeded.engine, seeded.x[0], model=MODEL, revision=REV, limit=1)[0].caption == "newer"
    assert S.search(seeded.engine, seeded.x[1], model=MODEL, revision=REV, limit=1)[0].caption == "nur deutsch"
    local = S.search(seeded.engine, seeded.x[LOCAL], model=MODEL, revision=REV, limit=1)[0]
    assert (local.ref, local.caption, local.model_revision) == (f"/data/local/{LOCAL}.jpg", None, REV)


def test_exclude_image_id(seeded: Seeded):
    hits = S.search(seeded.engine, seeded.x[5], model=MODEL, revision=REV, limit=5, exclude_image_id=seeded.ids[5])
    assert seeded.ids[5] not in [h.image_id for h in hits] and len(hits) == 5


def hnsw_ran(plan: str) -> bool:
    return any("embeddings_hnsw_256" in line and "never executed" not in line for line in plan.splitlines())


@pytest.mark.parametrize("strategy", ["exact", "hnsw"])
def test_selective_filters_still_fill_the_limit(seeded: Seeded, strategy: str, monkeypatch: pytest.MonkeyPatch):
    """Filters matching 2 % of images still fill the limit, with only matching images: a bucket is
    searched exactly among its images (fewer than EXACT_FILTER_MAX), or, with the threshold
    lowered, through the HNSW iterative scan (enable_sort=off keeps the planner from sorting the
    filtered rows instead, as it may on a table this small)."""
    engine = seeded.engine
    if strategy == "hnsw":
        monkeypatch.setattr(S, "EXACT_FILTER_MAX", 10)
        engine = create_engine(seeded.url, connect_args={"options": "-c enable_sort=off"})
    try:
        q = seeded.x[17]

        def best(match: Callable[[int], bool]) -> list[int]:
            rows = sorted((n for n in range(N) if match(n)), key=lambda n: -float(seeded.x[n] @ q))
            return [seeded.ids[n] for n in rows[:20]]

        def check(hits: list[S.Hit], want: list[int], exact: bool) -> None:
            assert len(hits) == len(want)
            got = [h.image_id for h in hits]
            # All of the true best when exact, nearly all through HNSW (approximate).
            assert got == want if exact else len(set(got) & set(want)) >= 0.8 * len(want)

        exact = strategy == "exact"
        check(S.search(engine, q, model=MODEL, revision=REV, limit=20, bucket="rare"),
              best(lambda n: key_of(n)[1] == "rare"), exact)
        check(S.search(engine, q, model=MODEL, revision=REV, limit=20, bucket="photos", prefix="cats/"),
              best(lambda n: key_of(n)[2].startswith("cats/")), exact)
        # A prefix alone goes through the index scan; '_' is literal (the axb/ keys must not match).
        check(S.search(engine, q, model=MODEL, revision=REV, limit=20, prefix="cats/"),
              best(lambda n: key_of(n)[2].startswith("cats/")), False)
        check(S.search(engine, q, model=MODEL, revision=REV, limit=20, prefix="a_b/"),
              best(lambda n: key_of(n)[2].startswith("a_b/")), False)
        assert hnsw_ran(S.explain(engine, q, model=MODEL, revision=REV, limit=20, bucket="rare")) == (not exact)
    finally:
        if engine is not seeded.engine:
            engine.dispose()


def test_without_iterative_scan_the_filtered_index_scan_comes_up_short(seeded: Seeded):
    """Why search() turns on hnsw.iterative_scan: the plain scan stops after ef_search candidates."""
    engine = create_engine(seeded.url, connect_args={"options": "-c enable_sort=off"})
    try:
        params = S._params(seeded.x[17], MODEL, REV, 20, "rare", None, None)
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL hnsw.iterative_scan = off"))
            assert len(conn.execute(S.SEARCH_INDEXED, params).all()) < 20
    finally:
        engine.dispose()


def test_unfiltered_search_uses_the_hnsw_index(seeded: Seeded):
    plan = S.explain(seeded.engine, seeded.x[3], model=MODEL, revision=REV, limit=10)
    assert "Index Scan using embeddings_hnsw_256" in plan, plan


def test_repeated_searches_on_one_connection_keep_custom_plans(seeded: Seeded):
    """psycopg prepares a statement after 5 runs; a generic plan of the search can't see the LIMIT
    or which filters are NULL and sorted the whole space (8x slower). search() forces custom plans."""
    engine = create_engine(seeded.url, pool_size=1, max_overflow=0)
    try:
        for i in range(12):
            S.search(engine, seeded.x[i], model=MODEL, revision=REV, limit=10, bucket="rare" if i % 2 else None)
        with engine.connect() as conn:
            plans = conn.execute(text("SELECT generic_plans, custom_plans FROM pg_prepared_statements "
                                      "WHERE statement LIKE '%WITH nn AS MATERIALIZED%'")).all()
        assert plans and plans[0][0] == 0 and plans[0][1] > 0
    finally:
        engine.dispose()


def test_other_dimensions_are_an_exact_scan(seeded: Seeded):
    x8 = clustered(40, 8, seed=1)
    hits = S.search(seeded.engine, x8[4], model="tiny8", revision="t1", limit=40)
    want = sorted(range(40), key=lambda n: -float(x8[n] @ x8[4]))
    assert [h.image_id for h in hits] == [seeded.ids[n] for n in want]
    assert "hnsw" not in S.explain(seeded.engine, x8[4], model="tiny8", revision="t1", limit=5)


def test_sql_function_agrees_with_search(seeded: Seeded):
    q = seeded.x[42]
    with seeded.engine.connect() as conn:
        top = conn.execute(text("SELECT image_id, similarity FROM imgq_similar(CAST(:q AS vector), :model, 5)"),
                           {"q": S.vector_literal(q), "model": MODEL}).all()
    hits = S.search(seeded.engine, q, model=MODEL, revision=REV, limit=5)
    assert top[0][0] == hits[0].image_id == seeded.ids[42]
    assert top[0][1] == pytest.approx(hits[0].similarity, abs=1e-6)


def test_spaces(seeded: Seeded):
    assert S.spaces(seeded.engine, MODEL) == [(REV, 256, N)]
    assert S.spaces(seeded.engine, "tiny8") == [("t1", 8, 40)]
    assert S.spaces(seeded.engine, "nope") == []


def test_errors_have_codes_and_say_what_exists(seeded: Seeded):
    with pytest.raises(errors.DimensionMismatch, match=r"query vector has 128 dimensions .* stores 256") as exc:
        S.search(seeded.engine, np.ones(128), model=MODEL, revision=REV)
    assert exc.value.code == "dim_mismatch"
    with pytest.raises(errors.NoEmbeddings, match=r"revision 'r9'; stored revisions: r1 \(256-d, 3,000 images\)"):
        S.search(seeded.engine, seeded.x[0], model=MODEL, revision="r9")
    with pytest.raises(errors.NoEmbeddings, match="nothing is stored for model 'other'") as exc:
        S.search(seeded.engine, seeded.x[0], model="other", revision=REV)
    assert exc.value.code == "no_embeddings"
    for empty in ([], np.array([], dtype=np.float32), np.zeros(256)):
        with pytest.raises(errors.EmptyQuery) as exc:
            S.search(seeded.engine, empty, model=MODEL, revision=REV)
        assert exc.value.code == "empty_query" and "\n" not in exc.value.message
    with pytest.raises(errors.SearchError, match="NaN"):
        S.search(seeded.engine, np.full(256, np.nan), model=MODEL, revision=REV)


def test_stored_vector_takes_the_newest_version_with_an_embedding(database_url: str):
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            ids = list(conn.execute(text(
                "INSERT INTO images (source, bucket, key, version, bytes, width, height, first_seen) VALUES "
                "('s3', 'b', 'k.jpg', 'v1', 1, 10, 10, now() - interval '2 days'), "
                "('s3', 'b', 'k.jpg', 'v2', 1, 10, 10, now() - interval '1 day'), "
                "('s3', 'b', 'k.jpg', 'v3', 1, 10, 10, now()) RETURNING id")).scalars())
        x = clustered(3, 256, seed=5)
        write_embeddings(engine, ids[:2], x[:2], MODEL, "r1")  # v3 is not embedded yet
        write_embeddings(engine, ids[:1], x[2:], MODEL, "r0")
        got = S.stored_vector(engine, model=MODEL, revision=None, source="s3", bucket="b", key="k.jpg")
        assert got is not None and got[0] == ids[1] and got[2] == "r1" and np.array_equal(got[1], x[1])
        got = S.stored_vector(engine, model=MODEL, revision="r0", source="s3", bucket="b", key="k.jpg")
        assert got is not None and got[0] == ids[0] and np.array_equal(got[1], x[2])
        assert S.stored_vector(engine, model=MODEL, revision="r1", source="s3", bucket="b", key="nope") is None
        assert S.stored_vector(engine, model="other", revision=None, source="s3", bucket="b", key="k.jpg") is None
    finally:
        engine.dispose()


def test_an_overwritten_objects_old_version_is_not_found(database_url: str):
    """images keeps a row per version of an object: the old version's vector (content that is gone)
    came back beside the new one, whatever the path (index, bucket filter, exact)."""
    engine = create_engine(database_url)
    bucket = f"over-{uuid.uuid4().hex[:8]}"
    try:
        with engine.begin() as conn:
            old, new, other = conn.execute(text(
                "INSERT INTO images (source, bucket, key, version, bytes, width, height, first_seen) VALUES "
                "('s3', :b, 'k.jpg', 'v1', 1, 10, 10, now() - interval '1 day'), "
                "('s3', :b, 'k.jpg', 'v2', 1, 10, 10, now()), "
                "('s3', :b, 'other.jpg', 'v1', 1, 10, 10, now()) RETURNING id"), {"b": bucket}).scalars()
        x = clustered(3, 256, seed=11)
        write_embeddings(engine, [old, new, other], x, "over-model", "r1")
        for filters in ({}, {"bucket": bucket}, {"bucket": bucket, "prefix": "k"}):
            found = [h.image_id for h in S.search(engine, x[0], model="over-model", revision="r1", limit=10, **filters)]
            assert old not in found and new in found, (filters, found)
        assert sorted(h.image_id for h in S.search(engine, x[0], model="over-model", revision="r1", limit=10)) == \
            sorted([new, other])
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM embeddings WHERE model = 'over-model'"))
            conn.execute(text("DELETE FROM images WHERE bucket = :b"), {"b": bucket})
        engine.dispose()


def test_an_object_changed_back_is_found_as_it_is_now(database_url: str):
    """A file edited (A -> B) and then reverted (B -> A) meets its first row again: ranked by
    first_seen, A stayed "old" and search showed B's vector. The object's current version is the
    one a worker saw last (images.last_seen, set by the store's upsert of every fetched object)."""
    from imgq.db.store import _UPSERT_IMAGES

    engine = create_engine(database_url)
    bucket = f"back-{uuid.uuid4().hex[:8]}"
    try:
        with engine.begin() as conn:  # as rows from before migration 0018: last_seen NULL
            a, b = conn.execute(text(
                "INSERT INTO images (source, bucket, key, version, bytes, width, height, first_seen, last_seen) "
                "VALUES ('s3', :b, 'k.jpg', 'vA', 1, 10, 10, now() - interval '2 days', NULL), "
                "('s3', :b, 'k.jpg', 'vB', 1, 10, 10, now() - interval '1 day', NULL) RETURNING id"),
                {"b": bucket}).scalars()
        x = clustered(2, 256, seed=12)
        write_embeddings(engine, [a, b], x, "back-model", "r1")

        def found() -> list[int]:
            return [h.image_id for h in S.search(engine, x[0], model="back-model", revision="r1", limit=5,
                                                 bucket=bucket)]

        assert found() == [b]
        with engine.begin() as conn:  # a worker fetches the object again: its bytes are A's
            conn.execute(_UPSERT_IMAGES, {"source": ["s3"], "bucket": [bucket], "key": ["k.jpg"], "version": ["vA"],
                                          "bytes": [1], "width": [10], "height": [10]})
        assert found() == [a]
        got = S.stored_vector(engine, model="back-model", revision="r1", source="s3", bucket=bucket, key="k.jpg")
        assert got is not None and got[0] == a
    finally:
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM embeddings WHERE model = 'back-model'"))
            conn.execute(text("DELETE FROM images WHERE bucket = :b"), {"b": bucket})
        engine.dispose()


# -- other spaces, the SQL function and the README's queries, each on a database of its own ---------


def seed_space(engine: Engine, x: np.ndarray, model: str, revs: list[str], buckets: list[str],
               key_prefix: str = "img/") -> list[int]:
    """Images s3://BUCKET/KEY_PREFIX{n}.jpg with row n of ``x`` as their embedding (plain SQL);
    returns the image ids in row order."""
    keys = [f"{key_prefix}{n}.jpg" for n in range(len(x))]
    with engine.begin() as conn:
        by_key = dict(conn.execute(text(
            "INSERT INTO images (source, bucket, key, version, bytes, width, height) "
            "SELECT 's3', b, k, 'v1', 100, 640, 480 FROM unnest(CAST(:b AS text[]), CAST(:k AS text[])) AS t(b, k) "
            "RETURNING key, id"), {"b": buckets, "k": keys}).all())
        ids = [by_key[k] for k in keys]
        conn.execute(text(
            "INSERT INTO embeddings (image_id, model, model_revision, params_hash, params, dim, embedding) "
            "SELECT i, :model, r, 'h', '{}', :dim, CAST(v AS vector) "
            "FROM unnest(CAST(:i AS bigint[]), CAST(:r AS text[]), CAST(:v AS text[])) AS t(i, r, v)"),
            {"model": model, "dim": x.shape[1], "i": ids, "r": revs, "v": [S.vector_literal(v) for v in x]})
        conn.execute(text("ANALYZE"))
    return ids


def index_scans(conn, index: str) -> int:  # type: ignore[no-untyped-def]
    """Scans of ``index`` by this backend not yet sent to the statistics (statements inside
    functions included): compare two readings in one transaction, which sends nothing."""
    return int(conn.execute(text("SELECT pg_stat_get_xact_numscans(to_regclass(:i))"), {"i": index}).scalar_one())


def hnsw_settings(conn) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    return tuple(conn.execute(text("SELECT current_setting('hnsw.ef_search'), "  # type: ignore[return-value]
                                   "current_setting('hnsw.iterative_scan')")).one())


def test_sql_function_returns_k_rows_when_k_exist_filtered_or_not(database_url: str):
    """imgq_similar(q, model, 100) used to stop at pgvector's default hnsw.ef_search (40 rows),
    and a revision matching half the rows at about 20. It raises ef_search for k and scans
    iteratively, returns the rows by distance, and leaves the caller's settings as they were.
    enable_sort=off makes the planner take the HNSW index on a table this small, as it does on a
    large one."""
    engine = create_engine(database_url, connect_args={"options": "-c enable_sort=off"})
    try:
        n = 400
        x = clustered(n, 256, seed=3)
        revs = ["a" if i % 2 else "b" for i in range(n)]
        ids = seed_space(engine, x, MODEL, revs, ["photos"] * n)
        q = x[11]
        with engine.begin() as conn:
            conn.execute(text("SET LOCAL hnsw.iterative_scan = off"))
            before, scans = hnsw_settings(conn), index_scans(conn, "embeddings_hnsw_256")
            for rev in (None, "a"):
                rows = conn.execute(text(
                    "SELECT image_id, model_revision, similarity FROM imgq_similar(CAST(:q AS vector), :m, 100, :rev)"),
                    {"q": S.vector_literal(q), "m": MODEL, "rev": rev}).all()
                assert len(rows) == 100, rev
                assert rev is None or {r.model_revision for r in rows} == {rev}
                sims = [r.similarity for r in rows]
                assert sims == sorted(sims, reverse=True)
                matching = [i for i in range(n) if rev is None or revs[i] == rev]
                best = {ids[i] for i in sorted(matching, key=lambda i: -float(x[i] @ q))[:100]}
                assert len({r.image_id for r in rows} & best) >= 90  # HNSW: approximate
            assert index_scans(conn, "embeddings_hnsw_256") > scans  # the index path was the one tested
            assert hnsw_settings(conn) == before
    finally:
        engine.dispose()


def test_a_dimension_with_its_own_index_is_searched_through_it(database_url: str):
    """`imgq db vector-index build --dim 512` makes embeddings_hnsw_512, and both `imgq search` and
    imgq_similar then go through it (they used to scan exactly: an untyped ORDER BY cannot use a
    typed expression index); without it, or while it is invalid, they scan exactly. On 300 vectors
    the index finds exactly what the exact scan finds."""
    from imgq.db.admin import build_vector_index

    engine = create_engine(database_url, connect_args={"options": "-c enable_sort=off"})
    try:
        n, m = 300, "m512"
        x = clustered(n, 512, seed=4)
        ids = seed_space(engine, x, m, ["r"] * n, ["rare" if i % 10 == 0 else "photos" for i in range(n)])
        queries = [x[i] for i in (0, 5, 77, 150, 299)]

        def found() -> list[list[int]]:
            return [[h.image_id for h in S.search(engine, q, model=m, revision="r", limit=10)] for q in queries]

        exact = found()
        assert exact == [[ids[i] for i in sorted(range(n), key=lambda i: -float(x[i] @ q))[:10]] for q in queries]
        assert "hnsw" not in S.explain(engine, queries[0], model=m, revision="r", limit=10)

        build_vector_index(engine, 512, maintenance_work_mem="64MB")
        with engine.begin() as conn:
            conn.execute(text("ANALYZE embeddings"))
        plan = S.explain(engine, queries[0], model=m, revision="r", limit=10)
        assert "Index Scan using embeddings_hnsw_512" in plan, plan
        assert found() == exact
        # A bucket filter: exact among few matches, through the index otherwise; the same hits.
        rare = S.search(engine, queries[1], model=m, revision="r", limit=5, bucket="rare")
        assert [h.image_id for h in rare] == [
            ids[i] for i in sorted(range(0, n, 10), key=lambda i: -float(x[i] @ queries[1]))[:5]]

        with engine.begin() as conn:
            scans = index_scans(conn, "embeddings_hnsw_512")
            for q, want in zip(queries, exact, strict=True):
                got = conn.execute(text("SELECT image_id FROM imgq_similar(CAST(:q AS vector), :m, 10)"),
                                   {"q": S.vector_literal(q), "m": m}).scalars().all()
                assert got == want
            assert index_scans(conn, "embeddings_hnsw_512") - scans == len(queries)

        # An invalid index (a build that was interrupted) is not used: exact again.
        with engine.begin() as conn:
            conn.execute(text("UPDATE pg_index SET indisvalid = false "
                              "WHERE indexrelid = 'embeddings_hnsw_512'::regclass"))
        assert "hnsw" not in S.explain(engine, queries[0], model=m, revision="r", limit=10)
        assert found() == exact
    finally:
        engine.dispose()


def readme_query(number: int) -> list[str]:
    """The statements of example query ``number`` under the README's "Postgres schema", comments
    dropped; psql's ``:q::vector(256)`` written as a bind parameter SQLAlchemy sees."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Postgres schema"):]
    section = section[:section.index("\n## ", 1)]
    found = re.search(rf"^-- {number}\. .*?(?=^-- {number + 1}\. |^```)", section, re.S | re.M)
    assert found, f"no example query {number}"
    sql = "\n".join(line for line in found.group(0).splitlines() if not line.lstrip().startswith("--"))
    sql = sql.replace(":q::vector(256)", "CAST(:q AS vector(256))")
    return [s.strip() for s in sql.split(";") if s.strip()]


def test_readme_query_2_gives_each_objects_latest_english_caption(database_url: str):
    """Translations and adapter captions keep the BLIP model of the English caption (and a
    translation its created_at): the "latest caption" query must pick BLIP's own English one."""
    blip = "Salesforce/blip-image-captioning-base"
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            ids = conn.execute(text(
                "INSERT INTO images (source, bucket, key, version, bytes, width, height) VALUES "
                "('s3', 'photos', '2024/0000.jpg', 'v1', 1, 4, 4), ('s3', 'photos', '2024/0001.jpg', 'v1', 1, 4, 4), "
                "('s3', 'photos', '2024/0002.jpg', 'v1', 1, 4, 4), ('s3', 'photos', '2023/0003.jpg', 'v1', 1, 4, 4) "
                "RETURNING id")).scalars().all()
            caption = text(
                "INSERT INTO captions (image_id, model, model_revision, params_hash, params, text, created_at, "
                "lang, method, via, source_id) VALUES (:image, :model, 'r1', :ph, '{}', :text, "
                "now() + CAST(:later AS interval), :lang, :method, :via, :source) RETURNING id")

            def add(image: int, text_: str, later: str = "0s", lang: str = "en", method: str = "native",
                    via: str = "", source: int | None = None, ph: str = "h") -> int:
                values = {"image": image, "model": blip, "ph": ph, "text": text_, "later": later, "lang": lang,
                          "method": method, "via": via, "source": source}
                return conn.execute(caption, values).scalar_one()

            # 0: a --lang job, the translations written with the English caption (same created_at)
            en = add(ids[0], "a dog")
            add(ids[0], "ein Hund", lang="de", method="translated", via="nllb", source=en)
            add(ids[0], "犬", lang="ja", method="translated", via="nllb", source=en)
            # 1: an older and a newer English caption (other params), translated later
            add(ids[1], "a cat", later="-1 day", ph="h0")
            en = add(ids[1], "a cat on a mat")
            add(ids[1], "eine Katze auf einer Matte", later="1 hour", lang="de", method="translated", via="nllb",
                source=en)
            # 2: an adapter caption made after the English one
            add(ids[2], "a bird")
            add(ids[2], "ein Vogel", later="1 minute", lang="de", method="adapter", via="de-news")
            add(ids[3], "not under 2024/")
        (statement,) = readme_query(2)
        with engine.connect() as conn:
            rows = conn.execute(text(statement)).all()
        assert [(r.key, r.text) for r in rows] == [
            ("2024/0000.jpg", "a dog"), ("2024/0001.jpg", "a cat on a mat"), ("2024/0002.jpg", "a bird")]
    finally:
        engine.dispose()


def test_readme_query_7_returns_its_hits_in_order_of_similarity(database_url: str):
    """With hnsw.iterative_scan = relaxed_order an index scan may return rows slightly out of
    order; the README's filtered query sorts them again (enable_sort=off: the HNSW index, as on a
    large table)."""
    engine = create_engine(database_url, connect_args={"options": "-c enable_sort=off"})
    try:
        n = 2000
        x = clustered(n, 256, seed=6)
        buckets = ["photos" if i % 10 == 0 else "archive" for i in range(n)]
        ids = seed_space(engine, x, "Salesforce/blip-itm-base-coco", ["r"] * n, buckets)
        statements = readme_query(7)
        with engine.connect() as conn:
            scans = index_scans(conn, "embeddings_hnsw_256")
            for statement in statements[:-1]:
                conn.execute(text(statement))
            for i in range(0, 400, 10):
                rows = conn.execute(text(statements[-1]), {"q": S.vector_literal(x[i]), "rev": "r"}).all()
                assert len(rows) == 20 and {r.bucket for r in rows} == {"photos"}
                sims = [r.similarity for r in rows]
                assert sims == sorted(sims, reverse=True), f"query {i}: {sims}"
            scans = index_scans(conn, "embeddings_hnsw_256") - scans
            # An object overwritten since (a newer version of img/0.jpg, not embedded yet): its old
            # version's vector is left out, by query 7 as by `imgq search`.
            conn.execute(text("INSERT INTO images (source, bucket, key, version, bytes, width, height, first_seen) "
                              "VALUES ('s3', 'photos', 'img/0.jpg', 'v2', 1, 1, 1, now() + interval '1 second')"))
            rows = conn.execute(text(statements[-1]), {"q": S.vector_literal(x[0]), "rev": "r"}).all()
            assert len(rows) == 20 and "img/0.jpg" not in {r.key for r in rows}
            # Query 6 (image 42 there: one of these here) runs and pins the revision.
            (six,) = readme_query(6)
            found = conn.execute(text(six.replace("image_id = 42", f"image_id = {ids[10]}")), {"rev": "r"}).all()
            assert len(found) == 10 and found[0].image_id == ids[10] and {r.model_revision for r in found} == {"r"}
            conn.rollback()
        assert scans > 0
    finally:
        engine.dispose()


def test_filtered_hits_come_back_sorted_by_similarity(database_url: str, monkeypatch: pytest.MonkeyPatch):
    """A filtered HNSW scan (iterative, relaxed_order) may return rows slightly out of order, and
    search() sorts them again. On Postgres 17+ a plain ``ORDER BY nn.distance`` over the CTE is
    taken as satisfied by the CTE's own ORDER BY (an Incremental Sort that keeps the disorder): the
    outer sort must be on an expression the CTE is not ordered by. A bucket (with the exact-search
    threshold lowered) and a prefix, each matching 10 %, both through the index."""
    monkeypatch.setattr(S, "EXACT_FILTER_MAX", 10)
    engine = create_engine(database_url, connect_args={"options": "-c enable_sort=off"})
    try:
        n = 2000
        x = clustered(n, 256, seed=6)
        seed_space(engine, x[:200], MODEL, [REV] * 200, ["photos"] * 200, key_prefix="cats/")
        seed_space(engine, x[200:], MODEL, [REV] * (n - 200), ["archive"] * (n - 200))
        for filters in ({"bucket": "photos"}, {"prefix": "cats/"}):
            assert hnsw_ran(S.explain(engine, x[0], model=MODEL, revision=REV, limit=20, **filters))
            disordered = []
            for i in range(0, n, 20):
                hits = S.search(engine, x[i], model=MODEL, revision=REV, limit=50, **filters)
                assert len(hits) == 50 and all(h.ref.startswith("s3://photos/cats/") for h in hits)
                sims = [h.similarity for h in hits]
                if sims != sorted(sims, reverse=True):
                    disordered.append(i)
            assert disordered == [], filters
    finally:
        engine.dispose()


def _images_rows_read(plan: dict) -> int:
    own = plan.get("Actual Rows", 0) * plan.get("Actual Loops", 1) if plan.get("Relation Name") == "images" else 0
    own += plan.get("Rows Removed by Filter", 0) if plan.get("Relation Name") == "images" else 0
    return own + sum(_images_rows_read(child) for child in plan.get("Plans", []))


def test_a_bucket_and_prefix_filter_reads_only_the_matching_images(database_url: str):
    """A filtered search first counts the images its filters match (up to EXACT_FILTER_MAX). The
    key's LIKE could not use the (source, bucket, key, version) index under a non-C collation, so
    a prefix read every image of the bucket: 253 ms a search at 1M images for 50 matches, where
    the search itself takes a few. Migration 0017's (bucket, key text_pattern_ops) index serves it."""
    engine = create_engine(database_url)
    try:
        with engine.begin() as conn:
            conn.execute(text("INSERT INTO images (source, bucket, key, version, bytes, width, height) "
                              "SELECT 's3', 'photos', 'archive/' || (g % 100) || '/' || g || '.jpg', 'v1', 1, 1, 1 "
                              "FROM generate_series(1, 50000) g"))
            conn.execute(text("INSERT INTO images (source, bucket, key, version, bytes, width, height) "
                              "SELECT 's3', 'photos', 'rare/' || g || '.jpg', 'v1', 1, 1, 1 "
                              "FROM generate_series(1, 50) g"))
            conn.execute(text("ANALYZE images"))
        count = text(f"SELECT im.id FROM images im WHERE true {S._IMAGE_FILTERS} LIMIT :exact_max")
        params = {"bucket": "photos", "prefix": S.like_prefix("rare/"), "exact_max": S.EXACT_FILTER_MAX}
        with engine.connect() as conn:
            assert len(conn.execute(count, params).all()) == 50
            plan = conn.execute(text("EXPLAIN (ANALYZE, FORMAT JSON) " + count.text), params).scalar_one()
        assert _images_rows_read(plan[0]["Plan"]) <= 100, plan
    finally:
        engine.dispose()
