"""Running one generation job: limiter slot, attempt under a lease, upstream call, decode, upload, record.

``JobRunner.run`` is what a worker does with a task id. It never raises for a job's own failure: the
outcome is written to the store (a retry is a due time in the store, enqueued by the sweeper). Only
``StoreUnavailable`` escapes: without the store nothing can be recorded, and the task is recovered by
the sweeper once the store is back (its lease expires, or its message is found lost).

No upstream call is paid twice for one job: a task's lease lets one attempt run at a time, a final task
is never run again, and when the outputs cannot be stored (an image URL that cannot be downloaded, S3
down) the upstream's answer (re-encoded from what was parsed: ``encode_result``) is kept in the store, so
the retry stores it instead of calling again. An attempt whose worker lost its task (a stale worker: its
lease expired and another attempt started, or the task was canceled) records nothing: the store refuses
its writes, and it deletes the objects it uploaded. (After a cancel that is the expected end, logged as
such, not warned of; a call the cancel cut off does not even try to write.)
(What remains: a worker killed between receiving an answer and storing its outputs, an upload's
duration, leaves that answer unused; the job is called again. Saving every answer first would cost
each job a multi-megabyte Redis write to cover that.)
"""

from __future__ import annotations

import functools
import logging
import random
import secrets
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack

from services.admission import Admission
from services.cancellation import InFlightCalls
from services.clock import parse_iso
from services.config import Config
from services.errors import (
    CallCutOff,
    Deferred,
    InvalidTransition,
    JobError,
    LeaseLost,
    NotFound,
    ServiceError,
    StorageUnavailable,
    StoreUnavailable,
    UpstreamError,
)
from services.images import inspect_image
from services.leases import LeaseKeeper
from services.limits import UpstreamLimiter
from services.logs import bind, task_scope
from services.presence import process_name
from services.records import OutputRecord, TaskRecord
from services.storage import Storage, output_key
from services.store import Attempt, GiveUp, JobStore, Lease, TaskStatus
from services.tenants import tenant_of
from services.upstream_client import UpstreamClient
from services.upstream_response import UpstreamResult, encode_result, parse_success
from services.usage import Usage
from services.work_gate import WorkGate

log = logging.getLogger(__name__)


def worker_name() -> str:
    """Who runs an attempt: host, process (as the process announces itself) and thread."""
    return f"{process_name()}:{threading.get_ident()}"


# Errors that cost the upstream nothing and are waited out instead of using up a task's attempts.
FREE_ERROR_CODES = frozenset({"upstream_rate_limited", "upstream_quota_exhausted"})


def attempts_used(task: TaskRecord) -> int:
    """The attempts that count against MAX_ATTEMPTS: all but those refused for rate or quota."""
    return sum(1 for attempt in task["attempts"] if attempt["error_code"] not in FREE_ERROR_CODES)


def out_of_attempts(max_attempts: int) -> GiveUp:
    """The policy the store applies as an attempt is about to start: a task that has used
    ``max_attempts`` fails with its last attempt's error instead (``retryable``: it might succeed if
    submitted again)."""

    def give_up(task: TaskRecord) -> JobError | None:
        if attempts_used(task) < max_attempts:
            return None
        last = task["attempts"][-1] if task["attempts"] else None
        code = (last["error_code"] if last else None) or "attempts_exhausted"
        return JobError(
            f"gave up after {len(task['attempts'])} attempts; the last ended with "
            f"{(last['error_code'] if last else None) or 'no error code'}",
            code=code,
            retryable=True,
            upstream_status=last["upstream_status"] if last else None,
        )

    return give_up


def backoff_delay(attempt: int, config: Config, hint: float | None = None) -> float:
    """Exponential backoff with jitter after ``attempt`` failed attempts; ``hint`` is the upstream's floor
    (``retryDelay``, ``Retry-After``), honoured up to UPSTREAM_MAX_RETRY_DELAY: the one place a hint is
    used, for the task's retry and for every worker's cooldown."""
    ceiling = min(config.retry_max_delay, config.retry_base_delay * 2 ** max(attempt - 1, 0))
    delay = random.uniform(ceiling / 2, ceiling)
    if hint is not None:
        delay = max(delay, min(hint, config.upstream_max_retry_delay) * random.uniform(1.0, 1.1))
    return delay


class JobRunner:
    def __init__(
        self,
        config: Config,
        store: JobStore,
        storage: Storage,
        upstream: UpstreamClient,
        limiter: UpstreamLimiter,
        keeper: LeaseKeeper,
        admission: Admission,
        usage: Usage,
        calls: InFlightCalls,
        gate: WorkGate,
    ) -> None:
        self._config = config
        self._store = store
        self._storage = storage
        self._upstream = upstream
        self._limiter = limiter
        self._keeper = keeper
        self._admission = admission
        self._usage = usage
        self._calls = calls
        self._gate = gate  # a permit while working, none while waiting (services/work_gate.py)
        # one function for every job's held message, so that the lease keeper renews them together
        self._hold_messages = functools.partial(store.hold_messages, lease_seconds=config.task_lease_seconds)

    def run(self, task_id: str) -> None:
        """Run the task's next attempt; then admit the next waiting tasks into the place it frees. Every
        line logged meanwhile carries the task's id, and its tenant once its record is read."""
        with task_scope(task_id), ExitStack() as message:
            # Until its attempt starts, the task's message is held here, neither lost nor sent again,
            # however long it waits for a turn or an upstream slot (the sweeper's claim_lost_messages,
            # and claim_expired_leases for a task it recovered).
            message.enter_context(
                self._keeper.keep(f"message of task {task_id}", self._hold_messages, task_id)
            )
            with self._gate.working():
                try:
                    self._run(task_id, message)
                finally:
                    self._admit_next()

    def _run(self, task_id: str, message: ExitStack) -> None:
        token = f"{worker_name()}:{secrets.token_hex(6)}"
        try:
            with self._gate.waiting():
                self._limiter.acquire(token)
        except Deferred as deferred:
            self._postpone(task_id, deferred.delay)
            return
        try:
            with self._keeper.keep(f"upstream slot {token}", self._limiter.renew_slots, token):
                self._attempt(task_id, message)
        finally:
            self._limiter.release(token)

    def _admit_next(self) -> None:
        try:
            self._admission.admit()
        except ServiceError as exc:  # the sweeper admits them on its next tick
            log.warning("admission after a job failed: %s", exc.message)

    def _postpone(self, task_id: str, delay: float) -> None:
        """Give the task back until the limiter allows, or fail it if that is past its hold."""
        hold = self._config.upstream_hold_seconds
        held_too_long = JobError(
            f"the upstream stayed rate-limited or busy past the task's hold: {hold:.0f}s after its "
            "creation (UPSTREAM_HOLD_SECONDS)",
            code="upstream_rate_limited",
            retryable=True,
        )
        task = self._store.postpone(task_id, delay=delay, hold_seconds=hold, error=held_too_long)
        if task is not None:
            bind(tenant=tenant_of(task))
        if task is not None and task["status"] == TaskStatus.FAILED:
            log.warning("task %s: failed (%s) after holding it %.0fs", task_id, held_too_long.code, hold)
        else:
            log.info("task %s: postponed %.1fs by the upstream limiter", task_id, delay)

    def _attempt(self, task_id: str, message: ExitStack) -> None:
        attempt = self._store.start_attempt(
            task_id,
            worker=worker_name(),
            lease_seconds=self._config.task_lease_seconds,
            give_up=out_of_attempts(self._config.max_attempts),
        )
        message.close()  # started (or not to be): the task is no longer queued
        if attempt is None:
            log.info("task %s: nothing to run (final, running elsewhere, or out of attempts)", task_id)
            return
        task, lease = attempt.task, attempt.lease
        bind(tenant=tenant_of(task))
        started = time.monotonic()
        closing = threading.Event()  # set before the attempt's closing write, which deletes the lease
        uploaded: list[str] = []  # this attempt's objects, deleted if its result is not recorded

        # A renewal that finds the lease gone once the closing write may have run lost nothing.
        with self._keeper.keep(f"lease on task {task_id}", self._store.renew_leases, lease, ended=closing):
            try:
                status, saved, result = self._upstream_result(attempt)
                outputs = self._store_outputs_or_save(lease, saved, result, uploaded)
                closing.set()
                self._while_the_store_is_down(
                    lambda: self._store.succeed(
                        lease, outputs=outputs, text=result.texts, usage=result.usage, upstream_status=status
                    )
                )
            except StoreUnavailable:
                raise  # whether a closing write was applied is unknown: its objects stay
            except (LeaseLost, InvalidTransition) as exc:
                _log_refused(task_id, lease, "result", exc)
                self._delete_quietly(task_id, uploaded)
                return
            except CallCutOff:  # the cancel closed the attempt already: nothing to record, nothing uploaded
                log.info(
                    "task %s: attempt %d's upstream call was cut off: the task was canceled",
                    task_id,
                    lease.attempt,
                )
                return
            except Exception as exc:
                closing.set()
                self._delete_quietly(task_id, uploaded)
                self._after_failure(task, lease, _job_error(task_id, exc))
                return
        log.info(
            "task %s: succeeded in %.2fs, %d output(s)", task_id, time.monotonic() - started, len(outputs)
        )

    def _upstream_result(self, attempt: Attempt) -> tuple[int, bool, UpstreamResult]:
        """The upstream's answer, and whether it is saved in the store already: the one an earlier
        attempt saved, or a new call's (both were read with the task when the attempt began).

        The raw body is not kept past parsing: only the decoded images are, so that a big answer is in
        memory once, not twice, while it is uploaded (bench/README.md, P4).
        """
        task_id = attempt.task["id"]
        if attempt.saved_result is not None:
            log.info("task %s: using the upstream answer saved by an earlier attempt", task_id)
            return 200, True, parse_success(attempt.saved_result)
        if attempt.payload is None:
            raise NotFound(f"the payload of task {task_id!r} is missing", field="id")
        try:
            # a cancel cuts this call off (services/cancellation.py)
            with self._calls.calling(task_id), self._gate.waiting():
                status, body = self._upstream.generate(attempt.payload)
        finally:
            self._count_call(attempt.task)
        return status, False, parse_success(body)

    def _count_call(self, task: TaskRecord) -> None:
        """One upstream call in the tenant's usage; not worth failing the job over."""
        try:
            self._usage.count(tenant_of(task), "upstream_calls")
        except StoreUnavailable as exc:
            log.warning("task %s: upstream call not counted in usage: %s", task["id"], exc.message)

    def _store_outputs_or_save(
        self, lease: Lease, saved: bool, result: UpstreamResult, uploaded: list[str]
    ) -> list[OutputRecord]:
        """Store the outputs; if that fails (an image URL that cannot be downloaded, storage down),
        keep the paid-for answer in the store first, so that the retry stores it instead of calling the
        upstream again."""
        try:
            return self._store_outputs(lease, result, uploaded)
        except (StorageUnavailable, UpstreamError):
            if not saved:
                self._store.save_result(lease, encode_result(result))
            raise

    def _store_outputs(self, lease: Lease, result: UpstreamResult, uploaded: list[str]) -> list[OutputRecord]:
        outputs: list[OutputRecord] = []
        for index, part in enumerate(result.images):
            data = part.data if part.data is not None else self._upstream.download(part.url or "")
            info = inspect_image(data)
            key = output_key(lease.task_id, lease.attempt, index, info.extension)
            stored = self._storage.put_image(key, data, info)
            uploaded.append(key)
            outputs.append(
                {
                    "index": index,
                    "bucket": stored.bucket,
                    "key": stored.key,
                    "mime_type": stored.mime_type,
                    "bytes": stored.bytes,
                    "width": stored.width,
                    "height": stored.height,
                    "sha256": stored.sha256,
                }
            )
        return outputs

    def _while_the_store_is_down(self, write: Callable[[], object]) -> None:
        """Make an attempt's closing write (what its upstream call answered), trying again while the
        store cannot be reached (a Redis restart, a failover) or cannot confirm it on
        ``REDIS_MIN_REPLICAS_ACK`` replicas, for up to a lease: given up at once, the task would run, and
        be paid for, again. A try whose answer was lost may have been applied: the next one finds it so
        and only confirms it (``JobStore._write``)."""
        deadline = time.monotonic() + self._config.task_lease_seconds
        pause = 0.1
        while True:
            try:
                write()
                return
            except StoreUnavailable:
                if time.monotonic() + pause > deadline:
                    raise
                time.sleep(pause)
                pause = min(2 * pause, 2.0)

    def _delete_quietly(self, task_id: str, keys: list[str]) -> None:
        """Delete objects of this attempt that the task's record does not point to; if the record cannot
        be read, keep them (an unused object rather than a lost one); if storage refuses, say which."""
        if not keys:
            return
        try:
            recorded = {output["key"] for output in self._store.get(task_id)["outputs"]}
        except (StoreUnavailable, NotFound) as exc:
            log.error("task %s: outputs %s kept, the record could not be read: %s", task_id, keys, exc)
            return
        unused = [key for key in keys if key not in recorded]
        if not unused:
            return
        try:
            self._storage.delete(unused)
        except StorageUnavailable as exc:
            log.error("task %s: could not delete unused outputs %s: %s", task_id, unused, exc.message)

    def _after_failure(self, task: TaskRecord, lease: Lease, error: JobError) -> None:
        task_id = task["id"]
        config = self._config
        try:
            if error.code in FREE_ERROR_CODES:
                self._after_refusal(task, lease, error)
                return
            used = attempts_used(task)
            if error.retryable and used < config.max_attempts:
                delay = backoff_delay(used, config, error.retry_after)
                self._while_the_store_is_down(lambda: self._store.schedule_retry(lease, error, delay=delay))
                log.warning(
                    "task %s: attempt %d failed (%s), retry in %.2fs", task_id, used, error.code, delay
                )
                return
            self._while_the_store_is_down(lambda: self._store.fail(lease, error))
            log.warning("task %s: failed (%s): %s", task_id, error.code, error.message)
        except (LeaseLost, InvalidTransition) as exc:
            _log_refused(task_id, lease, "failure", exc)

    def _after_refusal(self, task: TaskRecord, lease: Lease, error: JobError) -> None:
        """A 429: every worker waits it out (shared cooldown); the task waits too, without using an
        attempt, until UPSTREAM_HOLD_SECONDS after its creation, then fails with the 429's code."""
        config = self._config
        if error.code == "upstream_quota_exhausted":
            delay = config.upstream_quota_retry_seconds
        else:
            delay = backoff_delay(len(task["attempts"]), config, error.retry_after)
        self._limiter.cool_down(delay)
        held_until = parse_iso(task["created_at"]).timestamp() + config.upstream_hold_seconds
        if time.time() + delay > held_until:
            self._while_the_store_is_down(lambda: self._store.fail(lease, error))
            log.warning(
                "task %s: failed (%s) after holding it %.0fs",
                task["id"],
                error.code,
                config.upstream_hold_seconds,
            )
            return
        self._while_the_store_is_down(lambda: self._store.schedule_retry(lease, error, delay=delay))
        log.warning("task %s: upstream refused (%s); every worker waits %.2fs", task["id"], error.code, delay)


def _log_refused(task_id: str, lease: Lease, what: str, exc: LeaseLost | InvalidTransition) -> None:
    """An attempt's closing write, refused by the store. After a cancel that is the expected end (the
    cancel closed the attempt; its call ended, or was cut off, after that): no warning. Anything else (a
    lease lost to another worker, another change meanwhile) is worth one."""
    if isinstance(exc, InvalidTransition) and exc.current == TaskStatus.CANCELED:
        log.info(
            "task %s: attempt %d's %s is not recorded: the task was canceled", task_id, lease.attempt, what
        )
    else:
        log.warning("task %s: attempt %d's %s is refused: %s", task_id, lease.attempt, what, exc)


def _job_error(task_id: str, exc: Exception) -> JobError:
    """What an attempt's failure is recorded as."""
    if isinstance(exc, JobError):
        return exc
    if isinstance(exc, StorageUnavailable):
        return JobError(exc.message, code=exc.code, retryable=True)
    if isinstance(exc, ServiceError):
        log.error("task %s: unexpected service error", task_id, exc_info=exc)
        return JobError(exc.message, code=exc.code, retryable=False)
    log.error("task %s: unexpected error", task_id, exc_info=exc)
    return JobError(f"internal error ({type(exc).__name__}); the worker's log has it", code="internal_error")
