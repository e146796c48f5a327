"""A worker process's memory allocator: jemalloc when it was preloaded, else glibc's malloc, tuned.

Workers run on jemalloc where it is installed: their launchers preload it (``LD_PRELOAD``: devstack's
``worker_env`` for ``make run``, the tests and the benchmarks; the Docker image, docker-compose.yml and
the Kubernetes manifests). Under glibc's malloc, a worker's RSS grows with the jobs it has run, in its
threads' arenas, by 40–140 KB per 1,000 small jobs; under jemalloc it stays flat (bench/README.md, P4).
Where glibc's malloc runs, ``keep_big_buffers_out_of_the_heap`` tunes it. Only workers call this
(``worker/steps.py``): they hold multi-megabyte answers and images; the API does not, and a library
should not change a process's allocator behind its back.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc's mallopt parameters: allocations from M_MMAP_THRESHOLD up are mapped, and unmapped when freed;
# free memory at the top of a heap is given back once it exceeds M_TRIM_THRESHOLD
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
BIG_BUFFER_BYTES = 4 * 1024 * 1024
HEAP_SLACK_BYTES = 16 * 1024 * 1024


def keep_big_buffers_out_of_the_heap(
    threshold: int = BIG_BUFFER_BYTES, slack: int = HEAP_SLACK_BYTES
) -> bool:
    """Make glibc map every allocation of ``threshold`` bytes or more, and give it back when freed.

    By default glibc raises that threshold each time such a buffer is freed (up to 32 MB), after which
    big answers and images (a 4K image is 13 MB of base64, 10 MB decoded) are carved from per-thread
    heaps and stay there as RSS, fragmented (bench/README.md, P1–P5: fix 6, measured by P4). The
    threshold sits above a 1K answer (2 MB of base64, 1.5 MB decoded), whose buffers are reused from the
    heap: mapping them too costs CPU per job in page faults (fix 8). Fixing the threshold also fixes the
    trim threshold at glibc's 128 KB, which would hand those buffers back after every job; ``slack``
    keeps that much free heap instead. A ``MALLOC_MMAP_THRESHOLD_`` in the environment wins; other C
    libraries are left alone. Returns whether the setting was made.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold) and libc.mallopt(_M_TRIM_THRESHOLD, slack))
    except (OSError, AttributeError):
        return False


def allocator() -> str:
    """``"jemalloc"`` when it is loaded into this process, else ``"glibc"``."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            return "jemalloc" if any("libjemalloc" in line for line in maps) else "glibc"
    except OSError:
        return "glibc"
