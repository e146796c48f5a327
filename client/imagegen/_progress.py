"""The CLI's live progress line while it waits for a task: status, queue position (when the server
shows one), attempt, elapsed time. A spinner redrawn in place on a terminal; elsewhere one plain line per
change."""

from __future__ import annotations

import time
from collections.abc import Callable
from types import TracebackType

from rich.console import Console, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.text import Text

from imagegen.models import Task, TaskStatus

_STYLES = {
    TaskStatus.QUEUED: "yellow",
    TaskStatus.RUNNING: "cyan",
    TaskStatus.SUCCEEDED: "green",
    TaskStatus.FAILED: "red",
    TaskStatus.CANCELED: "magenta",
}


def describe(task: Task, elapsed: float) -> Text:
    """``queued · position 3 · 0.8s``, ``running · attempt 1 · 2.4s``, ``failed · no_image · 1.2s``."""
    words = [Text(task.status.value, style=_STYLES[task.status])]
    if task.status is TaskStatus.QUEUED and task.queue_position is not None:
        # 0: handed to the workers; n: n - 1 of the tenant's tasks wait ahead of it
        words.append(Text(f"position {task.queue_position}" if task.queue_position else "up next"))
    if task.status is TaskStatus.RUNNING and task.attempts:
        words.append(Text(f"attempt {task.attempts[-1].number}"))
    if task.status is TaskStatus.SUCCEEDED:
        words.append(Text(f"{len(task.outputs)} image{'s' if len(task.outputs) != 1 else ''}"))
    if task.error is not None:
        words.append(Text(task.error.code, style="bold"))
    words.append(Text(f"{elapsed:.1f}s"))
    return Text(" · ").join(words)


class Progress:
    """``with Progress(console) as progress: client.wait(task, on_update=progress.update)``."""

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic) -> None:
        self._console = console
        self._clock = clock
        self._started = clock()
        self._task: Task | None = None
        self._spinner = Spinner("dots")
        self._live = Live(self, console=console, refresh_per_second=8) if console.is_terminal else None

    def update(self, task: Task) -> None:
        self._task = task
        if self._live is not None:
            self._live.refresh()  # every status is drawn at least once, however short
        else:
            self._console.print(describe(task, self._clock() - self._started), highlight=False)

    def __rich__(self) -> RenderableType:
        if self._task is None:
            return Text("submitting")
        line = describe(self._task, self._clock() - self._started)
        if self._task.done:
            return Text.assemble(("✓ " if self._task.succeeded else "✗ "), line)
        self._spinner.update(text=line)
        return self._spinner

    def __enter__(self) -> Progress:
        if self._live is not None:
            self._live.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self._live is not None:
            self._live.stop()
