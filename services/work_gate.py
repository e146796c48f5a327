"""How many of a worker's threads do work at once, however many wait on the upstream.

A worker at ``WORKER_CONCURRENCY=2000`` holds 2,000 upstream calls, each in its own thread. Waiting on
a socket costs a thread nothing, but when the answers come back together (the same latency, a burst),
2,000 threads all want the GIL at once to parse, upload and record: each one's turn comes round slowly,
the process's CPU goes to handing the GIL around, and the lease keeper's thread, whose renewals keep
every one of those calls alive, is starved until leases expire (found by
``tests/test_faults_density.py``; bench/README.md, P6). So a job holds one of ``WORKER_BUSY_THREADS``
permits while it works, and gives it back while it waits: during the upstream call and while it waits
for an upstream slot. The threads waiting for a permit wait on a lock, which costs nothing either.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager


class WorkGate:
    def __init__(self, permits: int) -> None:
        self._permits = threading.BoundedSemaphore(permits)

    @contextmanager
    def working(self) -> Iterator[None]:
        """Hold a permit while the block runs."""
        with self._permits:
            yield

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Inside ``working``: give the permit back while the block waits, and take one again after."""
        self._permits.release()
        try:
            yield
        finally:
            self._permits.acquire()
