"""The real stack for tests: redis-server, S3 server, simulator and Celery workers as processes on free
ports, and the API over real HTTP. Each part can be killed and restarted by fault tests."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from werkzeug.serving import make_server

from api import create_app
from devstack.processes import (
    HOST,
    Child,
    Supervisor,
    free_port,
    start_redis,
    start_s3,
    start_simulator,
    start_worker,
    wait_until,
)
from devstack.sentinel import RedisGroup
from services import presence
from services.config import Config, load_config
from services.records import TaskRecord
from services.runtime import Runtime
from services.storage import Storage
from services.webhook_signing import generate_secret

SHARED = Path(__file__).resolve().parents[2] / "shared"
SAMPLES = SHARED / "upstream" / "samples"
FINAL = {"succeeded", "failed", "canceled"}

# Fast retries and short timeouts, so that the error classes finish in seconds.
TEST_ENV = {
    "MAX_ATTEMPTS": "3",
    "RETRY_BASE_DELAY": "0.05",
    "RETRY_MAX_DELAY": "0.3",
    "UPSTREAM_TIMEOUT": "2",
    "UPSTREAM_CONNECT_TIMEOUT": "2",
    "VISIBILITY_TIMEOUT": "60",
    "UPSTREAM_HOLD_SECONDS": "2",
    "UPSTREAM_QUOTA_RETRY_SECONDS": "0.4",
    "TASK_LEASE_SECONDS": "3",
    "SWEEP_INTERVAL": "0.05",
    "WORKER_CONCURRENCY": "16",
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "S3_BUCKET": "test-outputs",
    # webhooks: receivers on 127.0.0.1 over http, three quick attempts, a lease of seconds
    "WEBHOOK_ALLOW_PRIVATE": "true",
    "WEBHOOK_ALLOW_HTTP": "true",
    "WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.4",
    "WEBHOOK_TIMEOUT": "2",
    "WEBHOOK_LEASE_SECONDS": "5",
}


# The machine's RabbitMQ (the fault suite's RabbitMQ variant): each stack gets a vhost of its own.
RABBITMQ_HOST, RABBITMQ_PORT = "127.0.0.1", 5672
RABBITMQ_SKIP = (
    f"RabbitMQ not reachable on {RABBITMQ_HOST}:{RABBITMQ_PORT}: "
    "the RabbitMQ variant of the fault suite is skipped"
)
BROKERS = ("redis", "rabbitmq")


def rabbitmq_available() -> bool:
    """Whether a RabbitMQ listens on 127.0.0.1:5672 and ``rabbitmqctl`` is here to make vhosts."""
    if shutil.which("rabbitmqctl") is None:
        return False
    try:
        socket.create_connection((RABBITMQ_HOST, RABBITMQ_PORT), timeout=1).close()
    except OSError:
        return False
    return True


def _rabbitmqctl(*args: str) -> str:
    done = subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, text=True, timeout=60
    )
    return done.stdout


def new_vhost() -> tuple[str, str]:
    """A fresh vhost on the machine's RabbitMQ that guest may use: (its name, its amqp:// URL)."""
    vhost = f"iq-test-{uuid.uuid4().hex[:12]}"
    _rabbitmqctl("add_vhost", vhost)
    _rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return vhost, f"amqp://guest:guest@{RABBITMQ_HOST}:{RABBITMQ_PORT}/{vhost}"


def delete_vhost(vhost: str) -> None:
    _rabbitmqctl("delete_vhost", vhost)


def close_connections(vhost: str) -> None:
    """RabbitMQ closes every client connection to ``vhost`` (and only those): a broker that drops its
    clients, as on a node restart, without touching anyone else's vhost."""
    _rabbitmqctl("close_all_connections", "--vhost", vhost, "--limit", "1000", "fault test")


def list_queues(vhost: str) -> dict[str, dict[str, str]]:
    """Each queue of ``vhost``: its type and arguments."""
    columns = ("name", "type", "arguments")
    out = _rabbitmqctl("list_queues", "-p", vhost, "--no-table-headers", *columns)
    queues = {}
    for line in out.splitlines():
        values = line.split("\t")
        if len(values) == len(columns):
            queues[values[0]] = dict(zip(columns[1:], values[1:], strict=True))
    return queues


def seed_body() -> dict[str, Any]:
    return json.loads((SAMPLES / "request-seed-example.json").read_text())


def with_directive(body: dict[str, Any] | None = None, **directive: str) -> dict[str, Any]:
    """The seed body (or ``body``) with a simulator directive and a fresh key appended to its prompt."""
    body = copy.deepcopy(body or seed_body())
    directive.setdefault("key", uuid.uuid4().hex)
    words = " ".join(f"{name}={value}" for name, value in directive.items())
    body["contents"][0]["parts"].insert(0, {"text": f"[sim {words}]"})
    return body


def directive_key(body: dict[str, Any]) -> str:
    """The simulator key that ``with_directive`` put into ``body``."""
    return body["contents"][0]["parts"][0]["text"].split("key=")[1].split()[0].rstrip("]")


def listening_socket(host: str = HOST) -> socket.socket:
    """A socket listening on a port the system picks. Held from the moment the port is chosen, the port
    cannot be taken by another socket before the server uses it, as a ``free_port()`` can: one given to
    the API at a stack's start was taken by an outgoing connection while the workers started."""
    listener = socket.socket()
    listener.bind((host, 0))
    listener.listen(128)
    return listener


class ApiServer:
    """The Flask app behind a real threaded HTTP server in this process, on ``listener`` (default: a new
    ``listening_socket``)."""

    def __init__(self, config: Config, listener: socket.socket | None = None, host: str = HOST) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.app = create_app(config)
        listener = listener or listening_socket(host)
        self.port = listener.getsockname()[1]
        with listener:  # the server serves a duplicate of it
            self._server = make_server(host, self.port, self.app, threaded=True, fd=listener.fileno())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.url = f"http://{host}:{self.port}"

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join(10)


@dataclass
class Stack:
    root: Path
    overrides: dict[str, str] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    children: dict[str, Child] = field(default_factory=dict)
    redis_port: int = 0
    api: ApiServer | None = None
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10))
    supervisor: Supervisor = field(default_factory=Supervisor)
    owners: dict[str, str] = field(default_factory=dict)  # task id -> the tenant that submitted it
    metrics_ports: dict[str, int] = field(default_factory=dict)  # worker name -> its WORKER_METRICS_PORT
    # Redis as a primary with replicas behind three sentinels (devstack/sentinel.py) instead of one server
    redis_replicas: int = 0
    group: RedisGroup | None = None
    # the address Redis, S3, the simulator and the API listen on (tests/test_partition.py: one that worker
    # hosts in network namespaces reach)
    host: str = HOST
    # "redis" (the store's Redis) or "rabbitmq" (BROKER_URL on a vhost of the stack's own)
    broker: str = "redis"
    vhost: str | None = None
    _turn: int = 0

    @property
    def tenant_keys(self) -> dict[str, str]:
        """Tenant -> its key, from the stack's API_KEYS (empty: an open API)."""
        return {tenant: key for tenant, key in self.config.api_keys}

    def headers(self, tenant: str | None) -> dict[str, str]:
        """The Authorization header of ``tenant`` (none on an open API)."""
        return {"Authorization": f"Bearer {self.tenant_keys[tenant]}"} if tenant is not None else {}

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    @property
    def config(self) -> Config:
        return load_config(self.env)

    @property
    def api_url(self) -> str:
        assert self.api is not None
        return self.api.url

    @property
    def simulator_url(self) -> str:
        return self.env["UPSTREAM_BASE_URL"]

    def start(self, worker_count: int = 1, *, webhook_worker: bool = True) -> Stack:
        if self.redis_replicas:
            self.group = RedisGroup(self.root / "redis", self.log_dir).start(replicas=self.redis_replicas)
            self.children.update(self.group.children)
            redis_env = self.group.env()
        else:
            self.redis_port = free_port()
            self.start_redis()
            redis_env = {"REDIS_URL": f"redis://{self.host}:{self.redis_port}/0"}
        if self.broker == "rabbitmq":
            self.vhost, redis_env["BROKER_URL"] = new_vhost()
        s3_port, sim_port = free_port(), free_port()
        api_listener = listening_socket(self.host)
        api_port = api_listener.getsockname()[1]
        self.children["s3"] = start_s3(s3_port, log_dir=self.log_dir, host=self.host)
        self.children["simulator"] = start_simulator(sim_port, log_dir=self.log_dir, host=self.host)
        self.env.update(
            TEST_ENV,
            **redis_env,
            S3_ENDPOINT_URL=f"http://{self.host}:{s3_port}",
            UPSTREAM_BASE_URL=f"http://{self.host}:{sim_port}",
            WEBHOOK_SIGNING_SECRET=generate_secret(),
            PUBLIC_BASE_URL=f"http://{self.host}:{api_port}",
        )
        self.env.update(self.overrides)
        Storage(self.config).ensure_bucket()
        for number in range(worker_count):
            self.start_worker(f"worker{number}")
        if webhook_worker:
            self.start_worker("webhook-worker", queues="webhooks")
        self.api = ApiServer(self.config, api_listener, self.host)
        self.wait_ready([name for name in self.children if "worker" in name])
        return self

    def start_redis(self) -> None:
        self.children["redis"] = start_redis(
            self.root / "redis", self.redis_port, log_dir=self.log_dir, host=self.host
        )

    def start_worker(
        self,
        name: str,
        extra_env: Mapping[str, str] | None = None,
        *,
        queues: str = "generation",
        wrapper: Sequence[str] = (),
    ) -> Child:
        """Start a worker (``wrapper``: the command it runs under, such as ``ip netns exec NAME``)."""
        # Each worker serves its metrics on a port of its own, kept if it is started again under its name.
        port = self.metrics_ports.setdefault(name, free_port())
        env = {**self.env, "WORKER_METRICS_PORT": str(port), **(extra_env or {})}
        child = self.supervisor.watch(
            start_worker(env, log_dir=self.log_dir, name=name, queues=queues, wrapper=wrapper)
        )
        self.children[name] = child
        return child

    @property
    def runtime(self) -> Runtime:
        assert self.api is not None
        runtime: Runtime = self.api.app.extensions["runtime"]
        return runtime

    def wait_ready(self, names: list[str], timeout: float = 60) -> None:
        """Wait until each named worker process consumes its queues: it announces itself then
        (services/presence.py). A test that submits before that may find all its tasks taken by the
        worker that happened to start first."""

        def ready() -> bool:
            consuming = {
                worker["process"] for worker in presence.consuming(self.runtime.redis, self.runtime.keys)
            }
            return all(f"{socket.gethostname()}:{self.children[name].pid}" in consuming for name in names)

        try:
            wait_until(ready, timeout=timeout, what=f"workers {names} to consume")
        except TimeoutError:
            raise AssertionError(f"workers {names} not consuming after {timeout}s:\n{self.logs()}") from None

    def stop(self) -> None:
        self.supervisor.stop()
        if self.api is not None:
            self.api.stop()
        # the workers together (each takes a second or two to shut down), then the rest, newest first
        workers = [child for name, child in self.children.items() if "worker" in name]
        with ThreadPoolExecutor(max(1, len(workers))) as pool:
            list(pool.map(Child.stop, workers))
        for child in reversed(list(self.children.values())):
            child.stop()
        self.http.close()
        if self.api is not None:
            self.runtime.broker.close()
        if self.vhost is not None:
            delete_vhost(self.vhost)

    # client helpers ---------------------------------------------------------------------------------
    def submit(self, body: Any, *, tenant: str | None = None, **kwargs: Any) -> httpx.Response:
        """Submit ``body`` as ``tenant``; on a stack with API_KEYS and no tenant named, as each tenant
        in turn, so that every test on it runs with tasks of several tenants."""
        tenants = sorted(self.tenant_keys)
        if tenant is None and tenants:
            tenant = tenants[self._turn % len(tenants)]
            self._turn += 1
        headers = {**self.headers(tenant), **kwargs.pop("headers", {})}
        response = self.http.post(
            f"{self.api_url}/v1/images/generations", json=body, headers=headers, **kwargs
        )
        if response.status_code == 202 and tenant is not None:
            self.owners[response.json()["id"]] = tenant
        return response

    def submit_batch(self, body: Any, *, tenant: str | None = None, **kwargs: Any) -> httpx.Response:
        """``POST /v1/batches`` with ``body`` as ``tenant`` (as sent: no tenant named, no key); the tasks
        of an accepted batch are recorded as that tenant's, as ``submit`` records one task."""
        headers = {**self.headers(tenant), **kwargs.pop("headers", {})}
        response = self.http.post(f"{self.api_url}/v1/batches", json=body, headers=headers, **kwargs)
        if response.status_code == 202 and tenant is not None:
            self.owners.update(dict.fromkeys(response.json()["task_ids"], tenant))
        return response

    def get_task(self, task_id: str) -> httpx.Response:
        """``GET /v1/tasks/{id}`` as the tenant that submitted it."""
        return self.http.get(
            f"{self.api_url}/v1/tasks/{task_id}", headers=self.headers(self.owners.get(task_id))
        )

    def task(self, task_id: str) -> dict[str, Any]:
        response = self.get_task(task_id)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_final(self, task_id: str, timeout: float = 30) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            task = self.task(task_id)
            return task if task["status"] in FINAL else None

        try:
            return wait_until(final, timeout=timeout, what=f"task {task_id} to finish")  # type: ignore[return-value]
        except TimeoutError:
            raise AssertionError(f"task {task_id} not final: {self.task(task_id)}\n{self.logs()}") from None

    def run(self, body: Any, timeout: float = 30) -> dict[str, Any]:
        response = self.submit(body)
        assert response.status_code == 202, response.text
        return self.wait_final(response.json()["id"], timeout)

    def stored(self, task_id: str) -> TaskRecord:
        """The task's record as the store holds it: its attempts keep the ``worker`` (host:pid:thread)
        that ran them, which the API's view leaves out."""
        return self.runtime.store.get(task_id)

    def sim_stats(self) -> dict[str, Any]:
        return self.http.get(f"{self.simulator_url}/_sim/stats").json()

    def sim_calls(self, key: str) -> int:
        return self.sim_stats()["by_key"].get(key, 0)

    def output_objects(self, task_id: str) -> list[str]:
        """The keys of the task's objects in the bucket, whatever attempt stored them."""
        storage = Storage(self.config)
        listed = storage._client.list_objects_v2(Bucket=storage.bucket, Prefix=f"outputs/{task_id}/")
        return sorted(item["Key"] for item in listed.get("Contents", []))

    def worker_logs(self) -> str:
        """Everything the generation workers have logged so far."""
        return "\n".join(
            child.log_path.read_text(errors="replace")
            for name, child in self.children.items()
            if name.startswith("worker") and child.log_path is not None and child.log_path.exists()
        )

    def sim_call_log(self) -> list[dict[str, Any]]:
        """Every call the simulator received: key, outcome, status (None: the caller went away before
        the answer), started, finished (None: still in flight)."""
        return self.http.get(f"{self.simulator_url}/_sim/calls").json()

    def worker_metrics_urls(self) -> dict[str, str]:
        """Worker name -> the URL of its metrics (``WORKER_METRICS_PORT``)."""
        return {name: f"http://{HOST}:{port}/metrics" for name, port in self.metrics_ports.items()}

    def logs(self) -> str:
        return "\n".join(f"--- {name}\n{child.tail(30)}" for name, child in self.children.items())


@contextmanager
def running_stack(
    root: Path,
    worker_count: int = 1,
    *,
    webhook_worker: bool = True,
    redis_replicas: int = 0,
    broker: str = "redis",
    **overrides: str,
) -> Iterator[Stack]:
    """A stack with ``worker_count`` generation workers and, unless told not to, a webhook worker; with
    ``redis_replicas``, its Redis is a primary with that many replicas behind three sentinels; with
    ``broker="rabbitmq"``, the machine's RabbitMQ is the broker, on a vhost of its own (deleted after)."""
    stack = Stack(root, overrides, redis_replicas=redis_replicas, broker=broker)
    try:
        yield stack.start(worker_count, webhook_worker=webhook_worker)
    finally:
        stack.stop()
