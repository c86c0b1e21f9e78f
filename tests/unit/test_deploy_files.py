"""The deployment files agree with the code.

Pure and fast: parses the Dockerfile, the compose stack, the Prometheus/Grafana files, the
Kubernetes manifests and docs/operations.md (pyyaml + json), and checks them against
``feed.settings.Settings`` (setting names, defaults, ports, topics, group), the Prometheus metrics
the code registers (``fanout.metrics.WorkerMetrics``, ``gateway.metrics.GatewayMetrics``) and the
DLQ headers ``fanout.dlq`` writes. Nothing is started; nothing needs a container engine.
"""

from __future__ import annotations

import base64
import dataclasses
import fnmatch
import json
import math
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from feed.lag import desired_replicas
from feed.settings import Settings, SettingsError

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "docker-compose.yml"
PROMETHEUS = INFRA / "prometheus.yml"
DATASOURCES = INFRA / "grafana" / "provisioning" / "datasources" / "datasource.yml"
DASHBOARD_PROVIDERS = INFRA / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
DASHBOARDS = INFRA / "grafana" / "dashboards"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
OPERATIONS = ROOT / "docs" / "operations.md"

DEFAULTS = Settings()
#: Labels Prometheus adds at scrape time (static labels and Kubernetes relabeling included).
TARGET_LABELS = {"job", "instance", "role", "pod", "namespace", "container", "node", "service"}


# --- helpers ----------------------------------------------------------------------------------
def setting_names() -> set[str]:
    return {"FEED_" + field.name.upper() for field in dataclasses.fields(Settings)}


def unknown_feed_names(names: Any) -> set[str]:
    """``FEED_*`` names that are not a setting (an operator's typo is silently ignored)."""
    return {n for n in names if str(n).startswith("FEED_")} - setting_names()


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def settings_for(env: Mapping[str, str]) -> Settings:
    """The settings a process started with ``env`` would run with (SettingsError if invalid)."""
    return Settings.from_env({k: str(v) for k, v in env.items()})


def duration_s(raw: str | int | float) -> float:
    """A compose duration (``30s``, ``1m30s``, ``500ms``) or a number of seconds."""
    if isinstance(raw, int | float):
        return float(raw)
    total, pos = 0.0, 0
    for match in re.finditer(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", raw):
        assert match.start() == pos, f"bad duration {raw!r}"
        factor = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}[match[2]]
        total += float(match[1]) * factor
        pos = match.end()
    assert pos == len(raw) and pos, f"bad duration {raw!r}"
    return total


# --- metrics the code registers -----------------------------------------------------------------
_EXPOSED_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "enum": ("",),
    "unknown": ("",),
}
#: What the gateway was specified to export, used only if gateway.metrics cannot be imported.
_GATEWAY_FALLBACK = {
    "feed_gateway_connections": set(),
    "feed_gateway_messages_pushed_total": set(),
    "feed_gateway_push_latency_seconds_bucket": {"le"},
    "feed_gateway_push_latency_seconds_sum": set(),
    "feed_gateway_push_latency_seconds_count": set(),
    "feed_gateway_slow_client_closes_total": set(),
    "feed_gateway_http_requests_total": {"route", "status"},
    "feed_ingest_activities_total": set(),
}


def _registry_series(metrics_object: Any) -> dict[str, set[str]]:
    """Every series name ``/metrics`` can show for the object's registry -> its label names."""
    from prometheus_client.metrics import MetricWrapperBase

    labels: dict[str, set[str]] = {}
    for value in vars(metrics_object).values():
        if isinstance(value, MetricWrapperBase):
            name = value._name.removesuffix("_total")
            labels[name] = set(value._labelnames)
    series: dict[str, set[str]] = {}
    for family in metrics_object.registry.collect():
        # custom collectors (feed.stages.StageHistogram) name their labels on their samples
        sampled = {k for sample in family.samples for k in sample.labels} - {"le"}
        own = labels.get(family.name, set()) | sampled
        for suffix in _EXPOSED_SUFFIXES[family.type]:
            extra = {"le"} if suffix == "_bucket" else set()
            series[family.name + suffix] = own | extra
    return series


@cache
def code_metrics() -> dict[str, frozenset[str]]:
    from fanout.metrics import WorkerMetrics

    series = _registry_series(WorkerMetrics())
    try:
        from gateway.metrics import GatewayMetrics
    except ImportError:  # the gateway is not importable: fall back to its specified names
        series.update(_GATEWAY_FALLBACK)
    else:
        series.update(_registry_series(GatewayMetrics()))
    return {name: frozenset(labels) for name, labels in series.items()}


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_METRIC = re.compile(r"(?<![A-Za-z0-9_:.])(feed_[A-Za-z0-9_:]*)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"(feed_[A-Za-z0-9_:]*)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")


def promql_problems(expr: str) -> list[str]:
    """Unknown ``feed_*`` metrics, and labels the metrics of ``expr`` do not have."""
    known = code_metrics()
    problems: list[str] = []
    names = set(_METRIC.findall(_STRING.sub('""', expr)))
    problems += [f"unknown metric {n!r}" for n in sorted(names - known.keys())]
    available = set(TARGET_LABELS)
    for name in names & known.keys():
        available |= known[name]
    for metric, matchers in _SELECTOR.findall(expr):
        for label in _MATCHER.findall(_STRING.sub('""', matchers)):
            if metric in known and label not in known[metric] | TARGET_LABELS:
                problems.append(f"{metric} has no label {label!r}")
    for group in _GROUPING.findall(expr):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in available:
                problems.append(f"grouping by {label!r}, which none of {sorted(names)} has")
    return problems


# --- compose ------------------------------------------------------------------------------------
_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")


def compose_expand(value: Any) -> str:
    """``${VAR:-default}`` -> default (what the stack runs with when VAR is not exported)."""

    def sub(match: re.Match[str]) -> str:
        if match["op"] in {"-", ":-"}:
            return match["arg"]
        raise AssertionError(f"${{{match['name']}}} has no default: the stack would not start")

    return _INTERPOLATION.sub(sub, str(value))


def compose_env(service: Mapping[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) if "=" in item else (item, "") for item in raw)
    return {str(k): compose_expand(v) for k, v in raw.items()}


def compose_role(service: Mapping[str, Any]) -> str | None:
    command = service.get("command")
    if isinstance(command, str):
        command = command.split()
    return command[0] if command else None


@cache
def compose() -> dict[str, Any]:
    return load_yaml(COMPOSE)


def feed_services() -> dict[str, dict[str, Any]]:
    """Compose services running the project's image."""
    services = compose()["services"]
    image = services["migrate"]["image"]
    return {
        name: svc for name, svc in services.items() if svc.get("image") == image or "build" in svc
    }


def replicas(service: Mapping[str, Any]) -> int:
    return int((service.get("deploy") or {}).get("replicas", service.get("scale", 1)))


def port_targets(service: Mapping[str, Any]) -> set[int]:
    targets: set[int] = set()
    for port in service.get("ports") or []:
        if isinstance(port, dict):
            targets.add(int(port["target"]))
        else:
            targets.add(int(str(port).split("/")[0].rsplit(":", 1)[-1]))
    return targets


# --- kubernetes ---------------------------------------------------------------------------------
@cache
def k8s_docs() -> tuple[tuple[Path, dict[str, Any]], ...]:
    out = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        out += [(path, doc) for doc in load_yaml_all(path)]
    return tuple(out)


def k8s(kind: str) -> list[dict[str, Any]]:
    return [doc for _path, doc in k8s_docs() if doc.get("kind") == kind]


def k8s_one(kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in k8s(kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def configmap_data() -> dict[str, str]:
    data: dict[str, str] = {}
    for cm in k8s("ConfigMap"):
        data.update({k: str(v) for k, v in (cm.get("data") or {}).items()})
    return data


def container_env(container: Mapping[str, Any]) -> dict[str, str]:
    """What the container's process sees: envFrom ConfigMaps/Secrets, then env values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom") or []:
        if "configMapRef" in source:
            cm = k8s_one("ConfigMap", source["configMapRef"]["name"])
            env.update({k: str(v) for k, v in (cm.get("data") or {}).items()})
        if "secretRef" in source:
            secret = k8s_one("Secret", source["secretRef"]["name"])
            env.update({k: str(v) for k, v in (secret.get("stringData") or {}).items()})
            env.update(
                {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
            )
    for item in container.get("env") or []:
        if "value" in item:
            env[item["name"]] = str(item["value"])
    return env


def workloads() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(workload, container) for every Deployment and Job container."""
    for kind in ("Deployment", "Job", "StatefulSet", "DaemonSet", "CronJob"):
        for obj in k8s(kind):
            spec = obj["spec"]["jobTemplate"]["spec"] if kind == "CronJob" else obj["spec"]
            for container in spec["template"]["spec"]["containers"]:
                yield obj, container


def role_of(container: Mapping[str, Any]) -> str:
    command = list(container.get("command") or []) + list(container.get("args") or [])
    command = [c for c in command if c != "feed"]
    return command[0] if command else "gateway"  # the image's default CMD


def deployment_for(role: str) -> tuple[dict[str, Any], dict[str, Any]]:
    found = [(o, c) for o, c in workloads() if o["kind"] == "Deployment" and role_of(c) == role]
    assert len(found) == 1, f"expected one Deployment running `feed {role}`, found {len(found)}"
    return found[0]


def resolve_port(container: Mapping[str, Any], port: int | str) -> int:
    if isinstance(port, int) or str(port).isdigit():
        return int(port)
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return int(p["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def role_port(role: str, settings: Settings) -> int:
    return settings.gateway_port if role == "gateway" else settings.worker_metrics_port


# --- docs ---------------------------------------------------------------------------------------
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.S | re.M)


def fenced(text: str, language: str) -> list[str]:
    return [body for lang, body in _FENCE.findall(text) if lang == language]


def settings_table(text: str) -> dict[str, str]:
    """Rows ``| `FEED_X` | default | ...`` of the docs -> the default column."""
    rows: dict[str, str] = {}
    for match in re.finditer(r"^\|\s*`(FEED_[A-Z0-9_]+)`\s*\|([^|]*)\|", text, re.M):
        rows[match[1]] = match[2].strip()
    return rows


def documented_default_problem(var: str, column: str) -> str | None:
    expected = DEFAULTS.env().get(var, "")
    shown = re.findall(r"`([^`]*)`", column)
    if not expected:
        if shown:
            return f"{var}: the default is unset/empty, docs show {shown[0]!r}"
        return None
    if not shown:
        return f"{var}: docs show no default, expected `{expected}`"
    value = shown[0]
    if value == expected:
        return None
    try:
        if math.isclose(float(value), float(expected)):
            return None
    except ValueError:
        pass
    return f"{var}: docs say `{value}`, code says `{expected}`"


# === the helpers themselves can fail ===========================================================
def test_helpers_flag_what_they_should() -> None:
    assert unknown_feed_names(["FEED_KAFKA_GROUP", "FEED_NO_SUCH_THING", "PATH"]) == {
        "FEED_NO_SUCH_THING"
    }
    assert promql_problems("sum(rate(feed_activities_consumed_total[5m]))") == []
    assert promql_problems("rate(feed_nope_total[5m])") == ["unknown metric 'feed_nope_total'"]
    # A counter is exposed with _total, a histogram with _bucket/_sum/_count only.
    assert promql_problems("rate(feed_dlq[5m])")
    assert promql_problems("rate(feed_store_call_seconds[5m])")
    assert promql_problems("sum by (kind) (rate(feed_dlq_total[5m]))")
    assert promql_problems('feed_errors_total{reason="x"}')
    p99 = "histogram_quantile(0.99, sum by (le, store) (rate(feed_store_call_seconds_bucket[5m])))"
    assert promql_problems(p99) == []
    assert documented_default_problem("FEED_TIMELINE_MAX", "`801`")
    assert documented_default_problem("FEED_TIMELINE_MAX", "eight hundred")
    assert documented_default_problem("FEED_DRAIN_S", "`10`") is None
    assert documented_default_problem("FEED_JWT_SECRET", "`abc`")
    assert compose_expand("${X:-a-b}") == "a-b"
    with pytest.raises(AssertionError):
        compose_expand("${X:?required}")
    assert duration_s("1m30s") == 90 and duration_s("500ms") == 0.5


def test_gateway_metrics_module_is_used_when_importable() -> None:
    import gateway.metrics  # noqa: F401 - the gateway's metric names must be importable

    assert "feed_gateway_connections" in code_metrics()
    assert "feed_gateway_push_latency_seconds_bucket" in code_metrics()


# === every file parses =========================================================================
def test_every_yaml_and_json_file_parses() -> None:
    yaml_files = [
        COMPOSE,
        PROMETHEUS,
        DATASOURCES,
        DASHBOARD_PROVIDERS,
        *sorted(K8S.glob("*.yaml")),
    ]
    for path in yaml_files:
        docs = load_yaml_all(path)
        assert docs, f"{path} is empty"
        assert all(isinstance(doc, dict) for doc in docs), f"{path}: a document is not a mapping"
    dashboards = sorted(DASHBOARDS.glob("*.json"))
    assert dashboards
    for path in dashboards:
        assert isinstance(json.loads(path.read_text()), dict)
    for _path, doc in k8s_docs():
        assert {"apiVersion", "kind", "metadata"} <= doc.keys()


# === Dockerfile ================================================================================
def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = dockerfile_instructions()
    last_from = max(i for i, (kw, _) in enumerate(instructions) if kw == "FROM")
    return instructions[last_from:]


def test_dockerfile_is_multi_stage_non_root_with_healthcheck() -> None:
    instructions = dockerfile_instructions()
    froms = [rest for kw, rest in instructions if kw == "FROM"]
    assert len(froms) >= 2, "multi-stage: a builder and a runtime stage"
    assert any(re.search(r"\bAS\s+\w+", f, re.I) for f in froms[:-1])
    args = dict(re.match(r"(\w+)=?(.*)", rest).groups() for kw, rest in instructions if kw == "ARG")
    final_base = re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), froms[-1].split()[0])
    assert re.match(r"python:3\.11(\.\d+)?-slim", final_base), final_base
    stage = final_stage()
    copies = [
        m[1] for kw, rest in stage if kw == "COPY" and (m := re.search(r"--from=(\S+)", rest))
    ]
    assert copies, "the runtime stage copies the venv from the builder"
    stages = {m[1] for f in froms[:-1] if (m := re.search(r"\bAS\s+(\S+)", f, re.I))}
    assert set(copies) <= stages, f"COPY --from={copies}: stages are {stages}"
    users = [rest for kw, rest in stage if kw == "USER"]
    assert users, "the runtime stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}, "runs as a non-root user"
    healthchecks = [rest for kw, rest in stage if kw == "HEALTHCHECK"]
    assert healthchecks and "CMD" in healthchecks[-1] and "/healthz" in healthchecks[-1]
    hc = healthchecks[-1]
    assert f"'FEED_GATEWAY_PORT','{DEFAULTS.gateway_port}'" in hc
    assert f"'FEED_WORKER_METRICS_PORT','{DEFAULTS.worker_metrics_port}'" in hc
    entry = [rest for kw, rest in stage if kw == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["feed"]
    cmd = [rest for kw, rest in stage if kw == "CMD"]
    assert cmd and json.loads(cmd[-1]) == ["gateway"]


def test_dockerfile_settings_and_install() -> None:
    text = DOCKERFILE.read_text()
    assert not unknown_feed_names(re.findall(r"\bFEED_[A-Z0-9_]+", text))
    env = " ".join(rest for kw, rest in final_stage() if kw == "ENV")
    assert re.search(r"\bFEED_GATEWAY_HOST=0\.0\.0\.0\b", env)
    assert re.search(r"\bFEED_WORKER_METRICS_HOST=0\.0\.0\.0\b", env)
    exposed = {
        int(p.split("/")[0]) for kw, rest in final_stage() if kw == "EXPOSE" for p in rest.split()
    }
    assert {DEFAULTS.gateway_port, DEFAULTS.worker_metrics_port} <= exposed
    runs = " ".join(rest for kw, rest in dockerfile_instructions() if kw == "RUN")
    assert "pip" in runs and not re.search(r"\[(?:[^\]]*,)?\s*(dev|local|bench)\b", runs), (
        "install without the dev/local/bench extras"
    )


def test_dockerfile_installs_exactly_the_runtime_lock() -> None:
    """The image gets the locked versions (the ones the tests ran on), never a fresh
    resolution: the lock is installed with hashes, and the project's wheel without deps."""
    runs = [rest for kw, rest in dockerfile_instructions() if kw == "RUN"]
    lock = [r for r in runs if "requirements/runtime.lock" in r]
    assert lock and "--require-hashes" in lock[0], "pip install --require-hashes -r runtime.lock"
    installs = [part for r in runs for part in r.split("&&") if re.search(r"pip install\b", part)]
    assert installs, "the Dockerfile installs with pip"
    for part in installs:
        assert "runtime.lock" in part or "--no-deps" in part, (
            f"every other pip install is --no-deps: {part.strip()}"
        )


def test_the_benchmark_and_the_dev_launcher_stay_out_of_the_wheel_and_the_image() -> None:
    """bench/ (the harness) and infra/ (the local stack the tests and `feed dev` start) are
    tools of the checkout, not of a deployment."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    assert not [p for p in packages if p.split(".")[0] in {"bench", "infra", "tests"}], packages
    copies = [
        rest.split()[0]
        for kw, rest in dockerfile_instructions()
        if kw == "COPY" and "--from=" not in rest
    ]
    assert not [c for c in copies if c.rstrip("/").split("/")[0] in {"bench", "infra"}], copies
    assert (ROOT / "bench" / "__init__.py").is_file() and (ROOT / "infra" / "__init__.py").is_file()


def test_the_wheel_lists_every_package_and_data_file_of_the_product() -> None:
    """setuptools' explicit ``packages`` list takes no subpackage by itself: a package folder
    missing from it is missing from the wheel and the image (``gateway.routes`` once was), and
    so is a data file no ``package-data`` pattern matches (the Lua scripts)."""
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    tops = {name.split(".")[0] for name in listed}
    found = {
        ".".join(init.parent.relative_to(ROOT).parts)
        for top in tops
        for init in (ROOT / top).rglob("__init__.py")
    }
    assert found - listed == set(), "packages missing from [tool.setuptools] packages"
    patterns = setuptools.get("package-data", {})
    for top in tops:
        for path in (ROOT / top).rglob("*"):
            if not path.is_file() or path.suffix in {".py", ".pyc"} or "__pycache__" in path.parts:
                continue
            package = path.parent
            while not (package / "__init__.py").is_file():
                package = package.parent
            name = ".".join(package.relative_to(ROOT).parts)
            relative = path.relative_to(package).as_posix()
            assert any(fnmatch.fnmatch(relative, pattern) for pattern in patterns.get(name, [])), (
                f"{path.relative_to(ROOT)} is not package data of {name}: it is not in the wheel"
            )


def test_docker_build_context_has_what_the_dockerfile_copies() -> None:
    ignore = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    allowed = [p[1:].rstrip("/") for p in ignore if p.startswith("!")]
    excludes_all = "*" in ignore
    for kw, rest in dockerfile_instructions():
        if kw not in {"COPY", "ADD"} or "--from=" in rest:
            continue
        sources = [part for part in rest.split() if not part.startswith("--")][:-1]
        for source in sources:
            assert (ROOT / source).exists(), f"COPY {source}: no such file"
            if excludes_all:
                src = source.rstrip("/")
                assert any(
                    src == a or src.startswith(a + "/") or a.startswith(src + "/") for a in allowed
                ), f".dockerignore excludes {source}"
    # Every package of the wheel is in the context.
    packages = re.search(r"packages\s*=\s*\[([^\]]*)\]", (ROOT / "pyproject.toml").read_text())
    assert packages
    dockerfile = DOCKERFILE.read_text()
    # Subpackages come with their top-level directory.
    for pkg in sorted({name.split(".")[0] for name in re.findall(r'"([^"]+)"', packages[1])}):
        assert f"COPY {pkg} " in dockerfile or f"COPY {pkg}/" in dockerfile, (
            f"the Dockerfile does not copy package {pkg}"
        )


# === compose ===================================================================================
def test_compose_feed_env_names_are_settings() -> None:
    for name, service in compose()["services"].items():
        env = compose_env(service)
        assert not unknown_feed_names(env), f"{name}: {unknown_feed_names(env)}"


def test_compose_feed_services_have_valid_settings() -> None:
    for name, service in feed_services().items():
        env = compose_env(service)
        try:
            settings = settings_for(env)
        except SettingsError as exc:
            pytest.fail(f"{name}: {exc}")
        assert not settings.dev_mode, f"{name}: FEED_DEV_MODE exposes /dev/token"
        if compose_role(service) == "gateway":
            settings.require_gateway()
        assert settings.kafka_group == DEFAULTS.kafka_group
        assert (settings.topic_activities, settings.topic_follows, settings.topic_dlq) == (
            DEFAULTS.topic_activities,
            DEFAULTS.topic_follows,
            DEFAULTS.topic_dlq,
        )
        host = settings.kafka_bootstrap.partition(":")[0]
        assert host in compose()["services"], f"{name}: Kafka host {host!r} is not a service"
        assert settings.cassandra_hosts[0] in compose()["services"]


def test_compose_topology() -> None:
    services = compose()["services"]
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:3.8.0"
    kenv = {k: str(v) for k, v in kafka["environment"].items()}
    assert set(kenv["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert {
        "KAFKA_NODE_ID",
        "KAFKA_LISTENERS",
        "KAFKA_ADVERTISED_LISTENERS",
        "KAFKA_CONTROLLER_LISTENER_NAMES",
        "KAFKA_CONTROLLER_QUORUM_VOTERS",
    } <= kenv.keys()
    assert services["cassandra"]["image"] == "cassandra:4.1"
    assert services["redis"]["image"] == "redis:7-alpine"
    for name in ("kafka", "cassandra", "redis"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} needs a healthcheck"

    feed = feed_services()
    by_role: dict[str, int] = {}
    for name, service in feed.items():
        role = compose_role(service)
        assert role in {"migrate", "fanout", "gateway"}, f"{name}: unknown role {role}"
        by_role[role] = by_role.get(role, 0) + replicas(service)
        depends = service.get("depends_on") or {}
        if role == "migrate":
            assert depends["kafka"]["condition"] == "service_healthy"
            assert depends["cassandra"]["condition"] == "service_healthy"
        else:
            assert depends["migrate"]["condition"] == "service_completed_successfully", name
            settings = settings_for(compose_env(service))
            grace = duration_s(service.get("stop_grace_period", "10s"))
            assert grace > settings.drain_s, f"{name}: stop_grace_period <= FEED_DRAIN_S"
    assert by_role == {"migrate": 1, "fanout": 2, "gateway": 2}
    build = services["migrate"]["build"]
    assert (
        COMPOSE.parent / build["context"] / build.get("dockerfile", "Dockerfile")
    ).resolve() == DOCKERFILE.resolve()
    assert {"prometheus", "grafana"} <= services.keys()


def test_compose_ports_match_the_settings() -> None:
    for name, service in feed_services().items():
        role = compose_role(service)
        settings = settings_for(compose_env(service))
        if role == "gateway":
            assert port_targets(service) == {settings.gateway_port}, name
            assert settings.gateway_port == DEFAULTS.gateway_port
            assert settings.gateway_host == "0.0.0.0"
        elif role == "fanout":
            exposed = {int(p) for p in service.get("expose") or []} | port_targets(service)
            assert settings.worker_metrics_port in exposed, name
            assert settings.worker_metrics_port == DEFAULTS.worker_metrics_port
            assert settings.worker_metrics_host == "0.0.0.0"


def test_prometheus_scrapes_every_feed_container_on_its_port() -> None:
    config = load_yaml(PROMETHEUS)
    targets: dict[str, int] = {}
    for job in config["scrape_configs"]:
        assert job.get("metrics_path", "/metrics") == "/metrics"
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, port = target.rsplit(":", 1)
                targets[host] = int(port)
    for name, service in feed_services().items():
        role = compose_role(service)
        if role == "migrate":
            continue
        settings = settings_for(compose_env(service))
        assert targets.get(name) == role_port(role, settings), f"{name} is not scraped right"
    mounts = compose()["services"]["prometheus"]["volumes"]
    assert any(str(m).startswith("./prometheus.yml:/etc/prometheus/prometheus.yml") for m in mounts)


def test_grafana_provisioning() -> None:
    grafana = compose()["services"]["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target = str(volume).split(":")[:2]
        mounts[target] = source
    assert (COMPOSE.parent / mounts["/etc/grafana/provisioning"]).resolve() == (
        INFRA / "grafana" / "provisioning"
    ).resolve()
    providers = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    path = providers[0]["options"]["path"]
    assert (COMPOSE.parent / mounts[path]).resolve() == DASHBOARDS.resolve()
    datasources = load_yaml(DATASOURCES)["datasources"]
    prometheus = [d for d in datasources if d["type"] == "prometheus"]
    assert prometheus and prometheus[0]["url"] == "http://prometheus:9090"


# === Grafana dashboard ==========================================================================
def dashboard() -> dict[str, Any]:
    return json.loads((DASHBOARDS / "feed.json").read_text())


def dashboard_panels() -> list[dict[str, Any]]:
    out = []
    for panel in dashboard()["panels"]:
        out.append(panel)
        out += panel.get("panels", [])
    return out


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard_panels() for t in p.get("targets", []) if "expr" in t]


def test_dashboard_structure() -> None:
    dash = dashboard()
    assert 36 <= dash["schemaVersion"] <= 41
    assert dash["uid"] and dash["title"]
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    sources = load_yaml(DATASOURCES)["datasources"]
    uids = {source["uid"] for source in sources}
    variables = {v["name"] for v in dash["templating"]["list"] if v["type"] == "datasource"}
    allowed = uids | {f"${{{v}}}" for v in variables} | {f"${v}" for v in variables}
    # the delivery latency's exemplars link to the provisioned trace datasource
    (prometheus,) = [source for source in sources if source["type"] == "prometheus"]
    links = prometheus["jsonData"]["exemplarTraceIdDestinations"]
    assert {link["datasourceUid"] for link in links} <= uids
    for panel in dashboard_panels():
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in [panel, *panel["targets"]]:
            assert target["datasource"]["uid"] in allowed, panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24


def test_dashboard_metrics_exist_in_the_code() -> None:
    exprs = dashboard_exprs()
    assert exprs
    for expr in exprs:
        assert not promql_problems(expr), f"{expr}: {promql_problems(expr)}"
    used = set().union(*(_METRIC.findall(e) for e in exprs))
    required = {
        "feed_consumer_lag_sum",
        "feed_consumer_lag",
        "feed_activities_consumed_total",
        "feed_timeline_inserts_total",
        "feed_batch_size_bucket",
        "feed_store_call_seconds_bucket",
        "feed_dlq_total",
        "feed_errors_total",
        "feed_gateway_connections",
        "feed_gateway_messages_pushed_total",
        "feed_gateway_push_latency_seconds_bucket",
        "feed_gateway_slow_client_closes_total",
    }
    assert required <= used, f"missing panels for {required - used}"
    assert any("by (le, store)" in e and "0.99" in e for e in exprs), "store p99 by store"


# === Kubernetes ================================================================================
def test_k8s_feed_env_names_are_settings() -> None:
    for path, doc in k8s_docs():
        if doc["kind"] in {"ConfigMap", "Secret"}:
            keys = {*(doc.get("data") or {}), *(doc.get("stringData") or {})}
            assert not unknown_feed_names(keys), f"{path.name}: {unknown_feed_names(keys)}"
    for obj, container in workloads():
        names = {item["name"] for item in container.get("env") or []}
        assert not unknown_feed_names(names), f"{obj['metadata']['name']}: {names}"
    secret_keys = {
        k for s in k8s("Secret") for k in {*(s.get("stringData") or {}), *(s.get("data") or {})}
    }
    assert {"FEED_JWT_SECRET", "FEED_INGEST_TOKEN"} <= secret_keys
    assert not {"FEED_JWT_SECRET", "FEED_INGEST_TOKEN"} & configmap_data().keys(), (
        "secrets belong in the Secret"
    )


def test_k8s_containers_have_valid_settings() -> None:
    for obj, container in workloads():
        env = container_env(container)
        try:
            settings = settings_for(env)
        except SettingsError as exc:
            pytest.fail(f"{obj['metadata']['name']}: {exc}")
        assert not settings.dev_mode
        if role_of(container) == "gateway":
            settings.require_gateway()
        assert settings.kafka_group == DEFAULTS.kafka_group
        assert settings.topic_activities == DEFAULTS.topic_activities


def test_k8s_deployments_ports_probes_and_scrape_annotations() -> None:
    for role in ("fanout", "gateway"):
        deployment, container = deployment_for(role)
        settings = settings_for(container_env(container))
        port = role_port(role, settings)
        assert port == role_port(role, DEFAULTS), "ports match the code defaults"
        host = settings.gateway_host if role == "gateway" else settings.worker_metrics_host
        assert host == "0.0.0.0", f"{role} must listen on all interfaces in a pod"
        assert port in {int(p["containerPort"]) for p in container["ports"]}
        ready, live = container["readinessProbe"]["httpGet"], container["livenessProbe"]["httpGet"]
        assert ready["path"] == "/readyz" and live["path"] == "/healthz"
        assert resolve_port(container, ready["port"]) == port
        assert resolve_port(container, live["port"]) == port
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert int(annotations["prometheus.io/port"]) == port
        assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


def test_k8s_resources_and_security() -> None:
    for obj, container in workloads():
        name = obj["metadata"]["name"]
        resources = container.get("resources") or {}
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= (resources.get(kind) or {}).keys(), f"{name}: {kind}"
        pod = obj["spec"]["template"]["spec"]
        assert pod.get("securityContext", {}).get("runAsNonRoot") is True, name
        assert container.get("securityContext", {}).get("allowPrivilegeEscalation") is False


def test_k8s_graceful_shutdown_budget() -> None:
    for role in ("fanout", "gateway"):
        deployment, container = deployment_for(role)
        settings = settings_for(container_env(container))
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        pre_stop = 0.0
        command = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command")
        if command and command[0] == "sleep":
            pre_stop = float(command[1])
        # The gateway's watchdog ends the process at most 2 s after FEED_DRAIN_S.
        assert grace > pre_stop + settings.drain_s + 2, f"{role}: grace {grace} too short"


def test_k8s_services_select_their_pods() -> None:
    gateway, gw_container = deployment_for("gateway")
    fanout, fo_container = deployment_for("fanout")
    for service in k8s("Service"):
        selector = service["spec"]["selector"]
        matches = [
            (d, c)
            for d, c in ((gateway, gw_container), (fanout, fo_container))
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(matches) == 1, f"Service {service['metadata']['name']} selects no Deployment"
        _deployment, container = matches[0]
        role = role_of(container)
        settings = settings_for(container_env(container))
        for port in service["spec"]["ports"]:
            assert resolve_port(container, port["targetPort"]) == role_port(role, settings)
    assert any(
        s["spec"]["selector"].items() <= gateway["spec"]["template"]["metadata"]["labels"].items()
        for s in k8s("Service")
    ), "the gateway has a Service"


def test_k8s_pod_disruption_budgets_cover_both_roles() -> None:
    covered = set()
    for pdb in k8s("PodDisruptionBudget"):
        assert pdb["apiVersion"] == "policy/v1"
        labels = pdb["spec"]["selector"]["matchLabels"]
        for role in ("fanout", "gateway"):
            deployment, _ = deployment_for(role)
            if labels.items() <= deployment["spec"]["template"]["metadata"]["labels"].items():
                covered.add(role)
    assert covered == {"fanout", "gateway"}


def test_keda_scaled_object_matches_the_group_and_partitions() -> None:
    objects = k8s("ScaledObject")
    assert len(objects) == 1
    scaled = objects[0]
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    fanout, container = deployment_for("fanout")
    assert scaled["spec"]["scaleTargetRef"]["name"] == fanout["metadata"]["name"]
    settings = settings_for(container_env(container))
    triggers = [t for t in scaled["spec"]["triggers"] if t["type"] == "kafka"]
    assert triggers
    for trigger in triggers:
        meta = trigger["metadata"]
        assert all(isinstance(v, str) for v in meta.values()), "the CRD wants string metadata"
        assert meta["consumerGroup"] == settings.kafka_group == DEFAULTS.kafka_group
        assert meta["bootstrapServers"] == settings.kafka_bootstrap
        assert meta["topic"] in {settings.topic_activities, settings.topic_follows}
        assert int(meta["lagThreshold"]) > 0
        assert meta.get("offsetResetPolicy", "latest") == "earliest", (
            "the group starts from the earliest record"
        )
    assert any(
        t["metadata"]["topic"] == settings.topic_activities == DEFAULTS.topic_activities
        for t in triggers
    )
    partitions = int(configmap_data()["FEED_KAFKA_PARTITIONS"])
    assert partitions == settings.kafka_partitions
    low, high = scaled["spec"].get("minReplicaCount", 0), scaled["spec"]["maxReplicaCount"]
    assert 0 <= low <= high <= partitions, "workers beyond the partition count sit idle"
    # The formula in the comment is the code's.
    text = (K8S / "fanout-scaledobject.yaml").read_text()
    assert "ceil(total_lag / lagThreshold)" in text and "min(maxReplicaCount, partitions" in text
    threshold = int(triggers[0]["metadata"]["lagThreshold"])
    assert (
        desired_replicas(
            10**12, partitions, lag_threshold=threshold, max_replicas=high, min_replicas=low
        )
        == high
    )
    assert (
        desired_replicas(
            0, partitions, lag_threshold=threshold, max_replicas=high, min_replicas=low
        )
        == low
    )


def test_gateway_hpa_on_cpu() -> None:
    hpas = k8s("HorizontalPodAutoscaler")
    assert len(hpas) == 1
    hpa = hpas[0]
    assert hpa["apiVersion"] == "autoscaling/v2"
    gateway, _ = deployment_for("gateway")
    assert hpa["spec"]["scaleTargetRef"]["name"] == gateway["metadata"]["name"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    cpu = [
        m
        for m in hpa["spec"]["metrics"]
        if m["type"] == "Resource" and m["resource"]["name"] == "cpu"
    ]
    assert cpu and cpu[0]["resource"]["target"]["type"] == "Utilization"
    # Autoscaled Deployments leave replicas to the autoscalers.
    for role in ("fanout", "gateway"):
        assert "replicas" not in deployment_for(role)[0]["spec"]


def test_migrate_job() -> None:
    jobs = [(o, c) for o, c in workloads() if o["kind"] == "Job"]
    assert len(jobs) == 1
    job, container = jobs[0]
    assert job["apiVersion"] == "batch/v1"
    assert role_of(container) == "migrate"
    assert job["spec"]["template"]["spec"]["restartPolicy"] in {"Never", "OnFailure"}


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == files
    namespaces = {doc["metadata"]["name"] for doc in k8s("Namespace")}
    assert kustomization["namespace"] in namespaces
    for _path, doc in k8s_docs():
        if doc["kind"] != "Namespace":
            assert (
                doc["metadata"].get("namespace", kustomization["namespace"])
                == (kustomization["namespace"])
            )


# === docs/operations.md ========================================================================
def test_operations_doc_lists_every_setting_with_its_default() -> None:
    text = OPERATIONS.read_text()
    rows = settings_table(text)
    missing = setting_names() - rows.keys()
    assert not missing, f"docs/operations.md has no row for {sorted(missing)}"
    problems = [p for var, col in rows.items() if (p := documented_default_problem(var, col))]
    assert not problems, problems
    assert not unknown_feed_names(re.findall(r"\bFEED_[A-Z0-9_]*[A-Z0-9]\b", text))


RULES = INFRA / "prometheus" / "rules.yml"
RULES_TESTS = INFRA / "prometheus" / "rules.test.yml"
MONITORING = K8S / "monitoring"


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alert_rules_use_real_metrics_and_cover_what_an_operator_watches() -> None:
    alerts = alert_rules()
    names = [rule["alert"] for rule in alerts]
    assert len(names) == len(set(names))
    for rule in alerts:
        assert {"alert", "expr", "labels", "annotations"} <= rule.keys(), rule.get("alert")
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
    text = OPERATIONS.read_text()
    exprs = [str(rule["expr"]) for rule in alerts]
    exprs += [q for block in fenced(text, "promql") for q in block.split("\n\n") if q.strip()]
    for expr in exprs:
        assert not promql_problems(expr), f"{expr}: {promql_problems(expr)}"
    used = set().union(*(_METRIC.findall(e) for e in exprs))
    for needed in (
        "feed_consumer_lag_sum",  # lag growing
        "feed_dlq_total",  # DLQ rate
        "feed_errors_total",  # store errors
        "feed_delivery_latency_seconds_bucket",  # delivery latency p99
        "feed_event_loop_lag_seconds_bucket",  # event-loop lag
        "feed_gateway_push_latency_seconds_bucket",
        "feed_gateway_slow_client_closes_total",
    ):
        assert needed in used, f"no alert on {needed}"
    for needed in ("FeedWorkerDown", "FeedGatewayDown", "FeedGatewaySaturated"):
        assert needed in names
    # every alert is explained in docs/operations.md, and every one it names exists
    documented = set(re.findall(r"^\| `(Feed[A-Za-z0-9]+)` \|", text, re.M))
    assert documented == set(names), documented ^ set(names)
    # every alert has a promtool unit test
    tested = set(re.findall(r"alertname: (Feed[A-Za-z0-9]+)", RULES_TESTS.read_text()))
    wanted = {"FeedConsumerLagGrowing", "FeedDeadLetters", "FeedWorkerErrors", "FeedWorkerDown"}
    wanted |= {"FeedDeliveryLatencyHigh", "FeedEventLoopLagHigh", "FeedGatewaySaturated"}
    assert wanted <= tested, wanted - tested


def test_the_operator_manifests_carry_the_same_rules_and_scrape_both_roles() -> None:
    rule = yaml.safe_load((MONITORING / "prometheusrule.yaml").read_text())
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    monitors = list(yaml.safe_load_all((MONITORING / "podmonitor.yaml").read_text()))
    ports = {
        doc["metadata"]["name"]: {
            p["name"] for c in doc["spec"]["template"]["spec"]["containers"] for p in c["ports"]
        }
        for doc in k8s("Deployment")
    }
    for monitor in monitors:
        name = monitor["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"]
        assert name in ports, name
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports[name], (name, endpoint)
    kustomization = yaml.safe_load((MONITORING / "kustomization.yaml").read_text())
    assert set(kustomization["resources"]) == {"prometheusrule.yaml", "podmonitor.yaml"}
    compose = yaml.safe_load(COMPOSE.read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./prometheus/rules.yml:/etc/prometheus/rules.yml:ro" in mounts
    assert yaml.safe_load(PROMETHEUS.read_text())["rule_files"] == ["/etc/prometheus/rules.yml"]


def test_operations_doc_lists_the_dlq_headers() -> None:
    source = (ROOT / "fanout" / "dlq.py").read_text()
    headers = set(re.findall(r'\("(feed\.[a-z.]+)",', source))
    assert len(headers) >= 6
    text = OPERATIONS.read_text()
    assert not {h for h in headers if f"`{h}`" not in text}, "every DLQ header is documented"


# === promtool (Debian's prometheus package, installed by infra/setup.sh) ======================
def _promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    promtool = shutil.which("promtool")
    # Never skipped: `make test` installs it, so its absence is a set-up failure.
    assert promtool, "promtool is missing: run infra/setup.sh (apt-get install prometheus)"
    return subprocess.run(
        [promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_accepts_the_rules() -> None:
    done = _promtool("check", "rules", str(RULES))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in done.stdout


def test_promtool_unit_tests_of_the_rules_pass() -> None:
    done = _promtool("test", "rules", RULES_TESTS.name, cwd=RULES_TESTS.parent)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout
