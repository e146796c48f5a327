from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import report
from tests.stack import Stack, running_stack


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "stack(workers=N, VAR=value): options of a fault test's own stack")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if report.ROWS:
        terminalreporter.section("fault report")
        terminalreporter.write_line(report.table())


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One real stack shared by the end-to-end tests that do not break it."""
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running
