"""Keeping leases alive: one heartbeat thread per process renews every lease its jobs hold.

A job holds its task's lease (and its slot in the upstream limiter) for as long as its upstream call is
in flight. If the process dies, the renewals stop, the lease expires after ``TASK_LEASE_SECONDS``, and a
reaper hands the task to another worker. A renewal that finds the lease gone is logged: the job's own
later transitions then fail with ``LeaseLost`` rather than overwrite another worker's attempt.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from services.errors import ServiceError

log = logging.getLogger(__name__)

Renewal = Callable[[], bool]


class LeaseKeeper:
    def __init__(self, interval: float) -> None:
        self._interval = interval
        # each renewal runs in a copy of the context it was registered from: its log lines carry the
        # fields of the job's log scope (services/logs.py)
        self._renewals: dict[int, tuple[str, Renewal, contextvars.Context]] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def keep(self, name: str, renew: Renewal) -> Iterator[None]:
        """Call ``renew`` every interval while the block runs."""
        number = next(self._ids)
        with self._lock:
            self._renewals[number] = (name, renew, contextvars.copy_context())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._renewals.pop(number, None)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                renewals = list(self._renewals.items())
            for number, (name, renew, context) in renewals:
                context.run(self._renew, number, name, renew)

    def _renew(self, number: int, name: str, renew: Renewal) -> None:
        try:
            if not renew():
                with self._lock:
                    # A job that finished since the copy was taken released it: no loss.
                    if self._renewals.pop(number, None) is not None:
                        log.warning("%s: lost (expired before it was renewed)", name)
        except ServiceError as exc:
            log.warning("%s: could not renew (%s); will try again", name, exc.message)
        except Exception:  # a bug in one renewal must not stop the renewal of every other lease
            log.exception("%s: renewal failed unexpectedly; will try again", name)
