"""Workers run on jemalloc where it is installed (``worker/memory.py``, devstack's ``worker_env``): under
glibc's malloc a worker's RSS grows with the jobs it has run, under jemalloc it stays flat (bench/README.md,
P4). ``make setup`` installs it (libjemalloc2), as the Docker image does."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from devstack.processes import JEMALLOC_CONF, worker_env
from tests.stack import Stack

ROOT = Path(__file__).resolve().parents[1]
JEMALLOC = "libjemalloc.so.2"


def allocator_of_a_process(env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-c", "from worker.memory import allocator; print(allocator())"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.strip()


def test_the_stacks_workers_run_on_jemalloc_and_say_so(stack: Stack) -> None:
    worker = stack.children["worker0"]
    assert JEMALLOC in Path(f"/proc/{worker.pid}/maps").read_text()
    assert "memory allocator: jemalloc" in (stack.log_dir / "worker0.log").read_text(errors="replace")


def test_a_worker_is_given_jemalloc_unless_its_environment_preloads_something(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    given = worker_env({"WORKER_CONCURRENCY": "2"})
    assert given["LD_PRELOAD"] == JEMALLOC and given["MALLOC_CONF"] == JEMALLOC_CONF
    assert worker_env({"MALLOC_CONF": "narenas:1"})["MALLOC_CONF"] == "narenas:1"
    glibc = worker_env({"LD_PRELOAD": ""})
    assert glibc["LD_PRELOAD"] == "" and "MALLOC_CONF" not in glibc, "an empty LD_PRELOAD keeps glibc's"
    monkeypatch.setenv("LD_PRELOAD", "libother.so")
    assert worker_env({})["LD_PRELOAD"] == "libother.so"


def test_a_process_tells_which_allocator_it_runs_on() -> None:
    plain = {name: value for name, value in os.environ.items() if name != "LD_PRELOAD"}
    assert allocator_of_a_process(plain) == "glibc"
    assert allocator_of_a_process({**plain, "LD_PRELOAD": JEMALLOC}) == "jemalloc"
