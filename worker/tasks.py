"""The Celery tasks. They translate a message into ``JobRunner.run`` and its outcome into Celery terms."""

from __future__ import annotations

import logging

from celery import Task, shared_task

from services.errors import StoreUnavailable
from services.jobs import JobRunner, Retry
from services.queue import GENERATE_TASK
from services.runtime import Runtime, worker_name

log = logging.getLogger(__name__)

_runtime: Runtime | None = None


def runtime(task: Task) -> Runtime:
    """The process's clients, built on first use from the Celery app's configuration."""
    global _runtime
    if _runtime is None:
        _runtime = Runtime(task.app.conf.iq_config)
    return _runtime


@shared_task(name=GENERATE_TASK, bind=True, max_retries=None)
def generate(self: Task, task_id: str) -> None:
    rt = runtime(self)
    runner = JobRunner(rt.config, rt.store, rt.storage, rt.upstream, worker_name())
    try:
        outcome = runner.run(task_id)
    except StoreUnavailable as exc:
        # Nothing could be recorded: run the job again once the store is back.
        log.warning("task %s: store unavailable (%s); retrying", task_id, exc.message)
        raise self.retry(countdown=rt.config.retry_base_delay, exc=exc) from exc
    if isinstance(outcome, Retry):
        raise self.retry(countdown=outcome.delay)
