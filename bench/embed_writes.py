"""Embedding writes with the HNSW index: EmbeddingWriter batches vs one row per committed INSERT,
re-runs over stored identities, and bulk ingest with the index present vs built afterwards.

    .venv/bin/python -m bench.embed_writes [--rows 20000] [--ingest 50000] [--vectors random|clustered]

Runs its own embedded Postgres (``.imgq/bench/pg-vectors``), so other benches' database is left
alone. Prints a table per part and writes ``.imgq/bench/embed_writes.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, create_engine, text

from bench.common import WORK, median
from imgq.db import search as search_module
from imgq.db.results import embedding as embedding_module
from imgq.db.results.embedding import EmbeddingWriter
from imgq.ports import ResultRow

DIM = 256
MODEL, REV = "blip-itm", "bench"
INDEX = "embeddings_hnsw_256"


# -- shared with bench.search ---------------------------------------------------------------------

def start_pg(database: str) -> tuple[Any, Engine]:
    """A private embedded Postgres for vector benches, migrated; returns (server, engine)."""
    from imgq import embedded
    from imgq.db.migrate import upgrade

    pg = embedded.start_postgres(WORK / "pg-vectors" / "data", database=database)
    upgrade(pg.url)
    return pg, create_engine(pg.url)


def unit_vectors(n: int, *, clustered: bool, seed: int, centres: int = 2000, noise: float = 0.6,
                 topics: int = 50, spread: float = 0.7) -> np.ndarray:
    """``n`` unit float32 vectors, uniform on the sphere or clustered in two levels: ``topics``
    random directions, ``centres`` cluster centres around them (per-axis spread ``spread``), and
    points around the centres (per-axis ``noise``), then normalised. Cosines come out about 0.8
    within a cluster, 0.55 within a topic and 0 across topics. One level of random centres would
    make all clusters mutually orthogonal in 256-d, so the neighbours beyond a query's own
    cluster would be near-ties and recall there meaningless. The centres come from a fixed seed,
    so queries drawn with another seed come from the same clusters."""
    rng = np.random.default_rng(seed)
    if clustered:
        fixed = np.random.default_rng(12345)
        top = fixed.standard_normal((topics, DIM)).astype(np.float32)
        c = top[fixed.integers(0, topics, centres)] + spread * fixed.standard_normal((centres, DIM)).astype(np.float32)
        x = c[rng.integers(0, centres, n)] + noise * rng.standard_normal((n, DIM)).astype(np.float32)
    else:
        x = rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def reset(engine: Engine) -> None:
    with engine.begin() as conn:
        # CASCADE: the tables that reference these (item_translations, ...) go too, whatever a later
        # migration adds (a plain list failed once item_translations referenced job_items).
        conn.execute(text("TRUNCATE embeddings, matches, dead_letters, job_items, jobs, captions, images CASCADE"))


def index_ddl(engine: Engine) -> str:
    """The migration's CREATE INDEX for the HNSW index, read from the catalog (to re-create it)."""
    with engine.connect() as conn:
        ddl = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = :i"), {"i": INDEX}).scalar()
    if ddl is None:
        raise RuntimeError(f"{INDEX} is missing: drop the bench database folder and rerun")
    return ddl


def with_index_params(ddl: str, params: str | None) -> str:
    """The index DDL with ``WITH (params)`` in place of its storage parameters; ``None`` gives none,
    which is the migration's index (pgvector's defaults, m=16 and ef_construction=64)."""
    ddl = re.sub(r" WITH \([^)]*\)", "", ddl)
    return ddl if not params else ddl.replace(" WHERE ", f" WITH ({params}) WHERE ", 1)


def set_index(engine: Engine, params: str | None) -> str:
    """Re-create the HNSW index with ``params`` (the table should be empty: this is a build)."""
    ddl = with_index_params(index_ddl(engine), params)
    with engine.begin() as conn:
        conn.execute(text(f"DROP INDEX {INDEX}"))
        conn.execute(text(ddl))
    return ddl


def seed_images(engine: Engine, n: int, tag: str) -> list[int]:
    with engine.begin() as conn:
        return list(conn.execute(text(
            "INSERT INTO images (source, bucket, key, version, bytes, width, height) "
            "SELECT 's3', 'bench', :tag || '/' || g || '.jpg', 'v1', 50000, 640, 480 "
            "FROM generate_series(0, :n - 1) g ORDER BY g RETURNING id"), {"n": n, "tag": tag}).scalars())


def seed_job(engine: Engine, n: int) -> uuid.UUID:
    job = uuid.uuid4()
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO jobs (id, kind, model, params, params_hash, total) "
                          "VALUES (:job, 'embed', :model, '{}', 'h', :n)"), {"job": job, "model": MODEL, "n": n})
        conn.execute(text("INSERT INTO job_items (job_id, seq, ref, state) "
                          "SELECT :job, g, 'x', 'running' FROM generate_series(0, :n - 1) g"), {"job": job, "n": n})
    return job


# -- write paths ------------------------------------------------------------------------------------

@dataclass
class Batch:
    job: uuid.UUID
    seqs: range
    image_ids: list[int]
    x: np.ndarray

    def rows(self) -> list[ResultRow]:
        return [ResultRow(self.job, s, self.image_ids[s], MODEL, REV, "h", {}, self.x[s]) for s in self.seqs]


_ONE_INSERT = text("""
INSERT INTO embeddings (image_id, model, model_revision, params_hash, params, dim, embedding)
VALUES (:image_id, :model, :rev, 'h', '{}', :dim, CAST(:vec AS vector))
ON CONFLICT ON CONSTRAINT embeddings_identity DO NOTHING RETURNING id""")
_ONE_LINK = text("UPDATE job_items SET embedding_id = :eid WHERE job_id = :job AND seq = :seq")


def one_row_at_a_time(engine: Engine, b: Batch) -> None:
    """The baseline: an INSERT and an UPDATE per row, each row its own committed transaction."""
    for s in b.seqs:
        with engine.begin() as conn:
            eid = conn.execute(_ONE_INSERT, {"image_id": b.image_ids[s], "model": MODEL, "rev": REV, "dim": DIM,
                                             "vec": search_module.vector_literal(b.x[s])}).scalar()
            conn.execute(_ONE_LINK, {"eid": eid, "job": b.job, "seq": s})


def writer(batch: int, insert_sql: str | None = None) -> Callable[[Engine, Batch], None]:
    """EmbeddingWriter.write, ``batch`` rows per transaction (optionally with another INSERT)."""

    def run(engine: Engine, b: Batch) -> None:
        saved = embedding_module._INSERT
        if insert_sql is not None:
            embedding_module._INSERT = insert_sql
        try:
            w = EmbeddingWriter()
            rows = b.rows()
            for start in range(0, len(rows), batch):
                with engine.begin() as conn:
                    w.write(conn, rows[start : start + batch])
        finally:
            embedding_module._INSERT = saved

    return run


def concurrent(batch: int, writers: int) -> Callable[[Engine, Batch], None]:
    """``writers`` threads, each on its own connection, writing interleaved batches, as several
    worker processes would: HNSW inserts of separate transactions run in parallel."""
    one = writer(batch)

    def run(engine: Engine, b: Batch) -> None:
        starts = list(range(b.seqs.start, b.seqs.stop, batch))

        def work(i: int) -> None:
            for s in starts[i::writers]:
                one(engine, Batch(b.job, range(s, min(s + batch, b.seqs.stop)), b.image_ids, b.x))

        with ThreadPoolExecutor(writers) as pool:
            list(pool.map(work, range(writers)))

    return run


# The form first proposed for the writer: a no-op DO UPDATE that returns the existing row's id.
DO_UPDATE_INSERT = embedding_module._INSERT.replace("DO NOTHING", "DO UPDATE SET embedding = embeddings.embedding")


def rate_table(title: str, results: dict[str, list[float]], base: str) -> list[str]:
    lines = [title, f"  {'variant':44s} {'rows/s (median)':>15s}  {'x base':>7s}  per-round"]
    b = median(results[base])
    for name, values in results.items():
        lines.append(f"  {name:44s} {median(values):>15,.0f}  {median(values) / b:>6.2f}x  "
                     f"{[round(v) for v in values]}")
    return lines


def part_paths(engine: Engine, rows: int, rounds: int, clustered: bool) -> tuple[list[str], dict[str, Any]]:
    """Variants alternate in rounds on one growing table, so each sees the same index size."""
    variants: dict[str, Callable[[Engine, Batch], None]] = {
        "one row per INSERT, each committed": one_row_at_a_time,
        "EmbeddingWriter, 64 rows/transaction": writer(64),
        "EmbeddingWriter, 256 rows/transaction": writer(256),
        "EmbeddingWriter, 256 rows/tx, 2 writers": concurrent(256, 2),
    }
    per = rows // (len(variants) * rounds)
    n = per * len(variants) * rounds
    image_ids, job = seed_images(engine, n, "paths"), seed_job(engine, n)
    x = unit_vectors(n, clustered=clustered, seed=1)
    results: dict[str, list[float]] = {name: [] for name in variants}
    pos = 0
    for _ in range(rounds):
        for name, run in variants.items():
            b = Batch(job, range(pos, pos + per), image_ids, x)
            t = time.perf_counter()
            run(engine, b)
            results[name].append(per / (time.perf_counter() - t))
            pos += per
    with engine.connect() as conn:
        linked = conn.execute(text("SELECT count(embedding_id) FROM job_items WHERE job_id = :j"), {"j": job}).scalar()
    if linked != n:
        raise RuntimeError(f"only {linked} of {n} items were linked")

    # Re-runs: the same identities written again (a redelivery, or a job over images already
    # embedded). imgq's DO NOTHING + link vs a no-op DO UPDATE; alternated, fresh items each round.
    rerun = {"re-run, DO NOTHING + link (imgq)": writer(256),
             "re-run, DO UPDATE SET embedding = embedding": writer(256, DO_UPDATE_INSERT)}
    again: dict[str, list[float]] = {name: [] for name in rerun}
    chunk = min(n // rounds, 2048)
    for r in range(rounds):
        for name, run in rerun.items():
            job2 = seed_job(engine, n)
            seqs = range(r * chunk, (r + 1) * chunk)
            t = time.perf_counter()
            run(engine, Batch(job2, seqs, image_ids, unit_vectors(n, clustered=clustered, seed=100 + r)))
            again[name].append(chunk / (time.perf_counter() - t))
    lines = rate_table(f"Write paths, HNSW index present, {n:,} rows of {DIM}-d ({per:,} per variant and round, "
                       f"{rounds} rounds)", results, "one row per INSERT, each committed")
    lines += rate_table(f"Re-runs over stored identities ({chunk:,} rows per variant and round)", again,
                        "re-run, DO UPDATE SET embedding = embedding")
    return lines, {"rows": n, "per_round": per, "paths": results, "reruns": again}


def part_ingest(engine: Engine, rows: int, clustered: bool, mwm: str) -> tuple[list[str], dict[str, Any]]:
    """A GPU out-running the index: write ``rows`` with the index present, or drop it, write, and
    CREATE INDEX afterwards with ``mwm`` of maintenance_work_mem."""
    ddl = index_ddl(engine)
    x = unit_vectors(rows, clustered=clustered, seed=2)
    out: dict[str, dict[str, float]] = {}
    for mode in ("index present", "no index, then CREATE INDEX"):
        reset(engine)
        image_ids, job = seed_images(engine, rows, "ingest"), seed_job(engine, rows)
        if mode != "index present":
            with engine.begin() as conn:
                conn.execute(text(f"DROP INDEX {INDEX}"))
        t0 = time.perf_counter()
        writer(256)(engine, Batch(job, range(rows), image_ids, x))
        t1 = time.perf_counter()
        build = 0.0
        if mode != "index present":
            with engine.begin() as conn:
                conn.execute(text("SELECT set_config('maintenance_work_mem', :m, true)"), {"m": mwm})
                conn.execute(text(ddl))
            build = time.perf_counter() - t1
        with engine.connect() as conn:
            pages = conn.execute(text(f"SELECT pg_relation_size('{INDEX}')")).scalar()
        out[mode] = {"insert_s": t1 - t0, "build_s": build, "total_s": t1 - t0 + build,
                     "rows_per_s": rows / (t1 - t0 + build), "index_mb": pages / 2**20}
    with engine.connect() as conn:
        workers = conn.execute(text("SHOW max_parallel_maintenance_workers")).scalar()
    lines = [f"Ingest of {rows:,} rows (EmbeddingWriter, 256 rows/transaction); build with maintenance_work_mem="
             f"{mwm}, max_parallel_maintenance_workers={workers}",
             f"  {'mode':30s} {'insert s':>9s} {'build s':>8s} {'total s':>8s} {'rows/s':>8s} {'index MB':>9s}"]
    for mode, v in out.items():
        lines.append(f"  {mode:30s} {v['insert_s']:>9.1f} {v['build_s']:>8.1f} {v['total_s']:>8.1f} "
                     f"{v['rows_per_s']:>8,.0f} {v['index_mb']:>9.0f}")
    return lines, {"rows": rows, "maintenance_work_mem": mwm, "parallel_workers": workers, "modes": out}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=20_000, help="rows for the write-path comparison")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--ingest", type=int, default=50_000, help="rows for index-present vs build-after (0: skip)")
    ap.add_argument("--vectors", choices=("random", "clustered"), default="random")
    ap.add_argument("--maintenance-work-mem", default="1GB")
    ap.add_argument("--index-params", default=None, help="e.g. m=16,ef_construction=32 (default: the migration's)")
    ap.add_argument("--json", type=Path, default=WORK / "embed_writes.json")
    args = ap.parse_args()
    pg, engine = start_pg("imgq_vectors")
    clustered = args.vectors == "clustered"
    try:
        reset(engine)
        lines = [f"index: {set_index(engine, args.index_params)}"]
        more, paths = part_paths(engine, args.rows, args.rounds, clustered)
        lines += more
        ingest: dict[str, Any] = {}
        if args.ingest:
            more, ingest = part_ingest(engine, args.ingest, clustered, args.maintenance_work_mem)
            lines += more
        reset(engine)
    finally:
        engine.dispose()
        pg.stop()
    print(f"vectors: {args.vectors} {DIM}-d unit; machine: {platform.machine()}, "
          f"{__import__('os').cpu_count()} CPUs")
    print("\n".join(lines))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "paths": paths,
                                     "ingest": ingest}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
