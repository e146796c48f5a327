"""One ``wait``: what it saw last, whom it tells about changes, and its deadline."""

from __future__ import annotations

import time
from collections.abc import Callable

from imagegen.errors import WaitTimeoutError
from imagegen.models import Task


class Watch:
    def __init__(
        self,
        on_update: Callable[[Task], object] | None,
        timeout: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.last: Task | None = None
        self._on_update = on_update
        self._timeout = timeout
        self._clock = clock
        self._deadline = None if timeout is None else clock() + timeout

    def see(self, task: Task) -> bool:
        """Note ``task``; tell ``on_update`` if its status, queue position or attempts changed. Whether it
        is final."""
        changed = self.last is None or _progress(self.last) != _progress(task)
        self.last = task
        if changed and self._on_update is not None:
            self._on_update(task)
        return task.done

    def remaining(self, *, default: float) -> float:
        """Seconds left before the deadline (``default`` without one)."""
        if self._deadline is None:
            return default
        return max(0.0, self._deadline - self._clock())

    def check(self, task: Task) -> None:
        """WaitTimeoutError if the deadline has passed."""
        if self._timeout is not None and self.remaining(default=1) <= 0:
            raise WaitTimeoutError(task, self._timeout)


def _progress(task: Task) -> tuple[object, ...]:
    return task.status, task.queue_position, len(task.attempts)
