"""The worker's entry point: ``celery -A worker.main worker``. It only wires things up."""

from __future__ import annotations

import logging

from services.config import load_config
from services.queue import create_celery

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

app = create_celery(load_config())
app.conf.imports = ("worker.tasks", "worker.webhooks")
