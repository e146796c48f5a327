from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.stack import Stack, running_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One real stack shared by the end-to-end tests that do not break it."""
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running
