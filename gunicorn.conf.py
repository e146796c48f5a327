"""gunicorn's settings for the API: ``gunicorn -c gunicorn.conf.py 'api:create_app()'`` (the Docker
image, docker-compose and ``make run``). A file, not a module of ``api``: importing ``api`` would import
prometheus_client before ``PROMETHEUS_MULTIPROC_DIR`` is set below.

Metrics: the hooks that make ``GET /metrics`` right with several processes. Each worker process writes
its metrics into files in ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode), and
``/metrics``, whichever process answers it, adds them all up (``services/metrics.py``).

- ``PROMETHEUS_MULTIPROC_DIR`` unset: a fresh directory is made for this run (before any worker, or the
  app with ``--preload``, imports prometheus_client) and removed when gunicorn exits.
- Set: that directory is made if missing and emptied when gunicorn starts: files left by an earlier run
  would be counted again. Give each gunicorn its own, and none to the Celery workers.
- ``child_exit``: a worker process that exits takes its live gauges along (``mark_process_dead``); its
  counters stay in the sum, so totals never go down when gunicorn replaces a worker.

Logs: with ``LOG_FORMAT=json``, gunicorn's own lines (its master's "Listening at", a worker's boot, the access
log when ``--access-logfile`` is given) come out as JSON like the app's, through gunicorn's usual handlers
and destinations; only their formatter changes. With text, gunicorn logs as it always does. The app's own
lines are configured by ``create_app`` (``api/app.py``).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from typing import Any

# Before anything imports prometheus_client (services/ does): it picks multiprocess mode at import time.
_DIR = "PROMETHEUS_MULTIPROC_DIR"
_MADE_HERE = "IMAGEGEN_METRICS_DIR_MADE"  # remembers, across a reload (SIGHUP), that the directory is ours

if not os.environ.get(_DIR):
    os.environ[_DIR] = tempfile.mkdtemp(prefix="imagegen-metrics-")
    os.environ[_MADE_HERE] = os.environ[_DIR]

from gunicorn.glogging import Logger  # noqa: E402

from services import logs  # noqa: E402
from services.config import load_config  # noqa: E402


class ConfiguredLogger(Logger):  # type: ignore[misc]  # gunicorn is untyped: its base classes are Any
    """gunicorn's logger, its handlers given the configured formatter (and the log scope's fields)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        config = load_config()
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                logs.reformat(handler, config)


if load_config().log_format == "json":
    logger_class = ConfiguredLogger


def on_starting(server: Any) -> None:
    """In the master, once, before the first worker: an empty directory."""
    path = os.environ[_DIR]
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):
        os.remove(stale)
    server.log.info("metrics of the worker processes in %s (%s)", path, _DIR)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(worker.pid, os.environ[_DIR])  # type: ignore[no-untyped-call]  # untyped library


def on_exit(server: Any) -> None:
    made = os.environ.get(_MADE_HERE)
    if made and made == os.environ.get(_DIR):
        shutil.rmtree(made, ignore_errors=True)
