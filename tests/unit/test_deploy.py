"""The deployment files are code: compose and the Kubernetes manifests are checked for the wiring
an operator relies on, and validated against the Kubernetes and KEDA schemas."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KEDA = ROOT / "tests" / "fixtures" / "k8s"
GRACE_S = 60  # IMGQ_SHUTDOWN_GRACE_S in both deployments


def _seconds(value: str | int) -> float:
    found = re.fullmatch(r"(\d+)(s|m)?", str(value))
    assert found, value
    return int(found.group(1)) * (60 if found.group(2) == "m" else 1)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_runs_the_whole_stack_with_health_ordering(compose):
    services = compose["services"]
    assert {"redis", "postgres", "minio", "minio-init", "migrate", "flower", "worker", "worker-cpu"} <= set(services)
    for name in ("worker", "worker-cpu"):
        worker = services[name]
        assert worker["restart"] in ("unless-stopped", "always", "on-failure")
        assert _seconds(worker["stop_grace_period"]) > GRACE_S == int(worker["environment"]["IMGQ_SHUTDOWN_GRACE_S"])
        assert "/readyz" in " ".join(worker["healthcheck"]["test"])
        assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
        assert worker["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert services["worker-cpu"]["profiles"] == ["cpu"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["flower"]["command"][0] == "flower"
    assert "IMGQ_FLOWER_BASIC_AUTH" in services["flower"]["environment"]
    for service in services.values():
        image = service.get("image", "")
        assert not image.endswith(":latest") and (":" in image or "build" in service), image


def test_compose_gives_each_service_its_own_least_privilege_credentials(compose):
    services = compose["services"]
    users = {name: re.search(r"://([^:]+):", s["environment"]["IMGQ_DATABASE_URL"]).group(1)
             for name, s in services.items() if "IMGQ_DATABASE_URL" in s.get("environment", {})}
    assert users == {"migrate": "imgq_owner", "worker": "imgq_worker", "worker-cpu": "imgq_worker",
                     "producer": "imgq_producer", "api": "imgq_api"}
    assert services["worker"]["environment"]["AWS_ACCESS_KEY_ID"] == "imgq-worker"
    assert services["producer"]["environment"]["AWS_ACCESS_KEY_ID"] == "imgq-producer"
    assert services["api"]["environment"]["AWS_ACCESS_KEY_ID"] == "imgq-producer"
    roles = (ROOT / "deploy" / "postgres" / "10-roles.sh").read_text()
    assert "GRANT SELECT ON TABLES TO imgq_reader" in roles and "SUPERUSER" not in roles
    acl = compose["configs"]["redis_acl"]["content"]
    assert "user default off" in acl and "-@admin" in acl


def test_compose_keeps_secrets_required_and_off_command_lines(compose):
    text = (ROOT / "docker-compose.yml").read_text()
    for secret in ("REDIS_PASSWORD", "POSTGRES_PASSWORD", "POSTGRES_WORKER_PASSWORD", "MINIO_ROOT_PASSWORD",
                   "MINIO_WORKER_SECRET", "IMGQ_FLOWER_BASIC_AUTH", "IMGQ_METRICS_TOKEN", "POSTGRES_API_PASSWORD"):
        assert re.search(r"\$\{" + secret + r":\?", text), f"{secret} must be required (${{{secret}:?}})"
    for service in compose["services"].values():
        command = " ".join(map(str, service.get("command", []))) + " " + " ".join(
            map(str, (service.get("healthcheck") or {}).get("test", [])))
        assert "PASSWORD" not in command and "--requirepass" not in command and " -a " not in command
    example = (ROOT / "deploy" / "compose.env.example").read_text()
    placeholders = [line for line in example.splitlines() if "change-me" in line]
    assert len(placeholders) >= 10


def test_a_placeholder_secret_is_refused_at_start(monkeypatch):
    from imgq.config import Settings

    with pytest.raises(ValueError, match="IMGQ_BROKER_URL still holds the example's placeholder"):
        Settings(broker_url="redis://imgq:change-me@redis:6379/0")
    with pytest.raises(ValueError, match="IMGQ_METRICS_TOKEN"):
        Settings(metrics_token="change-me")
    with pytest.raises(ValueError, match="IMGQ_METRICS_BIND"):
        Settings(metrics_port=9464, metrics_bind="0.0.0.0")
    assert Settings(metrics_port=9464, metrics_bind="0.0.0.0", metrics_token="t0ken").metrics_port == 9464
    # boto3's credentials are not settings of imgq, but ship in the same secrets (found by review).
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "change-me")
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY still holds the example's placeholder"):
        Settings()


def test_images_are_multi_stage_non_root_and_cuda_only_from_the_torch_index():
    for name in ("Dockerfile.producer", "Dockerfile.worker", "Dockerfile.worker-cpu"):
        text = (ROOT / "deploy" / name).read_text()
        assert text.count("\nFROM ") + text.startswith("FROM ") >= 2, f"{name}: multi-stage"
        assert re.search(r"^USER (10001|imgq)$", text, re.MULTILINE), f"{name}: non-root"
        commands = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        assert "--extra-index-url" not in commands
    worker = (ROOT / "deploy" / "Dockerfile.worker").read_text()
    assert '--index-url "$TORCH_INDEX"' in worker and "torch.version.cuda" in worker
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".imgq", ".env", ".git"} <= set(ignored)


def test_compose_file_is_valid_for_docker_compose_where_it_exists(tmp_path: Path):
    docker = shutil.which("docker")
    probe = subprocess.run([docker, "compose", "version"], capture_output=True) if docker else None
    if probe is None or probe.returncode != 0:
        pytest.skip("docker compose is not installed here; the YAML checks above still ran")
    env = tmp_path / ".env"
    env.write_text((ROOT / "deploy" / "compose.env.example").read_text().replace("change-me", "s3cret"))
    out = subprocess.run([docker, "compose", "--env-file", str(env), "-f", str(ROOT / "docker-compose.yml"),
                          "config", "--quiet"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def _manifests() -> list[dict]:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    files = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == files, "kustomization.yaml must list every manifest"
    return [doc for name in listed for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def test_manifests_validate_against_the_kubernetes_and_keda_schemas():
    import kubernetes_validate

    keda = {}
    for path in KEDA.glob("keda-*.json"):
        spec = json.loads(path.read_text())
        keda[spec["kind"]] = spec
    kinds = []
    for doc in _manifests():
        kinds.append(doc["kind"])
        if doc["apiVersion"].startswith("keda.sh/"):
            spec = keda[doc["kind"]]
            assert doc["apiVersion"] == f"{spec['group']}/{spec['version']}"
            jsonschema.validate(doc, spec["schema"])
        else:
            kubernetes_validate.validate(doc, "1.30", strict=True)
    assert {"Deployment", "ScaledObject", "PodDisruptionBudget", "Job", "CronJob", "Service"} <= set(kinds)


def test_the_gpu_worker_is_one_process_per_gpu_scaled_to_zero_with_probes_and_grace():
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _manifests()}
    pod = docs[("Deployment", "imgq-worker")]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["terminationGracePeriodSeconds"] > GRACE_S
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["securityContext"]["runAsNonRoot"] is True
    scaled = docs[("ScaledObject", "imgq-worker")]["spec"]
    assert scaled["minReplicaCount"] == 0 and scaled["scaleTargetRef"]["name"] == "imgq-worker"
    assert {t["type"] for t in scaled["triggers"]} == {"redis", "postgresql"}
    assert docs[("PodDisruptionBudget", "imgq-worker")]["spec"]["maxUnavailable"] == 1
    flower = docs[("Deployment", "imgq-flower")]["spec"]["template"]["spec"]["containers"][0]
    assert any(e["name"] == "IMGQ_FLOWER_BASIC_AUTH" for e in flower["env"])


def test_the_grafana_dashboard_uses_only_metrics_the_worker_exports():
    import prometheus_client

    from imgq import metrics  # noqa: F401  (registers the metric families)

    exported = {"imgq_queue_depth", "imgq_worker_rss_bytes", "imgq_gpu_memory_bytes"}  # the scrape-time collector
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    for family in prometheus_client.REGISTRY.collect():  # labelled families have no samples yet
        exported.update(family.name + suffix for suffix in suffixes.get(family.type, [""]))
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "imgq-workers.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in re.findall(r"\b(imgq_[a-z_]+)", target["expr"])}
    assert used and used <= exported, used - exported
    assert not any("job" in re.findall(r"by \(([^)]*)\)", t["expr"]) for p in dashboard["panels"] for t in p["targets"])


def _workloads(docs: list[dict]) -> dict[str, tuple[dict, dict]]:
    """container name -> (container, pod spec) of every Deployment, Job and CronJob."""
    found = {}
    for doc in docs:
        spec = {"Deployment": lambda d: d["spec"]["template"]["spec"], "Job": lambda d: d["spec"]["template"]["spec"],
                "CronJob": lambda d: d["spec"]["jobTemplate"]["spec"]["template"]["spec"]}.get(doc["kind"])
        if spec:
            pod = spec(doc)
            found.update({container["name"]: (container, pod) for container in pod["containers"]})
    return found


def _secrets(docs: list[dict]) -> dict[str, dict[str, str]]:
    return {d["metadata"]["name"]: d["stringData"] for d in docs if d["kind"] == "Secret"}


def _container_env(container: dict, docs: list[dict]) -> dict[str, str]:
    """The environment Kubernetes gives a container: envFrom, then env; the example's placeholder
    secrets replaced by real-looking ones (imgq rightly refuses the placeholder)."""
    from imgq.config import PLACEHOLDER

    sources = {("configMap", d["metadata"]["name"]): d["data"] for d in docs if d["kind"] == "ConfigMap"}
    sources.update({("secret", name): data for name, data in _secrets(docs).items()})
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        kind = "configMap" if "configMapRef" in source else "secret"
        env.update(sources[(kind, source[f"{kind}Ref"]["name"])])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        (ref_kind, ref), = var["valueFrom"].items()
        env[var["name"]] = sources[(ref_kind.removesuffix("KeyRef"), ref["name"])][ref["key"]]
    return {name: str(value).replace(PLACEHOLDER, "s3cret") for name, value in env.items()}


def _settings_from(env: dict[str, str], monkeypatch: pytest.MonkeyPatch):
    from imgq.config import Settings

    with monkeypatch.context() as patch:
        for name in list(os.environ):
            if name.startswith("IMGQ_"):
                patch.delenv(name)
        for name, value in env.items():
            patch.setenv(name, value)
        return Settings(_env_file=None)


def test_every_k8s_container_gets_settings_imgq_accepts(monkeypatch):
    """The shared ConfigMap reaches every container that loads it: a setting only the worker may
    have (a non-loopback metrics bind needs the worker's token) must not stop the API or a job."""
    from pydantic import ValidationError

    docs = _manifests()
    workloads = _workloads(docs)
    assert {"api", "worker", "flower", "migrate", "backfill"} <= set(workloads)
    refused = {}
    for name, (container, _pod) in workloads.items():
        try:
            settings = _settings_from(_container_env(container, docs), monkeypatch)
        except ValidationError as exc:
            refused[name] = [error["msg"] for error in exc.errors()]
            continue
        if name == "worker":  # it still serves its probes where the manifest probes them
            ports = {port["name"]: port["containerPort"] for port in container["ports"]}
            assert settings.metrics_port == ports["metrics"] and settings.metrics_token
    assert refused == {}, refused


def test_keda_reads_the_postgres_backlog_with_a_url_pgx_parses():
    """KEDA's postgresql scaler hands `connection` to pgx, which parses only postgres:// and
    postgresql:// URLs: SQLAlchemy's postgresql+psycopg:// is the app's form, not KEDA's."""
    docs = _manifests()
    secrets = _secrets(docs)
    auths = {d["metadata"]["name"]: d["spec"] for d in docs if d["kind"] == "TriggerAuthentication"}
    triggers = [t for d in docs if d["kind"] == "ScaledObject" for t in d["spec"]["triggers"]
                if t["type"] == "postgresql"]
    assert triggers
    for trigger in triggers:
        params = {ref["parameter"]: secrets[ref["name"]][ref["key"]]
                  for ref in auths[trigger["authenticationRef"]["name"]]["secretTargetRef"]}
        connection = params["connection"]
        assert re.match(r"postgres(ql)?://", connection), connection
        assert urlsplit(connection).username == "imgq_reader"  # the read-only role


def _section(heading: str) -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start = readme.index(heading + "\n")
    end = readme.find("\n#", start + len(heading))
    return readme[start:end if end >= 0 else None]


def _acl_users(compose: dict) -> dict[str, list[str]]:
    acl = compose["configs"]["redis_acl"]["content"]
    return {line.split()[1]: line.split()[2:] for line in acl.splitlines() if line.startswith("user ")}


def _redis_admin(compose: dict) -> tuple[str, str]:
    """(user, the variable holding its password) of the one ACL user that may run ACL SETUSER."""
    admins = [(name, rules) for name, rules in _acl_users(compose).items() if "on" in rules and (
        "+@admin" in rules or "+acl" in rules or ("+@all" in rules and not {"-@admin", "-acl"} & set(rules)))]
    assert len(admins) == 1, f"one Redis user may administer ACLs, not {admins}"
    name, rules = admins[0]
    secret = [re.fullmatch(r">\$\{(\w+):\?[^}]*\}", rule) for rule in rules if rule.startswith(">")]
    assert len(secret) == 1 and secret[0], f"{name}: its password must be a required variable"
    return name, secret[0].group(1)


def test_redis_has_an_admin_user_of_its_own_and_the_rotation_procedure_uses_it(compose):
    name, variable = _redis_admin(compose)
    assert variable != "REDIS_PASSWORD"
    assert variable not in json.dumps(compose["services"]), f"{variable} is the operators' alone, no service's"
    example = (ROOT / "deploy" / "compose.env.example").read_text().splitlines()
    assert f"{variable}=change-me" in example
    rotation = _section("### Rotating secrets")
    redis = rotation[rotation.index("- **Redis:**"):].split("\n- ", 1)[0]
    assert f"--user {name}" in redis and variable in redis, redis
    assert "ACL SETUSER imgq" in redis


def test_the_redis_healthcheck_authenticates_and_requires_pong(compose):
    test = compose["services"]["redis"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL", "a pipe needs a shell"
    command = " ".join(test[1:])
    assert "--user health" in command and "--pass " in command, "without a password redis-cli sends no AUTH"
    assert re.search(r"\|\s*grep -q(x)? PONG", command), "redis-cli exits 0 on an error reply: look for PONG"
    assert _acl_users(compose)["health"][-2:] == ["-@all", "+ping"]


def test_the_compose_redis_acl_and_healthcheck_work_on_a_real_redis(compose, tmp_path: Path):
    """Where redis-server is installed: the healthcheck passes only against a live server, the
    admin user rotates imgq's password, and imgq itself may not touch ACLs."""
    server, cli = shutil.which("redis-server"), shutil.which("redis-cli")
    if not (server and cli):
        pytest.skip("redis-server is not installed here; the static ACL checks above still ran")
    admin, admin_var = _redis_admin(compose)
    values = {"REDIS_PASSWORD": "imgq-pw", admin_var: "admin-pw"}
    acl = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m: values[m.group(1)], compose["configs"]["redis_acl"]["content"])
    (tmp_path / "users.acl").write_text(acl)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    health = " ".join(compose["services"]["redis"]["healthcheck"]["test"][1:]).replace(
        "redis-cli", f"{cli} -p {port}", 1)

    def healthy() -> bool:
        return subprocess.run(["sh", "-c", health], capture_output=True).returncode == 0

    def as_user(user: str, password: str, *args: str) -> str:
        out = subprocess.run([cli, "-p", str(port), "--user", user, *args], capture_output=True, text=True,
                             env={**os.environ, "REDISCLI_AUTH": password})
        return out.stdout.strip()

    assert not healthy()
    redis = subprocess.Popen(_redis_command(compose, tmp_path / "users.acl", server, port),
                             stdout=subprocess.DEVNULL, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not healthy():
            assert redis.poll() is None and time.monotonic() < deadline, "redis did not start (or the check fails)"
            time.sleep(0.05)
        assert as_user("imgq", "imgq-pw", "ACL", "SETUSER", "imgq", ">x").startswith("NOPERM")
        assert as_user(admin, "admin-pw", "ACL", "SETUSER", "imgq", ">new-pw") == "OK"
        assert as_user("imgq", "new-pw", "PING") == as_user("imgq", "imgq-pw", "PING") == "PONG"
        assert as_user(admin, "admin-pw", "ACL", "SETUSER", "imgq", "<imgq-pw") == "OK"
        assert as_user("imgq", "imgq-pw", "PING") != "PONG"
        assert as_user("health", "", "GET", "k") != as_user("health", "any", "PING") == "PONG"
    finally:
        redis.terminate()
        redis.wait(timeout=10)


def _redis_command(compose: dict, acl: Path, server: str, port: int) -> list[str]:
    """The compose Redis service's command, run here: its ACL file at ``acl``, this host's
    redis-server on a loopback ``port``, nothing persisted."""
    command = [part.replace("/etc/redis/users.acl", str(acl)) for part in compose["services"]["redis"]["command"]]
    assert command[:2] == ["sh", "-c"] and "exec redis-server " in command[2]
    local = f"exec {server} --port {port} --bind 127.0.0.1 --save '' "
    script = command[2].replace("exec redis-server ", local).replace("--appendonly yes", "--appendonly no")
    return [*command[:2], script]


def test_the_compose_redis_refuses_a_placeholder_password(compose, tmp_path: Path):
    """REDIS_ADMIN_PASSWORD left as the example's change-me: no imgq service holds it, so only Redis
    itself can refuse it (found by review: Redis started, with an admin anyone could guess)."""
    _, admin_var = _redis_admin(compose)
    for values, refused in (({"REDIS_PASSWORD": "imgq-pw", admin_var: "change-me"}, True),
                            ({"REDIS_PASSWORD": "my-change-me-pw", admin_var: "admin-pw"}, True),
                            ({"REDIS_PASSWORD": "imgq-pw", admin_var: "admin-pw"}, False)):
        acl = re.sub(r"\$\{(\w+):\?[^}]*\}", lambda m, v=values: v[m.group(1)],
                     compose["configs"]["redis_acl"]["content"])
        (tmp_path / "users.acl").write_text(acl)
        # No server starts: refused, the check exits 1; passed, it execs a redis-server that is not there.
        done = subprocess.run(_redis_command(compose, tmp_path / "users.acl", "/nonexistent/redis-server", 1),
                              capture_output=True, text=True, timeout=10)
        assert (done.returncode, "placeholder (change-me)" in done.stderr) == ((1, True) if refused else (127, False))


def _run_lines(dockerfile: str) -> str:
    """The final stage's RUN commands, continuation lines joined."""
    final = dockerfile.split("\nFROM ")[-1]
    return " ".join(line.rstrip("\\").strip() for line in final.splitlines() if not line.startswith("#"))


def test_images_create_every_named_volume_path_compose_mounts_owned_by_imgq(compose):
    """A new named volume takes the owner of the path in the image, and root's when the image
    lacks it: the non-root user could not write there."""
    checked = []
    for name, service in compose["services"].items():
        if "build" not in service:
            continue
        run = _run_lines((ROOT / service["build"]["dockerfile"]).read_text())
        for mount in service.get("volumes", []):
            source, target = str(mount).split(":")[:2]
            if source in compose["volumes"]:
                pattern = r"(?:[\w:./-]+ )*" + re.escape(target) + r"(?=\s|$)"
                assert re.search(r"mkdir -p " + pattern, run), f"{name}: the image must create {target}"
                assert re.search(r"chown (?:-R )?imgq(?::imgq)? " + pattern, run), f"{name}: imgq must own {target}"
                checked.append(target)
    assert {"/models", "/home/imgq/flower"} <= set(checked)


def test_a_read_only_k8s_worker_writes_only_into_mounted_volumes(monkeypatch):
    """With readOnlyRootFilesystem every folder the worker writes (adapter copies, the model cache,
    local overlays) must be a volume; relative paths resolve in the image's WORKDIR."""
    docs = _manifests()
    container, pod = _workloads(docs)["worker"]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    workdir = container.get("workingDir") or re.findall(  # the final stage's
        r"^WORKDIR (\S+)$", (ROOT / "deploy" / "Dockerfile.worker").read_text(), re.MULTILINE)[-1]
    env = _container_env(container, docs)
    settings = _settings_from(env, monkeypatch)
    written = {"IMGQ_ADAPTER_DIR": str(settings.adapter_dir), "HF_HOME": env.get("HF_HOME", "~/.cache/huggingface")}
    if settings.explain_output and "://" not in settings.explain_output:
        written["IMGQ_EXPLAIN_OUTPUT"] = settings.explain_output
    volumes = {volume["name"] for volume in pod["volumes"]}
    mounts = [PurePosixPath(m["mountPath"]) for m in container["volumeMounts"]
              if m["name"] in volumes and not m.get("readOnly")]
    for variable, folder in written.items():
        path = PurePosixPath(workdir) / folder.replace("~", workdir, 1)
        assert any(path == mount or mount in path.parents for mount in mounts), f"{variable} ({path}) is read-only"


def test_the_grafana_dashboard_shows_every_metric_the_readme_lists():
    readme_metrics = set(re.findall(r"^\| `(imgq_[a-z_]+)", _section("### Metrics"), re.MULTILINE))
    assert len(readme_metrics) >= 10
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "imgq-workers.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    missing = {m for m in readme_metrics if not re.search(rf"\b{m}(_bucket|_sum|_count)?\b", exprs)}
    assert missing == set(), "README says the dashboard shows all of them"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells = {(p["gridPos"]["x"] + dx, p["gridPos"]["y"] + dy) for p in dashboard["panels"]
             for dx in range(p["gridPos"]["w"]) for dy in range(p["gridPos"]["h"])}
    assert len(cells) == sum(p["gridPos"]["w"] * p["gridPos"]["h"] for p in dashboard["panels"]), "panels overlap"


def test_the_worker_is_not_advertised_for_an_unauthenticated_scrape():
    """/metrics needs the bearer token: the prometheus.io/scrape convention has no way to send one."""
    docs = {(d["kind"], d["metadata"]["name"]): d for d in _manifests()}
    annotations = docs[("Deployment", "imgq-worker")]["spec"]["template"]["metadata"].get("annotations", {})
    assert "prometheus.io/scrape" not in annotations
