"""The Celery tasks and the worker's background threads. They translate Celery into ``services`` calls."""

from __future__ import annotations

import dataclasses
import logging
import threading
from typing import Any

from celery import Celery, Task, shared_task
from celery.signals import celeryd_after_setup, worker_ready, worker_shutdown

from services.errors import StoreUnavailable
from services.queue import GENERATE_TASK, GENERATION_QUEUE, enqueue_generation
from services.runtime import Runtime
from services.sweeper import Sweeper

log = logging.getLogger(__name__)

_runtime: Runtime | None = None
_runtime_lock = threading.Lock()
_sweeper: Sweeper | None = None
_pool_size: int | None = None


@celeryd_after_setup.connect
def note_pool_size(sender: Any, instance: Any, **_: Any) -> None:
    """The pool's real size, before any task runs: ``--concurrency`` on the command line wins over
    ``WORKER_CONCURRENCY``, and the connection pools (S3, Redis) are sized for that many threads."""
    global _pool_size
    _pool_size = instance.concurrency


def runtime(app: Celery) -> Runtime:
    """The process's clients, built once, on first use, from the Celery app's configuration."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            config = app.conf.iq_config
            if _pool_size is not None and _pool_size != config.worker_concurrency:
                config = dataclasses.replace(config, worker_concurrency=_pool_size)
            _runtime = Runtime(config)
            log.info("clients sized for a pool of %d", config.worker_concurrency)
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
