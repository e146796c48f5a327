"""gunicorn's configuration for the API: the hooks that make ``GET /metrics`` right with several processes.

Used by the Docker image and docker-compose (``gunicorn -c gunicorn.conf.py …``), by ``make run``, and read
by gunicorn on its own when started from this folder. Each worker process writes its metrics into files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode), and ``/metrics``, whichever process
answers it, adds them all up (``services/metrics.py``).

- ``PROMETHEUS_MULTIPROC_DIR`` unset: a fresh directory is made for this run (before any worker, or the
  app with ``--preload``, imports prometheus_client) and removed when gunicorn exits.
- Set: that directory is made if missing and emptied when gunicorn starts: files left by an earlier run
  would be counted again. Give each gunicorn its own, and none to the Celery workers.
- ``child_exit``: a worker process that exits takes its live gauges along (``mark_process_dead``); its
  counters stay in the sum, so totals never go down when gunicorn replaces a worker.
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from typing import Any

_DIR = "PROMETHEUS_MULTIPROC_DIR"
_MADE_HERE = "IMAGEGEN_METRICS_DIR_MADE"  # remembers, across a reload (SIGHUP), that the directory is ours

if not os.environ.get(_DIR):
    os.environ[_DIR] = tempfile.mkdtemp(prefix="imagegen-metrics-")
    os.environ[_MADE_HERE] = os.environ[_DIR]


def on_starting(server: Any) -> None:
    """In the master, once, before the first worker: an empty directory."""
    path = os.environ[_DIR]
    os.makedirs(path, exist_ok=True)
    for stale in glob.glob(os.path.join(path, "*.db")):
        os.remove(stale)
    server.log.info("metrics of the worker processes in %s (%s)", path, _DIR)


def child_exit(server: Any, worker: Any) -> None:
    from prometheus_client.multiprocess import mark_process_dead

    mark_process_dead(worker.pid, os.environ[_DIR])


def on_exit(server: Any) -> None:
    made = os.environ.get(_MADE_HERE)
    if made and made == os.environ.get(_DIR):
        shutil.rmtree(made, ignore_errors=True)
