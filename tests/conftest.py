from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from tests import report
from tests.fault_kit import FAULT_ENV
from tests.redis_server import running_redis
from tests.stack import RABBITMQ_SKIP, Stack, rabbitmq_available, running_stack


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "stack(workers=N, redis_replicas=N, VAR=value): options of a fault test's own stack"
    )


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if report.ROWS:
        terminalreporter.section("fault report")
        terminalreporter.write_line(report.table())


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One real stack shared by the end-to-end tests that do not break it."""
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of a redis-server of the unit tests' own: only Redis, none of the rest of the stack."""
    with running_redis(tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture
def redis_client(redis_server: str) -> Iterator[redis.Redis]:
    """A client of ``redis_server``, flushed before the test: each test starts from an empty Redis."""
    client = redis.Redis.from_url(redis_server, socket_timeout=10, socket_connect_timeout=10)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def clock_ahead(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """``clock_ahead(seconds)``: from then on, this process's clock (what ``services`` reads as now) is
    ``seconds`` ahead, as on a host whose clock is off. Redis's clock is not."""

    def set_ahead(seconds: float) -> None:
        for module in ("services.clock", "services.store", "services.limits"):
            monkeypatch.setattr(f"{module}.time", _SkewedTime(seconds))

    return set_ahead


class _SkewedTime:
    """The ``time`` module, but for ``time()``: ``seconds`` ahead."""

    def __init__(self, seconds: float) -> None:
        self._seconds = seconds

    def time(self) -> float:
        return time.time() + self._seconds

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def fault_stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Stack]:
    """A fault test's own stack (two generation workers unless its ``stack`` marker says otherwise),
    which it may break as it likes; on the broker the test is parametrized with
    (``fault_kit.both_brokers``), else Redis. Without a RabbitMQ on this machine the RabbitMQ variant is
    skipped, and says why."""
    marker = request.node.get_closest_marker("stack")
    options = dict(marker.kwargs) if marker else {}
    workers = options.pop("workers", 2)
    replicas = options.pop("redis_replicas", 0)
    broker = getattr(request, "param", "redis")
    if broker == "rabbitmq" and not rabbitmq_available():
        pytest.skip(RABBITMQ_SKIP)
    with running_stack(
        tmp_path, worker_count=workers, redis_replicas=replicas, broker=broker, **{**FAULT_ENV, **options}
    ) as running:
        yield running
