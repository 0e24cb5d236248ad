"""EmbeddingWriter against a real Postgres with pgvector (embedded)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import Engine, create_engine, text

from imgq.db.results.embedding import EmbeddingWriter
from imgq.db.search import parse_vector
from imgq.ports import ResultRow

pytestmark = pytest.mark.integration

DIM = 256


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = create_engine(database_url)
    yield engine
    engine.dispose()


def new_job(engine: Engine, n: int) -> uuid.UUID:
    job = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO jobs (id, kind, model, params, params_hash, total) "
                          "VALUES (:job, 'embed', 'm', '{}', 'h', :n)"), {"job": job, "n": n})
        conn.execute(text("INSERT INTO job_items (job_id, seq, ref, state) "
                          "SELECT :job, g, 's3://b/' || g, 'running' FROM generate_series(0, :n - 1) g"),
                     {"job": job, "n": n})
    return job


def new_images(engine: Engine, n: int, tag: str = "") -> list[int]:
    with engine.begin() as conn:
        return list(conn.execute(text(
            "INSERT INTO images (source, bucket, key, version, bytes, width, height) "
            "SELECT 's3', 'b', :tag || g, 'v1', 100, 640, 480 FROM generate_series(0, :n - 1) g RETURNING id"
        ), {"n": n, "tag": tag}).scalars())


def vectors(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def rows(job: uuid.UUID, image_ids: list[int], x: np.ndarray, rev: str = "r1") -> list[ResultRow]:
    return [ResultRow(job, seq, image_id, "blip-itm", rev, "ph", {"resize": "bicubic"}, x[seq])
            for seq, image_id in enumerate(image_ids)]


def write(engine: Engine, batch: list[ResultRow]) -> None:
    """The writer, then the link the store's finishing UPDATE makes from the ids it returns."""
    with engine.begin() as conn:
        link(conn, EmbeddingWriter().write(conn, batch))


def link(conn: object, ids: dict[tuple[uuid.UUID, int], int]) -> None:
    for (job, seq), embedding_id in ids.items():
        conn.execute(text("UPDATE job_items SET embedding_id = :e WHERE job_id = :j AND seq = :s"),  # type: ignore[attr-defined]
                     {"e": embedding_id, "j": job, "s": seq})


def stored(engine: Engine) -> dict[int, tuple[int, np.ndarray]]:
    """image_id -> (embedding id, vector), read back as pgvector text."""
    with engine.connect() as conn:
        found = conn.execute(text("SELECT image_id, id, CAST(embedding AS text) FROM embeddings"))
        return {image_id: (eid, parse_vector(lit)) for image_id, eid, lit in found}


def links(engine: Engine, job: uuid.UUID) -> dict[int, tuple[int | None, str]]:
    with engine.connect() as conn:
        found = conn.execute(text("SELECT seq, embedding_id, state FROM job_items WHERE job_id = :job"),
                             {"job": job})
        return {seq: (eid, state) for seq, eid, state in found}


def test_vectors_round_trip_exactly_and_items_are_linked(engine: Engine):
    job, images, x = new_job(engine, 3), new_images(engine, 3), vectors(3)
    x[0, :3] = [1e-38, 3e38, -0.1]  # subnormal-adjacent, huge, and not exact in decimal
    write(engine, rows(job, images, x))
    got = stored(engine)
    for seq, image_id in enumerate(images):
        assert np.array_equal(got[image_id][1], x[seq])  # float4 exactly, not approximately
    with engine.connect() as conn:
        meta = conn.execute(text(
            "SELECT DISTINCT model, model_revision, params_hash, params, dim FROM embeddings")).all()
    assert meta == [("blip-itm", "r1", "ph", {"resize": "bicubic"}, DIM)]
    # Linked, and the state is left for the store to finish.
    assert links(engine, job) == {seq: (got[image_id][0], "running") for seq, image_id in enumerate(images)}


def test_first_stored_vector_wins_and_later_items_still_link(engine: Engine):
    images = new_images(engine, 2)
    first, second = new_job(engine, 2), new_job(engine, 2)
    write(engine, rows(first, images, vectors(2, seed=1)))
    before = stored(engine)
    write(engine, rows(second, images, vectors(2, seed=2)))  # a redelivery or a re-run: new vectors
    after = stored(engine)
    assert after.keys() == before.keys()
    for image_id in images:
        assert after[image_id][0] == before[image_id][0]
        assert np.array_equal(after[image_id][1], before[image_id][1])
    assert links(engine, second) == {seq: (before[image_id][0], "running") for seq, image_id in enumerate(images)}


def test_partial_conflict_in_one_batch(engine: Engine):
    images = new_images(engine, 4)
    job = new_job(engine, 4)
    write(engine, rows(job, images, vectors(4))[:2])
    write(engine, rows(job, images, vectors(4, seed=9)))  # 2 existing + 2 new identities
    got = stored(engine)
    assert len(got) == 4
    assert links(engine, job) == {seq: (got[image_id][0], "running") for seq, image_id in enumerate(images)}


def test_one_image_in_two_items_of_a_batch_gives_one_row(engine: Engine):
    (image,) = new_images(engine, 1)
    job = new_job(engine, 2)
    write(engine, rows(job, [image, image], vectors(2)))
    got = stored(engine)
    assert np.array_equal(got[image][1], vectors(2)[0])  # the lower seq wins
    assert links(engine, job) == {0: (got[image][0], "running"), 1: (got[image][0], "running")}


def test_groups_by_revision(engine: Engine):
    images = new_images(engine, 2)
    job = new_job(engine, 4)
    x = vectors(4)
    batch = [ResultRow(job, seq, images[seq % 2], "blip-itm", f"r{seq // 2}", "ph", {}, x[seq]) for seq in range(4)]
    write(engine, batch)
    with engine.connect() as conn:
        revs = conn.execute(text("SELECT model_revision, count(*) FROM embeddings GROUP BY 1 ORDER BY 1")).all()
    assert revs == [("r0", 2), ("r1", 2)]
    assert all(eid is not None for eid, _ in links(engine, job).values())


def test_bulk_batch(engine: Engine):
    n = 500
    job, images, x = new_job(engine, n), new_images(engine, n), vectors(n, seed=3)
    write(engine, rows(job, images, x))
    got = stored(engine)
    assert len(got) == n
    assert all(np.array_equal(got[image_id][1], x[seq]) for seq, image_id in enumerate(images))
    assert all(eid is not None for eid, _ in links(engine, job).values())


def test_concurrent_writer_of_the_same_identity_links_to_the_committed_row(engine: Engine):
    """Our INSERT waits on the other transaction's row, skips it as a conflict once it commits,
    and the follow-up statement (a new snapshot) links the item to it."""
    (image,) = new_images(engine, 1)
    job_a, job_b = new_job(engine, 1), new_job(engine, 1)
    a = engine.connect()
    tx = a.begin()
    link(a, EmbeddingWriter().write(a, rows(job_a, [image], vectors(1, seed=1))))  # uncommitted
    errors: list[BaseException] = []

    def other() -> None:
        try:
            write(engine, rows(job_b, [image], vectors(1, seed=2)))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=other)
    thread.start()
    thread.join(0.5)
    assert thread.is_alive()  # blocked on our uncommitted row
    tx.commit()
    a.close()
    thread.join(10)
    assert not thread.is_alive() and not errors
    got = stored(engine)
    assert np.array_equal(got[image][1], vectors(1, seed=1)[0])
    assert links(engine, job_b) == {0: (got[image][0], "running")}


def test_bad_vectors_are_refused_with_the_item(engine: Engine):
    job, images = new_job(engine, 2), new_images(engine, 2)
    x = vectors(2)
    x[1, 7] = np.nan
    with pytest.raises(ValueError, match=rf"job {job} item 1 has NaN"):
        write(engine, rows(job, images, x))
    assert stored(engine) == {}


def test_results_columns_read_back(engine: Engine):
    job, images, x = new_job(engine, 2), new_images(engine, 2), vectors(2)
    write(engine, rows(job, images, x))
    w = EmbeddingWriter()
    assert (w.kind, w.table, w.link_column) == ("embed", "embeddings", "embedding_id")
    sql = (f"SELECT i.seq, {w.results_columns}, {w.VECTOR_COLUMN} FROM job_items i "
           f"LEFT JOIN {w.table} r_embed ON r_embed.id = i.{w.link_column} WHERE i.job_id = :job ORDER BY i.seq")
    with engine.connect() as conn:
        got = conn.execute(text(sql), {"job": job}).mappings().all()
    assert [(r["embedding_revision"], r["embedding_dim"]) for r in got] == [("r1", DIM)] * 2
    assert np.array_equal(parse_vector(got[1]["embedding"]), x[1])


def test_a_nan_vector_is_its_items_dead_letter_and_its_batchmates_are_stored(store):
    """Through the engine and the real store: one image's NaN vector (pgvector refuses it) must not
    fail the write it would have shared; before, all four were retried as db_unavailable."""
    from dataclasses import dataclass

    from imgq.contract import make_task
    from imgq.params import EmbedParams
    from imgq.ports import Blob
    from imgq.worker.engine import Engine
    from imgq.worker.fakes import EchoRunner
    from tests.jobs import create_job

    @dataclass
    class Picture:
        image: np.ndarray
        width: int = 4
        height: int = 4

    class NanEmbed(EchoRunner):
        def run(self, pixels, texts, params):  # type: ignore[no-untyped-def]
            means = pixels.reshape(len(pixels), -1).mean(axis=1)
            return [np.array([np.nan if np.isclose(m, 0.5) else m, 1.0], dtype=np.float32) for m in means]

    task = make_task("embed", "echo", EmbedParams())
    refs = [f"/d/{v}.jpg" for v in (0.1, 0.2, 0.5, 0.3)]
    job = create_job(store, [task], refs)
    store.claim(job, [0, 1, 2, 3], "w")
    engine = Engine(store=store, runners={"embed": NanEmbed(kind="embed")},
                    fetch=lambda ref: Blob(ref.encode(), "local", "", ref, "v1"),
                    decode=lambda data: Picture(np.full((3, 4, 4), float(data.decode()[3:-4]), dtype=np.float32)),
                    worker_name="w", max_batch=4, max_wait_s=0.5, decode_threads=1, db_retry_s=1.0).start()
    work = engine.submit(job, [task], list(enumerate(refs)))
    outcomes = [(w.seq, w.future.result(30).state, w.future.result(30).code) for w in work]
    engine.stop()
    assert outcomes == [(0, "done", None), (1, "done", None), (2, "dead", "model_error"), (3, "done", None)]
    with store.engine.connect() as conn:
        stored = conn.execute(text("SELECT seq FROM job_items WHERE job_id = :j AND embedding_id IS NOT NULL "
                                   "ORDER BY seq"), {"j": job}).scalars().all()
    assert stored == [0, 1, 3]
