"""The deployment files are code: compose and the Kubernetes manifests are checked for the wiring
an operator relies on, and validated against the Kubernetes and KEDA schemas."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
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


# Prometheus: the alert rules, the PodMonitor and the scrape example (deploy/prometheus). No PromQL
# parser is installed, so _PromQL below checks the syntax the rules use, each function's arguments,
# counters only under rate()/increase(), and that every metric and label exists; where promtool is
# installed (Debian: the prometheus package) it also checks the files and runs each alert on series.

PROM = ROOT / "deploy" / "prometheus"
# Labels Prometheus puts on every series it scrapes: job and instance, and the PodMonitor's targets'.
_TARGET_LABELS = frozenset({"job", "instance", "namespace", "pod", "container", "endpoint"})
# What the rules read from elsewhere: Prometheus' own `up`, and kube-state-metrics' (group imgq-kubernetes).
_EXTERNAL_SERIES = {
    "up": ("gauge", frozenset()),
    "kube_deployment_spec_replicas": ("gauge", frozenset({"deployment"})),
    "kube_deployment_status_replicas_available": ("gauge", frozenset({"deployment"})),
    "kube_pod_status_ready": ("gauge", frozenset({"pod", "uid", "condition"})),
}
_SEVERITIES = {"critical", "warning", "info"}


@pytest.fixture(scope="module")
def imgq_series() -> dict[str, tuple[str, frozenset[str]]]:
    """Every series a GPU worker exports: name -> (counter or gauge, its labels), from the metrics
    themselves (imgq.metrics and the scrape-time collector), not from a list kept by hand."""
    import sys
    from types import SimpleNamespace

    from prometheus_client.metrics import MetricWrapperBase

    from imgq import metrics
    from imgq.worker.metrics_server import ProcessCollector

    series: dict[str, tuple[str, frozenset[str]]] = {}
    for metric in vars(metrics).values():
        if isinstance(metric, MetricWrapperBase):
            name, labels = metric._name, frozenset(metric._labelnames)
            if metric._type == "histogram":  # its three series are counters
                series.update({f"{name}_bucket": ("counter", labels | {"le"}), f"{name}_sum": ("counter", labels),
                               f"{name}_count": ("counter", labels)})
            else:
                series[name + ("_total" if metric._type == "counter" else "")] = (metric._type, labels)
    cuda = SimpleNamespace(is_available=lambda: True, device_count=lambda: 1, memory_allocated=lambda index: 0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))  # the collector then reports GPU memory
        for family in ProcessCollector(lambda: {"imgq": 3}).collect():
            series[family.name] = (family.type, frozenset(k for sample in family.samples for k in sample.labels))
    assert {"imgq_dead_letters_total", "imgq_queue_depth", "imgq_gpu_memory_bytes", "imgq_model_seconds_bucket"} <= set(
        series)
    return series


class _Node:
    """A checked subexpression: its kind (scalar, string, vector or range), the labels its series
    carry, and a selector's metric."""

    def __init__(self, kind: str, labels: frozenset[str] = frozenset(), metric: str | None = None) -> None:
        self.kind, self.labels, self.metric = kind, labels, metric


_PROMQL_AGGREGATIONS = frozenset({"sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk",
                                  "bottomk", "quantile", "count_values"})
_PROMQL_COUNTER_FUNCTIONS = frozenset({"rate", "irate", "increase", "resets"})
_PROMQL_FUNCTIONS = {  # name -> the kinds of its arguments
    **dict.fromkeys(("rate", "irate", "increase", "resets", "delta", "idelta", "deriv", "changes", "avg_over_time",
                     "min_over_time", "max_over_time", "sum_over_time", "count_over_time", "last_over_time"),
                    ("range",)),
    **dict.fromkeys(("abs", "ceil", "floor", "sqrt", "exp", "ln", "absent", "scalar", "timestamp"), ("vector",)),
    "clamp_min": ("vector", "scalar"), "clamp_max": ("vector", "scalar"), "predict_linear": ("range", "scalar"),
    "histogram_quantile": ("scalar", "vector"), "vector": ("scalar",), "time": (),
}


class _PromQL:
    """A recursive-descent check of one PromQL expression against the series that exist; raises
    ValueError. It knows the part of PromQL alert rules need: no subqueries, offset or @."""

    _LEVELS = (("or",), ("and", "unless"), ("==", "!=", ">", "<", ">=", "<="), ("+", "-"), ("*", "/", "%", "atan2"),
               ("^",))
    _TOKEN = re.compile(r'\s*(\[\s*(?:\d+[smhdwy])+\s*\]|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?|"(?:[^"\\]|\\.)*"'
                        r"|[A-Za-z_:][\w:]*|==|!=|>=|<=|=~|!~|[-+*/%^<>=(){},])")
    def __init__(self, expr: str, series: dict[str, tuple[str, frozenset[str]]]) -> None:
        self.series, self.used, self.tokens, at = series, set(), [], 0
        while expr[at:].strip():
            found = self._TOKEN.match(expr, at)
            if not found:
                raise ValueError(f"cannot read {expr[at:at + 20].strip()!r}")
            self.tokens.append(found.group(1))
            at = found.end()
        self.at = 0

    def check(self) -> _Node:
        node = self._binary(0)
        if self.at != len(self.tokens):
            raise ValueError(f"unexpected {self.tokens[self.at]!r} (unbalanced parentheses?)")
        if node.kind != "vector":
            raise ValueError(f"an alert needs a vector, not a {node.kind}")
        return node

    def _peek(self) -> str:
        return self.tokens[self.at] if self.at < len(self.tokens) else ""

    def _take(self, expected: str | None = None) -> str:
        token = self._peek()
        if not token or (expected is not None and token != expected):
            raise ValueError(f"expected {expected or 'more'}, found {token or 'the end'!r} (unbalanced parentheses?)")
        self.at += 1
        return token

    def _label_list(self) -> frozenset[str]:
        self._take("(")
        labels = set()
        while self._peek() != ")":
            label = self._take()
            if not re.fullmatch(r"[A-Za-z_]\w*", label) or self._peek() not in (",", ")"):
                raise ValueError(f"bad label list near {label!r}")
            labels.add(label)
            if self._peek() == ",":
                self._take()
        self._take(")")
        return frozenset(labels)

    def _binary(self, level: int) -> _Node:
        if level == len(self._LEVELS):
            return self._unary()
        left = self._binary(level + 1)
        while self._peek() in self._LEVELS[level]:
            op = self._take()
            if level == 2 and self._peek() == "bool":
                self._take()
            match = group = None
            if self._peek() in ("on", "ignoring"):
                match = (self._take(), self._label_list())
                if self._peek() in ("group_left", "group_right"):
                    group = (self._take(), self._label_list() if self._peek() == "(" else frozenset())
            right = self._binary(level if op == "^" else level + 1)  # ^ is right-associative
            left = self._combine(op, left, right, match, group)
        return left

    def _combine(self, op: str, left: _Node, right: _Node, match, group) -> _Node:
        if {left.kind, right.kind} - {"scalar", "vector"}:
            raise ValueError(f"{op}: a {left.kind} and a {right.kind} (a range selector needs rate() or the like)")
        vectors = left.kind == right.kind == "vector"
        if (op in ("or", "and", "unless") or match) and not vectors:
            raise ValueError(f"{op} with on()/ignoring() joins two vectors")
        if match:
            keyword, labels = match
            missing = labels - (left.labels & right.labels if keyword == "on" else left.labels | right.labels)
            if missing:
                raise ValueError(f"{keyword} ({', '.join(sorted(missing))}): not on both sides of {op}")
        if group and group[1] - (right.labels if group[0] == "group_left" else left.labels):
            raise ValueError(f"{group[0]} ({', '.join(sorted(group[1]))}): not on the other side")
        if not vectors:
            return left if left.kind == "vector" else right
        extra = group[1] if group else frozenset()
        return _Node("vector", left.labels | right.labels if op == "or" else left.labels | extra)

    def _unary(self) -> _Node:
        if self._peek() in ("-", "+"):
            self._take()
        return self._primary()

    def _primary(self) -> _Node:
        token = self._take()
        if re.fullmatch(r"[\d.]+(?:[eE][+-]?\d+)?", token):
            return _Node("scalar")
        if token.startswith('"'):
            return _Node("string")
        if token == "(":
            node = self._binary(0)
            self._take(")")
            return node
        if not re.fullmatch(r"[A-Za-z_:][\w:]*", token):
            raise ValueError(f"unexpected {token!r}")
        if token in _PROMQL_AGGREGATIONS:
            return self._aggregation(token)
        if self._peek() == "(":
            return self._call(token)
        return self._selector(token)

    def _arguments(self) -> list[_Node]:
        self._take("(")
        args = [] if self._peek() == ")" else [self._binary(0)]
        while self._peek() == ",":
            self._take()
            args.append(self._binary(0))
        self._take(")")
        return args

    def _aggregation(self, name: str) -> _Node:
        grouping = (self._take(), self._label_list()) if self._peek() in ("by", "without") else None
        args = self._arguments()
        if grouping is None and self._peek() in ("by", "without"):
            grouping = (self._take(), self._label_list())
        wanted = ["scalar", "vector"] if name in ("topk", "bottomk", "quantile") else ["vector"]
        if name == "count_values":
            wanted = ["string", "vector"]
        if [arg.kind for arg in args] != wanted:
            raise ValueError(f"{name}() takes {', '.join(wanted)}")
        inner = args[-1]
        if grouping is None:
            return _Node("vector")
        keyword, labels = grouping
        if labels - inner.labels:
            raise ValueError(f"{name} {keyword} ({', '.join(sorted(labels - inner.labels))}): no such label beneath")
        return _Node("vector", labels if keyword == "by" else inner.labels - labels)

    def _call(self, name: str) -> _Node:
        if name not in _PROMQL_FUNCTIONS:
            raise ValueError(f"unknown function {name}()")
        args, wanted = self._arguments(), list(_PROMQL_FUNCTIONS[name])
        if [arg.kind for arg in args] != wanted:
            raise ValueError(f"{name}() takes {', '.join(wanted) or 'nothing'}, not {[a.kind for a in args]}")
        counters = [self.series[a.metric][0] == "counter" for a in args if a.metric]
        if name in _PROMQL_COUNTER_FUNCTIONS and not all(counters):
            raise ValueError(f"{name}() of a gauge: only counters (_total, _bucket, _sum, _count)")
        if name in ("delta", "idelta", "deriv", "predict_linear") and any(counters):
            raise ValueError(f"{name}() of a counter: use rate() or increase()")
        if name == "histogram_quantile" and "le" not in args[1].labels:
            raise ValueError("histogram_quantile() needs a _bucket series aggregated by (le, ...)")
        if name in ("scalar", "time"):
            return _Node("scalar")
        if name in ("vector", "absent"):
            return _Node("vector")
        inner = args[-1] if name == "histogram_quantile" else args[0]
        return _Node("vector", inner.labels - {"le"} if name == "histogram_quantile" else inner.labels)

    def _selector(self, name: str) -> _Node:
        if name not in self.series:
            raise ValueError(f"no series {name}")
        self.used.add(name)
        labels = self.series[name][1] | _TARGET_LABELS
        if self._peek() == "{":
            self._take()
            while self._peek() != "}":
                label, op, value = self._take(), self._take(), self._take()
                if label not in labels:
                    raise ValueError(f"{name} has no label {label}")
                if op not in ("=", "!=", "=~", "!~") or not value.startswith('"'):
                    raise ValueError(f"bad matcher {label}{op}{value}")
                if self._peek() == ",":
                    self._take()
            self._take("}")
        kind = "vector"
        if self._peek().startswith("["):
            self._take()
            kind = "range"
        if self._peek() in ("offset", "@", "["):
            raise ValueError(f"{self._peek()} is not supported here")
        return _Node(kind, labels, name)


def _rules_file() -> dict:
    return yaml.safe_load((PROM / "imgq-rules.yaml").read_text())


def _alert_rules() -> dict[str, dict]:
    rules = [rule for group in _rules_file()["groups"] for rule in group["rules"]]
    names = [rule.get("alert") for rule in rules]
    assert len(names) == len(set(names)), "alert names are unique"
    return dict(zip(names, rules, strict=True))


def test_every_alert_rule_has_a_for_a_severity_and_says_what_to_do():
    groups = _rules_file()["groups"]
    assert [group["name"] for group in groups] == ["imgq-workers", "imgq-kubernetes"]
    rules = _alert_rules()
    assert len(rules) >= 8
    for name, rule in rules.items():
        assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, name
        assert re.fullmatch(r"Imgq[A-Z]\w+", name) and isinstance(rule["expr"], str) and rule["expr"].strip(), name
        assert re.fullmatch(r"(\d+[smh])+", str(rule["for"])), f"{name}: for {rule['for']!r}"
        assert rule["labels"]["severity"] in _SEVERITIES, name
        assert set(rule["annotations"]) == {"summary", "description"}, name
        summary, description = rule["annotations"]["summary"], rule["annotations"]["description"]
        assert 10 < len(summary) < 120 and "\n" not in summary, name
        # What to do: an imgq command, a README section or a doc to follow.
        assert re.search(r"`imgq |README \"|docs/|kubectl ", description), f"{name}: its description says what to do"
    assert {rule["labels"]["severity"] for rule in rules.values()} == {"critical", "warning"}


def test_alert_expressions_parse_and_use_only_series_and_labels_that_exist(imgq_series):
    series = {**imgq_series, **_EXTERNAL_SERIES}
    readme = set(re.findall(r"^\| `(imgq_[a-z_]+)", _section("### Metrics"), re.MULTILINE))
    used = set()
    for name, rule in _alert_rules().items():
        parser = _PromQL(rule["expr"], series)
        try:
            parser.check()
        except ValueError as exc:
            raise AssertionError(f"{name}: {exc}\n{rule['expr']}") from exc
        assert parser.used, name
        named = set(re.findall(r"\b(imgq_[a-z0-9_]+)", rule["expr"]))
        assert named == {m for m in parser.used if m.startswith("imgq_")}, f"{name}: the parser saw every metric"
        used |= named
    documented = {re.sub(r"_(bucket|sum|count)$", "", m) for m in used}
    assert documented <= readme, f"alerts on metrics README 'Metrics' does not list: {documented - readme}"
    # Sources the README gives every operator: dead letters, the queue, Redis refusing, memory, retries, up.
    assert {"imgq_dead_letters_total", "imgq_queue_depth", "imgq_broker_refusing", "imgq_feed_memory_held_total",
            "imgq_retries_total", "imgq_worker_rss_bytes"} <= used


@pytest.mark.parametrize(("expr", "why"), [
    ("sum(rate(imgq_image_total[5m])) > 1", "no series imgq_image_total"),
    ("sum by (kind) (rate(imgq_dead_letters_total[5m])) > 1", r"by \(kind\): no such label"),
    ('imgq_broker_refusing{code="maxmemory"} == 1', "has no label code"),
    ("rate(imgq_queue_depth[5m]) > 0", "of a gauge"),
    ("deriv(imgq_retries_total[5m]) > 0", "of a counter"),
    ("sum(rate(imgq_images_total[5m]) > 1", "unbalanced"),
    ("sum(rate(imgq_images_total[5m]))) > 1", "unbalanced"),
    ("histogram_quantile(0.9, sum by (kind) (rate(imgq_model_seconds_bucket[5m]))) > 1", r"by \(le"),
    ("histogram_quantile(0.9, rate(imgq_model_seconds_sum[5m])) > 1", r"by \(le"),
    ("rates(imgq_images_total[5m]) > 1", "unknown function"),
    ("increase(imgq_images_total) > 0", "takes range"),
    ("imgq_images_total[5m] > 1", "range selector"),
    ("max by (queue) (imgq_queue_depth) unless on (kind) sum by (kind) (rate(imgq_images_total[5m]))", r"on \(kind\)"),
    ("sum(rate(imgq_images_total[5m])) > 1 and 2", "joins two vectors"),
    ("sum(rate(imgq_images_total[5m]))", None),  # valid: the control
    ("1 > bool 0", "needs a vector"),
    ("imgq_queue_depth{queue=imgq} > 0", "bad matcher"),
    ('imgq_queue_depth{queue="imgq"} offset 5m > 0', "not supported"),
    ("imgq_queue_depth > 0 $", "cannot read"),
])
def test_the_promql_check_refuses_what_prometheus_would_or_what_does_not_exist(imgq_series, expr, why):
    """The check above can fail: each expression has one mistake (a misspelled metric, a label the
    metric lacks, rate() of a gauge, a missing parenthesis, ...)."""
    series = {**imgq_series, **_EXTERNAL_SERIES}
    if why is None:
        _PromQL(expr, series).check()
        return
    with pytest.raises(ValueError, match=why):
        _PromQL(expr, series).check()


def test_the_promql_check_accepts_the_dashboards_queries(imgq_series):
    """Real PromQL in the other direction: every Grafana query (histogram_quantile by le included) passes."""
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "imgq-workers.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            _PromQL(target["expr"] + " > 0", imgq_series).check()


def _error_codes() -> dict[str, str]:
    """README "Error codes": code -> its Retried? cell."""
    rows = re.findall(r"^\| `([a-z_]+)` \|.*\| ([^|]+?) \|$", _section("## Error codes"), re.MULTILINE)
    assert len(rows) >= 20
    return dict(rows)


def test_the_dead_letter_alerts_split_every_error_code_between_faults_and_bad_input():
    rules = _alert_rules()
    faults = re.findall(r'code=~"([^"]+)"', rules["ImgqDeadLettersFromFaults"]["expr"])
    bad_input = re.findall(r'code!~"([^"]+)"', rules["ImgqDeadLettersBadInput"]["expr"])
    assert len(faults) == 1 and bad_input == faults * 2, "the two alerts use the one list of fault codes"
    codes, fault_codes = _error_codes(), set(faults[0].split("|"))
    assert fault_codes <= set(codes), f"not error codes: {fault_codes - set(codes)}"
    # A code that is retried, or that `dlq retry` fixes once something else is fixed, is a fault of the system.
    assert {code for code, retried in codes.items() if retried != "no"} <= fault_codes
    assert {"not_found", "not_an_image", "truncated", "too_large", "bad_ref"} <= set(codes) - fault_codes


def test_alert_annotations_name_only_settings_commands_sections_and_alerts_that_exist():
    import typer

    from imgq.cli import app
    from imgq.config import Settings

    settings = {f"IMGQ_{name.upper()}" for name in Settings.model_fields}
    cli = typer.main.get_command(app)
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    headings = re.findall(r"^#+ (.+)$", readme, re.MULTILINE)
    panels = {p["title"] for p in json.loads((ROOT / "deploy" / "grafana" / "imgq-workers.json").read_text())["panels"]}
    rules = _alert_rules()
    for name, rule in rules.items():
        text = " ".join(rule["annotations"].values())
        for setting in re.findall(r"\bIMGQ_[A-Z_]+", text):
            assert setting in settings, f"{name}: {setting} is no setting"
        for command in re.findall(r"`imgq ([a-z]+(?: [a-z]+)?)", text):
            group, _, sub = command.partition(" ")
            assert group in cli.commands, f"{name}: no command imgq {group}"
            subcommands = getattr(cli.commands[group], "commands", None)
            assert not sub or subcommands is None or sub in subcommands, f"{name}: no command imgq {command}"
        for quoted in re.findall(r'README ((?:"[^"]+"(?: -> )?)+)', text):
            for section in re.findall(r'"([^"]+)"', quoted):
                assert any(h.startswith(section) for h in headings), f"{name}: README has no section {section!r}"
        for doc, part in re.findall(r'(docs/[\w-]+\.md) \("([^"]+)"\)', text):
            assert part in (ROOT / doc).read_text(encoding="utf-8").replace("`", ""), f"{name}: {doc} lacks {part!r}"
        for path in re.findall(r"\b((?:deploy|docs)/[\w/.-]+\.\w+)", text):
            assert (ROOT / path).exists(), f"{name}: no file {path}"
        for panel in re.findall(r'dashboard\'s "([^"]+)"', text):
            assert any(title.startswith(panel) for title in panels), f"{name}: no dashboard panel {panel!r}"
        for other in set(re.findall(r"\bImgq[A-Z]\w+", text)) - {name}:
            assert other in rules, f"{name}: no alert {other}"


def test_the_worker_memory_alert_sits_below_the_containers_limit():
    container, _ = _workloads(_manifests())["worker"]
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Gi")
    rule = _alert_rules()["ImgqWorkerMemoryHigh"]
    found = re.fullmatch(r"imgq_worker_rss_bytes > (\d+) \* 1024 \^ 3", rule["expr"].strip())
    assert found, rule["expr"]
    assert 0.75 * int(limit[:-2]) <= int(found.group(1)) < int(limit[:-2])
    assert f"{found.group(1)} GiB" in rule["annotations"]["description"] and limit in rule["annotations"]["description"]


def _up_jobs() -> set[str]:
    return {job for rule in _alert_rules().values() for job in re.findall(r'\bup\{job="([^"]+)"\}', rule["expr"])}


def test_the_podmonitor_scrapes_the_worker_as_its_deployment_serves_metrics():
    from imgq.probes import PROBE_DEADLINE_S

    docs = {(d["kind"], d["metadata"]["name"]): d for d in _manifests()}
    assert not any(d["apiVersion"].startswith("monitoring.coreos.com/") for d in docs.values()), (
        "deploy/k8s applies without the Prometheus Operator's CRDs")
    worker = docs[("Deployment", "imgq-worker")]
    template = worker["spec"]["template"]
    container, _ = _workloads(list(docs.values()))["worker"]
    env = {e["name"]: e for e in container["env"]}
    monitor = yaml.safe_load((PROM / "podmonitor.yaml").read_text())
    assert (monitor["apiVersion"], monitor["kind"]) == ("monitoring.coreos.com/v1", "PodMonitor")
    assert monitor["metadata"]["namespace"] == worker["metadata"]["namespace"], "the token Secret is in its namespace"
    spec = monitor["spec"]
    selector = spec["selector"]["matchLabels"]
    assert selector and selector.items() <= template["metadata"]["labels"].items()
    assert selector.items() <= worker["spec"]["selector"]["matchLabels"].items()
    (endpoint,) = spec["podMetricsEndpoints"]
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert endpoint["port"] in ports and str(ports[endpoint["port"]]) == env["IMGQ_METRICS_PORT"]["value"]
    assert endpoint.get("path", "/metrics") == "/metrics"
    assert _seconds(endpoint["scrapeTimeout"]) > PROBE_DEADLINE_S and _seconds(endpoint["interval"]) >= 10
    auth = endpoint.get("authorization", {})
    assert auth.get("type", "Bearer") == "Bearer"
    secret = auth.get("credentials") or endpoint.get("bearerTokenSecret")
    assert secret == env["IMGQ_METRICS_TOKEN"]["valueFrom"]["secretKeyRef"], "the token the worker demands"
    assert secret["key"] in docs[("Secret", secret["name"])]["stringData"]
    assert _up_jobs() == {template["metadata"]["labels"][spec["jobLabel"]]}, "up{job=...} is the PodMonitor's job"
    # The kube-state-metrics rules name the worker's namespace and Deployment.
    kube = " ".join(r["expr"] for g in _rules_file()["groups"] if g["name"] == "imgq-kubernetes" for r in g["rules"])
    assert set(re.findall(r'namespace="([^"]+)"', kube)) == {worker["metadata"]["namespace"]}
    assert set(re.findall(r'deployment="([^"]+)"', kube)) == {"imgq-worker"}
    assert set(re.findall(r'pod=~"([^"]+)"', kube)) == {"imgq-worker-.+"}


def test_the_prometheusrule_is_the_rules_file_and_deploy_prometheus_applies_both():
    rule = yaml.safe_load((PROM / "prometheusrule.yaml").read_text())
    assert (rule["apiVersion"], rule["kind"]) == ("monitoring.coreos.com/v1", "PrometheusRule")
    assert rule["spec"] == _rules_file(), "prometheusrule.yaml's spec must be imgq-rules.yaml, verbatim"
    kustomization = yaml.safe_load((PROM / "kustomization.yaml").read_text())
    objects = sorted(p.name for p in PROM.glob("*.yaml")
                     if "apiVersion" in (yaml.safe_load(p.read_text()) or {}) and p.name != "kustomization.yaml")
    assert sorted(kustomization["resources"]) == objects == ["podmonitor.yaml", "prometheusrule.yaml"]
    namespace = yaml.safe_load((K8S / "namespace.yaml").read_text())["metadata"]["name"]
    assert kustomization["namespace"] == rule["metadata"]["namespace"] == namespace


def test_the_prometheus_example_scrapes_like_the_podmonitor_and_loads_the_rules(compose):
    config = yaml.safe_load((PROM / "prometheus.example.yml").read_text())
    assert config["rule_files"] == ["imgq-rules.yaml"]
    (job,) = config["scrape_configs"]
    assert {job["job_name"]} == _up_jobs()
    assert job["metrics_path"] == "/metrics"
    assert job["authorization"]["type"] == "Bearer" and job["authorization"]["credentials_file"]
    worker = compose["services"]["worker"]
    for target in job["static_configs"][0]["targets"]:
        host, port = target.split(":")
        assert host in compose["services"] and port == worker["environment"]["IMGQ_METRICS_PORT"], target


# Series -> what each alert does at some minutes: (alert, minute, [the labels of each firing alert]).
# Every alert fires in one scenario and stays quiet in another (checked below).
_ALERT_SCENARIOS = [
    ({'imgq_broker_refusing{reason="maxmemory", instance="w1"}': "1x10",
      'imgq_broker_refusing{reason="maxmemory", instance="w2"}': "0x10",
      'imgq_broker_refusing{reason="replica", instance="w1"}': "0x10",
      'imgq_broker_refusing{reason="replica", instance="w2"}': "0 0 0 0 1x6"},
     [("ImgqWorkersWaitingForRedis", 1, []), ("ImgqWorkersWaitingForRedis", 5, [{"reason": "maxmemory"}]),
      ("ImgqWorkersWaitingForRedis", 8, [{"reason": "maxmemory"}, {"reason": "replica"}])]),
    # Stuck: messages wait and nothing completes (the workers once did, long ago).
    ({'imgq_queue_depth{queue="imgq", instance="w1"}': "5x60", 'imgq_queue_depth{queue="imgq", instance="w2"}': "5x60",
      'imgq_images_total{kind="caption", instance="w1"}': "100x60",
      'imgq_dead_letters_total{code="not_found", instance="w1"}': "7x60"},
     [("ImgqBacklogNotDraining", 15, []), ("ImgqBacklogNotDraining", 40, [{"queue": "imgq"}])]),
    ({'imgq_queue_depth{queue="imgq", instance="w1"}': "5x60"},  # no counter has a series yet
     [("ImgqBacklogNotDraining", 40, [{"queue": "imgq"}])]),
    ({'imgq_queue_depth{queue="imgq", instance="w1"}': "5x60", 'imgq_images_total{kind="embed"}': "0+10x60"},
     [("ImgqBacklogNotDraining", 40, [])]),
    ({'imgq_queue_depth{queue="imgq", instance="w1"}': "5x60", 'imgq_dead_letters_total{code="not_found"}': "0+5x60"},
     [("ImgqBacklogNotDraining", 40, [])]),
    ({'imgq_queue_depth{queue="imgq", instance="w1"}': "0x60"}, [("ImgqBacklogNotDraining", 40, [])]),
    # Per minute: internal_error 12 (0.2/s), transient 3, not_found 120 against 6,000 results (2%).
    ({'imgq_dead_letters_total{code="internal_error"}': "0+12x60",
      'imgq_dead_letters_total{code="transient"}': "0+3x60",
      'imgq_dead_letters_total{code="not_found"}': "0+120x60", 'imgq_images_total{kind="caption"}': "0+6000x60"},
     [("ImgqDeadLettersFromFaults", 10, []), ("ImgqDeadLettersFromFaults", 40, [{"code": "internal_error"}]),
      ("ImgqDeadLettersBadInput", 59, [])]),
    # not_found 1/s and truncated 0.1/s against 10 results/s (11%): only not_found passes 0.5/s.
    ({'imgq_dead_letters_total{code="not_found"}': "0+60x90", 'imgq_dead_letters_total{code="truncated"}': "0+6x90",
      'imgq_dead_letters_total{code="internal_error"}': "0+60x90", 'imgq_images_total{kind="caption"}': "0+600x90"},
     [("ImgqDeadLettersBadInput", 20, []), ("ImgqDeadLettersBadInput", 70, [{"code": "not_found"}])]),
    ({'imgq_dead_letters_total{code="not_found"}': "0+60x90"},  # nothing committed at all
     [("ImgqDeadLettersBadInput", 70, [{"code": "not_found"}])]),
    ({"imgq_retries_total": "0+120x60", 'imgq_images_total{kind="caption"}': "0+60x60"},
     [("ImgqRetryStorm", 10, []), ("ImgqRetryStorm", 40, [{}])]),
    ({"imgq_retries_total": "0+120x60", 'imgq_images_total{kind="caption"}': "0+600x60"},
     [("ImgqRetryStorm", 40, [])]),
    ({"imgq_retries_total": "0+30x60"}, [("ImgqRetryStorm", 40, [])]),
    ({"imgq_feed_memory_held_total": "0+1x60"},
     [("ImgqFeederHeldByRedisMemory", 5, []), ("ImgqFeederHeldByRedisMemory", 30, [{}])]),
    ({"imgq_feed_memory_held_total": "0 0 0 0 0 1x55"}, [("ImgqFeederHeldByRedisMemory", 30, [])]),
    ({'imgq_recovered_items_total{reason="lost"}': "0x10 5x50",
      'imgq_recovered_items_total{reason="orphan"}': "0+5x60"},
     [("ImgqMessagesLost", 5, []), ("ImgqMessagesLost", 15, [{}])]),
    ({'imgq_worker_rss_bytes{instance="w1"}': "3.1e10x30", 'imgq_worker_rss_bytes{instance="w2"}': "2e10x30"},
     [("ImgqWorkerMemoryHigh", 10, []), ("ImgqWorkerMemoryHigh", 20, [{"instance": "w1"}])]),
    ({'up{job="imgq-worker", instance="w1"}': "0x10", 'up{job="imgq-worker", instance="w2"}': "1x10",
      'up{job="node", instance="n1"}': "0x10"},
     [("ImgqWorkerScrapeFailing", 3, []), ("ImgqWorkerScrapeFailing", 10, [{"job": "imgq-worker", "instance": "w1"}])]),
    ({'kube_deployment_spec_replicas{namespace="imgq", deployment="imgq-worker"}': "2x40",
      'kube_deployment_status_replicas_available{namespace="imgq", deployment="imgq-worker"}': "0x40"},
     [("ImgqNoWorkerReady", 10, []),
      ("ImgqNoWorkerReady", 30, [{"namespace": "imgq", "deployment": "imgq-worker"}])]),
    ({'kube_deployment_spec_replicas{namespace="imgq", deployment="imgq-worker"}': "2x40",
      'kube_deployment_status_replicas_available{namespace="imgq", deployment="imgq-worker"}': "0x5 1x35"},
     [("ImgqNoWorkerReady", 30, [])]),
    ({'kube_deployment_spec_replicas{namespace="imgq", deployment="imgq-worker"}': "0x40",
      'kube_deployment_status_replicas_available{namespace="imgq", deployment="imgq-worker"}': "0x40"},
     [("ImgqNoWorkerReady", 30, [])]),
    ({'kube_pod_status_ready{namespace="imgq", pod="imgq-worker-5d9-abcde", condition="false"}': "1x30",
      'kube_pod_status_ready{namespace="imgq", pod="imgq-worker-5d9-abcde", condition="true"}': "0x30",
      'kube_pod_status_ready{namespace="imgq", pod="imgq-worker-5d9-fghij", condition="false"}': "0x30",
      'kube_pod_status_ready{namespace="imgq", pod="imgq-flower-1", condition="false"}': "1x30"},
     [("ImgqWorkerNotReady", 10, []),
      ("ImgqWorkerNotReady", 20, [{"namespace": "imgq", "pod": "imgq-worker-5d9-abcde"}])]),
]


def test_the_alert_scenarios_cover_every_alert_both_ways():
    fired = {alert for _, checks in _ALERT_SCENARIOS for alert, _, alerts in checks if alerts}
    quiet = {alert for _, checks in _ALERT_SCENARIOS for alert, _, alerts in checks if not alerts}
    assert fired == quiet == set(_alert_rules())


def test_promtool_accepts_the_files_and_each_alert_fires_as_intended(tmp_path: Path):
    """Where promtool is installed: `check rules` (the templates too), `check config` on the example,
    and `test rules` on the scenarios above, the annotations left out (promtool compares them whole)."""
    # `make test` puts it beside the venv's python (make promtool, from Debian's prometheus package).
    beside = Path(sys.executable).parent / "promtool"
    promtool = shutil.which("promtool") or (str(beside) if beside.exists() else None)
    if not promtool:
        pytest.skip("promtool is not installed here (`make promtool`); the static checks above ran")

    def run(*args: str) -> None:
        done = subprocess.run([promtool, *args], capture_output=True, text=True, cwd=tmp_path, timeout=120)
        assert done.returncode == 0, done.stdout + done.stderr

    run("check", "rules", str(PROM / "imgq-rules.yaml"))
    config = yaml.safe_load((PROM / "prometheus.example.yml").read_text())
    (tmp_path / "token").write_text("t0ken\n")
    config["scrape_configs"][0]["authorization"]["credentials_file"] = str(tmp_path / "token")
    config["rule_files"] = [str(PROM / name) for name in config["rule_files"]]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    run("check", "config", str(tmp_path / "prometheus.yml"))

    rules = _rules_file()
    for group in rules["groups"]:
        for rule in group["rules"]:
            del rule["annotations"]
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    severity = {name: rule["labels"]["severity"] for name, rule in _alert_rules().items()}
    tests = [{"interval": "1m",
              "input_series": [{"series": name, "values": values} for name, values in series.items()],
              "alert_rule_test": [{"eval_time": f"{minute}m", "alertname": alert,
                                   "exp_alerts": [{"exp_labels": {**labels, "severity": severity[alert]}}
                                                  for labels in alerts]}
                                  for alert, minute, alerts in checks]}
             for series, checks in _ALERT_SCENARIOS]
    (tmp_path / "tests.yaml").write_text(yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m",
                                                         "tests": tests}))
    run("test", "rules", "tests.yaml")
