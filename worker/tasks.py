"""The Celery tasks and the worker's background threads. They translate Celery into ``services`` calls."""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery, Task, shared_task
from celery.signals import worker_ready, worker_shutdown

from services.errors import StoreUnavailable
from services.queue import GENERATE_TASK, GENERATION_QUEUE, enqueue_generation
from services.runtime import Runtime
from services.sweeper import Sweeper

log = logging.getLogger(__name__)

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()
_sweeper: Sweeper | None = None


def runtime(app: Celery) -> Runtime:
    """The process's clients, built once, on first use, from the Celery app's configuration."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = Runtime(app.conf.iq_config)
        return _runtime


@shared_task(name=GENERATE_TASK, bind=True)
def generate(self: Task, task_id: str) -> None:
    try:
        runtime(self.app).runner.run(task_id)
    except StoreUnavailable as exc:
        # Nothing could be recorded; the sweeper runs the task again once the store is back.
        log.warning("task %s: store unavailable (%s); left to the sweeper", task_id, exc.message)


@worker_ready.connect
def start_sweeper(sender: Any, **_: Any) -> None:
    global _sweeper
    app = sender.app
    rt = runtime(app)
    _sweeper = Sweeper(
        rt.store,
        lambda task_id: enqueue_generation(rt.redis, task_id),
        lambda: rt.redis.llen(GENERATION_QUEUE),
        lease_seconds=rt.config.task_lease_seconds,
        interval=rt.config.sweep_interval,
    )
    _sweeper.start()


@worker_shutdown.connect
def stop_sweeper(**_: Any) -> None:
    if _sweeper is not None:
        _sweeper.stop()
    if _runtime is not None:
        _runtime.keeper.stop()
