"""Every operation of the API, written once as a flow (``_steps.py``) that ``Client`` and ``AsyncClient``
run: the requests it sends, its retries and their delays, how ``wait`` follows a task, what ``download``
writes.

How ``wait`` follows a task, best first:

1. ``GET /v1/tasks/{id}/events`` (Server-Sent Events, one event per status change, the task as data), if
   the server's OpenAPI document lists it; resumed with ``Last-Event-ID`` when the stream breaks. A 404
   or 405 there, or three broken streams in a row, and the client polls instead.
2. ``GET /v1/tasks/{id}`` with ``Prefer: wait=N``: a server that can hold the request until the task is
   final (or N seconds pass) says so with ``Preference-Applied``, and the next request goes at once.
3. Otherwise the same GET, again after a delay that grows from ``PollPolicy.initial`` to its ``maximum``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any, TypedDict, Unpack
from urllib.parse import quote

import httpx

from imagegen._body import GenerateOptions, generation_body
from imagegen._files import save_output
from imagegen._retry import PollPolicy, RetryPolicy, error_code, retry_after_seconds
from imagegen._sse import Event, EventDecoder
from imagegen._steps import NEXT_LINE, Flow, OpenStream, Send, Sleep
from imagegen._version import __version__
from imagegen._watch import Watch
from imagegen.errors import (
    APIConnectionError,
    APIError,
    DownloadError,
    ImagegenError,
    TaskFailedError,
    api_error,
)
from imagegen.models import Page, Task, TaskStatus

log = logging.getLogger("imagegen")

DEFAULT_URL = "http://127.0.0.1:8000"  # where `make run` serves the API
SUBMIT_PATH = "/v1/images/generations"
EVENTS_PATH = "/v1/tasks/{task_id}/events"  # as the OpenAPI document names it
_IN_PROGRESS = frozenset({"idempotency_in_progress"})  # the first try of this key is still being handled
_NO_EVENTS = frozenset({404, 405, 501})  # this server has no event streams
_STREAM_RETRY = frozenset({429, 502, 503, 504})  # a stream refused for now: opened again after a while
_STREAM_READ_TIMEOUT = 60.0  # seconds without a byte (servers send a heartbeat well within it)
_STREAM_FAILURES = 3  # event streams in a row that broke before an event, before ``wait`` polls instead

OnUpdate = Callable[[Task], object]


def task_id_of(task: Task | str) -> str:
    return task.id if isinstance(task, Task) else task


class Operations:
    """The API of one server for one key, as flows; holds no connection (the clients do)."""

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 30.0,
        retry: RetryPolicy | None = None,
        poll: PollPolicy | None = None,
    ) -> None:
        """``base_url`` and ``api_key`` default to ``IMAGEGEN_URL`` and ``IMAGEGEN_API_KEY``."""
        self.base_url = (base_url or os.environ.get("IMAGEGEN_URL") or DEFAULT_URL).rstrip("/")
        api_key = api_key if api_key is not None else os.environ.get("IMAGEGEN_API_KEY")
        self.timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self.retry = retry or RetryPolicy()
        self.poll = poll or PollPolicy()
        self._agent = {"User-Agent": f"imagegen-client/{__version__}"}
        self._headers = {**self._agent, "Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._events: bool | None = None  # does the server stream a task's events? (asked once)

    # building and sending ---------------------------------------------------------------------------

    def request(
        self,
        method: str,
        target: str,
        *,
        json: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        read_timeout: float | None = None,
    ) -> httpx.Request:
        """A request to the API (``target`` a path), or to another origin without the API's key
        (``target`` a URL, e.g. a presigned download)."""
        ours = not target.startswith(("http://", "https://"))
        timeout = self.timeout
        if read_timeout is not None:
            timeout = httpx.Timeout(
                connect=timeout.connect, read=read_timeout, write=timeout.write, pool=timeout.pool
            )
        try:
            return httpx.Request(
                method,
                self.base_url + target if ours else target,
                json=json,
                params=_query(params),
                headers={**(self._headers if ours else self._agent), **(headers or {})},
                extensions={"timeout": timeout.as_dict()},
            )
        except httpx.InvalidURL as exc:
            raise ImagegenError(f"not a usable URL: {exc}") from None

    def call(
        self, request: httpx.Request, *, idempotent: bool = True, retry_codes: frozenset[str] = frozenset()
    ) -> Flow[httpx.Response]:
        """Send ``request`` until it succeeds, or raise the SDK's error once the retries are over.
        ``idempotent``: safe to send again after a connection error or a gateway's 502/504."""
        for attempt in itertools.count():
            try:
                response: httpx.Response = yield Send(request)
            except httpx.RequestError as exc:
                delay = self.retry.after_error(exc, attempt, idempotent=idempotent)
                if delay is None:
                    raise APIConnectionError(
                        f"{request.method} {request.url.copy_with(query=None)}: {type(exc).__name__}: {exc}"
                    ) from exc
                reason = type(exc).__name__
            else:
                delay = self.retry.after_response(
                    response, attempt, idempotent=idempotent, retry_codes=retry_codes
                )
                if delay is None:
                    raise_for_status(response)
                    return response
                reason = f"HTTP {response.status_code}"
            log.info("%s %s: %s, trying again in %.2fs", request.method, request.url.path, reason, delay)
            yield Sleep(delay)
        raise AssertionError("unreachable")

    # the operations ---------------------------------------------------------------------------------

    def submit(self, body: Mapping[str, Any], idempotency_key: str | None = None) -> Flow[Task]:
        """One Idempotency-Key per call, the same on each of its retries: the server creates one task."""
        key = idempotency_key or str(uuid.uuid4())
        request = self.request("POST", SUBMIT_PATH, json=body, headers={"Idempotency-Key": key})
        response = yield from self.call(request, retry_codes=_IN_PROGRESS)
        return Task.from_json(response.json())

    def generate(
        self, prompt: str, idempotency_key: str | None = None, **options: Unpack[GenerateOptions]
    ) -> Flow[Task]:
        return (yield from self.submit(generation_body(prompt, **options), idempotency_key))

    def get(self, task: Task | str) -> Flow[Task]:
        response = yield from self.call(self.request("GET", _task_path(task)))
        return Task.from_json(response.json())

    def cancel(self, task: Task | str) -> Flow[Task]:
        # Not sent again after a lost answer: the repeat would be a 409 for a cancel that worked.
        response = yield from self.call(self.request("POST", _task_path(task, "cancel")), idempotent=False)
        return Task.from_json(response.json())

    def page(self, cursor: str | None, **filters: Unpack[ListFilters]) -> Flow[Page]:
        """One page of ``GET /v1/tasks``, newest first; ``cursor``: the last page's ``next_cursor``."""
        params = list_query(cursor, **filters)
        response = yield from self.call(self.request("GET", "/v1/tasks", params=params))
        return Page.from_json(response.json())

    def wait(self, task: Task | str, *, timeout: float | None, on_update: OnUpdate | None) -> Flow[Task]:
        """The task once final (succeeded, failed or canceled); WaitTimeoutError after ``timeout`` s."""
        watch = Watch(on_update, timeout)
        if isinstance(task, Task) and watch.see(task):
            return task
        if (yield from self._streams_events()):
            final = yield from self._wait_streaming(task_id_of(task), watch)
            if final is not None:
                return final
        return (yield from self._wait_polling(task_id_of(task), watch))

    def download(self, task: Task | str, directory: str | os.PathLike[str]) -> Flow[list[Path]]:
        """Save each output of a succeeded task into ``directory``; the paths, in output order."""
        if not (isinstance(task, Task) and task.done):
            task = yield from self.get(task)
        if task.status in (TaskStatus.FAILED, TaskStatus.CANCELED):
            raise TaskFailedError(task)
        if not task.succeeded:
            raise ImagegenError(f"task {task.id} is {task.status}: wait for it before downloading")
        paths = []
        for output in task.outputs:
            response = yield from self.call(self.request("GET", _task_path(task, f"outputs/{output.index}")))
            if response.is_redirect:  # to a presigned URL, fetched without our key
                location = str(response.url.join(response.headers["Location"]))
                try:
                    response = yield from self.call(self.request("GET", location))
                except APIError as exc:
                    raise DownloadError(f"task {task.id} output {output.index}: {exc}") from exc
            paths.append(save_output(Path(directory), task.id, output, response.content))
        return paths

    # how wait follows a task ------------------------------------------------------------------------

    def _streams_events(self) -> Flow[bool]:
        if self._events is None:
            try:
                response = yield from self.call(self.request("GET", "/openapi.json"))
                self._events = EVENTS_PATH in (response.json().get("paths") or {})
            except (APIError, ValueError, AttributeError):
                self._events = False
        return self._events

    def _wait_polling(self, task_id: str, watch: Watch) -> Flow[Task]:
        delay = self.poll.initial
        while True:
            hold = int(min(self.poll.hold, watch.remaining(default=self.poll.hold)))
            request = self.request(
                "GET",
                _task_path(task_id),
                headers={"Prefer": f"wait={hold}"} if hold >= 1 else None,
                read_timeout=(self.timeout.read or 0) + hold,
            )
            response = yield from self.call(request)
            task = Task.from_json(response.json())
            if watch.see(task):
                return task
            watch.check(task)
            if "wait" in response.headers.get("Preference-Applied", ""):
                continue  # the server held the request as long as it would: ask again at once
            yield Sleep(min(delay, watch.remaining(default=delay)))
            delay = min(delay * self.poll.factor, self.poll.maximum)

    def _wait_streaming(self, task_id: str, watch: Watch) -> Flow[Task | None]:
        """The final task from the event stream, or None to poll instead (no stream here after all, or
        ``_STREAM_FAILURES`` streams in a row that broke before they brought an event)."""
        decoder, broken = EventDecoder(), 0
        while broken < _STREAM_FAILURES and watch.remaining(default=1) > 0:
            if broken:
                yield Sleep(self.retry.backoff(broken - 1))
            events_before = decoder.count
            headers = {"Accept": "text/event-stream", "Cache-Control": "no-cache"}
            if decoder.last_id is not None:
                headers["Last-Event-ID"] = decoder.last_id  # resume after the last event seen
            request = self.request(
                "GET",
                _task_path(task_id, "events"),
                headers=headers,
                read_timeout=min(_STREAM_READ_TIMEOUT, watch.remaining(default=_STREAM_READ_TIMEOUT)),
            )
            try:
                response = yield OpenStream(request)
                if response.status_code in _NO_EVENTS:
                    self._events = False
                    return None
                if response.status_code not in _STREAM_RETRY:
                    raise_for_status(response)
                while response.is_success and (line := (yield NEXT_LINE)) is not None:
                    task = _event_task(decoder.feed(line))
                    if task is not None and watch.see(task):
                        return task
                    if watch.remaining(default=1) <= 0:
                        break
            except httpx.RequestError as exc:  # broken, or silent past the read timeout
                log.info("GET %s: %s, resuming the event stream", request.url.path, type(exc).__name__)
            broken = 0 if decoder.count > events_before else broken + 1
        if watch.remaining(default=1) > 0:
            return None
        task = yield from self.get(task_id)  # the deadline passed: how the task is now
        if not watch.see(task):
            watch.check(task)
        return task


def raise_for_status(response: httpx.Response) -> None:
    """The SDK's APIError for an error answer: the server's ``error.code``, ``message`` and ``field``."""
    if response.status_code < 400:
        return
    code, message, field = f"http_{response.status_code}", response.reason_phrase, None
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict):
        code = error_code(response) or code
        message = str(error.get("message") or message)
        field = error.get("field")
    retry_after = retry_after_seconds(response.headers.get("Retry-After"))
    raise api_error(response.status_code, code, message, field=field, retry_after=retry_after)


class ListFilters(TypedDict, total=False):
    """What ``list`` may ask of ``GET /v1/tasks`` besides the cursor."""

    status: TaskStatus | str | None  # queued, running, succeeded, failed, canceled
    limit: int | None  # tasks a page: 1–100 (the server's default: 20)
    created_after: datetime | str | None  # a datetime, or ISO 8601 text
    created_before: datetime | str | None
    metadata: Mapping[str, str] | None  # {"order": "42"}: tasks whose metadata.order is "42"


def list_query(
    cursor: str | None,
    *,
    status: TaskStatus | str | None = None,
    limit: int | None = None,
    created_after: datetime | str | None = None,
    created_before: datetime | str | None = None,
    metadata: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The query of ``GET /v1/tasks`` (``metadata={"order": "42"}`` as ``metadata.order=42``)."""
    query: dict[str, Any] = {
        "status": str(status) if status else None,
        "limit": limit,
        "cursor": cursor,
        "created_after": _iso(created_after),
        "created_before": _iso(created_before),
    }
    query.update((f"metadata.{key}", value) for key, value in (metadata or {}).items())
    return query


def _iso(value: datetime | str | None) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value


def _query(params: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The query of ``params`` without its Nones; None when there is none: httpx would replace a URL's
    own query (a presigned URL's) with even an empty one."""
    return {name: value for name, value in params.items() if value is not None} if params else None


def _task_path(task: Task | str, *rest: str) -> str:
    return "/".join(("/v1/tasks", quote(task_id_of(task), safe=""), *rest))


def _event_task(event: Event | None) -> Task | None:
    """The task an event carries, if it carries one (other events are skipped)."""
    if event is None:
        return None
    try:
        value = json.loads(event.data)
        return Task.from_json(value) if isinstance(value, dict) else None
    except (ValueError, KeyError):
        return None
