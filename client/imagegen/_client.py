"""``Client``: the API with blocking calls. Every operation is a flow of ``_operations.py``; this module
only answers its steps (``_steps.py``) with httpx's blocking client and ``time.sleep``."""

from __future__ import annotations

import builtins
import os
import time
from collections.abc import Iterator, Mapping
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


class Client:
    """A client of one imagegen-queue server, for one API key.

    ``base_url`` defaults to ``IMAGEGEN_URL`` (else http://127.0.0.1:8000), ``api_key`` to
    ``IMAGEGEN_API_KEY`` (none: an open server). Each call is tried again on 429 and 503 (after the
    server's ``Retry-After``, up to ``retry.max_wait`` seconds) and, when it is safe to repeat, on
    connection errors, at most ``max_retries`` times. ``http_client``: an ``httpx.Client`` of your own
    (proxies, event hooks, a mock transport); the SDK sets each request's URL, headers and timeout.
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 30.0,
        max_retries: int = 4,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        retry = retry or RetryPolicy(max_retries=max_retries)
        self._ops = Operations(base_url, api_key, timeout=timeout, retry=retry, poll=poll)
        self._http = http_client or httpx.Client()
        self._owns_http = http_client is None

    @property
    def base_url(self) -> str:
        return self._ops.base_url

    def generate(
        self, prompt: str, *, idempotency_key: str | None = None, **options: Unpack[GenerateOptions]
    ) -> Task:
        """Submit one prompt (``aspect_ratio``, ``image_size``, ``images``: paths or bytes, ``model``,
        ``metadata``, ``webhook_url``, …); the queued task. Wait for it with ``wait``."""
        return self._run(self._ops.generate(prompt, idempotency_key, **options))

    def submit(self, body: Mapping[str, Any], *, idempotency_key: str | None = None) -> Task:
        """Submit a request body of your own (the upstream's, plus ``metadata``, ``webhook_url``)."""
        return self._run(self._ops.submit(body, idempotency_key))

    def get(self, task: Task | str) -> Task:
        return self._run(self._ops.get(task))

    def wait(
        self, task: Task | str, *, timeout: float | None = None, on_update: OnUpdate | None = None
    ) -> Task:
        """The task once final, whatever its status (``TaskFailedError(task)`` to raise on failure);
        ``on_update(task)`` on every change seen; ``WaitTimeoutError`` after ``timeout`` seconds."""
        return self._run(self._ops.wait(task, timeout=timeout, on_update=on_update))

    def download(self, task: Task | str, directory: str | os.PathLike[str]) -> builtins.list[Path]:
        """Save a succeeded task's images into ``directory`` as ``{id}-{index}.{ext}``; their paths."""
        return self._run(self._ops.download(task, directory))

    def cancel(self, task: Task | str) -> Task:
        return self._run(self._ops.cancel(task))

    def list(self, *, cursor: str | None = None, **filters: Unpack[ListFilters]) -> Iterator[Page]:
        """The caller's tasks, newest first, page after page: ``status``, ``limit`` (tasks a page, at most
        100), ``created_after``, ``created_before``, ``metadata`` (``{"order": "42"}``)."""
        while True:
            page = self._run(self._ops.page(cursor, **filters))
            yield page
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    # the driver -------------------------------------------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        runner, stream = Runner(flow), _Lines()
        try:
            while (step := runner.step) is not None:
                try:
                    reply = self._answer(step, stream)
                except httpx.RequestError as exc:
                    runner.fail(exc)
                else:
                    runner.answer(reply)
        finally:
            stream.close()
            flow.close()
        return runner.result

    def _answer(self, step: Step, stream: _Lines) -> object:
        if isinstance(step, Sleep):
            time.sleep(step.seconds)
            return None
        if isinstance(step, NextLine):
            return stream.next_line()
        stream.close()
        response = self._http.send(step.request, stream=True)
        if isinstance(step, OpenStream) and response.status_code < 400:
            stream.open(response)
            return response
        try:
            response.read()
        finally:
            response.close()
        return response


class _Lines:
    """The open event stream of a flow, if any."""

    def __init__(self) -> None:
        self._response: httpx.Response | None = None
        self._lines: Iterator[str] = iter(())

    def open(self, response: httpx.Response) -> None:
        self._response, self._lines = response, response.iter_lines()

    def next_line(self) -> str | None:
        return next(self._lines, None)

    def close(self) -> None:
        if self._response is not None:
            self._response.close()
        self._response, self._lines = None, iter(())
