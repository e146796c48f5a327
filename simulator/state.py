"""Counters, the call log, script positions and served images of one simulator instance."""

from __future__ import annotations

import hashlib
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any

from simulator.images import RenderedImage

_CALL_LOG_LIMIT = 100_000


@dataclass
class CallRecord:
    """One upstream call; filled in as the request is understood, finished when answered."""

    started: float
    epoch: int
    key: str | None = None
    model: str | None = None
    outcome: str | None = None
    status: int | None = None
    finished: float | None = None

    def duration_s(self) -> float:
        return (self.finished or self.started) - self.started

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "outcome": self.outcome,
            "status": self.status,
            "started": self.started,
            "finished": self.finished,
            "model": self.model,
        }


class SimState:
    """Thread-safe bookkeeping. Outcomes are counted before the reply is written, in_flight drops after.

    reset() starts a new epoch: outcomes of calls still in flight are then no longer counted.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._epoch = 0
        self._in_flight = 0
        self._images: dict[str, RenderedImage] = {}
        self._clear()

    def _clear(self) -> None:
        self._total = 0
        self._max_in_flight = self._in_flight
        self._by_key: Counter[str] = Counter()
        self._by_outcome: Counter[str] = Counter()
        self._occurrences: Counter[bytes] = Counter()
        self._downloads: Counter[str] = Counter()
        self._calls: deque[CallRecord] = deque(maxlen=_CALL_LOG_LIMIT)

    def begin_call(self) -> CallRecord:
        with self._lock:
            record = CallRecord(started=time.time(), epoch=self._epoch)
            self._total += 1
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
            self._calls.append(record)
            return record

    def settle_call(self, record: CallRecord, outcome: str, status: int | None) -> None:
        """Record the outcome and the status about to be sent (None: the client went away)."""
        with self._lock:
            record.outcome, record.status = outcome, status
            if record.epoch == self._epoch:
                self._by_outcome[outcome] += 1

    def finish_call(self, record: CallRecord) -> None:
        """The reply is written (or the call failed before settling, counted as "error")."""
        if record.outcome is None:
            self.settle_call(record, "error", None)
        with self._lock:
            record.finished = time.time()
            self._in_flight -= 1

    def next_position(self, key: str) -> int:
        """How many earlier calls carried this key (and count this one)."""
        with self._lock:
            position = self._by_key[key]
            self._by_key[key] += 1
            return position

    def next_occurrence(self, body: bytes) -> int:
        """How many times this exact body was seen before (and count this one)."""
        digest = hashlib.sha256(body).digest()
        with self._lock:
            occurrence = self._occurrences[digest]
            self._occurrences[digest] += 1
            return occurrence

    def remember_image(self, image: RenderedImage) -> None:
        with self._lock:
            self._images[image.image_id] = image

    def next_download(self, key: str) -> int:
        """How many earlier downloads carried this key (and count this one)."""
        with self._lock:
            position = self._downloads[key]
            self._downloads[key] += 1
            return position

    def image(self, image_id: str) -> RenderedImage | None:
        with self._lock:
            return self._images.get(image_id)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "calls": self._total,
                "in_flight": self._in_flight,
                "max_in_flight": self._max_in_flight,
                "by_key": dict(self._by_key),
                "by_outcome": dict(self._by_outcome),
                "downloads_by_key": dict(self._downloads),
            }

    def calls(self) -> list[dict[str, Any]]:
        with self._lock:
            return [record.as_dict() for record in self._calls]

    def reset(self) -> None:
        with self._lock:
            self._epoch += 1
            self._clear()
