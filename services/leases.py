"""Keeping leases alive: one heartbeat thread per process renews every lease its jobs hold.

A job holds its task's lease (and its slot in the upstream limiter) for as long as its upstream call is
in flight. If the process dies, the renewals stop, the lease expires after ``TASK_LEASE_SECONDS``, and a
reaper hands the task to another worker. A renewal that finds the lease gone is logged: the job's own
later transitions then fail with ``LeaseLost`` rather than overwrite another worker's attempt.

Holds of one kind are renewed together, ``BATCH`` to a call (``renew_many``: the store's leases, the
limiter's slots, each one script call for a whole batch): a worker holding 2,000 calls renews its 4,000
holds an interval in a few round trips, not 4,000 (bench/README.md, P6).
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from services.errors import ServiceError

log = logging.getLogger(__name__)

# Renews many holds of one kind in one round trip; answers, in order, whether each was still held.
RenewMany = Callable[[Sequence[Any]], list[bool]]
BATCH = 500


@dataclass(frozen=True)
class _Hold:
    name: str
    renew_many: RenewMany
    item: Any
    ended: threading.Event | None
    # the context it was registered from: its log lines carry the fields of the job's log scope
    context: contextvars.Context


class LeaseKeeper:
    def __init__(self, interval: float) -> None:
        self._interval = interval
        self._holds: dict[int, _Hold] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @contextmanager
    def keep(
        self, name: str, renew_many: RenewMany, item: Any, *, ended: threading.Event | None = None
    ) -> Iterator[None]:
        """Renew ``item`` (through ``renew_many``, with every other hold of that kind) every interval
        while the block runs. Once ``ended`` is set, a renewal that finds the hold gone lost nothing (the
        job's closing write released it)."""
        number = next(self._ids)
        with self._lock:
            self._holds[number] = _Hold(name, renew_many, item, ended, contextvars.copy_context())
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="lease-keeper", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._holds.pop(number, None)

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        took = 0.0
        while not self._stop.wait(max(0.0, self._interval - took)):
            began = time.monotonic()
            count = self.renew_all()
            took = time.monotonic() - began
            if took > self._interval:  # leases last three intervals: two such passes in a row lose some
                log.warning(
                    "renewing %d holds took %.1fs, longer than the %.1fs between renewals: the process is "
                    "short of CPU",
                    count,
                    took,
                    self._interval,
                )

    def renew_all(self) -> int:
        """One pass: every hold registered now, a round trip per ``BATCH`` holds of a kind. Returns how
        many holds it renewed (or tried to)."""
        groups: dict[RenewMany, list[tuple[int, _Hold]]] = defaultdict(list)
        with self._lock:
            for number, hold in self._holds.items():
                groups[hold.renew_many].append((number, hold))
        for renew_many, holds in groups.items():
            for start in range(0, len(holds), BATCH):
                self._renew(renew_many, holds[start : start + BATCH])
        return sum(len(holds) for holds in groups.values())

    def _renew(self, renew_many: RenewMany, holds: list[tuple[int, _Hold]]) -> None:
        try:
            renewed = renew_many([hold.item for _, hold in holds])
        except ServiceError as exc:
            log.warning("%s: could not renew (%s); will try again", _names(holds), exc.message)
            return
        except Exception:  # a bug in one kind of renewal must not stop the renewal of every other lease
            log.exception("%s: renewal failed unexpectedly; will try again", _names(holds))
            return
        for (number, hold), held in zip(holds, renewed, strict=True):
            if held or (hold.ended is not None and hold.ended.is_set()):
                continue
            with self._lock:
                # A job that finished since the copy was taken released it: no loss.
                gone = self._holds.pop(number, None) is not None
            if gone:
                hold.context.run(log.warning, "%s: lost (expired before it was renewed)", hold.name)


def _names(holds: list[tuple[int, _Hold]]) -> str:
    first = holds[0][1].name
    return first if len(holds) == 1 else f"{first} and {len(holds) - 1} more"
