"""Static checks of docker-compose.yml and the Dockerfile (no Docker engine needed)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.processes import JEMALLOC_CONF

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_TEXT = (ROOT / "docker-compose.yml").read_text()
SERVICES: dict[str, Any] = yaml.safe_load(COMPOSE_TEXT)["services"]
APP_VARIABLES = (
    "REDIS_URL",
    "REDIS_SENTINELS",
    "REDIS_SENTINEL_MASTER",
    "REDIS_SENTINEL_PASSWORD",
    "REDIS_MIN_REPLICAS_ACK",
    "BROKER_URL",
    "BROKER_DELIVERY_LIMIT",
    "S3_ENDPOINT_URL",
    "S3_BUCKET",
    "S3_REGION",
    "S3_PRESIGN_EXPIRES",
    "UPSTREAM_BASE_URL",
    "UPSTREAM_API_KEY",
    "UPSTREAM_TIMEOUT",
    "API_KEYS",
    "ADMIN_API_KEY",
    "ALLOW_OPEN_API",
    "TENANT_MAX_CONCURRENCY",
    "TENANT_MAX_QUEUED",
    "TENANT_RATE_PER_MINUTE",
    "TENANT_WEIGHT",
    "WEBHOOK_SIGNING_SECRET",
    "WEBHOOK_TIMEOUT",
    "PUBLIC_BASE_URL",
    "LOG_FORMAT",
)
# Credentials: no default anywhere, compose stops with a message when one is unset (${VAR:?message}).
CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def command(service: str) -> str:
    value = SERVICES[service]["command"]
    return value if isinstance(value, str) else " ".join(value)


def test_services_exist() -> None:
    assert {"redis", "minio", "minio-init", "api", "worker", "webhook-worker"} <= set(SERVICES)


def test_redis_is_durable_and_never_evicts() -> None:
    assert "--appendonly yes" in command("redis")
    assert "--maxmemory-policy noeviction" in command("redis")
    assert SERVICES["redis"]["volumes"]


@pytest.mark.parametrize("service", sorted(set(SERVICES) - {"minio-init"}))
def test_long_running_services_have_a_healthcheck(service: str) -> None:
    assert SERVICES[service]["healthcheck"]["test"]


def test_worker_can_scale() -> None:
    worker = SERVICES["worker"]
    assert "container_name" not in worker and "ports" not in worker
    assert "-Q generation" in command("worker")
    assert "--pool" not in command("worker"), "the pool comes from WORKER_POOL, not a fixed flag"
    assert worker["environment"]["WORKER_POOL"] == "${WORKER_POOL:-threads}"
    assert worker["stop_grace_period"]


def test_webhooks_have_their_own_worker() -> None:
    assert "-Q webhooks" in command("webhook-worker") and "generation" not in command("webhook-worker")
    assert "webhooks" not in command("worker")


def test_api_serves_the_app_factory() -> None:
    assert command("api").startswith("gunicorn") and "api:create_app()" in command("api")
    assert "--worker-class gevent" in command("api"), "requests that wait hold no thread"
    # gunicorn's own lines in the format LOG_FORMAT asks for, in compose as in the image
    assert "-c gunicorn.conf.py" in command("api")
    [cmd] = re.findall(r"^CMD (.*)$", dockerfile_stages()["app"], re.M)
    assert " ".join(json.loads(cmd)) == command("api"), "compose runs the image's own command"
    assert "/readyz" in " ".join(SERVICES["api"]["healthcheck"]["test"])


def required(name: str) -> str:
    """compose's ``${NAME:?message}``: the value of NAME, or stop with the message when unset or empty."""
    return rf"\$\{{{name}:\?[^}}]+\}}"


@pytest.mark.parametrize("service", ["api", "worker", "webhook-worker"])
def test_app_services_get_their_environment(service: str) -> None:
    environment = SERVICES[service]["environment"]
    assert set(APP_VARIABLES) | set(CREDENTIALS) <= set(environment)
    assert all(re.fullmatch(rf"\$\{{{name}:-[^}}]*\}}", environment[name]) for name in APP_VARIABLES)
    assert all(re.fullmatch(required(name), environment[name]) for name in CREDENTIALS)
    assert environment["REDIS_URL"] == "${REDIS_URL:-redis://redis:6379/0}"
    assert environment["S3_ENDPOINT_URL"] == "${S3_ENDPOINT_URL:-http://minio:9000}"


@pytest.mark.parametrize("service", ["api", "worker", "webhook-worker"])
def test_an_open_api_is_refused_unless_asked_for(service: str) -> None:
    """With neither API_KEYS nor ADMIN_API_KEY, the API does not start (api/app.py) unless ALLOW_OPEN_API."""
    environment = SERVICES[service]["environment"]
    assert environment["ALLOW_OPEN_API"] == "${ALLOW_OPEN_API:-false}"
    assert environment["API_KEYS"] == "${API_KEYS:-}" and environment["ADMIN_API_KEY"] == "${ADMIN_API_KEY:-}"


def test_no_default_credentials() -> None:
    assert "minioadmin" not in COMPOSE_TEXT.lower()
    minio, init = SERVICES["minio"]["environment"], SERVICES["minio-init"]["environment"]
    assert re.fullmatch(required("AWS_ACCESS_KEY_ID"), minio["MINIO_ROOT_USER"])
    assert re.fullmatch(required("AWS_SECRET_ACCESS_KEY"), minio["MINIO_ROOT_PASSWORD"])
    assert all(re.fullmatch(required(name), init[name]) for name in CREDENTIALS)
    # every use of a credential variable is the required form: none has a default, empty or not
    for name in (*CREDENTIALS, "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"):
        for use in re.findall(rf"\$\{{{name}(?::?[-?+=][^}}]*)?\}}", COMPOSE_TEXT):
            assert re.fullmatch(required(name), use), use


def test_minio_is_published_on_loopback_only() -> None:
    """By default: MINIO_BIND widens it on purpose. The API's port needs no such care: it requires keys."""
    [published] = SERVICES["minio"]["ports"]
    assert published == "${MINIO_BIND:-127.0.0.1}:${MINIO_PORT:-9000}:9000"
    assert not any("ports" in SERVICES[name] for name in ("redis", "minio-init", "worker", "webhook-worker"))


@pytest.mark.parametrize(
    ("service", "dependency", "condition"),
    [
        ("api", "redis", "service_healthy"),
        ("api", "minio-init", "service_completed_successfully"),
        ("worker", "redis", "service_healthy"),
        ("worker", "minio-init", "service_completed_successfully"),
        ("webhook-worker", "redis", "service_healthy"),
        ("minio-init", "minio", "service_healthy"),
    ],
)
def test_start_order(service: str, dependency: str, condition: str) -> None:
    assert SERVICES[service]["depends_on"][dependency]["condition"] == condition


def dockerfile_stages() -> dict[str, str]:
    """The Dockerfile's text by stage name (``FROM ... AS name``; an unnamed stage is keyed by its image)."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    parts = re.split(r"^FROM\s+", dockerfile, flags=re.M)[1:]
    stages = {}
    for part in parts:
        header = part.splitlines()[0].split()
        stages[header[2] if len(header) >= 3 and header[1].upper() == "AS" else header[0]] = part
    return stages


def test_dockerfile_installs_the_runtime_lock_as_non_root() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stages = dockerfile_stages()
    assert re.search(r"^FROM python:3\.11-slim AS base\b", dockerfile, re.M)
    assert list(stages)[-1] == "app", "a plain `docker build .` must build the app image"
    assert "pip install -r /src/requirements/runtime.txt" in stages["base"]
    assert re.search(r"\bpip install --no-deps /src\s*$", stages["base"], re.M)
    for name in ("base", "app"):
        assert not re.search(r"\[(test|dev)\]|requirements/dev\.txt|pillow|moto", stages[name]), name
    for name in ("base", "simulator"):
        users = re.findall(r"^USER\s+(\S+)", stages[name], re.M)
        assert users and users[-1].split(":")[0] not in ("root", "0"), name


def test_the_workers_run_on_jemalloc_from_the_image() -> None:
    """The image installs it; the workers preload it, and an LD_PRELOAD set empty keeps glibc's malloc."""
    install = r"apt-get install -y --no-install-recommends libjemalloc2\b"
    assert re.search(install, dockerfile_stages()["base"])
    for service in ("worker", "webhook-worker"):
        environment = SERVICES[service]["environment"]
        assert environment["LD_PRELOAD"] == "${LD_PRELOAD-libjemalloc.so.2}", service
        assert environment["MALLOC_CONF"] == f"${{MALLOC_CONF-{JEMALLOC_CONF}}}", service
    assert not {"LD_PRELOAD", "MALLOC_CONF"} & set(SERVICES["api"]["environment"])


def test_the_app_image_refuses_an_open_api() -> None:
    assert re.search(r"^ENV ALLOW_OPEN_API=false$", dockerfile_stages()["app"], re.M)
    assert "ALLOW_OPEN_API" not in dockerfile_stages()["base"], "the simulator stage needs no such thing"


def test_the_simulator_gets_its_own_stage_with_pillow() -> None:
    simulator = dockerfile_stages()["simulator"]
    assert re.search(r"^FROM base AS simulator\b", "FROM " + simulator)
    assert "pip install --constraint /src/requirements/dev.txt pillow" in simulator
    assert SERVICES["simulator"]["build"]["target"] == "simulator"
    assert SERVICES["simulator"]["image"] != SERVICES["api"]["image"], "one tag per stage"


def test_flower_watches_the_broker_from_its_own_stage() -> None:
    """Flower (a compose profile) reads the app's broker, from an image with Flower at the tested version;
    its port is on loopback only, and basic auth passes on from the shell (no default, no empty value)."""
    flower = SERVICES["flower"]
    assert flower["profiles"] == ["flower"]
    assert command("flower").startswith("celery -A worker.main flower") and "--port=5555" in command("flower")
    assert flower["environment"]["REDIS_URL"] == SERVICES["worker"]["environment"]["REDIS_URL"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"] and flower["environment"]["FLOWER_BASIC_AUTH"] is None
    assert flower["ports"] == ["${FLOWER_BIND:-127.0.0.1}:${FLOWER_PORT:-5555}:5555"]
    assert "/healthcheck" in " ".join(flower["healthcheck"]["test"])
    assert flower["depends_on"]["redis"]["condition"] == "service_healthy"
    assert flower["build"] == {"context": ".", "target": "flower"}
    others = {SERVICES[name]["image"] for name in ("api", "simulator")}
    assert flower["image"] not in others, "one tag per stage"
    stage = dockerfile_stages()["flower"]
    assert re.search(r"^FROM base AS flower\b", "FROM " + stage)
    assert "pip install --constraint /src/requirements/dev.txt flower" in stage
    users = re.findall(r"^USER\s+(\S+)", stage, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert "\nflower==" in (ROOT / "requirements" / "dev.txt").read_text()
    assert "\nflower==" not in (ROOT / "requirements" / "runtime.txt").read_text(), "not in the app image"


@pytest.mark.parametrize("service", ["api", "worker", "webhook-worker"])
def test_app_services_build_the_app_stage(service: str) -> None:
    assert SERVICES[service]["build"] == {"context": ".", "target": "app"}


def test_the_locks_pin_every_package() -> None:
    for name in ("runtime", "dev"):
        lines = (ROOT / "requirements" / f"{name}.txt").read_text().splitlines()
        requirements = [line for line in lines if line and not line.startswith((" ", "#"))]
        assert requirements and all(re.fullmatch(r"[a-z0-9._-]+==\S+", line) for line in requirements), name
    runtime = (ROOT / "requirements" / "runtime.txt").read_text()
    assert "\nmoto==" not in runtime and "\npillow==" not in runtime, "dev packages in the runtime lock"
