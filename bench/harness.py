"""Reusable pieces for the benchmarks: a whole stack on free ports, load, timings, process metrics, output.

A scenario (``bench/pool.py`` and later ones) composes these::

    with bench_stack(sim_args=["--latency-ms", "2000"], env={"MAX_ATTEMPTS": "3"}) as stack:
        worker = stack.start_worker("w0", pool="threads", concurrency=100)
        with ProcessSampler(worker.pid) as sampler:
            submitted = submit_jobs(stack.api_url, [seed_body()] * 400)
            seen, final = wait_all_final(stack.api_url, submitted.ids, timeout=120)
        stack.stop_worker("w0")
        print(task_timings(list(final.values()), latency_s=2.0), sampler.as_dict())

Everything runs as real processes, started by ``devstack.processes`` (redis-server, moto's S3 server, the
upstream simulator, the API under gunicorn), except the Celery workers: ``start_worker`` here passes
``--pool`` explicitly (see ``worker_command``). By default they run a snapshot of the code taken when the
stack starts (``code_snapshot``). Nothing here imports the API, the worker or the services: the stack is
driven over HTTP only, as a client would.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3
import httpx

from devstack.processes import (
    HOST,
    Child,
    free_port,
    start_api,
    start_redis,
    start_s3,
    start_simulator,
    wait_until,
    worker_env,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT.parent / "shared" / "upstream" / "samples"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
FINAL = frozenset({"succeeded", "failed", "canceled"})
# What the stack's processes import; copied by ``code_snapshot`` so that a run sees one version of it.
CODE_DIRS = ("api", "devstack", "services", "simulator", "worker")

# Environment for the API and the workers. Timeouts are far above the simulated latency so that a slow
# machine shows up as a long makespan, not as retries; VISIBILITY_TIMEOUT must exceed
# UPSTREAM_TIMEOUT + UPSTREAM_CONNECT_TIMEOUT (services/config.py checks it).
BASE_ENV: dict[str, str] = {
    "MAX_ATTEMPTS": "3",
    "RETRY_BASE_DELAY": "0.5",
    "RETRY_MAX_DELAY": "2",
    "UPSTREAM_TIMEOUT": "60",
    "UPSTREAM_CONNECT_TIMEOUT": "10",
    "VISIBILITY_TIMEOUT": "300",
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "S3_BUCKET": "bench-outputs",
    "KEY_PREFIX": "bench",
}


def seed_body() -> dict[str, Any]:
    """The sample request every scenario sends unless it says otherwise."""
    return json.loads((SAMPLES / "request-seed-example.json").read_text())


# --------------------------------------------------------------------------------------------------
# the stack
# --------------------------------------------------------------------------------------------------


def worker_command(
    name: str, *, pool: str | None, concurrency: int | None, queues: str = "generation"
) -> list[str]:
    """``celery -A worker.main worker`` with the pool given on the command line.

    Passing ``--pool`` matters for gevent: Celery monkey-patches the process (``gevent.monkey.patch_all``)
    only when it finds ``-P``/``--pool`` in argv (``celery.maybe_patch_concurrency``). With the pool
    chosen through ``WORKER_POOL`` alone, the CLI does pick the gevent pool class (it falls back to
    ``app.conf.worker_pool`` when ``--pool`` is left at its ``prefork`` default), but sockets stay
    blocking, so one greenlet's upstream call blocks every other. ``pool=None`` reproduces that path.
    """
    celery = Path(sys.executable).with_name("celery")
    args = [
        str(celery) if celery.exists() else "celery", "-A", "worker.main", "worker", "--loglevel", "INFO",
        "-Q", queues, "--hostname", f"{name}@%h", "--without-gossip", "--without-mingle",
    ]  # fmt: skip
    if pool is not None:
        args += ["--pool", pool]
    if concurrency is not None:
        args += ["--concurrency", str(concurrency)]
    return args


@dataclass
class BenchStack:
    """Redis, S3, simulator and API as child processes under ``root``; workers come and go."""

    root: Path
    sim_args: Sequence[str] = ()
    extra_env: Mapping[str, str] = field(default_factory=dict)
    api_workers: int = 2
    api_threads: int = 8
    api_worker_class: str = "gthread"
    api_worker_connections: int = 1000
    env: dict[str, str] = field(default_factory=dict)
    children: dict[str, Child] = field(default_factory=dict)
    api_url: str = ""
    simulator_url: str = ""
    http: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=30))

    @property
    def log_dir(self) -> Path:
        return self.root / "logs"

    def start(self) -> BenchStack:
        redis_port, s3_port, sim_port, api_port = free_port(), free_port(), free_port(), free_port()
        self.children["redis"] = start_redis(self.root / "redis", redis_port, log_dir=self.log_dir)
        self.children["s3"] = start_s3(s3_port, log_dir=self.log_dir)
        self.children["simulator"] = start_simulator(sim_port, log_dir=self.log_dir, args=self.sim_args)
        self.simulator_url = f"http://{HOST}:{sim_port}"
        self.env.update(
            BASE_ENV,
            REDIS_URL=f"redis://{HOST}:{redis_port}/0",
            S3_ENDPOINT_URL=f"http://{HOST}:{s3_port}",
            UPSTREAM_BASE_URL=self.simulator_url,
        )
        self.env.update(self.extra_env)
        _create_bucket(self.env)
        self.children["api"] = start_api(
            self.env,
            api_port,
            log_dir=self.log_dir,
            workers=self.api_workers,
            threads=self.api_threads,
            worker_class=self.api_worker_class,
            worker_connections=self.api_worker_connections,
        )
        self.api_url = f"http://{HOST}:{api_port}"
        return self

    def stop(self) -> None:
        for child in reversed(list(self.children.values())):
            child.stop()
        self.children.clear()
        self.http.close()

    # workers ----------------------------------------------------------------------------------------
    def start_worker(
        self,
        name: str,
        *,
        pool: str | None,
        concurrency: int,
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 60,
        queues: str = "generation",
    ) -> Child:
        """Start a Celery worker consuming ``queues`` and wait until it logs ``ready.``.

        ``WORKER_POOL``/``WORKER_CONCURRENCY`` are set to match; ``pool=None`` leaves ``--pool`` off the
        command line (see ``worker_command``) and takes the pool from ``env["WORKER_POOL"]``.
        """
        environment = worker_env({**self.env, "WORKER_CONCURRENCY": str(concurrency), **(env or {})})
        if pool is not None:
            environment["WORKER_POOL"] = pool
        log_path = self.log_dir / f"{name}.log"
        args = worker_command(name, pool=pool, concurrency=concurrency, queues=queues)
        child = Child(name, args, environment, log_path).start()
        self.children[name] = child

        def ready() -> bool:
            if not child.alive():
                raise RuntimeError(f"worker {name} exited:\n{child.tail()}")
            return f"{name}@" in (text := _read(log_path)) and " ready." in text

        try:
            wait_until(ready, timeout=ready_timeout, what=f"worker {name} to be ready", interval=0.1)
        except TimeoutError as exc:
            raise RuntimeError(f"{exc}\n{child.tail()}") from None
        return child

    def stop_worker(self, name: str) -> None:
        child = self.children.pop(name, None)
        if child is not None:
            child.stop()

    # simulator --------------------------------------------------------------------------------------
    def sim_stats(self) -> dict[str, Any]:
        return self.http.get(f"{self.simulator_url}/_sim/stats").json()

    def sim_reset(self) -> None:
        """Wait for the simulator to go idle, then clear its counters (max_in_flight, calls, …)."""
        wait_until(lambda: self.sim_stats()["in_flight"] == 0, timeout=30, what="simulator to be idle")
        self.http.post(f"{self.simulator_url}/_sim/reset").raise_for_status()


def _create_bucket(env: Mapping[str, str]) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=env["S3_ENDPOINT_URL"],
        region_name=env.get("S3_REGION", "us-east-1"),
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket=env["S3_BUCKET"])


@contextmanager
def bench_stack(
    *,
    sim_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    root: Path | None = None,
    keep: bool = False,
    snapshot: bool = True,
    api_workers: int = 2,
    api_threads: int = 8,
    api_worker_class: str = "gthread",
    api_worker_connections: int = 1000,
) -> Iterator[BenchStack]:
    """A running stack in a temporary directory (or ``root``); everything stopped on exit.

    With ``snapshot`` the stack's processes run a copy of the code taken now (``code_snapshot``), so that
    edits made to the working tree during a run do not mix versions between processes or runs. The
    directory (every component's log is under ``logs/``) is removed afterwards unless ``keep``.
    """
    made = root is None
    path = Path(tempfile.mkdtemp(prefix="imagegen-bench-")) if root is None else root
    stack = BenchStack(
        path, sim_args, dict(env or {}), api_workers, api_threads, api_worker_class, api_worker_connections
    )
    try:
        with code_snapshot(path / "code") if snapshot else _nothing():
            try:
                yield stack.start()
            finally:
                stack.stop()
    finally:
        if made and not keep:
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


@contextmanager
def code_snapshot(target: Path) -> Iterator[Path]:
    """Copy ``CODE_DIRS`` to ``target``; child processes started inside the block import that copy.

    Children inherit this process's environment and working directory, and ``python -m``, celery and
    gunicorn all put the working directory first on ``sys.path``: so this sets both (PYTHONPATH and
    ``os.chdir``) for the duration of the block. This process's own imports are not affected.
    """
    for name in CODE_DIRS:
        shutil.copytree(ROOT / name, target / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    old_cwd, old_path = os.getcwd(), os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(target) + (os.pathsep + old_path if old_path else "")
    os.chdir(target)
    try:
        yield target
    finally:
        os.chdir(old_cwd)
        if old_path is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old_path


def code_fingerprint(root: Path = ROOT) -> str:
    """sha256 over the paths and contents of the ``.py`` files in ``CODE_DIRS`` under ``root``."""
    digest = hashlib.sha256()
    for name in CODE_DIRS:
        for path in sorted((root / name).rglob("*.py")):
            if "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def code_info() -> dict[str, Any]:
    """Which code a run measured: the commit, the files of ``CODE_DIRS`` changed since, a fingerprint."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=False
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "subject": git("log", "-1", "--format=%s"),
        "uncommitted": git("status", "--porcelain", "--", *CODE_DIRS).splitlines(),
        "fingerprint": code_fingerprint(),
    }


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------


@dataclass
class Submitted:
    ids: list[str]
    started: float  # time.time() before the first request
    finished: float  # time.time() after the last answer
    post_seconds: list[float]
    errors: list[str]

    @property
    def seconds(self) -> float:
        return self.finished - self.started


def submit_jobs(
    api_url: str,
    bodies: Sequence[Any],
    *,
    parallelism: int = 16,
    headers: Mapping[str, str] | None = None,
) -> Submitted:
    """POST every body to ``/v1/images/generations`` from ``parallelism`` threads; 202 expected.

    ``headers``: sent with every request (``Authorization`` for a tenant's key)."""
    return _post_all(
        api_url, "/v1/images/generations", bodies, lambda answer: [answer["id"]], parallelism, headers
    )


def submit_batches(
    api_url: str,
    bodies: Sequence[Any],
    *,
    size: int = 1000,
    parallelism: int = 2,
    headers: Mapping[str, str] | None = None,
) -> Submitted:
    """POST the bodies as batches of ``size`` to ``/v1/batches`` from ``parallelism`` threads, as a client
    with thousands of jobs would; 202 expected. The ids come in the bodies' order."""
    batches = [{"requests": list(bodies[i : i + size])} for i in range(0, len(bodies), size)]
    return _post_all(api_url, "/v1/batches", batches, lambda answer: answer["task_ids"], parallelism, headers)


def _post_all(
    api_url: str,
    path: str,
    payloads: Sequence[Any],
    ids_of: Callable[[dict[str, Any]], list[str]],
    parallelism: int,
    headers: Mapping[str, str] | None,
) -> Submitted:
    """POST each payload to ``path`` from ``parallelism`` threads; the task ids of the 202 answers, in the
    payloads' order."""
    ids: list[list[str]] = [[] for _ in payloads]
    post_seconds: list[float] = [0.0] * len(payloads)
    errors: list[str] = []
    limits = httpx.Limits(max_connections=parallelism, max_keepalive_connections=parallelism)
    with httpx.Client(base_url=api_url, timeout=120, limits=limits, headers=headers) as client:

        def post(index: int) -> None:
            began = time.monotonic()
            try:
                response = client.post(path, json=payloads[index])
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            finally:
                post_seconds[index] = time.monotonic() - began
            if response.status_code != 202:
                errors.append(f"{response.status_code}: {response.text[:200]}")
                return
            ids[index] = ids_of(response.json())

        started = time.time()
        with ThreadPoolExecutor(parallelism) as executor:
            list(executor.map(post, range(len(payloads))))
        finished = time.time()
    return Submitted([i for chunk in ids for i in chunk], started, finished, post_seconds, errors)


def wait_all_final(
    api_url: str,
    ids: Sequence[str],
    *,
    timeout: float,
    interval: float = 0.2,
    headers: Mapping[str, str] | None = None,
) -> tuple[float, dict[str, dict[str, Any]]]:
    """Block until every task is final; return when that was seen (time.time()) and the final records.

    Uses only ``GET /v1/tasks/{id}``, and sparingly, so that the observer does not load the API while
    it is measured: each poll walks the unfinished ids in submission order and stops at the first one
    that is not final (jobs finish roughly in that order); a final record is kept and never asked for
    again. About one request per task plus one per poll. TimeoutError after ``timeout`` seconds.
    ``headers``: sent with every request (the tenant's key: another tenant's task is a 404).
    """
    pending = list(ids)
    final: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    with httpx.Client(base_url=api_url, timeout=30, headers=headers) as client:
        while pending:
            still: list[str] = []
            for position, task_id in enumerate(pending):
                response = client.get(f"/v1/tasks/{task_id}")
                response.raise_for_status()
                task = response.json()
                if task["status"] in FINAL:
                    final[task_id] = task
                else:
                    still = pending[position:]
                    break
            pending = still
            if not pending:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{len(pending)} task(s) not final after {timeout:.0f}s, e.g. {pending[0]}"
                )
            time.sleep(interval)
    return time.time(), final


def fetch_tasks(
    api_url: str,
    ids: Sequence[str],
    *,
    parallelism: int = 16,
    headers: Mapping[str, str] | None = None,
) -> list[dict[str, Any]]:
    """GET /v1/tasks/{id} for every id (after the measurement)."""
    with httpx.Client(base_url=api_url, timeout=30, headers=headers) as client:

        def get(task_id: str) -> dict[str, Any]:
            response = client.get(f"/v1/tasks/{task_id}")
            response.raise_for_status()
            return response.json()

        with ThreadPoolExecutor(parallelism) as executor:
            return list(executor.map(get, ids))


# --------------------------------------------------------------------------------------------------
# timings
# --------------------------------------------------------------------------------------------------


def parse_time(value: str) -> float:
    """Epoch seconds from the store's ISO timestamps (``2025-01-01T00:00:00.123Z``)."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def percentile(values: Sequence[float], pct: float) -> float | None:
    """Linear-interpolated percentile (``pct`` in 0..100), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def task_timings(tasks: Sequence[Mapping[str, Any]], *, latency_s: float) -> dict[str, Any]:
    """Makespan and per-task latency figures from task records (``GET /v1/tasks/{id}``).

    - ``makespan_s``: last ``finished_at`` − first ``created_at``.
    - ``excess_*``: (``finished_at`` − ``created_at``) − upstream latency, i.e. queueing + our overhead.
    - ``wait_*``: ``started_at`` − ``created_at`` (time in the queue before the first attempt).
    - ``overhead_*``: an attempt's duration − upstream latency (payload load, HTTP, decode, S3 upload,
      store writes): the per-job cost of the pool itself, without queueing.
    """
    done = [t for t in tasks if t.get("finished_at")]
    created = [parse_time(t["created_at"]) for t in tasks]
    finished = [parse_time(t["finished_at"]) for t in done]
    excess = [parse_time(t["finished_at"]) - parse_time(t["created_at"]) - latency_s for t in done]
    wait = [parse_time(t["started_at"]) - parse_time(t["created_at"]) for t in tasks if t.get("started_at")]
    overhead = [
        a["duration_ms"] / 1000 - latency_s
        for t in done
        for a in t.get("attempts", [])
        if a.get("outcome") == "succeeded" and a.get("duration_ms") is not None
    ]
    statuses: dict[str, int] = {}
    for t in tasks:
        statuses[t["status"]] = statuses.get(t["status"], 0) + 1
    return {
        "tasks": len(tasks),
        "statuses": statuses,
        "failures": len(tasks) - statuses.get("succeeded", 0),
        "attempts": sum(len(t.get("attempts", [])) for t in tasks),
        "retried_tasks": sum(1 for t in tasks if len(t.get("attempts", [])) > 1),
        "first_created": min(created) if created else None,
        "last_finished": max(finished) if finished else None,
        "makespan_s": (max(finished) - min(created)) if finished else None,
        **_spread("excess", excess),
        **_spread("wait", wait),
        **_spread("overhead", overhead),
    }


def _spread(name: str, values: Sequence[float]) -> dict[str, float | None]:
    return {
        f"{name}_p50_s": percentile(values, 50),
        f"{name}_p99_s": percentile(values, 99),
        f"{name}_max_s": max(values) if values else None,
    }


# --------------------------------------------------------------------------------------------------
# process metrics from /proc (no psutil)
# --------------------------------------------------------------------------------------------------

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    cpu_s: float  # utime + stime
    children_cpu_s: float  # cutime + cstime: reaped children
    rss_bytes: int


def proc_stat(pid: int) -> ProcStat | None:
    """/proc/<pid>/stat, or None when the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2 :].split()  # fields[0] is field 3 (state) of proc(5)
    return ProcStat(
        pid=pid,
        ppid=int(fields[1]),
        cpu_s=(int(fields[11]) + int(fields[12])) / _CLK_TCK,
        children_cpu_s=(int(fields[13]) + int(fields[14])) / _CLK_TCK,
        rss_bytes=int(fields[21]) * _PAGE,
    )


def proc_status_kb(pid: int, key: str) -> int | None:
    """A ``kB`` field of /proc/<pid>/status (``VmHWM``, ``VmRSS``) or smaps_rollup (``Pss``)."""
    for name in ("status", "smaps_rollup"):
        try:
            text = Path(f"/proc/{pid}/{name}").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            return None
        match = re.search(rf"^{key}:\s+(\d+) kB", text, re.MULTILINE)
        if match:
            return int(match.group(1))
    return None


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants that are alive now."""
    parents: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            stat = proc_stat(int(entry.name))
            if stat is not None:
                parents.setdefault(stat.ppid, []).append(stat.pid)
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(parents.get(pid, []))
    return tree


def tree_cpu_seconds(root: int) -> float:
    """CPU seconds used so far by ``root``'s tree: live processes plus children the root has reaped."""
    total = 0.0
    for pid in process_tree(root):
        stat = proc_stat(pid)
        if stat is not None:
            total += stat.cpu_s + (stat.children_cpu_s if pid == root else 0.0)
    return total


class ProcessSampler:
    """Samples a process tree while a measurement runs: CPU seconds used and peak memory.

    ``cpu_s`` is the tree's CPU time between ``__enter__`` and ``__exit__``. ``peak_rss_mb`` is the
    largest sum of the tree's RSS over the samples (it counts pages shared between prefork children
    once per process); ``peak_pss_mb`` is the same for PSS (shared pages split between sharers), which
    is the fair figure for a prefork pool. ``hwm_mb`` is the largest single-process VmHWM at the end.
    """

    def __init__(self, root: int, *, interval: float = 0.1, pss_every: int = 5) -> None:
        self.root = root
        self.interval = interval
        self.pss_every = pss_every
        self.cpu_s = 0.0
        self.peak_rss_mb = 0.0
        self.peak_pss_mb = 0.0
        self.hwm_mb = 0.0
        self.processes = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="process-sampler")
        self._cpu_start = 0.0

    def __enter__(self) -> ProcessSampler:
        self._cpu_start = tree_cpu_seconds(self.root)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.cpu_s = tree_cpu_seconds(self.root) - self._cpu_start
        pids = process_tree(self.root)
        self.processes = len(pids)
        hwm = [proc_status_kb(pid, "VmHWM") or 0 for pid in pids]
        self.hwm_mb = max(hwm, default=0) / 1024
        self._sample(with_pss=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample(with_pss=self.samples % self.pss_every == 0)
            self._stop.wait(self.interval)

    def _sample(self, *, with_pss: bool) -> None:
        pids = process_tree(self.root)
        rss = sum(stat.rss_bytes for pid in pids if (stat := proc_stat(pid)) is not None)
        self.peak_rss_mb = max(self.peak_rss_mb, rss / 2**20)
        if with_pss:
            pss = sum(proc_status_kb(pid, "Pss") or 0 for pid in pids)
            self.peak_pss_mb = max(self.peak_pss_mb, pss / 1024)
        self.samples += 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "cpu_s": self.cpu_s,
            "peak_rss_mb": self.peak_rss_mb,
            "peak_pss_mb": self.peak_pss_mb,
            "hwm_max_process_mb": self.hwm_mb,
            "processes": self.processes,
            "samples": self.samples,
        }


@contextmanager
def cpu_usage(pids: Mapping[str, int]) -> Iterator[dict[str, float]]:
    """CPU seconds each named process tree used inside the block (filled in on exit)."""
    start = {name: tree_cpu_seconds(pid) for name, pid in pids.items()}
    used: dict[str, float] = {}
    yield used
    used.update({name: tree_cpu_seconds(pid) - start[name] for name, pid in pids.items()})


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, summed over CPUs (/proc/stat)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / _CLK_TCK, sum(values) / _CLK_TCK


@contextmanager
def machine_usage() -> Iterator[dict[str, float]]:
    """The machine's CPU use inside the block: ``busy_s`` (all processes, all CPUs), ``busy_fraction``
    (of all CPUs) and ``self_s`` (this process: the load generator and samplers). Filled in on exit."""
    busy0, total0 = machine_cpu()
    self0 = time.process_time()
    used: dict[str, float] = {}
    yield used
    busy1, total1 = machine_cpu()
    used.update(
        busy_s=busy1 - busy0,
        busy_fraction=(busy1 - busy0) / max(total1 - total0, 1e-9),
        self_s=time.process_time() - self0,
    )


def wait_for_quiet(*, threshold: float = 0.25, window: float = 1.0, max_wait: float = 20.0) -> float:
    """Wait until the machine is less than ``threshold`` busy over ``window`` seconds, at most ``max_wait``
    seconds; return the last busy fraction seen. Other work on the machine is the main source of noise."""
    deadline = time.monotonic() + max_wait
    while True:
        with machine_usage() as used:
            time.sleep(window)
        if used["busy_fraction"] < threshold or time.monotonic() > deadline:
            return used["busy_fraction"]


# --------------------------------------------------------------------------------------------------
# logs
# --------------------------------------------------------------------------------------------------

_PROBLEM = re.compile(r"\b(ERROR|CRITICAL|WARNING|Traceback)\b")


def log_problems(path: Path, *, limit: int = 20) -> dict[str, Any]:
    """Counts of ERROR/WARNING/Traceback lines in a log and the first few distinct ones."""
    counts: dict[str, int] = {}
    examples: list[str] = []
    for line in _read(path).splitlines():
        match = _PROBLEM.search(line)
        if not match:
            continue
        counts[match.group(1)] = counts.get(match.group(1), 0) + 1
        # drop the leading timestamp and the task ids, so that repeats collapse
        short = re.sub(r"^[\d\-: ,.\[\]]+", "", line)
        short = re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "<id>", short)[:300]
        if short not in examples and len(examples) < limit:
            examples.append(short)
    return {"counts": counts, "examples": examples}


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------------------------------
# output
# --------------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    load = os.getloadavg()
    try:
        mem_kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
    except (OSError, AttributeError):
        mem_kb = 0
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "mem_gb": round(mem_kb / 2**20, 1),
        "loadavg_at_start": [round(x, 2) for x in load],
    }


def fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def write_results(
    name: str, data: Mapping[str, Any], markdown: str, *, directory: Path = RESULTS_DIR
) -> Path:
    """Write ``<name>-<timestamp>.json`` and ``.md`` into ``directory``, and copy both to ``<name>-latest``.

    Returns the path of the JSON file.
    """
    directory.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = []
    for suffix, text in ((".json", json.dumps(data, indent=2, sort_keys=False) + "\n"), (".md", markdown)):
        path = directory / f"{name}-{stamp}{suffix}"
        tmp = path.with_suffix(suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
        shutil.copyfile(path, directory / f"{name}-latest{suffix}")
        paths.append(path)
    return paths[0]
