"""Metrics (services/metrics.py): recorded where things happen, served by the API (every gunicorn process
added up, the queues read from Redis at scrape time) and by each worker process on WORKER_METRICS_PORT.

The stack tests run on stacks of their own (``fault_stack``), so that the counts they expect are exact.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from devstack.processes import GUNICORN_CONFIG, HOST, free_port, wait_until
from services import metrics
from services.config import load_config
from services.errors import UpstreamError
from services.keys import Keys
from services.queue import GENERATION_QUEUE, WEBHOOK_QUEUE
from services.redis_connection import scrape_client
from tests.fault_kit import settle_succeeded, slow_bodies, submit_many
from tests.receiver import Receiver
from tests.stack import FINAL, Stack, seed_body, with_directive

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(url: str) -> Samples:
    """One scrape, on a connection of its own (under gunicorn: whichever process accepts it)."""
    response = httpx.get(url, timeout=10, headers={"Connection": "close"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return parse(response.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


class Scrapes:
    """The stack's API and every worker's endpoint, scraped together; counts are summed over the workers."""

    def __init__(self, stack: Stack) -> None:
        self.api = scrape(f"{stack.api_url}/metrics")
        self.workers = {name: scrape(url) for name, url in stack.worker_metrics_urls().items()}

    def workers_total(self, name: str, **labels: str) -> float:
        return sum(value(samples, name, **labels) for samples in self.workers.values())


# recording never breaks the work it counts --------------------------------------------------------------
@pytest.fixture
def broken_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Any:
        raise RuntimeError("the metrics library is broken")

    monkeypatch.setattr(metrics, "_instruments", broken)


@pytest.mark.usefixtures("broken_metrics")
def test_a_broken_metric_is_logged_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    metrics.task_submitted()
    metrics.task_finished("succeeded", created_at="2026-01-01T00:00:00.000Z", finished_at=None)
    metrics.webhook_delivery("delivered")
    with metrics.storage_upload():
        pass
    with metrics.upstream_request():
        pass
    with pytest.raises(UpstreamError), metrics.upstream_request():  # the call's own error goes through
        raise UpstreamError("the upstream is down", code="upstream_unavailable")
    assert "a metric could not be recorded" in caplog.text


def test_upstream_outcomes_are_bounded() -> None:
    before = parse(metrics.exposition(None)[0].decode())
    for code in ("upstream_timeout", "not_a_code_we_know"):
        with pytest.raises(UpstreamError), metrics.upstream_request():
            raise UpstreamError("x", code=code)
    after = parse(metrics.exposition(None)[0].decode())
    requests = "imagegen_upstream_requests_total"
    for outcome, delta in (("upstream_timeout", 1), ("other", 1), ("ok", 0)):
        assert value(after, requests, outcome=outcome) - value(before, requests, outcome=outcome) == delta
    outcomes = {dict(labels)["outcome"] for name, labels in after if name == requests}
    assert outcomes == set(metrics.UPSTREAM_OUTCOMES)


# the queues, read at scrape time -------------------------------------------------------------------------
def test_queue_collector_reads_the_store(redis_client: redis.Redis, redis_server: str) -> None:
    keys = Keys("iq")
    now = time.time() * 1000
    redis_client.lpush(GENERATION_QUEUE, "m1", "m2", "m3")
    redis_client.lpush(WEBHOOK_QUEUE, "w1")
    redis_client.zadd(keys.queued, {"t1": now - 4000})
    redis_client.zadd(keys.admitted, {"t1": now, "t2": now})
    redis_client.zadd(keys.running, {"t2": now + 3000})
    redis_client.zadd(keys.delayed, {"t3": now - 2000, "t4": now + 60000})
    redis_client.zadd(keys.tenant_ready("a"), {"t5": now - 30000, "t6": now})
    redis_client.zadd(keys.tenant_ready("b"), {"t7": now - 10000})
    redis_client.sadd(keys.ready_tenants, "a", "b")
    redis_client.zadd(keys.webhooks_due, {"e1": now + 5000})
    redis_client.zadd(keys.limiter_slots, {"s1": now + 9000, "s2": now + 9000, "expired": now - 1})
    collector = metrics.QueueCollector(
        scrape_client(load_config({"REDIS_URL": redis_server})), keys, max_concurrency=2
    )
    samples = parse(metrics.exposition(None, [collector])[0].decode())

    depth = {queue: value(samples, "imagegen_queue_depth", queue=queue) for queue in metrics.QUEUES}
    assert depth == {
        "generation": 3,
        "webhooks": 1,
        "ready": 3,
        "admitted": 2,
        "running": 1,
        "delayed": 2,
        "webhook_events": 1,
    }
    age = {
        queue: value(samples, "imagegen_queue_oldest_age_seconds", queue=queue)
        for queue in metrics.AGED_QUEUES
    }
    assert 30 <= age["ready"] < 40, "the oldest waiting task of any tenant"
    assert 4 <= age["generation"] < 14, "the oldest message sent and not started"
    assert 2 <= age["delayed"] < 12, "the most overdue retry"
    assert age["webhook_events"] == 0, "none is overdue"
    assert value(samples, "imagegen_upstream_slots_in_use") == 2, "expired slots are not held"
    assert value(samples, "imagegen_upstream_max_concurrency") == 2
    assert value(samples, "imagegen_store_up") == 1


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts connections (the kernel's backlog) and never answers: a hung Redis."""
    with socket.socket() as server:
        server.bind((HOST, 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.mark.parametrize("redis_is", ["down", "hung"])
def test_a_scrape_never_hangs_on_redis(redis_is: str, request: pytest.FixtureRequest) -> None:
    port = request.getfixturevalue("silent_port") if redis_is == "hung" else free_port()
    collector = metrics.QueueCollector(
        scrape_client(load_config({"REDIS_URL": f"redis://{HOST}:{port}/0"})), Keys("iq"), max_concurrency=0
    )
    started = time.monotonic()
    body, _ = metrics.exposition(None, [collector])
    took = time.monotonic() - started
    assert took < 3 * metrics.SCRAPE_TIMEOUT, f"the scrape took {took:.1f}s"
    samples = parse(body.decode())
    assert value(samples, "imagegen_store_up") == 0
    assert "imagegen_queue_depth" not in names(samples)
    assert "imagegen_tasks_submitted_total" in names(samples), "the process's own metrics are still there"


# the real stack -------------------------------------------------------------------------------------------
@pytest.mark.timeout(120)
@pytest.mark.stack(workers=1)
def test_metrics_after_a_load(fault_stack: Stack) -> None:
    stack = fault_stack
    receiver = Receiver(stack.env["WEBHOOK_SIGNING_SECRET"])
    receiver.script("/down", [500])
    try:
        before = Scrapes(stack)
        bodies = [seed_body(), seed_body(), with_directive(), with_directive(script="400")]
        bodies.append({**seed_body(), "webhook_url": receiver.url("/hooks")})
        bodies.append({**seed_body(), "webhook_url": receiver.url("/down")})
        ids = submit_many(stack, bodies)
        tasks = [stack.wait_final(task_id) for task_id in ids]
        assert [task["status"] for task in tasks] == ["succeeded"] * 3 + ["failed"] + ["succeeded"] * 2
        receiver.wait_for("/hooks", 1)
        receiver.wait_for("/down", len(stack.config.webhook_retry_schedule))

        expected_workers = {
            ("imagegen_tasks_finished_total", ("status", "succeeded")): 5,
            ("imagegen_tasks_finished_total", ("status", "failed")): 1,
            ("imagegen_tasks_finished_total", ("status", "canceled")): 0,
            ("imagegen_upstream_requests_total", ("outcome", "ok")): 5,
            ("imagegen_upstream_requests_total", ("outcome", "upstream_rejected")): 1,
            ("imagegen_upstream_request_duration_seconds_count", None): 6,
            ("imagegen_task_duration_seconds_count", None): 6,
            ("imagegen_storage_upload_duration_seconds_count", None): 5,
            ("imagegen_storage_upload_failures_total", None): 0,
            ("imagegen_webhook_deliveries_total", ("outcome", "delivered")): 1,
            ("imagegen_webhook_deliveries_total", ("outcome", "given_up")): 1,
            ("imagegen_webhook_deliveries_total", ("outcome", "failed")): len(
                stack.config.webhook_retry_schedule
            )
            - 1,
        }

        def deltas() -> dict[tuple[str, tuple[str, str] | None], float]:
            after = Scrapes(stack)
            return {
                (name, label): after.workers_total(name, **dict([label] if label else []))
                - before.workers_total(name, **dict([label] if label else []))
                for name, label in expected_workers
            }

        try:
            wait_until(lambda: deltas() == expected_workers, timeout=15, what="the workers' counts")
        except TimeoutError:
            assert deltas() == expected_workers
        after = Scrapes(stack)
    finally:
        receiver.stop()

    submitted = "imagegen_tasks_submitted_total"
    assert value(after.api, submitted) - value(before.api, submitted) == len(bodies)
    assert after.workers_total("imagegen_upstream_in_flight") == 0
    generation = after.workers["worker0"]
    duration = "imagegen_upstream_request_duration_seconds"
    buckets = sorted(
        (float(dict(labels)["le"]), count)
        for (name, labels), count in generation.items()
        if name == f"{duration}_bucket"
    )
    assert [le for le, _ in buckets] == [*metrics.UPSTREAM_BUCKETS, float("inf")]
    counts = [count for _, count in buckets]
    assert counts == sorted(counts), "buckets are cumulative"
    assert counts[-1] == value(generation, f"{duration}_count") >= 6
    assert 0 < value(generation, f"{duration}_sum") < counts[-1] * 2, "the simulator answers at once"
    upload = "imagegen_storage_upload_duration_seconds"
    assert 0 < value(generation, f"{upload}_sum") < value(generation, f"{upload}_count") * 5
    assert "process_resident_memory_bytes" in names(generation), "a worker's own process metrics"
    # the queues are the API's alone (the same for every API process), never the workers'
    assert value(after.api, "imagegen_store_up") == 1
    assert {value(after.api, "imagegen_queue_depth", queue=queue) for queue in metrics.QUEUES} == {0}
    assert all("imagegen_queue_depth" not in names(samples) for samples in after.workers.values())


@pytest.mark.timeout(120)
@pytest.mark.stack(workers=1, UPSTREAM_MAX_CONCURRENCY="2")
def test_queues_and_the_cap_under_load_and_redis_hung(fault_stack: Stack) -> None:
    stack = fault_stack
    api = f"{stack.api_url}/metrics"
    bodies = slow_bodies(6, 3000)
    ids = submit_many(stack, bodies)

    def busy() -> Samples | None:
        samples = scrape(api)
        depth = {queue: value(samples, "imagegen_queue_depth", queue=queue) for queue in ("ready", "running")}
        return samples if depth == {"ready": 4, "running": 2} else None

    samples = wait_until(busy, timeout=30, what="2 tasks running under the cap, 4 waiting")
    assert isinstance(samples, dict)
    assert value(samples, "imagegen_queue_depth", queue="admitted") == 2
    assert value(samples, "imagegen_upstream_slots_in_use") == 2
    assert value(samples, "imagegen_upstream_max_concurrency") == 2
    assert value(samples, "imagegen_queue_oldest_age_seconds", queue="ready") > 0
    wait_until(
        lambda: Scrapes(stack).workers_total("imagegen_upstream_in_flight") == 2,
        timeout=10,
        what="2 upstream calls in flight in the worker",
    )

    redis_server = stack.children["redis"]
    redis_server.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        hung = scrape(api)
        took = time.monotonic() - started
    finally:
        redis_server.signal(signal.SIGCONT)
    assert took < 3 * metrics.SCRAPE_TIMEOUT + 1, f"a scrape with Redis hung took {took:.1f}s"
    assert value(hung, "imagegen_store_up") == 0 and "imagegen_queue_depth" not in names(hung)
    assert value(hung, "imagegen_tasks_submitted_total") >= len(ids)
    settle_succeeded(stack, ids)


def test_a_cancel_is_counted_by_the_api(stack: Stack) -> None:
    """A task becomes final where its change is written: a cancel in the API process."""
    before = scrape(f"{stack.api_url}/metrics")
    task_id = stack.submit(with_directive(delay_ms="2000")).json()["id"]
    assert stack.http.post(f"{stack.api_url}/v1/tasks/{task_id}/cancel").json()["status"] == "canceled"
    after = scrape(f"{stack.api_url}/metrics")
    finished, submitted = "imagegen_tasks_finished_total", "imagegen_tasks_submitted_total"
    assert value(after, finished, status="canceled") - value(before, finished, status="canceled") == 1
    assert value(after, submitted) - value(before, submitted) == 1


# gunicorn: several processes, one answer ------------------------------------------------------------------
def gunicorn(env: dict[str, str], port: int, log: Path) -> subprocess.Popen[bytes]:
    args = [
        str(Path(sys.executable).with_name("gunicorn")), "-c", str(GUNICORN_CONFIG),
        "--bind", f"{HOST}:{port}", "--workers", "2", "--threads", "2", "api:create_app()",
    ]  # fmt: skip
    with open(log, "ab") as output:
        process = subprocess.Popen(args, env=env, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_until(
            lambda: httpx.get(f"http://{HOST}:{port}/healthz", timeout=1).status_code == 200,
            timeout=30,
            what="gunicorn to answer",
        )
    except TimeoutError:
        process.kill()
        raise AssertionError(log.read_text()) from None
    return process


def stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def submitted_by_process(directory: Path) -> dict[int, float]:
    """Each process's own count of submitted tasks, read from its file in the multiprocess directory."""
    counts = {}
    for path in directory.glob("counter_*.db"):
        pid = int(path.stem.split("_")[1])
        samples = [
            sample
            for family in MultiProcessCollector.merge([str(path)])
            for sample in family.samples
            if sample.name == "imagegen_tasks_submitted_total"
        ]
        counts[pid] = sum(sample.value for sample in samples)
    return counts


@pytest.mark.timeout(120)
def test_gunicorn_processes_add_up(stack: Stack, tmp_path: Path) -> None:
    directory = tmp_path / "multiproc"
    port = free_port()
    url = f"http://{HOST}:{port}"
    env = {**os.environ, **stack.env, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    process = gunicorn(env, port, tmp_path / "gunicorn.log")
    accepted: list[str] = []
    try:
        assert value(scrape(f"{url}/metrics"), "imagegen_tasks_submitted_total") == 0

        def submit(_: int) -> str:
            response = httpx.post(
                f"{url}/v1/images/generations", json=seed_body(), headers={"Connection": "close"}, timeout=10
            )
            assert response.status_code == 202, response.text
            return str(response.json()["id"])

        def both_processes_counted() -> bool:
            with ThreadPoolExecutor(4) as pool:
                accepted.extend(pool.map(submit, range(8)))
            return len([count for count in submitted_by_process(directory).values() if count > 0]) >= 2

        wait_until(both_processes_counted, timeout=60, what="both gunicorn workers to accept submissions")
        by_process = submitted_by_process(directory)
        assert sum(by_process.values()) == len(accepted)
        for _ in range(6):  # whichever process answers, it answers for all of them
            assert value(scrape(f"{url}/metrics"), "imagegen_tasks_submitted_total") == len(accepted)

        # a worker process that dies: gunicorn replaces it, and its counts stay in the total
        busiest = max(by_process, key=lambda pid: by_process[pid])
        os.kill(busiest, signal.SIGKILL)
        wait_until(lambda: not _alive(busiest), timeout=20, what="gunicorn to reap its dead worker")
        wait_until(
            lambda: value(scrape(f"{url}/metrics"), "imagegen_tasks_submitted_total") == len(accepted),
            timeout=20,
            what="the total after a worker died",
        )
    finally:
        stop(process)
    for task_id in accepted:
        assert stack.wait_final(task_id)["status"] in FINAL


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_gunicorn_makes_and_removes_its_own_directory(stack: Stack, tmp_path: Path) -> None:
    """Started without PROMETHEUS_MULTIPROC_DIR, gunicorn.conf.py gives the run a fresh directory."""
    env = {
        name: setting
        for name, setting in {**os.environ, **stack.env}.items()
        if name != "PROMETHEUS_MULTIPROC_DIR"
    }
    port = free_port()
    log = tmp_path / "gunicorn.log"
    process = gunicorn(env, port, log)
    try:
        assert "imagegen_tasks_submitted_total" in names(scrape(f"http://{HOST}:{port}/metrics"))
        found = re.search(r"metrics of the worker processes in (\S+)", log.read_text())
        assert found, log.read_text()
        directory = Path(found.group(1))
        assert list(directory.glob("*.db")), "the processes write their metrics there"
    finally:
        stop(process)
    assert not directory.exists(), "removed when gunicorn exits"
