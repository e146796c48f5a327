"""worker.open_files: a worker raises its soft open-files limit to what its pool needs, within the hard
limit, and says so when the hard limit is too low. Each case runs in a child process started with the
limits it needs, so that this process's own limits are never touched."""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from worker.open_files import needed

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, logging, resource, sys
logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
from worker.open_files import raise_open_files_limit
soft = raise_open_files_limit(int(sys.argv[1]))
print(json.dumps([soft, resource.getrlimit(resource.RLIMIT_NOFILE)[0]]))
"""


def run_with_limits(concurrency: int, soft: int, hard: int) -> tuple[list[int], str]:
    def limits() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(concurrency)],
        cwd=ROOT,
        preexec_fn=limits,  # noqa: PLW1509 - only setrlimit, before exec
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(done.stdout), done.stderr


def hard_limit() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1 << 20 if hard == resource.RLIM_INFINITY else hard


def test_a_pool_of_2000_gets_the_files_it_needs_from_a_soft_limit_of_1024() -> None:
    if hard_limit() < needed(2000):
        pytest.skip(f"this machine's hard limit ({hard_limit()}) is below {needed(2000)}")
    (returned, in_force), stderr = run_with_limits(2000, soft=1024, hard=hard_limit())
    assert returned == in_force == needed(2000)
    assert stderr == ""


def test_a_higher_soft_limit_is_left_alone() -> None:
    hard = hard_limit()
    (returned, in_force), _ = run_with_limits(10, soft=min(hard, 4096), hard=hard)
    assert returned == in_force == min(hard, 4096)


def test_a_hard_limit_below_the_need_is_used_and_reported() -> None:
    (returned, in_force), stderr = run_with_limits(2000, soft=512, hard=1024)
    assert returned == in_force == 1024
    assert "a pool of 2000 may need 6256 open files, but the hard limit is 1024" in stderr
