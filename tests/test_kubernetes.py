"""Static checks of deploy/kubernetes/ (no cluster needed).

Every manifest is parsed; every core object is validated against the Kubernetes API's JSON schemas that
kubernetes-validate ships (strict: an unknown field is an error; offline: the schemas are files in the
package), for the oldest Kubernetes version we claim and the newest the package has; the KEDA ScaledObject
against ``tests/schemas/keda-scaledobject-v1alpha1.json`` (written from KEDA's documentation: see its
``$comment``). Then what a schema cannot see: every variable the manifests set is one the code reads,
every Secret and ConfigMap key referenced exists, selectors select the pods they mean, the autoscalers
target the right Deployments, the workers' grace period outlasts their own shutdown deadline, which
outlasts their longest job, and the probes point at paths the API serves.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # types-jsonschema is not a dependency
import kubernetes_validate  # type: ignore[import-untyped]  # no type information shipped
import pytest
import yaml  # type: ignore[import-untyped]  # types-PyYAML is not a dependency

from devstack.processes import JEMALLOC_CONF
from services.config import VARIABLES, Config, load_config
from services.errors import ConfigError
from services.metrics import QUEUES
from services.queue import GENERATION_QUEUE, WEBHOOK_QUEUE
from services.task_events import MAX_WAIT_SECONDS

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "kubernetes"
KEDA_SCHEMA = Path(__file__).resolve().parent / "schemas" / "keda-scaledobject-v1alpha1.json"

# The oldest Kubernetes the manifests are for (PodDisruptionBudget's unhealthyPodEvictionPolicy is GA in
# 1.31) and the newest whose schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.31", kubernetes_validate.latest_version())
NAMESPACE = "imagegen"
# Read by gunicorn.conf.py, not by services/config.py (checked below against the file's text).
GUNICORN_VARIABLES = frozenset({"PROMETHEUS_MULTIPROC_DIR"})
# read by the dynamic loader and jemalloc, not by our code: the workers run on jemalloc (README.md, Memory)
ALLOCATOR_VARIABLES = frozenset({"LD_PRELOAD", "MALLOC_CONF"})
# Seconds a worker needs after its own deadline (or its last job) to stop: ack, withdraw its presence,
# close its connections. The grace period must leave at least this much after WORKER_SHUTDOWN_TIMEOUT.
EXIT_MARGIN = 15
# Seconds a generation job spends after its upstream call and downloads: the S3 upload and store writes.
STORE_MARGIN = 30
# Placeholders in the Secret template: "<...>" pieces ("<tenant>:<key>"), or empty for a variable that is off
# when unset.
PLACEHOLDER = re.compile(r"(<[^<>]+>)?([:,]<[^<>]+>)*")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


@cache
def _kustomization() -> dict[str, Any]:
    docs = _documents(K8S / "kustomization.yaml")
    assert len(docs) == 1
    return docs[0]


@cache
def _objects() -> tuple[dict[str, Any], ...]:
    """Every object the kustomization lists, as kustomize renders it: the namespace and the common labels
    applied (a Namespace object is not namespaced; its name is the namespace)."""
    kustomization = _kustomization()
    common: dict[str, str] = {}
    for entry in kustomization.get("labels", []):
        common.update(entry["pairs"])
    objects: list[dict[str, Any]] = []
    for name in kustomization["resources"]:
        for doc in _documents(K8S / name):
            metadata = doc.setdefault("metadata", {})
            if doc["kind"] != "Namespace":
                metadata["namespace"] = kustomization["namespace"]
            metadata["labels"] = {**metadata.get("labels", {}), **common}
            objects.append(doc)
    return tuple(objects)


def _of_kind(kind: str) -> list[dict[str, Any]]:
    return [obj for obj in _objects() if obj["kind"] == kind]


def _named(kind: str, name: str) -> dict[str, Any]:
    found = [obj for obj in _of_kind(kind) if obj["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name}: {len(found)} found"
    return found[0]


def _containers() -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
    """(Deployment, container) for every container of every Deployment."""
    for deployment in _of_kind("Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            yield deployment, container


def _configmap_data() -> dict[str, str]:
    return dict(_named("ConfigMap", "imagegen-config")["data"])


def _secret_data() -> dict[str, str]:
    return dict(_named("Secret", "imagegen-secrets")["stringData"])


def _plain_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables that are not secrets: the ConfigMaps it takes whole, then its own
    ``value`` entries, which win (as in Kubernetes)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            env.update(_named("ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
    return env


def _config(container: dict[str, Any]) -> Config:
    env = {name: value for name, value in _plain_env(container).items() if name not in GUNICORN_VARIABLES}
    return load_config(env)


def _flag(command: list[str], name: str) -> str:
    assert name in command, f"{name} missing from {command}"
    return command[command.index(name) + 1]


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def _worker_queue(container: dict[str, Any]) -> str | None:
    command = container.get("command", [])
    if command[:4] != ["celery", "-A", "worker.main", "worker"]:
        return None
    return _flag(command, "-Q")


def _cpu(quantity: str | int) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


_MEMORY_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "K": 10**3, "M": 10**6, "G": 10**9}


def _memory(quantity: str | int) -> float:
    match = re.fullmatch(r"([0-9.]+)(Ki|Mi|Gi|K|M|G)?", str(quantity))
    assert match, f"unexpected memory quantity {quantity!r}"
    return float(match[1]) * _MEMORY_UNITS.get(match[2] or "", 1)


# --- the files --------------------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _kustomization()
    manifests = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(manifests)
    assert kustomization["namespace"] == NAMESPACE
    assert [obj["metadata"]["name"] for obj in _of_kind("Namespace")] == [NAMESPACE]
    # common labels on objects and pod templates, never on selectors (immutable once applied)
    for entry in kustomization["labels"]:
        assert entry["includeSelectors"] is False and entry["includeTemplates"] is True


def test_every_object_is_one_of_the_expected() -> None:
    kinds = sorted((obj["kind"], obj["metadata"]["name"]) for obj in _objects())
    assert kinds == sorted(
        [
            ("Namespace", "imagegen"),
            ("ConfigMap", "imagegen-config"),
            ("Secret", "imagegen-secrets"),
            ("Deployment", "imagegen-api"),
            ("Service", "imagegen-api"),
            ("HorizontalPodAutoscaler", "imagegen-api"),
            ("PodDisruptionBudget", "imagegen-api"),
            ("Deployment", "imagegen-worker"),
            ("ScaledObject", "imagegen-worker"),
            ("PodDisruptionBudget", "imagegen-worker"),
            ("Deployment", "imagegen-webhook-worker"),
            ("PodDisruptionBudget", "imagegen-webhook-worker"),
        ]
    )


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_core_objects_match_the_kubernetes_schemas(version: str) -> None:
    checked = 0
    errors: list[str] = []
    for obj in _objects():
        if obj["apiVersion"].startswith("keda.sh/"):
            continue
        # every other object must have a schema: SchemaNotFoundError fails the test, never skips the object
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            errors.append(f"{obj['kind']} {obj['metadata']['name']}: {where}: {exc.message}")
        checked += 1
    assert not errors, "\n".join(errors)
    assert checked == len(_objects()) - len(_of_kind("ScaledObject"))


def test_scaled_object_matches_the_keda_schema() -> None:
    schema = json.loads(KEDA_SCHEMA.read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert len(_of_kind("ScaledObject")) == 1
    for obj in _of_kind("ScaledObject"):
        errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(obj)]
        assert not errors, "\n".join(errors)


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (its built-in kustomize) not installed")
def test_kustomize_renders_what_the_tests_check() -> None:
    """kustomize itself renders the same objects, namespaces and labels as ``_objects`` assumes."""
    rendered = subprocess.run(  # a fixed command on our own files
        ["kubectl", "kustomize", str(K8S)], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    ours = {(o["kind"], o["metadata"]["name"]): o["metadata"] for o in _objects()}
    theirs = {(o["kind"], o["metadata"]["name"]): o["metadata"] for o in yaml.safe_load_all(rendered) if o}
    assert theirs.keys() == ours.keys()
    for key, metadata in theirs.items():
        assert metadata.get("namespace") == ours[key].get("namespace"), key
        assert metadata.get("labels") == ours[key].get("labels"), key


# --- what the code reads ----------------------------------------------------------------------------------


def test_every_variable_set_is_one_the_code_reads() -> None:
    assert all(name in (ROOT / "gunicorn.conf.py").read_text() for name in GUNICORN_VARIABLES)
    known = set(VARIABLES) | GUNICORN_VARIABLES | ALLOCATOR_VARIABLES
    assert set(_configmap_data()) <= set(VARIABLES), set(_configmap_data()) - set(VARIABLES)
    assert set(_secret_data()) <= set(VARIABLES), set(_secret_data()) - set(VARIABLES)
    for deployment, container in _containers():
        names = [entry["name"] for entry in container.get("env", [])]
        assert len(names) == len(set(names)), f"{deployment['metadata']['name']}: a variable set twice"
        assert set(names) <= known, f"{deployment['metadata']['name']}: {set(names) - known}"
        # the workers serve their metrics from their own registry (README.md, "Metrics")
        if _worker_queue(container):
            assert "PROMETHEUS_MULTIPROC_DIR" not in names
            env = _plain_env(container)
            assert env.get("LD_PRELOAD") == "libjemalloc.so.2", "workers run on jemalloc"
            assert env.get("MALLOC_CONF") == JEMALLOC_CONF
        else:
            assert not ALLOCATOR_VARIABLES & set(names)


def test_every_secret_and_configmap_reference_resolves() -> None:
    for deployment, container in _containers():
        where = deployment["metadata"]["name"]
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                _named("ConfigMap", source["configMapRef"]["name"])
            if "secretRef" in source:
                _named("Secret", source["secretRef"]["name"])
        for entry in container.get("env", []):
            ref = entry.get("valueFrom", {})
            if "secretKeyRef" in ref:
                secret = _named("Secret", ref["secretKeyRef"]["name"])
                assert ref["secretKeyRef"]["key"] in secret["stringData"], f"{where}: {entry['name']}"
                assert ref["secretKeyRef"].get("optional") is not True
            if "configMapKeyRef" in ref:
                configmap = _named("ConfigMap", ref["configMapKeyRef"]["name"])
                assert ref["configMapKeyRef"]["key"] in configmap["data"], f"{where}: {entry['name']}"
    # every key of the Secret is used by some container
    used = {
        entry["valueFrom"]["secretKeyRef"]["key"]
        for _, container in _containers()
        for entry in container.get("env", [])
        if "secretKeyRef" in entry.get("valueFrom", {})
    }
    assert used == set(_secret_data())


def test_the_configmap_and_each_containers_settings_parse() -> None:
    load_config(_configmap_data())
    for _, container in _containers():
        _config(container)


def test_the_secret_is_a_template_that_starts_nothing() -> None:
    secret = _named("Secret", "imagegen-secrets")
    assert "data" not in secret, "real values (base64) in the template"
    for name, value in _secret_data().items():
        assert PLACEHOLDER.fullmatch(value), f"{name} is not a placeholder"
    # an admin key anyone can read here would be a hole: empty (the admin API off) until set
    assert _secret_data()["ADMIN_API_KEY"] == ""
    # as shipped, the API would refuse to start (config names the variable)
    with pytest.raises(ConfigError):
        load_config({**_configmap_data(), **_secret_data()})


# --- how the objects fit together -----------------------------------------------------------------------


def test_selectors_select_their_own_pods() -> None:
    deployments = _of_kind("Deployment")
    for deployment in deployments:
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert _selects(selector, deployment["spec"]["template"]["metadata"]["labels"])
        # and no other Deployment's pods
        for other in deployments:
            if other is not deployment:
                assert not _selects(selector, other["spec"]["template"]["metadata"]["labels"])

    def selected(selector: dict[str, str]) -> list[str]:
        return [
            d["metadata"]["name"]
            for d in deployments
            if _selects(selector, d["spec"]["template"]["metadata"]["labels"])
        ]

    assert selected(_named("Service", "imagegen-api")["spec"]["selector"]) == ["imagegen-api"]
    for pdb in _of_kind("PodDisruptionBudget"):
        assert selected(pdb["spec"]["selector"]["matchLabels"]) == [pdb["metadata"]["name"]]
        # never minAvailable: with one replica it would block every node drain
        assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"]
    assert sorted(pdb["metadata"]["name"] for pdb in _of_kind("PodDisruptionBudget")) == sorted(
        d["metadata"]["name"] for d in deployments
    )


def test_named_ports_and_volumes_exist() -> None:
    for deployment, container in _containers():
        where = deployment["metadata"]["name"]
        ports = {port["name"]: port["containerPort"] for port in container.get("ports", [])}
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            if probe in container:
                port = container[probe]["httpGet"]["port"]
                assert port in ports, f"{where}: {probe} on {port}"
        volumes = {volume["name"] for volume in deployment["spec"]["template"]["spec"].get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{where}: {mount['name']}"
    api = _named("Deployment", "imagegen-api")["spec"]["template"]["spec"]["containers"][0]
    target = _named("Service", "imagegen-api")["spec"]["ports"][0]["targetPort"]
    assert target in {port["name"] for port in api["ports"]}
    assert _flag(api["command"], "--bind") == f"0.0.0.0:{api['ports'][0]['containerPort']}"


def test_the_hpa_scales_the_api_on_cpu() -> None:
    hpa = _named("HorizontalPodAutoscaler", "imagegen-api")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "imagegen-api",
    }
    assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    # utilization is a share of the request: every container of the target must request CPU
    for container in _named("Deployment", "imagegen-api")["spec"]["template"]["spec"]["containers"]:
        assert "cpu" in container["resources"]["requests"]


def test_the_scaled_object_scales_the_generation_workers() -> None:
    scaled = _named("ScaledObject", "imagegen-worker")
    ref = scaled["spec"]["scaleTargetRef"]
    assert (ref.get("apiVersion", "apps/v1"), ref.get("kind", "Deployment")) == ("apps/v1", "Deployment")
    target = _named("Deployment", ref["name"])
    [container] = target["spec"]["template"]["spec"]["containers"]
    assert _worker_queue(container) == GENERATION_QUEUE
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["maxReplicaCount"] >= scaled["spec"]["minReplicaCount"]
    # the autoscalers own their Deployments' replicas; one autoscaler per Deployment
    targets = [
        ref["name"],
        _named("HorizontalPodAutoscaler", "imagegen-api")["spec"]["scaleTargetRef"]["name"],
    ]
    assert len(set(targets)) == len(targets)
    for name in targets:
        assert "replicas" not in _named("Deployment", name)["spec"], f"{name}: replicas fights its autoscaler"


def test_the_scaled_object_reads_the_tasks_waiting_and_admitted() -> None:
    scaled = _named("ScaledObject", "imagegen-worker")
    [trigger] = scaled["spec"]["triggers"]
    assert trigger["type"] == "prometheus" and trigger.get("metricType", "AverageValue") == "AverageValue"
    metadata = trigger["metadata"]
    matchers = re.findall(r'imagegen_queue_depth\{queue=~"([^"]+)"\}', metadata["query"])
    assert len(matchers) == 1, metadata["query"]
    queues = set(matchers[0].split("|"))
    assert queues == {"ready", "admitted"} and queues <= set(QUEUES)
    # one worker pod per WORKER_CONCURRENCY tasks
    [container] = _named("Deployment", scaled["spec"]["scaleTargetRef"]["name"])["spec"]["template"]["spec"][
        "containers"
    ]
    config = _config(container)
    assert float(metadata["threshold"]) == config.worker_concurrency
    # with a cap on the upstream, the admission window is at most the cap: pods past it would sit idle
    cap = config.upstream_max_concurrency
    if cap:
        most = scaled["spec"]["maxReplicaCount"]
        assert (most - 1) * config.worker_concurrency < cap <= most * config.worker_concurrency


def test_the_workers_run_the_queues_compose_runs() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    commands = {
        deployment["metadata"]["name"]: container["command"]
        for deployment, container in _containers()
        if _worker_queue(container)
    }
    assert commands == {
        "imagegen-worker": compose["worker"]["command"],
        "imagegen-webhook-worker": compose["webhook-worker"]["command"],
    }
    assert {_flag(command, "-Q") for command in commands.values()} == {GENERATION_QUEUE, WEBHOOK_QUEUE}


def test_the_api_runs_gunicorn_as_compose_does() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["api"]["command"]
    [container] = _named("Deployment", "imagegen-api")["spec"]["template"]["spec"]["containers"]
    command = container["command"]
    # compose's command, plus flags for Kubernetes only
    assert command[:-1] == compose[:-1] + ["--graceful-timeout", _flag(command, "--graceful-timeout")] + [
        "--no-control-socket"
    ]
    assert command[-1] == compose[-1] == "api:create_app()"


# --- stopping -------------------------------------------------------------------------------------------


def test_a_worker_is_killed_only_after_its_longest_job() -> None:
    """terminationGracePeriodSeconds > WORKER_SHUTDOWN_TIMEOUT >= the longest job a worker may be running
    when it gets SIGTERM, each bounded by the settings the container really has (worker.yaml's comment)."""
    seen = set()
    for deployment, container in _containers():
        queue = _worker_queue(container)
        if queue is None:
            continue
        seen.add(queue)
        spec = deployment["spec"]["template"]["spec"]
        grace = spec["terminationGracePeriodSeconds"]
        config = _config(container)
        if queue == GENERATION_QUEUE:
            longest = (
                config.limiter_max_wait
                + config.upstream_connect_timeout
                + config.upstream_timeout
                + config.image_download_timeout
                + STORE_MARGIN
            )
        else:
            longest = 2 * config.webhook_timeout  # services/netguard.py deadline() around one delivery
        where = deployment["metadata"]["name"]
        assert config.worker_shutdown_timeout >= longest, f"{where}: the deadline cuts off a job"
        assert grace > config.worker_shutdown_timeout, f"{where}: killed before its own deadline"
        assert grace - config.worker_shutdown_timeout >= EXIT_MARGIN, f"{where}: no time to stop"
        # both clocks start at SIGTERM only without a preStop hook
        assert "lifecycle" not in container
    assert seen == {GENERATION_QUEUE, WEBHOOK_QUEUE}


def test_the_api_finishes_waiting_requests_before_it_is_killed() -> None:
    deployment = _named("Deployment", "imagegen-api")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    graceful = int(_flag(container["command"], "--graceful-timeout"))
    assert graceful > MAX_WAIT_SECONDS  # a Prefer: wait request ends before gunicorn gives up on it
    sleep = container["lifecycle"]["preStop"]["exec"]["command"]
    assert sleep[0] == "sleep"
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > int(sleep[1]) + graceful


# --- probes, security, images, resources ----------------------------------------------------------------


def test_probes_point_at_paths_the_api_serves() -> None:
    from api import create_app

    rules = {rule.rule for rule in create_app(Config(allow_open_api=True)).url_map.iter_rules()}
    [container] = _named("Deployment", "imagegen-api")["spec"]["template"]["spec"]["containers"]
    paths = {
        probe: container[probe]["httpGet"]["path"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
    }
    assert paths == {"startupProbe": "/healthz", "livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    assert set(paths.values()) <= rules
    # the API's /metrics, which Prometheus scrapes for the ScaledObject
    annotations = _named("Deployment", "imagegen-api")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in rules
    assert int(annotations["prometheus.io/port"]) == container["ports"][0]["containerPort"]
    # the workers' probes: their own metrics endpoint, on WORKER_METRICS_PORT
    for deployment, worker in _containers():
        if _worker_queue(worker):
            port = _config(worker).worker_metrics_port
            assert port and worker["ports"] == [{"name": "metrics", "containerPort": port, "protocol": "TCP"}]
            for probe in ("startupProbe", "livenessProbe"):
                assert worker[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            assert annotations["prometheus.io/port"] == str(port)


def test_pods_run_as_the_images_user_on_a_read_only_root() -> None:
    user = re.findall(r"^USER (\d+):(\d+)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE)[-1]
    for deployment, container in _containers():
        where = deployment["metadata"]["name"]
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert (str(pod["securityContext"]["runAsUser"]), str(pod["securityContext"]["runAsGroup"])) == user
        assert pod["automountServiceAccountToken"] is False
        security = container["securityContext"]
        assert security["readOnlyRootFilesystem"] is True, where
        assert security["allowPrivilegeEscalation"] is False, where
        assert security["capabilities"]["drop"] == ["ALL"], where
        # what is written goes to emptyDirs: /tmp, and the API's metrics directory
        empty_dirs = {v["name"] for v in pod["volumes"] if "emptyDir" in v}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert mounts.get("/tmp") in empty_dirs, where
        env = _plain_env(container)
        if "PROMETHEUS_MULTIPROC_DIR" in env:
            assert mounts.get(env["PROMETHEUS_MULTIPROC_DIR"]) in empty_dirs, where


def test_images_have_a_version_tag() -> None:
    images = {container["image"] for _, container in _containers()}
    assert len(images) == 1, images  # the API and the workers run one build
    [image] = images
    name, _, tag = image.rpartition(":")
    assert name and "/" not in tag and tag not in ("", "latest"), image
    [entry] = _kustomization()["images"]
    assert entry["name"] == name and entry["newTag"] not in ("", "latest")


def test_every_container_has_requests_within_limits() -> None:
    for deployment, container in _containers():
        where = deployment["metadata"]["name"]
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert set(requests) == set(limits) == {"cpu", "memory"}, where
        assert _cpu(requests["cpu"]) <= _cpu(limits["cpu"]), where
        assert _memory(requests["memory"]) <= _memory(limits["memory"]), where
