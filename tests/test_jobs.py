"""services.jobs.JobRunner with a real JobStore, LeaseKeeper and UpstreamLimiter on the unit tests' Redis.

The rest are seams: the upstream is ``UpstreamClient`` over ``httpx.MockTransport`` answering with bodies
shaped as the real upstream's (the samples in shared/upstream/samples, with a real PNG made here), and
storage is a plain in-process fake with ``Storage``'s ``put_image``/``presigned_url`` (the S3 path is
covered end to end by the stack's tests).
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import redis
from PIL import Image

from devstack.processes import wait_until
from services import clock
from services.admission import Admission
from services.cancellation import InFlightCalls
from services.config import Config, load_config
from services.errors import Deferred, StorageUnavailable
from services.images import ImageInfo
from services.jobs import JobRunner, attempts_used, backoff_delay, out_of_attempts
from services.leases import LeaseKeeper
from services.limits import LimiterSettings, UpstreamLimiter
from services.queue import enqueue_generations
from services.records import TaskRecord
from services.storage import Storage, StoredObject
from services.store import NO_LIMITS, JobStore, TaskStatus
from services.upstream_client import UpstreamClient
from services.usage import Usage
from services.work_gate import WorkGate
from tests.origin import Origin, body

SHARED = Path(os.environ.get("IMAGEGEN_SHARED_DIR", Path(__file__).parents[2] / "shared"))
SAMPLES = SHARED / "upstream" / "samples"
BUCKET = "test-outputs"


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes()


def png(width: int, height: int, color: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="PNG")
    return out.getvalue()


PNG = png(8, 6, (200, 40, 90))
REQUEST = sample("request-seed-example.json")
CAMEL = json.loads(sample("response-gemini-camel.json"))


def success_body(image: bytes = PNG) -> bytes:
    """The camelCase Gemini sample with ``image`` as its one image."""
    body = json.loads(json.dumps(CAMEL))
    body["candidates"][0]["content"]["parts"][1]["inlineData"]["data"] = base64.b64encode(image).decode()
    return json.dumps(body).encode()


Answer = tuple[int, bytes] | Exception


class FakeUpstream:
    """The upstream behind ``httpx.MockTransport``: gives its answers in order (the last one again once
    they run out) and records each request's body. ``during_call`` runs while a call is in flight."""

    def __init__(self) -> None:
        self.answers: list[Answer] = []
        self.requests: list[bytes] = []
        self.during_call: Callable[[], None] | None = None

    def will_answer(self, *answers: Answer) -> None:
        self.answers.extend(answers)

    @property
    def calls(self) -> int:
        return len(self.requests)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request.read())
        if self.during_call is not None:
            self.during_call()
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, Exception):
            raise answer
        status, body = answer
        # A stream, as a real transport gives: a Response made with content= is already read, and
        # UpstreamClient reads the body from the stream (iter_raw), which would raise StreamConsumed.
        headers = {"content-type": "application/json", "content-length": str(len(body))}
        return httpx.Response(status, headers=headers, stream=httpx.ByteStream(body))


class FakeStorage:
    """``services.storage.Storage``'s interface, in memory; ``failures`` uploads fail first."""

    bucket = BUCKET

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.failures = 0
        self.uploads = 0

    def put_image(self, key: str, data: bytes, info: ImageInfo) -> StoredObject:
        self.uploads += 1
        if self.failures:
            self.failures -= 1
            raise StorageUnavailable("storage could not upload: the fake is down")
        self.objects[key] = bytes(data)
        return StoredObject(
            bucket=self.bucket,
            key=key,
            mime_type=info.mime_type,
            bytes=len(data),
            sha256=hashlib.sha256(data).hexdigest(),
            width=info.width,
            height=info.height,
        )

    def delete(self, keys: list[str]) -> None:
        for key in keys:
            self.objects.pop(key, None)

    def presigned_url(self, key: str) -> str:
        return f"http://s3.test/{self.bucket}/{key}?X-Amz-Signature=fake"


class Harness:
    """A JobRunner's parts on the test Redis; ``runner()`` builds one, with config overrides."""

    def __init__(self, client: redis.Redis) -> None:
        self.config = load_config(
            {
                "UPSTREAM_BASE_URL": "http://upstream.test",
                "MAX_ATTEMPTS": "3",
                "RETRY_BASE_DELAY": "0.2",
                "RETRY_MAX_DELAY": "1",
                "TASK_LEASE_SECONDS": "3",
                "UPSTREAM_MAX_CONCURRENCY": "2",
                "S3_BUCKET": BUCKET,
            }
        )
        self.store = JobStore(client, prefix="jobs-test")
        self.keeper = LeaseKeeper(interval=self.config.task_lease_seconds / 3)
        self.upstream = FakeUpstream()
        self.client = UpstreamClient(self.config, transport=httpx.MockTransport(self.upstream))
        self.clients = [self.client]
        self.storage = FakeStorage()
        self.limiter = self.new_limiter(max_wait_in_thread=1.0)

    def new_limiter(
        self, *, max_concurrency: int | None = None, max_wait_in_thread: float
    ) -> UpstreamLimiter:
        config = self.config
        settings = LimiterSettings(
            max_concurrency=config.upstream_max_concurrency if max_concurrency is None else max_concurrency,
            rate_per_minute=config.upstream_rate_per_minute,
            hold_seconds=config.task_lease_seconds,
            max_wait_in_thread=max_wait_in_thread,
        )
        return UpstreamLimiter(self.store._redis, self.store.keys, settings)

    def runner(
        self, limiter: UpstreamLimiter | None = None, upstream: UpstreamClient | None = None, **overrides: Any
    ) -> JobRunner:
        config: Config = dataclasses.replace(self.config, **overrides)
        storage = cast(Storage, self.storage)
        client = upstream or self.client
        redis_client = self.store._redis
        admission = Admission(
            redis_client,
            self.store.keys,
            lambda ids: enqueue_generations(redis_client, ids),
            window=config.upstream_max_concurrency,
            defaults=NO_LIMITS,
        )
        usage = Usage(redis_client, self.store.keys)
        return JobRunner(
            config,
            self.store,
            storage,
            client,
            limiter or self.limiter,
            self.keeper,
            admission,
            usage,
            InFlightCalls(),
            WorkGate(config.worker_busy_threads),
        )

    def upstream_client(self, **overrides: Any) -> UpstreamClient:
        """Another client of the fake upstream, with config overrides (closed with the harness)."""
        client = UpstreamClient(
            dataclasses.replace(self.config, **overrides), transport=httpx.MockTransport(self.upstream)
        )
        self.clients.append(client)
        return client

    def submit(self) -> str:
        return self.store.create(model="gemini-2.5-flash-image", payload=REQUEST, metadata=None)["id"]

    def in_set(self, key: str, task_id: str) -> float | None:
        return self.store._redis.zscore(key, task_id)

    def retry_due(self, task_id: str) -> None:
        """The task's retry (or postponement) is due now: what the sweeper finds once its time has come
        (until then, no message starts it)."""
        self.store._redis.zadd(self.store.keys.delayed, {task_id: 0}, xx=True)
        assert self.store.claim_due_retries() == [task_id]

    def close(self) -> None:
        self.keeper.stop()
        for client in self.clients:
            client.close()


@pytest.fixture
def h(redis_client: redis.Redis) -> Iterator[Harness]:
    harness = Harness(redis_client)
    yield harness
    harness.close()


def seconds_between(earlier: str, later: str) -> float:
    return (clock.epoch_ms(later) - clock.epoch_ms(earlier)) / 1000


def assert_due_at(h: Harness, task_id: str, next_attempt_at: str) -> None:
    """The task waits in the delayed set until its ``next_attempt_at``: scored on Redis's clock (the
    sweeper's), which on this host is this process's own, but for the moments between the two reads."""
    due = h.in_set(h.store.keys.delayed, task_id)
    assert due is not None and abs(due - clock.epoch_ms(next_attempt_at)) <= 50


def outcomes(task: TaskRecord) -> list[tuple[str | None, str | None, int | None]]:
    return [(a["outcome"], a["error_code"], a["upstream_status"]) for a in task["attempts"]]


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


# ---------------------------------------------------------------- success


def test_a_success_records_its_outputs_and_closes_the_attempt(h: Harness) -> None:
    h.upstream.will_answer((200, success_body()))
    task_id = h.submit()
    h.runner().run(task_id)

    task = h.store.get(task_id)
    key = f"outputs/{task_id}/1/0.png"  # attempt 1's first output
    assert task["status"] == TaskStatus.SUCCEEDED
    assert task["outputs"] == [
        {
            "index": 0,
            "bucket": BUCKET,
            "key": key,
            "mime_type": "image/png",
            "bytes": len(PNG),
            "width": 8,
            "height": 6,
            "sha256": hashlib.sha256(PNG).hexdigest(),
        }
    ]
    assert h.storage.objects == {key: PNG}
    assert task["text"] == ["Here is your llama."]
    assert task["usage"] == CAMEL["usageMetadata"]
    assert task["error"] is None and task["finished_at"] is not None
    assert outcomes(task) == [("succeeded", None, 200)]
    assert task["attempts"][0]["finished_at"] is not None
    assert h.upstream.requests == [REQUEST], "the payload is sent as it was stored"
    # The lease and the upstream slot are given back: two slots of two are free again.
    assert not h.store._redis.exists(h.store.keys.lease(task_id))
    probe = h.new_limiter(max_wait_in_thread=0)
    probe.acquire("x")
    probe.acquire("y")
    probe.release("x")
    probe.release("y")
    # A redelivered message for the finished task does nothing.
    h.runner().run(task_id)
    assert h.upstream.calls == 1 and h.store.get(task_id) == task


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize(
    ("answer", "code", "status"),
    [
        ((503, sample("error-503.json")), "upstream_unavailable", 503),
        ((500, sample("error-500-list-wrapped.json")), "upstream_unavailable", 500),
        (httpx.ReadTimeout("timed out"), "upstream_timeout", None),
        (httpx.ConnectError("connection refused"), "upstream_unavailable", None),
    ],
    ids=["503", "500-list", "read-timeout", "connect-error"],
)
def test_a_retryable_upstream_error_schedules_a_retry_with_backoff(
    h: Harness, answer: Answer, code: str, status: int | None
) -> None:
    h.upstream.will_answer(answer, answer, (200, success_body()))
    task_id = h.submit()
    runner = h.runner()

    runner.run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.QUEUED and task["error"] is None
    assert outcomes(task) == [("retry", code, status)]
    assert task["next_attempt_at"] is not None
    delay = seconds_between(task["attempts"][0]["finished_at"] or "", task["next_attempt_at"])
    assert 0.1 - 0.002 <= delay <= 0.2 + 0.002, "after 1 attempt: between half and all of RETRY_BASE_DELAY"
    assert_due_at(h, task_id, task["next_attempt_at"])
    assert h.in_set(h.store.keys.queued, task_id) is None, "waits in the delayed set, not as a message"
    assert wait_until(lambda: h.store.claim_due_retries() == [task_id], timeout=10, what="the retry")

    runner.run(task_id)
    task = h.store.get(task_id)
    delay = seconds_between(task["attempts"][1]["finished_at"] or "", task["next_attempt_at"] or "")
    assert 0.2 - 0.002 <= delay <= 0.4 + 0.002, "after 2 attempts: the backoff doubles"

    h.retry_due(task_id)
    runner.run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.SUCCEEDED
    assert outcomes(task) == [("retry", code, status), ("retry", code, status), ("succeeded", None, 200)]
    assert h.upstream.calls == 3


def test_a_non_retryable_upstream_error_fails_the_task(h: Harness) -> None:
    h.upstream.will_answer((400, sample("error-400-invalid.json")))
    task_id = h.submit()
    h.runner().run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.FAILED
    assert task["error"] == {
        "code": "upstream_rejected",
        "message": "Unsupported aspect ratio: 7:3",
        "retryable": False,
        "upstream_status": 400,
    }
    assert outcomes(task) == [("failed", "upstream_rejected", 400)]
    assert h.in_set(h.store.keys.delayed, task_id) is None
    h.runner().run(task_id)
    assert h.upstream.calls == 1, "a failed task is not run again"


def test_the_last_allowed_attempt_fails_with_its_own_error(h: Harness) -> None:
    h.upstream.will_answer((503, sample("error-503.json")))
    task_id = h.submit()
    runner = h.runner(max_attempts=2)
    runner.run(task_id)
    h.retry_due(task_id)
    runner.run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.FAILED
    assert task["error"] is not None
    assert (task["error"]["code"], task["error"]["retryable"], task["error"]["upstream_status"]) == (
        "upstream_unavailable",
        True,
        503,
    )
    assert outcomes(task) == [("retry", "upstream_unavailable", 503), ("failed", "upstream_unavailable", 503)]
    runner.run(task_id)
    assert h.upstream.calls == 2


def test_out_of_attempts_fails_with_the_last_code_without_calling_the_upstream(h: Harness) -> None:
    h.upstream.will_answer((503, sample("error-503.json")))
    task_id = h.submit()
    h.runner(max_attempts=3).run(task_id)
    h.retry_due(task_id)
    h.runner(max_attempts=3).run(task_id)
    assert h.store.get(task_id)["status"] == TaskStatus.QUEUED

    h.retry_due(task_id)
    h.runner(max_attempts=2).run(task_id)  # MAX_ATTEMPTS lowered meanwhile: two are all it gets
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.FAILED
    assert task["error"] is not None
    assert (task["error"]["code"], task["error"]["upstream_status"]) == ("upstream_unavailable", 503)
    assert len(task["attempts"]) == 2, "no attempt started"
    assert h.upstream.calls == 2


def test_an_attempt_lost_with_its_worker_counts_and_ends_the_task_as_worker_lost(h: Harness) -> None:
    h.upstream.will_answer((503, sample("error-503.json")))
    task_id = h.submit()
    h.runner(max_attempts=2).run(task_id)
    h.retry_due(task_id)
    # Another worker starts the second attempt and dies: its lease expires unrenewed.
    assert h.store.start_attempt(task_id, worker="dead", lease_seconds=0.2, give_up=out_of_attempts(2))
    lease_key = h.store.keys.lease(task_id)
    wait_until(lambda: not h.store._redis.exists(lease_key), timeout=10, what="the dead worker's lease")

    h.runner(max_attempts=2).run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.FAILED
    assert task["error"] is not None and task["error"]["code"] == "worker_lost"
    assert outcomes(task) == [("retry", "upstream_unavailable", 503), ("worker_lost", "worker_lost", None)]
    assert h.upstream.calls == 1


def attempt(error_code: str | None) -> dict[str, Any]:
    return {"outcome": "retry", "error_code": error_code, "upstream_status": None, "finished_at": "x"}


@pytest.mark.parametrize(
    ("codes", "gives_up_with"),
    [
        ([], None),
        (["upstream_unavailable"], None),
        (["upstream_rate_limited", "upstream_quota_exhausted", "upstream_unavailable"], None),
        (["upstream_unavailable", "upstream_timeout"], "upstream_timeout"),
        (["upstream_unavailable", "worker_lost"], "worker_lost"),
        (["upstream_unavailable", None], "attempts_exhausted"),
    ],
)
def test_out_of_attempts_counts_all_but_refusals(codes: list[str | None], gives_up_with: str | None) -> None:
    task = cast(TaskRecord, {"attempts": [attempt(code) for code in codes]})
    error = out_of_attempts(2)(task)
    assert (error.code if error else None) == gives_up_with
    if error is not None:
        assert error.retryable, "submitted again, it might succeed"


# ---------------------------------------------------------------- 429: refusals wait, using no attempt


def test_a_429_with_a_retry_delay_cools_every_worker_down_and_uses_no_attempt(h: Harness) -> None:
    h.upstream.will_answer((429, sample("error-429-quota.json")))  # retryDelay 29.72s
    task_id = h.submit()
    h.runner(max_attempts=1).run(task_id)

    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.QUEUED, "not failed, although MAX_ATTEMPTS is 1"
    assert outcomes(task) == [("retry", "upstream_rate_limited", 429)]
    assert attempts_used(task) == 0
    delay = seconds_between(task["attempts"][0]["finished_at"] or "", task["next_attempt_at"] or "")
    assert 29.72 - 0.002 <= delay <= 29.72 * 1.1 + 0.002, "at least the upstream's retryDelay"
    # Every worker waits: another process's limiter defers by the cooldown.
    with pytest.raises(Deferred) as deferred:
        h.new_limiter(max_wait_in_thread=0).acquire("another worker")
    assert deferred.value.delay > 29
    # And the attempt was free: with MAX_ATTEMPTS 1 the task may still start one (once it is due).
    h.retry_due(task_id)
    assert h.store.start_attempt(task_id, worker="w", lease_seconds=3, give_up=out_of_attempts(1)) is not None
    assert h.upstream.calls == 1


def test_a_daily_quota_429_waits_upstream_quota_retry_seconds(h: Harness) -> None:
    h.upstream.will_answer((429, sample("error-429-daily-quota.json")))
    task_id = h.submit()
    h.runner(upstream_quota_retry_seconds=5.0).run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.QUEUED
    assert outcomes(task) == [("retry", "upstream_quota_exhausted", 429)]
    delay = seconds_between(task["attempts"][0]["finished_at"] or "", task["next_attempt_at"] or "")
    assert abs(delay - 5.0) <= 0.002
    with pytest.raises(Deferred) as deferred:
        h.new_limiter(max_wait_in_thread=0).acquire("another worker")
    assert deferred.value.delay > 4


def test_a_429_that_would_outlast_the_hold_fails_the_task(h: Harness) -> None:
    h.upstream.will_answer((429, sample("error-429-quota.json")))
    task_id = h.submit()
    h.runner(upstream_hold_seconds=1.0).run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.FAILED
    assert task["error"] is not None and task["error"]["code"] == "upstream_rate_limited"
    assert task["error"]["upstream_status"] == 429


def test_a_retry_hint_is_honoured_up_to_upstream_max_retry_delay(h: Harness) -> None:
    h.upstream.will_answer((429, sample("error-429-quota.json")))  # retryDelay 29.72s
    task_id = h.submit()
    h.runner(upstream_max_retry_delay=2.0).run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.QUEUED
    delay = seconds_between(task["attempts"][0]["finished_at"] or "", task["next_attempt_at"] or "")
    assert 2.0 - 0.002 <= delay <= 2.0 * 1.1 + 0.002, "the cap, with the hint's jitter"
    with pytest.raises(Deferred) as deferred:
        h.new_limiter(max_wait_in_thread=0).acquire("another worker")
    assert deferred.value.delay <= 2.2, "every worker's cooldown is capped too"


@pytest.mark.parametrize(("hint", "floor"), [(5.0, 5.0), (86400.0, 300.0), (1e12, 300.0)])
def test_backoff_honours_a_hint_up_to_the_cap(h: Harness, hint: float, floor: float) -> None:
    for attempt in (1, 5):
        assert floor <= backoff_delay(attempt, h.config, hint) <= floor * 1.1


# ---------------------------------------------------------------- storage failures


def test_a_storage_failure_keeps_the_answer_and_the_retry_uploads_it_without_calling_again(
    h: Harness,
) -> None:
    h.upstream.will_answer((200, success_body()), (503, sample("error-503.json")))
    h.storage.failures = 1
    task_id = h.submit()
    runner = h.runner()

    runner.run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.QUEUED
    assert outcomes(task) == [("retry", "storage_unavailable", None)]
    assert h.store._redis.exists(h.store.keys.result(task_id)), "the paid-for answer is kept"

    h.retry_due(task_id)
    runner.run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.SUCCEEDED
    assert h.upstream.calls == 1, "the retry used the saved answer"
    assert h.storage.objects == {f"outputs/{task_id}/2/0.png": PNG}, "attempt 2 stored it"
    assert [o["sha256"] for o in task["outputs"]] == [hashlib.sha256(PNG).hexdigest()]
    assert task["text"] == ["Here is your llama."] and task["usage"] == CAMEL["usageMetadata"]
    assert outcomes(task) == [("retry", "storage_unavailable", None), ("succeeded", None, 200)]
    assert not h.store._redis.exists(h.store.keys.result(task_id)), "dropped once the task is final"


def test_storage_down_on_every_attempt_fails_the_task_after_one_upstream_call(h: Harness) -> None:
    h.upstream.will_answer((200, success_body()))
    h.storage.failures = 100
    task_id = h.submit()
    runner = h.runner(max_attempts=3)
    for attempt in range(3):
        if attempt:
            h.retry_due(task_id)
        runner.run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.FAILED
    assert task["error"] is not None and task["error"]["code"] == "storage_unavailable"
    assert h.storage.uploads == 3 and h.upstream.calls == 1


# ---------------------------------------------------------------- cancel


def test_a_canceled_tasks_late_success_is_dropped(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.upstream.will_answer((200, success_body()))
    task_id = h.submit()
    h.upstream.during_call = lambda: h.store.cancel(task_id)  # the client cancels while the call runs

    with caplog.at_level(logging.INFO, logger="services.jobs"):
        h.runner().run(task_id)
    assert warnings_of(caplog) == [], "a cancel's expected end: its result is not recorded"
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.CANCELED
    assert task["outputs"] == [] and task["text"] == [] and task["error"] is None
    assert outcomes(task) == [("canceled", None, None)]
    assert not h.store._redis.exists(h.store.keys.lease(task_id))
    h.runner().run(task_id)
    assert h.upstream.calls == 1
    assert h.storage.uploads == 1 and h.storage.objects == {}, "its upload is deleted"


def take_over(h: Harness, task_id: str) -> None:
    """What happens while a worker's call is in flight and its lease expires (a long pause): the sweeper
    finds the lease gone and another worker opens attempt 2."""
    h.store._redis.delete(h.store.keys.lease(task_id))
    h.store._redis.zadd(h.store.keys.running, {task_id: 0})
    assert h.store.claim_expired_leases(30) == [task_id]
    assert h.store.start_attempt(task_id, worker="other", lease_seconds=30, give_up=out_of_attempts(5))


def test_a_stale_workers_late_success_is_refused_and_its_upload_deleted(h: Harness) -> None:
    h.upstream.will_answer((200, success_body()))
    task_id = h.submit()
    h.upstream.during_call = lambda: take_over(h, task_id)

    h.runner().run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.RUNNING, "attempt 2 runs on; nothing of attempt 1 is recorded"
    assert [(a["outcome"], a["worker"]) for a in task["attempts"]] == [
        ("worker_lost", task["attempts"][0]["worker"]),
        (None, "other"),
    ]
    assert task["outputs"] == []
    assert h.storage.uploads == 1 and h.storage.objects == {}, "the stale upload is deleted"


def test_a_stale_workers_saved_answer_and_failure_are_refused(h: Harness) -> None:
    h.upstream.will_answer((200, success_body()))
    h.storage.failures = 1  # its upload fails: it would save the answer and schedule a retry
    task_id = h.submit()
    h.upstream.during_call = lambda: take_over(h, task_id)

    h.runner().run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.RUNNING and [a["outcome"] for a in task["attempts"]] == [
        "worker_lost",
        None,
    ]
    assert not h.store._redis.exists(h.store.keys.result(task_id)), "no answer saved for a stale attempt"
    assert h.in_set(h.store.keys.delayed, task_id) is None, "no retry scheduled by it"


def test_a_canceled_tasks_late_failure_is_dropped(h: Harness, caplog: pytest.LogCaptureFixture) -> None:
    h.upstream.will_answer((503, sample("error-503.json")))
    task_id = h.submit()
    h.upstream.during_call = lambda: h.store.cancel(task_id)

    with caplog.at_level(logging.INFO, logger="services.jobs"):
        h.runner().run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.CANCELED and task["next_attempt_at"] is None
    assert outcomes(task) == [("canceled", None, None)]
    assert h.in_set(h.store.keys.delayed, task_id) is None
    assert "attempt 1's failure is not recorded: the task was canceled" in caplog.text
    assert warnings_of(caplog) == [], "the expected end of a cancel, not a warning"


def test_a_call_cut_off_by_a_cancel_records_nothing_and_warns_of_nothing(
    h: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    h.upstream.will_answer(httpx.ReadError("the connection was shut down"))  # what a cut-off call sees
    task_id = h.submit()
    runner = h.runner()

    def cancel() -> None:  # what POST /v1/tasks/{id}/cancel, then the worker's CancelListener, do
        h.store.cancel(task_id)
        assert runner._calls.abort(task_id)

    h.upstream.during_call = cancel
    with caplog.at_level(logging.INFO, logger="services.jobs"):
        runner.run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.CANCELED and outcomes(task) == [("canceled", None, None)]
    assert h.in_set(h.store.keys.delayed, task_id) is None
    assert "attempt 1's upstream call was cut off: the task was canceled" in caplog.text
    assert warnings_of(caplog) == []


# ---------------------------------------------------------------- the limiter


def test_a_deferring_limiter_postpones_the_task(h: Harness) -> None:
    h.upstream.will_answer((200, success_body()))
    limiter = h.new_limiter(max_concurrency=1, max_wait_in_thread=0)
    limiter.acquire("a job elsewhere")  # every slot is busy
    task_id = h.submit()
    runner = h.runner(limiter=limiter)

    runner.run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.QUEUED and task["attempts"] == []
    assert task["next_attempt_at"] is not None
    assert_due_at(h, task_id, task["next_attempt_at"])
    assert h.upstream.calls == 0

    limiter.release("a job elsewhere")
    assert wait_until(lambda: h.store.claim_due_retries() == [task_id], timeout=10, what="the postponed task")
    runner.run(task_id)
    assert h.store.get(task_id)["status"] == TaskStatus.SUCCEEDED
    assert h.upstream.calls == 1


def test_a_cooldown_postpones_the_task_by_what_is_left_of_it(h: Harness) -> None:
    h.upstream.will_answer((200, success_body()))
    limiter = h.new_limiter(max_wait_in_thread=0)
    limiter.cool_down(5)
    task_id = h.submit()
    began = time.time()
    h.runner(limiter=limiter).run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.QUEUED and task["attempts"] == []
    assert clock.epoch_ms(task["next_attempt_at"] or "") / 1000 - began >= 4.5
    assert h.upstream.calls == 0


def test_a_cooldown_past_the_hold_fails_the_queued_task(h: Harness) -> None:
    h.upstream.will_answer((200, success_body()))
    limiter = h.new_limiter(max_wait_in_thread=0)
    limiter.cool_down(5)
    task_id = h.submit()
    h.runner(limiter=limiter, upstream_hold_seconds=3.0).run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.FAILED and task["attempts"] == []
    assert task["error"] == {
        "code": "upstream_rate_limited",
        "message": "the upstream stayed rate-limited or busy past the task's hold: 3s after its creation "
        "(UPSTREAM_HOLD_SECONDS)",
        "retryable": True,
        "upstream_status": None,
    }
    keys = h.store.keys
    assert h.in_set(keys.delayed, task_id) is None and h.in_set(keys.queued, task_id) is None
    assert not h.store._redis.sismember(keys.active, task_id)
    assert h.upstream.calls == 0


def test_an_answer_without_an_image_fails_the_task(h: Harness) -> None:
    h.upstream.will_answer((200, sample("response-text-only.json")))
    task_id = h.submit()
    h.runner().run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.FAILED
    assert task["error"] is not None
    assert (task["error"]["code"], task["error"]["retryable"]) == ("no_image", False)
    assert outcomes(task) == [("failed", "no_image", 200)]
    assert h.upstream.calls == 1 and h.storage.uploads == 0


# ---------------------------------------------------------------- what the upstream's answer points to


def url_body(url: str) -> bytes:
    """An OpenAI-style answer whose one image is at ``url``."""
    return json.dumps({"created": 0, "data": [{"url": url}]}).encode()


@pytest.fixture
def image_host() -> Iterator[Origin]:
    server = Origin()
    yield server
    server.stop()


def test_a_foreign_image_is_fetched_without_the_key_and_a_failed_fetch_keeps_the_answer(
    h: Harness, image_host: Origin
) -> None:
    h.upstream.will_answer((200, url_body(image_host.url("/img.png"))))
    upstream = h.upstream_client(
        upstream_api_key="sk-upstream", image_url_allow_http=True, image_url_allow_private=True
    )
    image_host.answer("/img.png", body(b"<html>SECRET-BODY-TEXT</html>", status=503))
    task_id = h.submit()
    runner = h.runner(upstream=upstream)

    runner.run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.QUEUED
    assert outcomes(task) == [("retry", "upstream_unavailable", 503)]
    assert h.store._redis.exists(h.store.keys.result(task_id)), "the paid-for answer is kept"

    image_host.answer("/img.png", body(PNG, headers={"Content-Type": "image/png"}))
    assert wait_until(lambda: h.store.claim_due_retries() == [task_id], timeout=10, what="the retry")
    runner.run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.SUCCEEDED
    assert h.storage.objects == {f"outputs/{task_id}/2/0.png": PNG}
    assert h.upstream.calls == 1, "the retry fetched the image of the saved answer"
    fetches = image_host.at("/img.png")
    assert len(fetches) == 2 and all("authorization" not in r.headers for r in fetches)


def test_a_refused_image_url_fails_the_task(h: Harness, image_host: Origin) -> None:
    """Without IMAGE_URL_ALLOW_HTTP and IMAGE_URL_ALLOW_PRIVATE, http://127.0.0.1 is not fetched."""
    image_host.answer("/img.png", body(PNG))
    h.upstream.will_answer((200, url_body(image_host.url("/img.png"))))
    task_id = h.submit()
    h.runner().run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.FAILED
    assert task["error"] is not None
    assert (task["error"]["code"], task["error"]["retryable"]) == ("output_url_refused", False)
    assert image_host.requests == [] and h.upstream.calls == 1


def test_an_upstream_answer_over_the_cap_fails_the_task_without_another_call(h: Harness) -> None:
    answer = success_body()
    h.upstream.will_answer((200, answer))
    task_id = h.submit()
    cap = len(answer) - 1
    runner = h.runner(upstream=h.upstream_client(max_upstream_response_bytes=cap))
    runner.run(task_id)
    task = h.store.get(task_id)
    assert task["status"] == TaskStatus.FAILED
    assert task["error"] == {
        "code": "upstream_response_too_large",
        "message": f"the upstream's answer is larger than {cap} bytes (MAX_UPSTREAM_RESPONSE_BYTES)",
        "retryable": False,
        "upstream_status": 200,
    }
    runner.run(task_id)
    assert h.upstream.calls == 1
