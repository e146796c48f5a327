"""The open-files limit of a worker process, raised to what its pool needs.

Each slot of the pool may hold an upstream connection, a Redis connection and an S3 connection at once:
a worker at ``WORKER_CONCURRENCY=2000`` needs some 6,000 descriptors, and many systems start processes
with a soft limit of 1,024 (bench/README.md, P6). The soft limit is raised up to the hard one, which only
the operator can raise (``ulimit -n``, systemd's ``LimitNOFILE``, compose's ``ulimits``, Kubernetes
inherits the runtime's).
"""

from __future__ import annotations

import logging
import resource

log = logging.getLogger(__name__)

PER_SLOT = 3  # upstream, Redis, S3
SPARE = 256  # the broker, the sweeper, webhooks, logs, libraries


def needed(concurrency: int) -> int:
    return concurrency * PER_SLOT + SPARE


def raise_open_files_limit(concurrency: int) -> int:
    """Raise the soft limit on open files to what ``concurrency`` slots need, within the hard limit;
    warn when the hard limit is below it. Returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed(concurrency)
    if soft != resource.RLIM_INFINITY and soft < want:
        target = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning(
            "a pool of %d may need %d open files, but the hard limit is %d: calls beyond it fail with "
            "'Too many open files'; raise the limit (ulimit -n, LimitNOFILE, compose's ulimits) or lower "
            "WORKER_CONCURRENCY",
            concurrency,
            want,
            hard,
        )
    return soft
