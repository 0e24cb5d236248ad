"""Nearest-neighbour search on 100k stored 256-d embeddings: latency of ``imgq.db.search.search``
and recall@10 against exact (numpy brute-force) search, unfiltered and with selective filters.

    .venv/bin/python -m bench.search [--rows 100000] [--queries 200] [--ef 40,64,100]
                                     [--index-params m=16,ef_construction=64]

Vectors are clustered in two levels (``--topics`` directions, ``--centres`` Gaussian cluster
centres around them, per-axis noise; see ``bench.embed_writes.unit_vectors``), normalised. Real
image embeddings are clustered (by subject, style, source), and HNSW is built for that; uniformly
random 256-d unit vectors have no neighbourhood structure (every pair is nearly orthogonal) and
are the worst case for any graph index. Queries are new draws from the same clusters, not stored
vectors. Filters are independent of the vectors (bucket/prefix chosen at random per image).

Runs its own embedded Postgres (``.imgq/bench/pg-vectors``, database ``imgq_search``); loads by
binary COPY with the index dropped, then builds it. ``--reuse`` keeps a matching earlier load.
Prints a table and writes ``.imgq/bench/search.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import Engine, create_engine, text

from bench.common import WORK, median
from bench.embed_writes import DIM, INDEX, index_ddl, reset, start_pg, unit_vectors, with_index_params
from imgq.db import search as S
from imgq.db.results.embedding import _vector_cursor

MODEL = "blip-itm"
PREFIXES = 50  # p00/ .. p49/: 2 % each
BUCKETS = (("main", 0.86), ("mid", 0.10), ("small", 0.03), ("tiny", 0.01))
_TIMES = re.compile(r"(?:Planning|Execution) Time: ([0-9.]+) ms")


def layout(n: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(bucket index, prefix index) per image, independent of its vector."""
    rng = np.random.default_rng(seed)
    bucket = rng.choice(len(BUCKETS), size=n, p=[p for _, p in BUCKETS])
    return bucket, rng.integers(0, PREFIXES, n)


def load(engine: Engine, x: np.ndarray, rev: str, params: str | None) -> dict[str, float]:
    """COPY images and embeddings with the HNSW index dropped, then build it. Ids are 1..n."""
    ddl = with_index_params(index_ddl(engine), params)
    bucket, prefix = layout(len(x))
    reset(engine)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE images, embeddings RESTART IDENTITY CASCADE"))
        conn.execute(text(f"DROP INDEX {INDEX}"))
    t0 = time.perf_counter()
    with engine.begin() as conn:
        raw = conn.connection.driver_connection
        with raw.cursor() as cur, cur.copy("COPY images (source, bucket, key, version, bytes, width, height) "
                                           "FROM STDIN") as copy:
            copy.write("".join(f"s3\t{BUCKETS[b][0]}\tp{p:02d}/{i}.jpg\tv1\t50000\t640\t480\n"
                               for i, (b, p) in enumerate(zip(bucket.tolist(), prefix.tolist(), strict=True))))
        with _vector_cursor(conn) as cur, cur.copy(
            "COPY embeddings (image_id, model, model_revision, params_hash, params, dim, embedding) "
            "FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(["int8", "text", "text", "text", "jsonb", "int4", "vector"])
            for i in range(len(x)):
                copy.write_row((i + 1, MODEL, rev, "h", {}, DIM, x[i]))
    t1 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text("SELECT set_config('maintenance_work_mem', '1GB', true)"))
        conn.execute(text(ddl))
    t2 = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE images, embeddings"))
    return {"copy_s": t1 - t0, "build_s": t2 - t1, "copy_rows_per_s": len(x) / (t1 - t0)}


def loaded(engine: Engine, rev: str, n: int, params: str | None) -> bool:
    with engine.connect() as conn:
        count = conn.execute(text("SELECT count(*) FROM embeddings WHERE model_revision = :r"), {"r": rev}).scalar()
        ddl = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = :i"), {"i": INDEX}).scalar()
    return count == n and ddl is not None and ddl == with_index_params(ddl, params)


def plan_kind(plan: str) -> str:
    """Which strategy an EXPLAIN ANALYZE of search() ran: the HNSW scan, or an exact one."""
    ran = [line for line in plan.splitlines() if INDEX in line and "never executed" not in line]
    return "HNSW" if ran else "exact (filter first)"


def pctl(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) if xs else float("nan")


def newest_version_cost(engine: Engine, queries: np.ndarray, rev: str, k: int,
                        cases: dict[str, tuple[dict[str, Any], np.ndarray]]) -> dict[str, dict[str, float]]:
    """search() with and without its newest-version clause (a probe of images per candidate), each
    query both ways back to back, in alternating order; every object here has one version, so the
    hits are the same and only the probe's cost differs."""
    clause = S._IMAGE_FILTERS[S._IMAGE_FILTERS.index("\n  AND NOT EXISTS"):]
    variants = {"with": S._IMAGE_FILTERS, "without": S._IMAGE_FILTERS.replace(clause, "")}
    out: dict[str, dict[str, float]] = {}
    try:
        for name in ("no filter", "bucket=tiny (1 %)"):
            filters = cases[name][0]
            times: dict[str, list[float]] = {"with": [], "without": []}
            same = 0
            for qi, q in enumerate(queries):
                found: dict[str, list[int]] = {}
                for variant in (("with", "without") if qi % 2 else ("without", "with")):
                    S._IMAGE_FILTERS = variants[variant]
                    S.search_indexed.cache_clear()
                    S.search_filtered.cache_clear()
                    t = time.perf_counter()
                    hits = S.search(engine, q, model=MODEL, revision=rev, limit=k, **filters)
                    times[variant].append((time.perf_counter() - t) * 1000)
                    found[variant] = [h.image_id for h in hits]
                same += found["with"] == found["without"]
            out[name] = {"with_p50_ms": median(times["with"]), "without_p50_ms": median(times["without"]),
                         "ratio": median(times["with"]) / median(times["without"]), "same_hits": same / len(queries)}
    finally:
        S._IMAGE_FILTERS = variants["with"]
        S.search_indexed.cache_clear()
        S.search_filtered.cache_clear()
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--centres", type=int, default=2000)
    ap.add_argument("--noise", type=float, default=0.6)
    ap.add_argument("--topics", type=int, default=50)
    ap.add_argument("--ef", default="40,64,100", help="hnsw.ef_search values (search() uses ef_search(10) = 64)")
    ap.add_argument("--index-params", default=None, help="e.g. m=16,ef_construction=64 (default: the migration's)")
    ap.add_argument("--exact-queries", type=int, default=20, help="queries timed with the index disabled")
    ap.add_argument("--exact-filter-max", type=int, default=None,
                    help="override search.EXACT_FILTER_MAX (0: every filtered search goes through HNSW)")
    ap.add_argument("--reuse", action="store_true", help="keep an earlier load with the same parameters")
    ap.add_argument("--json", type=Path, default=WORK / "search.json")
    args = ap.parse_args()
    k = 10
    shape = {"centres": args.centres, "noise": args.noise, "topics": args.topics}
    x = unit_vectors(args.rows, clustered=True, seed=0, **shape)
    queries = unit_vectors(args.queries, clustered=True, seed=7, **shape)
    rev = f"n{args.rows}-t{args.topics}-c{args.centres}-s{args.noise}-l{len(BUCKETS)}"  # what was loaded
    if args.exact_filter_max is not None:
        S.EXACT_FILTER_MAX = args.exact_filter_max
    default_ef = S.ef_search
    pg, engine = start_pg("imgq_search")
    exact_engine = create_engine(pg.url, connect_args={"options": "-c enable_indexscan=off"})
    report: dict[str, Any] = {"args": {**vars(args), "json": str(args.json)}, "load_before": os.getloadavg()}
    try:
        if args.reuse and loaded(engine, rev, args.rows, args.index_params):
            report["load"] = "reused"
        else:
            report["load"] = load(engine, x, rev, args.index_params)
        with engine.connect() as conn:
            report["index"] = conn.execute(text("SELECT indexdef FROM pg_indexes WHERE indexname = :i"),
                                           {"i": INDEX}).scalar()
            report["index_mb"] = conn.execute(text(f"SELECT pg_relation_size('{INDEX}')")).scalar() / 2**20
            report["shared_buffers"] = conn.execute(text("SHOW shared_buffers")).scalar()
        bucket, prefix = layout(args.rows)
        cases: dict[str, tuple[dict[str, Any], np.ndarray]] = {
            "no filter": ({}, np.arange(args.rows)),
            "bucket=mid (10 %)": ({"bucket": "mid"}, np.flatnonzero(bucket == 1)),
            "bucket=small (3 %)": ({"bucket": "small"}, np.flatnonzero(bucket == 2)),
            "prefix=p07/ (2 %)": ({"prefix": "p07/"}, np.flatnonzero(prefix == 7)),
            "bucket=tiny (1 %)": ({"bucket": "tiny"}, np.flatnonzero(bucket == 3)),
        }
        # Ground truth: exact cosine top-k in numpy over each case's subset (ids are row + 1).
        truth = {name: [set((rows[np.argsort(-(x[rows] @ q))[:k]] + 1).tolist()) for q in queries]
                 for name, (_, rows) in cases.items()}
        plans = {name: plan_kind(S.explain(engine, queries[0], model=MODEL, revision=rev, limit=k, **f))
                 for name, (f, _) in cases.items()}
        efs = [int(v) for v in args.ef.split(",")]
        results: dict[str, dict[str, Any]] = {}
        for q in queries[:20]:  # warm the caches: filtered scans reach much more of the graph
            for filters, _ in cases.values():
                S.search(engine, q, model=MODEL, revision=rev, limit=k, **filters)
        keys = [(name, ef) for ef in efs for name in cases]
        lat: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
        server: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
        rec: dict[tuple[str, int], list[float]] = {key: [] for key in keys}
        got_k: dict[tuple[str, int], list[int]] = {key: [] for key in keys}
        # Every query runs every (case, ef_search) back to back, so load from other processes
        # falls on all of them alike.
        for qi, q in enumerate(queries):
            for name, ef in keys:
                filters = cases[name][0]
                S.ef_search = lambda limit, ef=ef: ef  # type: ignore[assignment,misc]
                t = time.perf_counter()
                hits = S.search(engine, q, model=MODEL, revision=rev, limit=k, **filters)
                lat[name, ef].append((time.perf_counter() - t) * 1000)
                rec[name, ef].append(len(truth[name][qi] & {h.image_id for h in hits}) / k)
                got_k[name, ef].append(len(hits))
                # The server's own planning + execution time: what a busy client CPU can't inflate.
                plan = S.explain(engine, q, model=MODEL, revision=rev, limit=k, **filters)
                server[name, ef].append(sum(float(v) for v in _TIMES.findall(plan)))
        for name, ef in keys:
            key = (name, ef)
            results[f"{name} | ef_search={ef}"] = {
                "case": name, "ef_search": ef, "plan": plans[name], "p50_ms": median(lat[key]),
                "p95_ms": pctl(lat[key], 95), "server_p50_ms": median(server[key]),
                "server_p95_ms": pctl(server[key], 95), "recall_at_10": float(np.mean(rec[key])),
                "min_hits": min(got_k[key]), "latencies_ms": lat[key]}
        S.ef_search = default_ef
        report["newest_version_filter"] = newest_version_cost(engine, queries, rev, k, cases)
        exact_lat = []
        for q in queries[: args.exact_queries]:
            t = time.perf_counter()
            S.search(exact_engine, q, model=MODEL, revision=rev, limit=k)
            exact_lat.append((time.perf_counter() - t) * 1000)
        report["exact_scan_no_filter"] = {"p50_ms": median(exact_lat), "p95_ms": pctl(exact_lat, 95)}
        report["results"] = results
        report["load_after"] = os.getloadavg()
    finally:
        S.ef_search = default_ef
        exact_engine.dispose()
        engine.dispose()
        pg.stop()

    load_info = report["load"]
    print(f"{args.rows:,} clustered {DIM}-d vectors ({args.topics} topics, {args.centres} centres, "
          f"noise {args.noise}), {args.queries} queries, k={k}; {os.cpu_count()} CPUs; "
          f"shared_buffers {report['shared_buffers']}; exact below {S.EXACT_FILTER_MAX:,} matching images")
    print(f"index: {report['index']}  ({report['index_mb']:.0f} MB)")
    if isinstance(load_info, dict):
        print(f"load: COPY {load_info['copy_s']:.1f} s ({load_info['copy_rows_per_s']:,.0f} rows/s), "
              f"CREATE INDEX {load_info['build_s']:.1f} s")
    print(f"load average before/after: {report['load_before']} / {report['load_after']}")
    print("  search() wall time from Python (3 statements + commit), and the server's planning + execution time")
    print(f"  {'case':22s} {'ef_search':>9s} {'plan':>20s} {'p50 ms':>7s} {'p95 ms':>7s} {'srv p50':>7s} "
          f"{'srv p95':>7s} {'recall@10':>9s} {'min hits':>8s}")
    for r in report["results"].values():
        print(f"  {r['case']:22s} {r['ef_search']:>9d} {r['plan']:>20s} {r['p50_ms']:>7.2f} {r['p95_ms']:>7.2f} "
              f"{r['server_p50_ms']:>7.2f} {r['server_p95_ms']:>7.2f} {r['recall_at_10']:>9.3f} {r['min_hits']:>8d}")
    print("  newest-version filter (search() leaves out an overwritten object's older versions), side by side:")
    for name, r in report["newest_version_filter"].items():
        print(f"  {name:22s} without p50 {r['without_p50_ms']:.2f} ms, with p50 {r['with_p50_ms']:.2f} ms: "
              f"x{r['ratio']:.2f}; the same hits for {r['same_hits']:.0%} of the queries")
    e = report["exact_scan_no_filter"]
    print(f"  exact scan (index disabled), no filter, {args.exact_queries} queries: p50 {e['p50_ms']:.1f} ms, "
          f"p95 {e['p95_ms']:.1f} ms")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
