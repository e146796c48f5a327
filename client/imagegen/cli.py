"""The ``imagegen`` command: the SDK's operations from a shell.

    imagegen generate "a red fox" --ratio 16:9 --size 2K --out DIR    wait (live progress), save, print paths
    imagegen generate "a red fox" --no-wait                            print the task's id
    imagegen submit body.json | status ID | wait ID | download ID --out DIR | list [--status S] | cancel ID

``--json`` on each prints JSON on stdout for scripts (and no progress display); ``--url`` and ``--api-key``
override ``IMAGEGEN_URL`` and ``IMAGEGEN_API_KEY``. Errors go to stderr with their code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console

from imagegen._client import Client
from imagegen._operations import DEFAULT_URL
from imagegen._progress import Progress
from imagegen.errors import (
    APIConnectionError,
    APIError,
    ImagegenError,
    TaskFailedError,
    WaitTimeoutError,
)
from imagegen.models import Task, TaskStatus

OK, TASK_FAILED, USAGE, API_FAILED, TIMED_OUT, INTERRUPTED = 0, 1, 2, 3, 4, 130
_EXIT_CODES = """exit codes:
  0  done (the task succeeded, where the command waits for it)
  1  the task failed or was canceled: its error code on stderr
  2  the command line or an input file is wrong
  3  the server refused the request (its error code on stderr) or could not be reached
  4  --timeout passed before the task was final"""


def build_parser() -> argparse.ArgumentParser:
    # The common options work before and after the command: they default to SUPPRESS (in the parser and
    # in the command's, which share these actions), so that the command's do not overwrite what was given
    # before it; ``main`` fills in what was given nowhere.
    common = argparse.ArgumentParser(add_help=False)
    suppress = argparse.SUPPRESS
    common.add_argument("--url", default=suppress, help=f"the server [$IMAGEGEN_URL, else {DEFAULT_URL}]")
    common.add_argument("--api-key", default=suppress, help="the API key [$IMAGEGEN_API_KEY]")
    common.add_argument("--json", action="store_true", default=suppress, help="print JSON, for scripts")
    parser = argparse.ArgumentParser(
        prog="imagegen",
        description="Generate images with an imagegen-queue server.",
        parents=[common],
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, run: Callable[[Client, argparse.Namespace], int], help_text: str) -> Any:
        sub = commands.add_parser(name, parents=[common], help=help_text, description=help_text)
        sub.set_defaults(run=run)
        return sub

    generate = command("generate", _generate, "submit a prompt, wait for it, save its images")
    generate.add_argument("prompt")
    generate.add_argument("--ratio", default="1:1", help="aspect ratio: 1:1 (default), 16:9, 9:16, 4:3, …")
    generate.add_argument("--size", default="1K", help="1K (default), 2K or 4K")
    generate.add_argument("--model", help="the model (default: the SDK's)")
    generate.add_argument(
        "--image", action="append", default=[], type=Path, help="an input image (again for more)"
    )
    generate.add_argument("--out", type=Path, default=Path("."), help="where to save the images (default: .)")
    generate.add_argument("--no-wait", action="store_true", help="print the task's id and return at once")
    generate.add_argument("--timeout", type=float, help="stop waiting after this many seconds")

    submit = command("submit", _submit, "submit a request body of your own (a JSON file, - for stdin)")
    submit.add_argument("body", help="the JSON body's file, or - for standard input")

    command("status", _status, "show a task").add_argument("id")
    wait = command("wait", _wait, "wait until a task is final")
    wait.add_argument("id")
    wait.add_argument("--timeout", type=float, help="stop waiting after this many seconds")
    download = command("download", _download, "save a succeeded task's images")
    download.add_argument("id")
    download.add_argument("--out", type=Path, default=Path("."), help="where to save them (default: .)")
    listing = command("list", _list, "list your tasks, newest first")
    listing.add_argument("--status", choices=[status.value for status in TaskStatus])
    listing.add_argument("--limit", type=int, default=20, help="tasks on the page, at most 100 (default: 20)")
    listing.add_argument("--cursor", help="the next page: the cursor printed after the last one")
    command("cancel", _cancel, "cancel a queued or running task").add_argument("id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, default in (("url", None), ("api_key", None), ("json", False)):
        setattr(args, name, getattr(args, name, default))
    client = Client(args.url, args.api_key)
    try:
        code: int = args.run(client, args)
        return code
    except TaskFailedError as exc:
        _fail(f"task {exc.task.id} {exc.task.status}: {_error_text(exc.task)}")
        return TASK_FAILED
    except WaitTimeoutError as exc:
        _fail(f"{exc} (imagegen wait {exc.task.id} to go on waiting)")
        return TIMED_OUT
    except APIError as exc:
        _fail(f"{exc.code} (HTTP {exc.status}): {exc.message}" + (f" [{exc.field}]" if exc.field else ""))
        return API_FAILED
    except APIConnectionError as exc:
        _fail(f"connection_failed: {exc}")
        return API_FAILED
    except (ImagegenError, OSError, ValueError) as exc:  # an input image or body file
        _fail(str(exc))
        return USAGE
    except KeyboardInterrupt:
        _fail("interrupted")
        return INTERRUPTED
    finally:
        client.close()


# the commands -----------------------------------------------------------------------------------------


def _generate(client: Client, args: argparse.Namespace) -> int:
    options: dict[str, Any] = {"aspect_ratio": args.ratio, "image_size": args.size, "images": args.image}
    if args.model:
        options["model"] = args.model
    task = client.generate(args.prompt, **options)
    if args.no_wait:
        _print(args, task, task.id)
        return OK
    return _finish(client, args, _follow(client, args, task), out=args.out)


def _submit(client: Client, args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.body == "-" else Path(args.body).read_text()
    task = client.submit(json.loads(text))
    _print(args, task, task.id)
    return OK


def _status(client: Client, args: argparse.Namespace) -> int:
    task = client.get(args.id)
    _print(args, task, _summary(task))
    return OK


def _wait(client: Client, args: argparse.Namespace) -> int:
    return _finish(client, args, _follow(client, args, args.id))


def _download(client: Client, args: argparse.Namespace) -> int:
    return _finish(client, args, client.get(args.id), out=args.out)


def _list(client: Client, args: argparse.Namespace) -> int:
    page = next(client.list(status=args.status, limit=args.limit, cursor=args.cursor))
    if args.json:
        print(json.dumps({"data": [task.raw for task in page], "next_cursor": page.next_cursor}, indent=2))
        return OK
    for task in page:
        created = task.created_at.isoformat(timespec="seconds") if task.created_at else "-"
        print(f"{task.id}  {task.status.value:<9}  {created}  {task.model or '-'}")
    if page.next_cursor:
        print(f"more: imagegen list --cursor {page.next_cursor}", file=sys.stderr)
    return OK


def _cancel(client: Client, args: argparse.Namespace) -> int:
    task = client.cancel(args.id)
    _print(args, task, f"{task.id} {task.status.value}")
    return OK


# shared by the commands -------------------------------------------------------------------------------


def _follow(client: Client, args: argparse.Namespace, task: Task | str) -> Task:
    """Wait for the task, with the live progress display on stderr unless ``--json``."""
    if args.json:
        return client.wait(task, timeout=args.timeout)
    with Progress(Console(stderr=True, highlight=False)) as progress:
        return client.wait(task, timeout=args.timeout, on_update=progress.update)


def _finish(client: Client, args: argparse.Namespace, task: Task, *, out: Path | None = None) -> int:
    """Print a final task (saving its images into ``out``); TASK_FAILED unless it succeeded."""
    paths = client.download(task, out) if out is not None and task.succeeded else []
    if args.json:
        print(json.dumps({**task.raw, **({"files": [str(path) for path in paths]} if out else {})}, indent=2))
    elif out is not None:
        for path in paths:
            print(path)
    else:
        print(_summary(task))
    if not task.succeeded:
        reason = _error_text(task) if task.done else f"not final yet (imagegen wait {task.id})"
        _fail(f"task {task.id} {task.status.value}: {reason}")
        return TASK_FAILED
    return OK


def _print(args: argparse.Namespace, task: Task, text: str) -> None:
    print(json.dumps(task.raw, indent=2) if args.json else text)


def _summary(task: Task) -> str:
    rows = [("id", task.id), ("status", task.status.value), ("model", task.model or "-")]
    if task.created_at:
        rows.append(("created", task.created_at.isoformat(timespec="seconds")))
    if task.queue_position is not None:
        rows.append(("position", str(task.queue_position)))
    if task.attempts:
        rows.append(("attempts", str(len(task.attempts))))
    for output in task.outputs:
        size = f" {output.width}x{output.height}" if output.width and output.height else ""
        rows.append((f"output {output.index}", f"{output.mime_type}{size} {output.bytes} bytes"))
    if task.error is not None:
        rows.append(("error", _error_text(task)))
    return "\n".join(f"{name:<10}{value}" for name, value in rows)


def _error_text(task: Task) -> str:
    return f"{task.error.code}: {task.error.message}" if task.error else task.status.value


def _fail(message: str) -> None:
    print(f"imagegen: {message}", file=sys.stderr)
