"""Start the service's parts as child processes on free ports, and stop them.

Used by ``python -m devstack`` (``make run``), by the tests and by the benchmarks, so that all three run
the same real components: redis-server, an S3 server (moto), the upstream simulator, Celery workers and
the API.
"""

from __future__ import annotations

import ctypes.util
import functools
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

HOST = "127.0.0.1"
# gunicorn's hooks for GET /metrics across its processes (multiprocess mode), as the Docker image uses them
GUNICORN_CONFIG = str(Path(__file__).resolve().parents[1] / "gunicorn.conf.py")  # metrics hooks, log format


# The lowest port free_port picks; below it, where the system leaves room (Linux: 32768 and up is
# ephemeral), up to the lowest ephemeral port.
LOWEST_PORT = 10000
_given: set[int] = set()
_given_lock = threading.Lock()


def free_port() -> int:
    """A port nothing listens on, for a server about to start on it; never the same twice in a process.

    Picked below the range the system takes outgoing connections' ports from
    (``/proc/sys/net/ipv4/ip_local_port_range``), not with ``bind(0)``, which picks in that range: there,
    any connection made between this call and the server's bind could take the port (a fresh-clone run
    failed so: ``EADDRINUSE``), and a Redis restarted on its port by a fault test could find it taken.
    Below it, only a bind that names the port takes it. Where the system leaves no room below its range,
    ``bind(0)`` as before."""
    ceiling = _ephemeral_floor()
    with _given_lock:
        for _ in range(100):
            port = _bound_port(random.randrange(LOWEST_PORT, ceiling) if ceiling > LOWEST_PORT + 1000 else 0)
            if port and port not in _given:
                _given.add(port)
                return port
    return _bound_port(0)


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def _bound_port(port: int) -> int:
    """``port`` (0: one the system picks) if a socket can bind it on ``HOST`` now, else 0."""
    with socket.socket() as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return 0
        bound: int = sock.getsockname()[1]
        return bound


def wait_until(
    predicate: Callable[[], object], *, timeout: float, what: str, interval: float = 0.05
) -> object:
    """Poll ``predicate`` until it returns something truthy; raise TimeoutError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except Exception as exc:  # noqa: BLE001 - polled again until the deadline
            last_error = exc
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what} (last error: {last_error})")
        time.sleep(interval)


@dataclass
class Child:
    """One child process, its name and where its output goes."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path | None
    process: subprocess.Popen[bytes] | None = field(default=None, init=False)
    stopped: bool = field(default=False, init=False)  # stopped on purpose: a supervisor leaves it be
    restarts: int = field(default=0, init=False)

    def start(self) -> Child:
        """Start it in its own process group; output to ``log_path``, or to ours when that is None."""
        if self.log_path is None:
            self.process = subprocess.Popen(self.args, env=self.env, start_new_session=True)
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                self.args, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGTERM, wait, then SIGKILL whatever is left of its process group."""
        self.stopped = True
        if self.process is None:
            return
        self.signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(5)

    def kill(self) -> None:
        """SIGKILL at once, as a crash would."""
        if self.process is None:
            return
        try:
            os.killpg(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(10)

    def tail(self, lines: int = 40) -> str:
        if self.log_path is None:
            return ""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


def _python() -> str:
    return sys.executable


def _bin(name: str) -> str:
    candidate = Path(sys.executable).with_name(name)
    return str(candidate) if candidate.exists() else name


def start_redis(
    data_dir: Path,
    port: int,
    *,
    log_dir: Path,
    appendfsync: str = "everysec",
    name: str = "redis",
    replicaof: int | None = None,
    host: str = HOST,
    min_replicas_to_write: int = 0,
) -> Child:
    """A redis-server that keeps its data (AOF) in ``data_dir``; the same call restarts it on that data.
    ``replicaof``: the port of the primary (on ``HOST``) it starts as a replica of. ``host``: the address
    it listens on (tests/test_partition.py: one that worker hosts in network namespaces reach).
    ``min_replicas_to_write``: as a primary, it refuses writes unless that many replicas are connected
    (and less than 10 s behind): a primary cut off from its group takes no write the group will lose."""
    data_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "redis-server", "--port", str(port), "--bind", host, "--dir", str(data_dir),
        "--appendonly", "yes", "--appendfsync", appendfsync, "--save", "",
        "--maxmemory-policy", "noeviction", "--protected-mode", "no", "--daemonize", "no",
    ]  # fmt: skip
    if replicaof is not None:
        args += ["--replicaof", HOST, str(replicaof)]
    if min_replicas_to_write:
        args += ["--min-replicas-to-write", str(min_replicas_to_write), "--min-replicas-max-lag", "10"]
    # a replica (or a former primary made one) is sent the data at once, not after Redis's default 5 s
    args += ["--repl-diskless-sync-delay", "0"]
    child = Child(name, args, dict(os.environ), log_dir / f"{name}.log").start()
    _wait_for_redis(host, port, f"redis-server on port {port}")
    return child


def start_sentinel(
    data_dir: Path,
    port: int,
    *,
    log_dir: Path,
    master: str,
    primary_port: int,
    quorum: int = 2,
    down_after_ms: int = 3000,
    failover_timeout_ms: int = 3000,
    name: str = "sentinel",
) -> Child:
    """A ``redis-server --sentinel`` watching the primary on ``primary_port`` under the name ``master``.
    Sentinel rewrites its configuration file as it learns: each gets its own in ``data_dir``."""
    data_dir.mkdir(parents=True, exist_ok=True)
    conf = data_dir / f"{name}.conf"
    conf.write_text(
        "\n".join(
            [
                f"port {port}",
                f"bind {HOST}",
                "protected-mode no",
                "daemonize no",
                f"dir {data_dir}",
                f"sentinel monitor {master} {HOST} {primary_port} {quorum}",
                f"sentinel down-after-milliseconds {master} {down_after_ms}",
                f"sentinel failover-timeout {master} {failover_timeout_ms}",
                f"sentinel parallel-syncs {master} 1",
                "",
            ]
        )
    )
    child = Child(
        name, ["redis-server", str(conf), "--sentinel"], dict(os.environ), log_dir / f"{name}.log"
    ).start()
    _wait_for_redis(HOST, port, f"redis-sentinel on port {port}")
    return child


def _wait_for_redis(host: str, port: int, what: str) -> None:
    """Until the server on ``port`` answers PING (a redis-server or a sentinel)."""
    client = redis.Redis(host=host, port=port, socket_connect_timeout=0.5)
    try:
        wait_until(client.ping, timeout=15, what=what)
    finally:
        client.close()


def start_s3(port: int, *, log_dir: Path, host: str = HOST) -> Child:
    """moto's S3-compatible server; its data lives in memory and is gone when it stops."""
    args = [_python(), "-m", "moto.server", "-H", host, "-p", str(port)]
    child = Child("s3", args, dict(os.environ), log_dir / "s3.log").start()
    wait_until(lambda: _http_ok(f"http://{host}:{port}/"), timeout=30, what=f"S3 server on port {port}")
    return child


def start_simulator(port: int, *, log_dir: Path, args: Sequence[str] = (), host: str = HOST) -> Child:
    cmd = [_python(), "-m", "simulator", "--host", host, "--port", str(port), *args]
    child = Child("simulator", cmd, dict(os.environ), log_dir / "simulator.log").start()
    url = f"http://{host}:{port}/_sim/stats"
    wait_until(lambda: _http_ok(url), timeout=30, what=f"simulator on port {port}")
    return child


# jemalloc gives freed pages back after 10 s by default; a worker reuses its answers' buffers every few
# seconds, and faulted them in again: 60 s keeps its CPU per job at glibc's (bench/README.md, P4).
JEMALLOC_CONF = "dirty_decay_ms:60000,muzzy_decay_ms:60000"


@functools.cache
def _jemalloc() -> str | None:
    return ctypes.util.find_library("jemalloc")  # its soname, libjemalloc.so.2, which LD_PRELOAD finds


def worker_env(env: Mapping[str, str]) -> dict[str, str]:
    """A worker process's environment: ours, ``env`` over it, and jemalloc preloaded where it is installed
    (``libjemalloc2``; ``make setup`` and the Docker image install it), with ``JEMALLOC_CONF``.

    Under glibc's malloc a worker's RSS grows with the jobs it has run, in its threads' arenas; under
    jemalloc it stays flat (bench/README.md, P4). An ``LD_PRELOAD`` or ``MALLOC_CONF`` already set, even
    empty, is left as it is: ``LD_PRELOAD=`` keeps glibc's malloc.
    """
    merged = {**os.environ, **env}
    if "LD_PRELOAD" not in merged and (library := _jemalloc()):
        merged["LD_PRELOAD"] = library
        merged.setdefault("MALLOC_CONF", JEMALLOC_CONF)
    return merged


def start_worker(
    env: Mapping[str, str],
    *,
    log_dir: Path | None,
    name: str = "worker",
    concurrency: int | None = None,
    queues: str = "generation",
    wrapper: Sequence[str] = (),
) -> Child:
    """A Celery worker consuming ``queues`` (comma-separated: ``generation``, ``webhooks``). ``wrapper``:
    a command it runs under (``ip netns exec NAME``: a worker host of its own; tests/test_partition.py)."""
    args = [
        *wrapper,
        _bin("celery"), "-A", "worker.main", "worker", "--loglevel", "INFO", "-Q", queues,
        "--hostname", f"{name}@%h", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    if concurrency is not None:
        args += ["--concurrency", str(concurrency)]
    log_path = log_dir / f"{name}.log" if log_dir else None
    return Child(name, args, worker_env(env), log_path).start()


def start_api(
    env: Mapping[str, str],
    port: int,
    *,
    log_dir: Path | None,
    workers: int = 2,
    threads: int = 8,
    worker_class: str = "gthread",
    worker_connections: int = 1000,
) -> Child:
    """gunicorn: ``gthread`` (``threads`` a process) or ``gevent`` (``worker_connections`` a process, the
    Docker image's choice: requests that wait hold no thread; ``services/task_events.py``)."""
    args = [
        _bin("gunicorn"), "-c", GUNICORN_CONFIG, "--bind", f"{HOST}:{port}", "--workers", str(workers),
        "--access-logfile", "-", "--graceful-timeout", "10",
    ]  # fmt: skip
    if worker_class == "gevent":
        args += ["--worker-class", "gevent", "--worker-connections", str(worker_connections)]
    else:
        args += ["--threads", str(threads)]
    args.append("api:create_app()")
    child = Child("api", args, {**os.environ, **env}, log_dir / "api.log" if log_dir else None).start()
    wait_until(lambda: _http_ok(f"http://{HOST}:{port}/healthz"), timeout=30, what=f"API on port {port}")
    return child


def _http_ok(url: str) -> bool:
    return httpx.get(url, timeout=1.0).status_code < 500


class Supervisor:
    """Restarts supervised children that exit when nobody stopped them, as a process manager would.

    Celery workers exit on some broker connection losses (kombu raises while restoring unacknowledged
    messages: "Unrecoverable error"); in production the container's restart policy brings them back,
    here this does. Nothing is lost meanwhile: the store, not the broker, holds every task's state.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self._children: list[Child] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()

    def watch(self, child: Child) -> Child:
        self._children.append(child)
        return child

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for child in list(self._children):
                if not child.stopped and not child.alive():
                    child.restarts += 1
                    print(
                        f"supervisor: {child.name} exited; restarting it (restart {child.restarts})",
                        flush=True,
                    )
                    child.start()
