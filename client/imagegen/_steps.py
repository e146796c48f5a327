"""The seam between what the SDK does and how it does I/O, shared by ``Client`` and ``AsyncClient``.

Every operation is written once, in ``_operations.py``, as a *flow*: a generator that yields the steps it
needs (send this request, open this event stream, read its next line, sleep) and receives each step's
answer. The two clients differ only in their drivers, which answer the steps with blocking or with
awaited calls. A driver throws an ``httpx.RequestError`` back into the flow where a step failed; the flow
decides whether to retry, and maps it to the SDK's own errors.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import httpx

T = TypeVar("T")


@dataclass(frozen=True)
class Send:
    """Send ``request`` and read the whole answer; answered with the ``httpx.Response``."""

    request: httpx.Request


@dataclass(frozen=True)
class OpenStream:
    """Send ``request`` and keep its body open as a stream of lines (an error answer is read whole);
    answered with the ``httpx.Response``. The stream is closed at the flow's next step that is not
    ``NEXT_LINE``, and when the flow ends."""

    request: httpx.Request


class NextLine:
    def __repr__(self) -> str:
        return "NEXT_LINE"


NEXT_LINE = NextLine()
"""Read the open stream's next line; answered with it (without its line break), or None at its end."""


@dataclass(frozen=True)
class Sleep:
    seconds: float


Step = Send | OpenStream | NextLine | Sleep
Flow = Generator[Step, Any, T]


class Runner(Generic[T]):
    """Steps one flow: ``step`` is what it waits for (None once it has returned ``result``)."""

    def __init__(self, flow: Flow[T]) -> None:
        self._flow = flow
        self.step: Step | None = None
        self._result: T | None = None
        self._resume(lambda: next(flow))

    def answer(self, reply: object) -> None:
        self._resume(lambda: self._flow.send(reply))

    def fail(self, error: httpx.RequestError) -> None:
        self._resume(lambda: self._flow.throw(error))

    @property
    def result(self) -> T:
        assert self.step is None, "the flow has not finished"
        return self._result  # type: ignore[return-value]

    def _resume(self, resume: Any) -> None:
        try:
            self.step = resume()
        except StopIteration as stop:
            self.step = None
            self._result = stop.value
