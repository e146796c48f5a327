"""A background thread that calls one step every interval, for the sweeper and the webhook dispatcher."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from services.errors import ServiceError

log = logging.getLogger(__name__)


class Periodic:
    """Calls ``step`` every ``interval`` s on a daemon thread until stopped. A step that returns True
    found a full batch and is called again at once; after an error (Redis down, say) it is logged and
    the next step waits at least a second, so that an outage is not logged many times a second."""

    def __init__(self, name: str, interval: float, step: Callable[[], bool]) -> None:
        self._name = name
        self._interval = interval
        self._step = step
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)

    def _run(self) -> None:
        wait = self._interval
        while not self._stop.wait(wait):
            wait = self._interval
            try:
                if self._step():
                    wait = 0
            except ServiceError as exc:
                log.warning("%s: %s", self._name, exc.message)
                wait = max(self._interval, 1.0)
            except Exception:
                log.exception("%s: unexpected error", self._name)
                wait = max(self._interval, 1.0)
