"""A worker told to stop ends within ``WORKER_SHUTDOWN_TIMEOUT``, whatever it is waiting for.

Celery's warm shutdown (SIGTERM) waits for every running task, however long; with Redis or the upstream
unreachable, tasks and Celery's own reconnect loops can wait far longer than any orchestrator grants,
and a second SIGTERM changes nothing. When the worker starts shutting down, a timer starts; if the
process still runs when it fires, it exits at once. Nothing is lost: what its tasks held is released by
their leases (``TASK_LEASE_SECONDS``) and the sweeper hands it to another worker; a webhook delivery in
flight is claimed again when its lease ends.
"""

from __future__ import annotations

import logging
import os
import threading

log = logging.getLogger(__name__)

EXIT_CODE = 70  # EX_SOFTWARE: ended by the deadline, not by a clean shutdown


class ShutdownDeadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._timer: threading.Timer | None = None

    def start(self) -> None:
        """Start counting (again calls are ignored: the first request to stop sets the deadline)."""
        if self._timer is not None:
            return
        log.info("shutting down; exiting in at most %.0fs", self.seconds)
        self._timer = threading.Timer(self.seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        log.error(
            "still running %.0fs after being told to stop (WORKER_SHUTDOWN_TIMEOUT): exiting now; its "
            "tasks run again once their leases expire",
            self.seconds,
        )
        for handler in logging.getLogger().handlers:
            handler.flush()
        os._exit(EXIT_CODE)
