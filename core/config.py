"""The one settings object. Build it at the entry point (CLI) and pass it down."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from imgq.feeding import PRIORITY_MAX, PRIORITY_MIN
from imgq.nightly import BackfillSpec, check_unique

DEFAULT_CAPTION_MODEL = "Salesforce/blip-image-captioning-base"
# The captioning checkpoint has no contrastive heads; embeddings and match scores need a retrieval one.
DEFAULT_EMBED_MODEL = "Salesforce/blip-itm-base-coco"
DEFAULT_TRANSLATE_MODEL = "facebook/nllb-200-distilled-600M"


def usable_cpus() -> int:
    if hasattr(os, "sched_getaffinity"):  # Linux: honours taskset/cpusets, unlike os.cpu_count()
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


# deploy/compose.env.example and deploy/k8s ship this in every secret; a deployment that kept one
# must not start.
PLACEHOLDER = "change-me"
# Read by boto3, not by these settings, yet set beside them in every deployment (k8s secrets).
S3_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def _loopback(address: str) -> bool:
    import ipaddress

    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """imgq configuration; every field reads ``IMGQ_<NAME>`` from the environment or ``.env``."""

    model_config = SettingsConfigDict(env_prefix="IMGQ_", env_file=".env", extra="ignore")

    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis) URL.")
    database_url: str = Field(
        "postgresql+psycopg://postgres@127.0.0.1:5432/imgq", description="SQLAlchemy URL of Postgres."
    )
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto); unset = AWS.")
    s3_region: str = "us-east-1"
    allowed_buckets: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated S3 buckets refs may name. Empty = no S3 refs."
    )
    local_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list, description="Comma-separated folders local refs must resolve inside."
    )

    kinds: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["caption"],
        description="Comma-separated job kinds a worker serves (caption, embed, validate, translate); it loads "
        "one model per family: caption -> IMGQ_CAPTION_MODEL, embed/validate -> IMGQ_EMBED_MODEL, "
        "translate -> IMGQ_TRANSLATE_MODEL.",
    )
    caption_model: str = Field(DEFAULT_CAPTION_MODEL, description="Captioning model: hub id or local checkpoint dir.")
    model_revision: str | None = Field(None, description="Hub revision (commit) of the caption model to pin.")
    embed_model: str = Field(
        DEFAULT_EMBED_MODEL, description="BLIP retrieval model (embed, validate, search): hub id or local dir."
    )
    embed_model_revision: str | None = Field(None, description="Hub revision (commit) of the embed model to pin.")
    translate_model: str = Field(
        DEFAULT_TRANSLATE_MODEL, description="Translation model of `--lang` captions (a many-language seq2seq "
        "model; Opus-MT per-language models also work): hub id or local checkpoint dir.",
    )
    translate_model_revision: str | None = Field(None, description="Hub revision (commit) of the translation "
                                                 "model to pin.")
    adapter_cache: int = Field(8, ge=1, le=1024, description="LoRA adapters a worker keeps loaded (least recently "
                               "used is dropped first).")
    adapter_dir: Path = Field(Path(".imgq/adapters"), description="Where a worker keeps local copies of adapters "
                              "stored in S3.")
    attention: Literal["eager", "sdpa"] = Field(
        "sdpa", description="BLIP attention: sdpa (fused; the embed model's vision encoder 2.2x on a GPU; for "
        "captioning also the decoder's self- and cross-attention) or eager (transformers' own).",
    )
    decode_loop: Literal["generate", "static", "graphs"] = Field(
        "static", description="How greedy captions are decoded: static (imgq.worker.decode_loop: a static key/value "
        "cache driven step by step; generate's ids, 1.7-2.0x its images/s for the tiny model on CPU), graphs (the "
        "same, each step replayed as a CUDA graph on a GPU; not yet measured on one) or generate (transformers' own "
        "loop). "
        "Beams, sampling, a repetition penalty and explained captions always use generate.",
    )
    explain_output: str | None = Field(
        None, description="Where workers write the overlays of jobs enqueued with --explain: a local folder or "
        "s3://bucket/prefix, never a source bucket or root. Unset: only the per-token summary is stored.",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto = bfloat16 on CUDA (fp16 if unsupported), float32 on CPU."
    )

    # One queue: a worker's feeder, retries and depth gauge are its queue's (a comma made a queue
    # literally named "a,b", where it used to mean several).
    queue: str = Field("imgq", min_length=1, pattern=r"^[^,\s]+$")
    refs_per_message: int = Field(16, ge=1, le=1000, description="Refs packed into one broker message.")
    copy_streams: int = Field(
        2, ge=1, le=8, description="COPY streams (connections) loading a job of more than 5,000 refs into "
        "Postgres: 1 = one transaction; more spread the server's load over its cores.",
    )
    max_batch: int = Field(
        0, ge=0, le=4096, description="Largest model batch; 0 = chosen by the worker from timings of its model "
        "(IMGQ_AUTOTUNE), else 32.",
    )
    max_wait_ms: int = Field(50, ge=0, le=60_000, description="Longest an item waits for batchmates.")
    decode_threads: int = Field(
        0, ge=0, le=256, description="Fetch/decode threads per worker; 0 = one per CPU core this process may use."
    )
    result_writers: int = Field(
        2, ge=1, le=16, description="Threads writing results to Postgres, each on its own connection: while one "
        "waits on the server, the next prepares its write (docs/performance.md).",
    )
    torch_threads: int = Field(
        0,
        ge=0,
        le=256,
        description="torch intra-op CPU threads; 0 = chosen by the worker on a CPU-only host from the model's "
        "share of the CPU work (IMGQ_AUTOTUNE), else torch's default (one per core).",
    )
    autotune: bool = Field(
        True, description="At start-up, time the model on a few synthetic batches and one decode, and choose "
        "IMGQ_MAX_BATCH and IMGQ_TORCH_THREADS where they are 0 (docs/performance.md). Takes about a second "
        "for a small model; explicit settings always win.",
    )
    messages_in_flight: int = Field(
        16, ge=1, le=1024, description="Messages a worker holds at once (Celery thread pool size)."
    )
    broker_window: int = Field(
        10_000, ge=1, description="Most messages waiting in each lane of the broker queue (backfills have their "
        "own; imgq.feeding); the rest of the backlog waits "
        "in Postgres and the feeder tops the queue up. 10,000 x 16 refs = 34 MB of Redis, 80 s of work for one "
        "GPU at 2,000 img/s (docs/performance.md).",
    )
    broker_memory_fraction: float = Field(
        0.8, ge=0, le=1, description="The feeder publishes only while Redis holds less than this share of its "
        "maxmemory (INFO memory, every client's keys counted); the rest of the backlog waits in Postgres. 0 turns "
        "the check off; a Redis without maxmemory is bounded by the window alone (docs/scaling.md).",
    )
    feed_interval_s: float = Field(0.25, gt=0, le=60, description="How often the feeder tops the window up.")
    priority: int = Field(0, ge=PRIORITY_MIN, le=PRIORITY_MAX,
                          description="Default priority of an enqueued job; higher is fed first.")
    tenant: str = Field("default", min_length=1, description="Default tenant of an enqueued job (fair shares).")
    max_num_beams: int = Field(8, ge=1, le=16, description="Widest caption beam search a tenant may ask for "
                               "over the API, unless its limits (tenants.limits num_beams) say otherwise.")
    max_new_tokens: int = Field(128, ge=1, le=512, description="Longest caption (tokens) a tenant may ask for "
                                "over the API, unless its limits (max_new_tokens) say otherwise.")
    max_item_cost: float = Field(64.0, gt=0, description="Most an item of an API job may cost (imgq.cost: a greedy "
                                 "20-token caption is 1), unless the tenant's limits (item_cost) say otherwise.")

    backfills: Annotated[list[BackfillSpec], NoDecode] = Field(
        default_factory=list, description="Backfills `imgq beat` runs on a schedule: a JSON list of {name, source, "
        "kinds, params, schedule (crontab, e.g. '0 2 * * *')[, since, tenant, priority, max_rate]} "
        "(docs/backfill.md).",
    )
    control_queue: str = Field("imgq-control", min_length=1, description="Broker queue of control tasks "
                               "(scheduled backfills), consumed by `imgq beat`; never a worker's image queue.")

    max_object_bytes: int = Field(50 * 2**20, ge=1, description="Refuse objects larger than this.")
    max_pixels: int = Field(40_000_000, ge=1, description="Refuse images with more pixels than this.")
    draft_decode: bool = Field(True, description="Decode JPEGs at 1/2, 1/4 or 1/8 scale when that still covers the "
                               "model's input (Pillow's draft mode): a 12 MP photo decodes several times faster, "
                               "with a small stated pixel difference (docs/performance.md). Off: full decode, "
                               "then resize.")
    max_attempts: int = Field(5, ge=1, le=100, description="Deliveries before an item is dead-lettered.")
    decode_timeout_s: float = Field(30, gt=0, description="Longest one image may take to decode before it is "
                                    "dead-lettered (decode_timeout).")
    retry_base_s: float = Field(1.0, gt=0)
    retry_max_s: float = Field(300.0, gt=0)
    visibility_timeout_s: int = Field(
        3600, ge=2, description="Redis redelivers an unacknowledged message after this long."
    )
    task_time_limit_s: int = Field(600, ge=1, description="Longest one message may take to settle.")
    reconcile_after_s: float = Field(
        1200, gt=0, description="Items published and still queued after this, once their broker lane has let "
        "every message pushed before theirs go, were lost: the feeder publishes them again."
    )
    reconcile_interval_s: float = Field(60, gt=0, description="How often the feeder looks for lost items.")
    shutdown_grace_s: float = Field(60, gt=0, description="SIGTERM: time to finish in-flight messages.")
    heartbeat_s: float = Field(3, gt=0, le=300, description="How often a worker records that it is alive.")
    worker_dead_after_s: float = Field(
        12, gt=0, description="A worker silent this long is dead: its running items are re-published."
    )

    # Operations: every listener is authenticated unless it is bound to loopback.
    metrics_port: int = Field(0, ge=0, le=65535, description="Worker's Prometheus /metrics (and /healthz, "
                              "/readyz) port; 0 = no listener.")
    metrics_bind: str = Field("127.0.0.1", description="Address the metrics listener binds.")
    metrics_token: str | None = Field(None, description="Bearer token /metrics requires; required when "
                                      "IMGQ_METRICS_BIND is not a loopback address.")
    flower_basic_auth: str | None = Field(None, description="user:password[,user2:password2] for `imgq flower`.")
    remote_control: Literal["read-only", "off", "full"] = Field(
        "read-only", description="Celery remote control the worker answers: read-only (what Flower reads), off, "
        "or full (shutdown, revoke, ... by any broker client).",
    )

    # The HTTP API (`imgq api`, docs/api.md): every /v1 route needs a tenant's API key.
    api_bind: str = Field("127.0.0.1", description="Address `imgq api` binds.")
    api_port: int = Field(8000, ge=1, le=65535, description="Port `imgq api` listens on.")
    api_max_body_bytes: int = Field(2 * 2**20, ge=1024, description="Largest request body the API reads (413).")
    api_max_refs: int = Field(10_000, ge=1, description="Most refs one POST /v1/jobs may name or a prefix may "
                              "expand to (413), unless the tenant's limits (max_refs) say otherwise.")
    api_requests_per_minute: int = Field(600, ge=1, description="Requests per API key per minute (429), unless "
                                         "the tenant's limits (requests_per_minute) say otherwise.")
    api_auth_failures_per_minute: int = Field(30, ge=1, description="Failed authentications one client address may "
                                              "make per minute per API process before its unknown keys get 429 "
                                              "without a database lookup.")
    api_priority: int = Field(10, ge=PRIORITY_MIN, le=PRIORITY_MAX, description="Priority of API jobs unless the "
                              "request names one; also the highest a request may name, unless the tenant's "
                              "limits (max_priority) say otherwise.")

    # Job-finished callbacks (docs/callbacks.md): every worker runs the notifier.
    callback_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated hosts callbacks may be POSTed to: hostnames (exact or "
        "*.example.com), IPs or CIDRs. Empty = callbacks refused. Private, loopback and link-local addresses "
        "are refused unless an IP/CIDR entry covers them.",
    )
    callback_max_attempts: int = Field(8, ge=1, le=100, description="POSTs of one callback before it is failed.")
    callback_interval_s: float = Field(1, gt=0, le=3600, description="How often a worker looks for due callbacks.")
    callback_timeout_s: float = Field(10, gt=0, le=300, description="Deadline of one whole callback attempt.")

    @field_validator("allowed_buckets", "local_roots", "kinds", "callback_hosts", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("kinds")
    @classmethod
    def _known_kinds(cls, kinds: list[str]) -> list[str]:
        from imgq.errors import BadParams
        from imgq.kinds import parse_kinds

        try:
            return parse_kinds(kinds)
        except BadParams as exc:
            raise ValueError(exc.message) from None

    @field_validator("backfills", mode="before")
    @classmethod
    def _backfills_json(cls, value: object) -> object:
        import json

        if isinstance(value, str):
            try:
                return json.loads(value) if value.strip() else []
            except json.JSONDecodeError as exc:
                raise ValueError(f"not valid JSON: {exc}") from None
        return value

    @field_validator("backfills")
    @classmethod
    def _unique_backfills(cls, specs: list[BackfillSpec]) -> list[BackfillSpec]:
        return check_unique(specs)

    @field_validator("callback_hosts")
    @classmethod
    def _callback_hosts(cls, hosts: list[str]) -> list[str]:
        from imgq.callbacks import HostPolicy
        from imgq.errors import CallbackRefused

        try:
            HostPolicy.parse(hosts)
        except CallbackRefused as exc:
            raise ValueError(exc.message) from None
        return hosts

    @field_validator("local_roots")
    @classmethod
    def _resolve_roots(cls, roots: list[Path]) -> list[Path]:
        return [Path(root).expanduser().resolve() for root in roots]

    @field_validator("decode_threads")
    @classmethod
    def _auto_threads(cls, value: int) -> int:
        # Decoding is CPU work (Pillow releases the GIL): more threads than cores only adds
        # switching; on 2 cores, 2 threads beat 4 by 9 % end to end (docs/performance.md).
        return value or usable_cpus()

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        for name, value in [*self.as_env().items(), *((n, os.environ.get(n, "")) for n in S3_CREDENTIALS)]:
            if PLACEHOLDER in value.lower():
                raise ValueError(f"{name} still holds the example's placeholder ({PLACEHOLDER!r}): set a real secret")
        if self.metrics_port and not self.metrics_token and not _loopback(self.metrics_bind):
            raise ValueError(f"IMGQ_METRICS_BIND ({self.metrics_bind}) is not a loopback address: set "
                             "IMGQ_METRICS_TOKEN, which /metrics then requires as a bearer token")
        # A message must be acknowledged well before Redis would hand it to a second worker.
        if self.visibility_timeout_s <= self.task_time_limit_s + self.max_wait_ms / 1000:
            raise ValueError(
                f"IMGQ_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must exceed "
                f"IMGQ_TASK_TIME_LIMIT_S ({self.task_time_limit_s}) + max wait; "
                "otherwise running messages are delivered twice"
            )
        if self.worker_dead_after_s < 3 * self.heartbeat_s:
            raise ValueError(
                f"IMGQ_WORKER_DEAD_AFTER_S ({self.worker_dead_after_s}) must be at least 3 x IMGQ_HEARTBEAT_S "
                f"({self.heartbeat_s}); otherwise one late beat would take a live worker's items"
            )
        if self.retry_max_s >= self.visibility_timeout_s:
            raise ValueError(
                f"IMGQ_RETRY_MAX_S ({self.retry_max_s}) must be below IMGQ_VISIBILITY_TIMEOUT_S "
                f"({self.visibility_timeout_s}); Redis may deliver a message delayed longer twice"
            )
        if self.explain_output:
            self._check_explain_output(self.explain_output)
        if self.reconcile_after_s <= self.retry_max_s:
            raise ValueError(
                f"IMGQ_RECONCILE_AFTER_S ({self.reconcile_after_s}) must exceed IMGQ_RETRY_MAX_S "
                f"({self.retry_max_s}); otherwise items waiting to retry are published twice"
            )
        return self

    def _check_explain_output(self, where: str) -> None:
        # Overlays are derived data: written into a source, they would be captioned as images.
        if where.startswith("s3://"):
            bucket = where[5:].split("/", 1)[0]
            if not bucket:
                raise ValueError(f"IMGQ_EXPLAIN_OUTPUT ({where}) names no bucket: use s3://bucket/prefix")
            if bucket in self.allowed_buckets:
                raise ValueError(f"IMGQ_EXPLAIN_OUTPUT ({where}) is in a source bucket (IMGQ_ALLOWED_BUCKETS); "
                                 "write overlays to a results bucket")
            return
        if "://" in where:
            raise ValueError(f"IMGQ_EXPLAIN_OUTPUT ({where}) must be a local folder or s3://bucket/prefix")
        folder = Path(where).expanduser().resolve()
        for root in self.local_roots:
            if folder == root or root in folder.parents:
                raise ValueError(f"IMGQ_EXPLAIN_OUTPUT ({where}) is inside a source root (IMGQ_LOCAL_ROOTS "
                                 f"{root}); write overlays to a folder outside it")

    def model_for(self, kind: str) -> str:
        """The model a kind's tasks name at enqueue and a worker serves for it."""
        from imgq.kinds import spec

        return str(getattr(self, spec(kind).model_setting))

    def revision_for(self, kind: str) -> str | None:
        from imgq.kinds import spec

        return self.model_revision if spec(kind).model_setting == "caption_model" else self.embed_model_revision

    def as_env(self) -> dict[str, str]:
        """The ``IMGQ_*`` variables that reproduce these settings in another process."""
        import json

        env: dict[str, str] = {}
        for name, value in self.model_dump(mode="json").items():
            if value is not None:
                if isinstance(value, list) and value and isinstance(value[0], dict):
                    env[f"IMGQ_{name.upper()}"] = json.dumps(value)  # IMGQ_BACKFILLS is JSON
                    continue
                env[f"IMGQ_{name.upper()}"] = ",".join(map(str, value)) if isinstance(value, list) else str(value)
        return env

    def masked(self) -> dict[str, str]:
        """``IMGQ_*`` values for display, with passwords in URLs and secret query parameters hidden."""
        return {name: "***" if name in _SECRET_VARIABLES and value else mask_secrets(value)
                for name, value in self.as_env().items()}

    @property
    def sync_database_url(self) -> str:
        """The URL with the psycopg 3 driver, whatever the user wrote."""
        url = self.database_url
        for prefix in ("postgresql+psycopg2://", "postgresql://", "postgres://"):
            if url.startswith(prefix):
                return "postgresql+psycopg://" + url[len(prefix) :]
        return url


_SECRET_VARIABLES = {"IMGQ_METRICS_TOKEN", "IMGQ_FLOWER_BASIC_AUTH"}
_SECRET_PARAMS = {"password", "pass", "pwd", "secret", "token", "sslpassword", "access_key", "secret_key"}


def mask_secrets(value: str) -> str:
    """Hide the password of every ``scheme://user:password@host`` and secret query parameters,
    splitting userinfo at the *last* ``@`` (a password may contain ``@``)."""
    from urllib.parse import parse_qsl, urlencode, urlsplit

    parts = []
    for piece in value.split(","):
        if "://" not in piece:
            parts.append(piece)
            continue
        try:
            url = urlsplit(piece)
        except ValueError:
            parts.append("***")
            continue
        netloc = url.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, _, password = userinfo.partition(":")
            netloc = f"{user}:***@{host}" if password else f"{userinfo}@{host}"  # nothing to hide
        pairs = parse_qsl(url.query, keep_blank_values=True)
        if netloc == url.netloc and not any(k.lower() in _SECRET_PARAMS for k, _ in pairs):
            parts.append(piece)  # nothing to hide: keep it byte for byte
            continue
        query = urlencode([(k, "***" if k.lower() in _SECRET_PARAMS else v) for k, v in pairs], safe="/:*")
        parts.append(f"{url.scheme}://{netloc}{url.path}" + (f"?{query}" if query else "")
                     + (f"#{url.fragment}" if url.fragment else ""))
    return ",".join(parts)
