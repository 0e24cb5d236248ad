"""Captions in other languages end to end: `imgq enqueue caption --lang` -> a real `imgq worker`
serving caption,translate -> translated rows that `imgq check` accounts for; `imgq enqueue
translate --job` reuses the stored English captions (the worker's metrics show BLIP did not run);
`imgq enqueue caption --adapter` captions in the adapter's language."""

from __future__ import annotations

import json
import socket
import urllib.request
import uuid
from pathlib import Path

import pytest
from sqlalchemy import text

from imgq.db.store import Store
from tests.e2e.helpers import check_job, jpeg_bytes, run_cli, wait_finished, workers

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.splitlines() if line.startswith(name))


def test_captions_translated_into_each_language_then_translated_again_without_blip(
    make_settings, image_root: Path, tiny_model_dir: Path, tiny_translate_dir: Path, tmp_path: Path
):
    port = _free_port()
    settings = make_settings(kinds=["caption", "translate"], translate_model=str(tiny_translate_dir),
                             metrics_port=port)
    refs = []
    for i in range(6):
        path = image_root / f"{i}.jpg"
        path.write_bytes(jpeg_bytes(320, 240, 700 + i))
        refs.append(str(path))

    refused = run_cli(settings, "enqueue", "caption", *refs, "--lang", "de,xx")
    assert refused.returncode == 2 and "error[unknown_language]" in refused.stderr
    out = run_cli(settings, "enqueue", "caption", *refs, "--lang", "de,fr", "--max-new-tokens", "6")
    assert out.returncode == 0, out.stderr
    job = out.stdout.strip()
    store = Store.from_url(settings.database_url)
    with workers(settings, tiny_model_dir, tmp_path, 1) as procs:
        wait_finished(store, [uuid.UUID(job)], timeout=120, procs=procs, log_dir=tmp_path)
        assert _metric(port, 'imgq_reused_results_total{kind="caption"}') == 0

        report = check_job(settings, job)
        assert "translations=12" in report
        rows = [json.loads(line) for line in run_cli(settings, "results", job, "--lang", "de").stdout.splitlines()]
        assert len(rows) == 6 and all(r["caption"] and r["method"] == "translated" and r["source_caption"]
                                      for r in rows)

        # Back-fill Japanese onto the same job's captions: BLIP is not run again.
        out = run_cli(settings, "enqueue", "translate", "--job", job, "--lang", "ja")
        assert out.returncode == 0, out.stderr
        second = out.stdout.strip()
        wait_finished(store, [uuid.UUID(second)], timeout=120, procs=procs, log_dir=tmp_path)
        assert _metric(port, 'imgq_reused_results_total{kind="caption"}') == 6
        assert _metric(port, 'imgq_images_total{kind="caption"}') == 12  # committed twice, computed once
    assert "translations=6" in check_job(settings, second)
    with store.engine.connect() as conn:
        by_method = dict(conn.execute(text("SELECT lang, count(*) FROM captions GROUP BY lang")).all())
        same = conn.execute(text(
            "SELECT count(*) FROM job_items a JOIN job_items b ON a.ref = b.ref AND a.caption_id = b.caption_id "
            "WHERE a.job_id = :a AND b.job_id = :b"), {"a": uuid.UUID(job), "b": uuid.UUID(second)}).scalar_one()
    store.engine.dispose()
    assert by_method == {"en": 6, "de": 6, "fr": 6, "ja": 6}
    assert same == 6, "the second job links the first job's English captions"
    bad = run_cli(settings, "enqueue", "translate", "--lang", "ja")
    assert bad.returncode == 2 and "error[bad_request]" in bad.stderr


def test_adapter_jobs_caption_in_the_adapters_language_and_a_withdrawn_adapter_is_dead_lettered(
    make_settings, image_root: Path, tiny_model_dir: Path, tmp_path: Path
):
    from imgq.db.adapters import AdapterRecord, Adapters
    from imgq.worker.loading import local_revision
    from tests.integration.test_adapters import write_adapter

    settings = make_settings(adapter_dir=tmp_path / "adapter-cache")
    refs = []
    for i in range(4):
        path = image_root / f"a{i}.jpg"
        path.write_bytes(jpeg_bytes(320, 240, 900 + i))
        refs.append(str(path))
    store = Store.from_url(settings.database_url)
    registry = Adapters(store.engine)
    for seed, name in enumerate(["de-news", "fr-art", "gone"]):
        folder = image_root / "adapters" / name  # workers read adapters only under IMGQ_LOCAL_ROOTS
        revision = write_adapter(tiny_model_dir, folder, seed)
        registry.register(AdapterRecord(name, "fr" if name == "fr-art" else "de", str(tiny_model_dir),
                                        local_revision(tiny_model_dir), str(folder), revision))

    refused = run_cli(settings, "enqueue", "caption", *refs, "--adapter", "nope")
    assert refused.returncode == 2 and "error[unknown_adapter]" in refused.stderr
    # Named in --params, it was accepted and every item dead-lettered.
    refused = run_cli(settings, "enqueue", "caption", *refs, "--params", '{"adapter": "nope"}')
    assert refused.returncode == 2 and "error[unknown_adapter]" in refused.stderr
    jobs = {}
    for name in ("de-news", "fr-art", "gone"):
        out = run_cli(settings, "enqueue", "caption", *refs, "--adapter", name, "--max-new-tokens", "6")
        assert out.returncode == 0, out.stderr
        jobs[name] = out.stdout.strip()
    plain = run_cli(settings, "enqueue", "caption", *refs, "--max-new-tokens", "6")
    jobs["plain"] = plain.stdout.strip()
    with store.engine.begin() as conn:  # withdrawn after its job was accepted: dead-lettered, not lost
        conn.execute(text("DELETE FROM adapters WHERE name = 'gone'"))

    with workers(settings, tiny_model_dir, tmp_path, 1) as procs:
        wait_finished(store, [uuid.UUID(j) for j in jobs.values()], timeout=120, procs=procs, log_dir=tmp_path)
    for name in ("de-news", "fr-art", "plain"):
        check_job(settings, jobs[name])
    # German captions are not BLIP's English: translate refuses them rather than feed them to an
    # English-source model.
    again = run_cli(settings, "enqueue", "translate", "--job", jobs["de-news"], "--lang", "fr")
    assert again.returncode == 2 and "error[bad_request]" in again.stderr and "de-news" in again.stderr
    assert store.counts(uuid.UUID(jobs["gone"]))["dead"] == 4
    assert "adapter_unavailable" in run_cli(settings, "dlq", "list", "--job", jobs["gone"]).stdout
    with store.engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT j.job_id, c.lang, c.method, c.via, c.text FROM job_items j JOIN captions c ON c.id = j.caption_id"
        )).all()
    store.engine.dispose()
    by_job: dict[str, set[tuple[str, str, str]]] = {}
    texts: dict[str, list[str]] = {}
    for job_id, lang, method, via, caption in rows:
        by_job.setdefault(str(job_id), set()).add((lang, method, via))
        texts.setdefault(str(job_id), []).append(caption)
    assert by_job[jobs["de-news"]] == {("de", "adapter", "de-news")}
    assert by_job[jobs["fr-art"]] == {("fr", "adapter", "fr-art")}
    assert by_job[jobs["plain"]] == {("en", "native", "")}
    assert sorted(texts[jobs["de-news"]]) != sorted(texts[jobs["plain"]]), "the adapter changes the captions"
    out = run_cli(settings, "results", jobs["fr-art"], "--lang", "fr")
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert all(r["method"] == "adapter" and r["via"] == "fr-art" and r["caption"] for r in rows)
    other = run_cli(settings, "results", jobs["fr-art"], "--lang", "de")  # the adapter's language is fr
    assert other.returncode == 2 and "has no de captions (it asked for: fr)" in other.stderr
