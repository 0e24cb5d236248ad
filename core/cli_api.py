"""``imgq api`` and ``imgq apikey``: the HTTP API's server and its tenants' keys."""

from __future__ import annotations

import json
from typing import Annotated

import typer

apikey_app = typer.Typer(help="API keys of the HTTP API's tenants, and their limits: create, revoke, list, "
                         "limits.", no_args_is_help=True)


def _engine():  # type: ignore[no-untyped-def]
    from imgq.cli import _settings
    from imgq.db.store import make_engine

    settings = _settings()
    return settings, make_engine(settings.sync_database_url)


@apikey_app.command("create")
def apikey_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key acts for (created if new).")],
    bucket: Annotated[list[str] | None, typer.Option("--bucket", help="An S3 bucket the tenant may read "
                                                     "(within IMGQ_ALLOWED_BUCKETS); repeat for several.")] = None,
    root: Annotated[list[str] | None, typer.Option("--root", help="A local folder the tenant may read (within "
                                                   "IMGQ_LOCAL_ROOTS); repeat for several.")] = None,
    label: Annotated[str, typer.Option(help="What the key is for, shown by `imgq apikey list`.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout: key, key_id, tenant and "
                                          "callback_secret (null for an existing tenant), so a script that "
                                          "keeps stdout keeps both secrets.")] = False,
) -> None:
    """Create an API key for a tenant; print it once (only its hash is stored).

    A new tenant also gets the secret its job callbacks are signed with, printed once on stderr
    (with --json, in the object on stdout). An existing tenant keeps its sources and gains the
    --bucket and --root given."""
    from imgq.cli import _fail
    from imgq.db.tenancy import TENANT_NAME, check_sources, create_key

    settings, engine = _engine()
    if not TENANT_NAME.match(tenant):
        _fail("bad_request", f"--tenant {tenant!r}: use 1-63 letters, digits, dots, underscores or dashes")
    if tenant == settings.tenant:
        # Tenancy is by name, and every job enqueued without --tenant gets this one: a key for it
        # would list, read and cancel the operators' own jobs, whatever its sources.
        _fail("bad_request", f"--tenant {tenant!r} is IMGQ_TENANT, the tenant of every job enqueued without "
              "--tenant (the operators' own); an API key for it would see those jobs. Choose another name")
    buckets, roots, problems = check_sources(bucket or [], root or [], allowed_buckets=settings.allowed_buckets,
                                             local_roots=settings.local_roots)
    if problems:
        _fail("bad_source", "; ".join(problems))
    try:
        key, callback_secret = create_key(engine, tenant, buckets=buckets, roots=roots, label=label)
    finally:
        engine.dispose()
    if as_json:
        typer.echo(json.dumps({"key": key, "key_id": key.split("_")[1], "tenant": tenant,
                               "callback_secret": callback_secret}))
        return
    if callback_secret is not None:
        typer.echo(f"created tenant {tenant}; its callback signing secret (shown once): {callback_secret}", err=True)
    typer.echo(f"key {key.split('_')[1]} for tenant {tenant} (shown once; store it now)", err=True)
    typer.echo(key)


@apikey_app.command("revoke")
def apikey_revoke(key_id: Annotated[str, typer.Argument(help="The key's id (`imgq apikey list`).")]) -> None:
    """Revoke a key: its requests get 401 within a second, and its sessions on the jobs page end."""
    from imgq.cli import _fail
    from imgq.db.tenancy import revoke_key

    _, engine = _engine()
    try:
        revoked = revoke_key(engine, key_id)
    finally:
        engine.dispose()
    if not revoked:
        _fail("not_found", f"no unrevoked key {key_id}", 1)
    typer.echo(f"revoked {key_id}", err=True)


@apikey_app.command("list")
def apikey_list(
    tenant: Annotated[str | None, typer.Option(help="Only this tenant's keys.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
) -> None:
    """Every key with its tenant, label, sources, creation, last use and revocation (never a secret)."""
    from imgq.cli_common import _json_default
    from imgq.db.tenancy import list_keys

    _, engine = _engine()
    try:
        rows = list_keys(engine, tenant)
    finally:
        engine.dispose()
    for row in rows:
        if as_json:
            typer.echo(json.dumps(row, default=_json_default))
            continue
        state = "revoked" if row["revoked_at"] else "active"
        used = f"{row['last_used_at']:%Y-%m-%d %H:%M}" if row["last_used_at"] else "never"
        sources = ",".join([f"s3://{b}" for b in row["buckets"]] + list(row["roots"])) or "-"
        typer.echo(f"{row['id']}  {row['tenant']:<16} {state:<8} used {used:<16} {sources}  {row['label']}")
    if not rows and not as_json:
        typer.echo("no keys", err=True)


@apikey_app.command("limits")
def apikey_limits(
    tenant: Annotated[str, typer.Argument(help="The tenant (created by `imgq apikey create`).")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="NAME=VALUE, repeatable: requests_per_minute, "
                                                   "max_refs, max_priority, num_beams, max_new_tokens, "
                                                   "item_cost.")] = None,
    unset: Annotated[list[str] | None, typer.Option("--unset", help="NAME, repeatable: back to the setting's "
                                                    "default.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout: tenant, limits (every one; "
                                          "defaults from this environment's IMGQ_ settings) and own (those "
                                          "the tenant sets).")] = False,
) -> None:
    """Show or change a tenant's limits (per-minute requests, refs per request, priority cap, cost
    limits); the API applies a change within a second. Prints every limit after the change, each
    with where it comes from: the tenant's own, or the IMGQ_ setting that gives its default (read
    from this command's environment: run it with the API's settings to see what the API applies)."""
    from imgq.cli import _fail
    from imgq.db.tenancy import effective_limits, parse_limits, set_limits

    _check_limit_types(set_ or [])
    try:
        changes = parse_limits(set_ or [])
    except ValueError as exc:
        _fail("bad_request", str(exc))
    both = sorted(set(changes) & {name.strip() for name in unset or []})
    if both:
        _fail("bad_request", "; ".join(f"--set {name} and --unset {name} contradict each other: choose one"
                                       for name in both))
    settings, engine = _engine()
    try:
        own = set_limits(engine, tenant, changes, unset or [])
    except ValueError as exc:
        _fail("bad_request", str(exc))
    finally:
        engine.dispose()
    if own is None:
        _fail("not_found", f"no tenant {tenant!r} (`imgq apikey create --tenant {tenant}` makes one)", 1)
    limits = effective_limits(settings, own)
    if as_json:
        typer.echo(json.dumps({"tenant": tenant, "limits": {name: value for name, value, _ in limits},
                               "own": own}, sort_keys=True))
        return
    for name, value, setting in limits:
        typer.echo(f"{name:<20} {value:<10} {'own' if setting is None else f'default ({setting})'}")


# What a limit's value must be, in words (LIMIT_TYPES holds the Python types).
_TYPE_WORDS = {int: "an integer", float: "a number"}


def _check_limit_types(assignments: list[str]) -> None:
    """A --set value that is not of its limit's type, refused as parse_limits would be, with the type said
    in words ("num_beams takes an integer", not "takes a int")."""
    from imgq.cli import _fail
    from imgq.db.tenancy import LIMIT_TYPES

    for assignment in assignments:
        name, sep, raw = assignment.partition("=")
        kind = LIMIT_TYPES.get(name.strip()) if sep else None
        if kind is None:
            continue  # parse_limits names the limits there are
        try:
            kind(raw.strip())
        except ValueError:
            _fail("bad_request", f"{assignment!r}: {name.strip()} takes {_TYPE_WORDS.get(kind, kind.__name__)}")


def api(
    host: Annotated[str | None, typer.Option(help="Address to bind (IMGQ_API_BIND, default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (IMGQ_API_PORT, default 8000).")] = None,
    workers: Annotated[int, typer.Option(min=1, max=64, help="Server processes (each with its own pool of "
                                         "16 database connections); about one per core.")] = 1,
    access_log: Annotated[bool, typer.Option("--access-log/--no-access-log", help="One log line per request "
                                             "(costs about a third of the throughput of cheap requests).")] = False,
) -> None:
    """Serve the HTTP API (OpenAPI at /docs): jobs, results, images and search for the tenants'
    keys (`imgq apikey create`), and the jobs page at /ui."""
    from imgq.cli import _fail, _require_schema, _settings

    try:
        import uvicorn

        from imgq.producer.api.app import create_app
    except ImportError as exc:
        _fail("missing_extra", f"the API needs the api extra: pip install 'imgq[api]' ({exc})")
    settings = _settings()  # checked here, so a bad setting is one error line, not one per worker
    _require_schema(settings)
    options = {"host": host or settings.api_bind, "port": port or settings.api_port, "log_level": "info",
               "proxy_headers": False, "server_header": False, "access_log": access_log}
    if workers > 1:  # each process builds its app from the same IMGQ_* environment
        uvicorn.run("imgq.producer.api.app:from_env", factory=True, workers=workers, **options)
    else:
        uvicorn.run(create_app(settings), **options)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""
    app.command("api")(api)
    app.add_typer(apikey_app, name="apikey")
