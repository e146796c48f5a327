"""``AsyncClient``: the API with awaited calls; the same flows as ``Client`` (``_operations.py``), their
steps answered with httpx's async client and ``asyncio.sleep``."""

from __future__ import annotations

import asyncio
import builtins
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar, Unpack

import httpx

from imagegen._body import GenerateOptions
from imagegen._operations import ListFilters, OnUpdate, Operations
from imagegen._retry import PollPolicy, RetryPolicy
from imagegen._steps import Flow, NextLine, OpenStream, Runner, Sleep, Step
from imagegen.models import Page, Task

T = TypeVar("T")


class AsyncClient:
    """``Client`` to await: the same arguments and methods (see ``Client`` for each); ``list`` is an
    async iterator; ``http_client`` an ``httpx.AsyncClient``; ``on_update`` a plain callable."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 30.0,
        max_retries: int = 4,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        retry = retry or RetryPolicy(max_retries=max_retries)
        self._ops = Operations(base_url, api_key, timeout=timeout, retry=retry, poll=poll)
        self._http = http_client or httpx.AsyncClient()
        self._owns_http = http_client is None

    @property
    def base_url(self) -> str:
        return self._ops.base_url

    async def generate(
        self, prompt: str, *, idempotency_key: str | None = None, **options: Unpack[GenerateOptions]
    ) -> Task:
        return await self._run(self._ops.generate(prompt, idempotency_key, **options))

    async def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None = None) -> Task:
        return await self._run(self._ops.submit(body, idempotency_key))

    async def get(self, task: Task | str) -> Task:
        return await self._run(self._ops.get(task))

    async def wait(
        self, task: Task | str, *, timeout: float | None = None, on_update: OnUpdate | None = None
    ) -> Task:
        return await self._run(self._ops.wait(task, timeout=timeout, on_update=on_update))

    async def download(self, task: Task | str, directory: str | os.PathLike[str]) -> builtins.list[Path]:
        return await self._run(self._ops.download(task, directory))

    async def cancel(self, task: Task | str) -> Task:
        return await self._run(self._ops.cancel(task))

    async def list(self, *, cursor: str | None = None, **filters: Unpack[ListFilters]) -> AsyncIterator[Page]:
        while True:
            page = await self._run(self._ops.page(cursor, **filters))
            yield page
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        await self.aclose()

    # the driver -------------------------------------------------------------------------------------

    async def _run(self, flow: Flow[T]) -> T:
        runner, stream = Runner(flow), _AsyncLines()
        try:
            while (step := runner.step) is not None:
                try:
                    reply = await self._answer(step, stream)
                except httpx.RequestError as exc:
                    runner.fail(exc)
                else:
                    runner.answer(reply)
        finally:
            await stream.aclose()
            flow.close()
        return runner.result

    async def _answer(self, step: Step, stream: _AsyncLines) -> object:
        if isinstance(step, Sleep):
            await asyncio.sleep(step.seconds)
            return None
        if isinstance(step, NextLine):
            return await stream.next_line()
        await stream.aclose()
        response = await self._http.send(step.request, stream=True)
        if isinstance(step, OpenStream) and response.status_code < 400:
            stream.open(response)
            return response
        try:
            await response.aread()
        finally:
            await response.aclose()
        return response


class _AsyncLines:
    """The open event stream of a flow, if any."""

    def __init__(self) -> None:
        self._response: httpx.Response | None = None
        self._lines: AsyncIterator[str] | None = None

    def open(self, response: httpx.Response) -> None:
        self._response, self._lines = response, response.aiter_lines()

    async def next_line(self) -> str | None:
        return None if self._lines is None else await anext(self._lines, None)

    async def aclose(self) -> None:
        if self._response is not None:
            await self._response.aclose()
        self._response, self._lines = None, None
