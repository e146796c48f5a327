"""Flower against the broker: ``make flower`` on a free port, against a real stack's Redis, finds the
stack's workers through its HTTP API, sees them alive by their heartbeats, and sees their tasks once it
has turned their task events on (they are off by default: README.md, "Flower")."""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from devstack.processes import HOST, Child, free_port, wait_until
from tests.stack import Stack, running_stack, seed_body

ROOT = Path(__file__).resolve().parents[1]
AUTH = ("ops", "flower-test-password")


@dataclass
class Flower:
    stack: Stack
    url: str

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", auth=AUTH, timeout=15, **kwargs)


@pytest.fixture(scope="module")
def flower(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flower]:
    """``make flower`` itself, with this interpreter's virtualenv (``-o``: never set up again here)."""
    with running_stack(tmp_path_factory.mktemp("flower")) as stack:
        port = free_port()
        venv = Path(sys.executable).parent.parent
        args = ["make", "-s", "-C", str(ROOT), "-o", str(venv / ".installed"), "flower", f"VENV={venv}"]
        env = {**os.environ, **stack.env, "FLOWER_PORT": str(port), "FLOWER_BASIC_AUTH": ":".join(AUTH)}
        stack.children["flower"] = Child("flower", args, env, stack.log_dir / "flower.log").start()
        url = f"http://{HOST}:{port}"
        try:
            wait_until(lambda: httpx.get(f"{url}/healthcheck").text == "OK", timeout=60, what="Flower")
        except TimeoutError:
            pytest.fail(f"Flower did not start:\n{stack.children['flower'].tail()}")
        yield Flower(stack, url)


def names() -> set[str]:
    host = socket.gethostname()
    return {f"worker0@{host}", f"webhook-worker@{host}"}


def test_flower_finds_the_workers(flower: Flower) -> None:
    """``/api/workers?refresh=1`` asks every worker over the broker (Celery's remote control)."""
    workers = flower.get("/api/workers", params={"refresh": 1}).json()
    assert set(workers) == names(), workers
    host = socket.gethostname()
    queues = {name: [queue["name"] for queue in workers[name]["active_queues"]] for name in workers}
    assert queues == {f"worker0@{host}": ["generation"], f"webhook-worker@{host}": ["webhooks"]}
    for worker in workers.values():
        assert {"imagegen.generate", "imagegen.deliver_webhook"} <= set(worker["registered"])
        assert worker["stats"]["pool"]["max-concurrency"] == int(flower.stack.env["WORKER_CONCURRENCY"])
        assert worker["stats"]["broker"]["transport"] == "redis"


def test_flower_sees_the_workers_alive(flower: Flower) -> None:
    """Their heartbeats are worker events, sent whether task events are on or not."""
    wait_until(
        lambda: flower.get("/api/workers", params={"status": 1}).json() == dict.fromkeys(names(), True),
        timeout=30,
        what="both workers alive in Flower",
    )


def test_flower_sees_the_tasks_once_it_turned_events_on(flower: Flower) -> None:
    """Flower turns task events on in every worker every 5 s while it runs: a task run after that shows."""
    deadline = time.monotonic() + 45
    while True:
        task = flower.stack.run(seed_body())
        assert task["status"] == "succeeded", task
        time.sleep(0.5)  # the events reach Flower
        tasks = flower.get("/api/tasks").json().values()
        seen = [item for item in tasks if task["id"] in (item.get("args") or "")]
        if seen or time.monotonic() > deadline:
            break
    assert len(seen) == 1, f"task {task['id']} not in Flower's tasks"
    [item] = seen
    assert item["name"] == "imagegen.generate" and item["state"] == "SUCCESS"
    assert item["worker"] == f"worker0@{socket.gethostname()}"


def test_flower_api_needs_its_credentials(flower: Flower) -> None:
    assert httpx.get(f"{flower.url}/api/workers", timeout=10).status_code == 401
    assert httpx.get(f"{flower.url}/api/workers", auth=("ops", "wrong"), timeout=10).status_code == 401
