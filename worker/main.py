"""The worker's entry point: ``celery -A worker.main worker``. It only wires things up."""

from __future__ import annotations

from worker.app import create_worker_app

app = create_worker_app()
