"""A redis-server of the unit tests' own: only Redis, on a free port, its data in a temp dir.

The unit tests of the store, the job runner, the limiter, the sweeper and the lease keeper need a real
Redis but nothing else of the stack (no S3 server, no simulator, no workers). Each test gets the server
flushed (``tests/conftest.py``: ``redis_client``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

from devstack.processes import HOST, Child, free_port, start_redis

_TRIES = 3


def _is_ours(child: Child, port: int) -> bool:
    """Whether the server answering on ``port`` is ``child``: a port found free may have been taken by
    another process in between (another test session's redis-server, say), and a FLUSHALL must never
    reach a server that is not ours."""
    client = redis.Redis(host=HOST, port=port, socket_timeout=5, socket_connect_timeout=5)
    try:
        return child.alive() and int(client.info("server")["process_id"]) == child.pid
    finally:
        client.close()


@contextmanager
def running_redis(root: Path) -> Iterator[str]:
    """Start a redis-server under ``root``; yield its URL; stop it on exit."""
    for _ in range(_TRIES):
        port = free_port()
        child = start_redis(root / f"data-{port}", port, log_dir=root / "logs", appendfsync="no")
        if _is_ours(child, port):
            break
        child.stop()
    else:
        raise RuntimeError(f"could not start a redis-server of our own in {_TRIES} tries; see {root}/logs")
    try:
        yield f"redis://{HOST}:{port}/0"
    finally:
        child.stop()
