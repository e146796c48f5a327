"""Scenario ``waiters``: how many waiting requests and open event streams one API process holds.

``Prefer: wait`` and ``GET /v1/tasks/{id}/events`` keep a request open for up to a minute (a stream: for
the task's whole life). Under gunicorn's thread workers each open request holds a thread; under its gevent
workers (the Docker image's choice) a greenlet, and the process's one subscription to the task events
wakes them (``services/task_events.py``). For each server model in ``--servers``:

1. a stack with ONE API process and no generation worker yet, so that every task stays queued;
2. submit ``--waiters`` + ``--streams`` tasks; open one ``GET /v1/tasks/{id}`` with ``Prefer: wait=60``
   per waiter task and one ``GET /v1/tasks/{id}/events`` per stream task, each on its own connection
   (asyncio, raw HTTP/1.1, from this process);
3. once the API process holds them all (its open sockets, and every stream's first event), hold for
   ``--hold`` seconds, sampling the process's RSS, threads, open files and CPU, while a probe sends plain
   ``GET /v1/tasks/{id}`` one after another and times them: does the API still answer?
4. start a worker (threads, 100) so that the tasks run (simulator latency ``--latency-ms``): every waiter
   must get its final task (200; one that runs past its 60 s asks again) and every stream events 1, 2, 3
   and its end. Delivery latency = the client received it − the task's ``finished_at`` (one clock);
5. the process's sockets and memory afterwards.

``gthread`` runs as the contrast at a small size (``--gthread-waiters``, 2 × its 8 threads, waiting
``--gthread-wait`` s): its probe GETs wait for a free thread.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import add_common_arguments, finish, header, new_data, say
from bench.harness import (
    FINAL,
    BenchStack,
    ProcessSampler,
    bench_stack,
    fmt,
    markdown_table,
    parse_time,
    percentile,
    proc_stat,
    proc_status_kb,
    process_tree,
    seed_body,
    submit_jobs,
    wait_for_quiet,
)
from devstack.processes import HOST, wait_until

DESCRIPTION = "waiting requests and event streams held by one API process: memory, threads, a GET meanwhile"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--waiters", type=int, default=1000, help="requests with Prefer: wait=60 (1000)")
    parser.add_argument("--streams", type=int, default=1000, help="open event streams (1000)")
    parser.add_argument("--hold", type=float, default=20, help="seconds to hold them all (20)")
    parser.add_argument("--heartbeat", type=float, default=15, help="EVENTS_HEARTBEAT_SECONDS (15)")
    parser.add_argument("--latency-ms", type=float, default=500, help="simulator latency, ms (500)")
    parser.add_argument("--probes", type=int, default=200, help="plain GETs during the hold (200)")
    parser.add_argument("--servers", default="gevent,gthread", help="server models (gevent,gthread)")
    parser.add_argument("--gthread-waiters", type=int, default=16, help="waiters in the gthread run (16)")
    parser.add_argument("--gthread-wait", type=int, default=10, help="their Prefer: wait, s (10)")
    add_common_arguments(parser, quiet_wait=10)


# --------------------------------------------------------------------------------------------------
# a raw HTTP/1.1 client: thousands of open requests cost this process little
# --------------------------------------------------------------------------------------------------


async def _head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        if name:
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ", 2)[1]), headers


async def _chunks(reader: asyncio.StreamReader, headers: dict[str, str]) -> Any:
    """The body's pieces as they arrive (chunked, or one piece of Content-Length, or to the end)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        yield await reader.read()


async def _open(port: int, path: str, extra: dict[str, str]) -> tuple[Any, Any]:
    reader, writer = await asyncio.open_connection(HOST, port)
    lines = [f"GET {path} HTTP/1.1", f"Host: {HOST}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in extra.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    await writer.drain()
    return reader, writer


async def get(port: int, path: str, extra: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await _open(port, path, extra or {})
    try:
        status, headers = await _head(reader)
        body = b"".join([piece async for piece in _chunks(reader, headers)])
        return status, headers, body
    finally:
        writer.close()


@dataclass
class Waiter:
    task_id: str
    asks: int = 0  # requests made: more than one when a wait of 60 s ended before the task did
    status: int | None = None
    task: dict[str, Any] | None = None
    received: float | None = None
    error: str | None = None


@dataclass
class Stream:
    task_id: str
    events: list[tuple[str, str, float]] = field(default_factory=list)  # (id, event, received)
    heartbeats: int = 0
    final_task: dict[str, Any] | None = None
    ended: float | None = None
    error: str | None = None
    opened: asyncio.Event = field(default_factory=asyncio.Event)


async def run_waiter(port: int, waiter: Waiter, wait: int, *, again: bool) -> None:
    """Wait for the task; with ``again``, ask again while a wait ends before the task does."""
    try:
        while True:
            waiter.asks += 1
            status, headers, body = await get(port, f"/v1/tasks/{waiter.task_id}", {"Prefer": f"wait={wait}"})
            waiter.status, waiter.received = status, time.time()
            waiter.task = json.loads(body)
            if not again or status != 200 or waiter.task["status"] in FINAL:
                return
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        waiter.error = f"{type(exc).__name__}: {exc}"


async def run_stream(port: int, stream: Stream) -> None:
    try:
        reader, writer = await _open(port, f"/v1/tasks/{stream.task_id}/events", {})
        try:
            status, headers = await _head(reader)
            if status != 200:
                stream.error = f"HTTP {status}"
                return
            text = ""
            async for piece in _chunks(reader, headers):
                text += piece.decode()
                while "\n\n" in text:
                    message, text = text.split("\n\n", 1)
                    _message(stream, message)
            stream.ended = time.time()
        finally:
            writer.close()
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        stream.error = f"{type(exc).__name__}: {exc}"
    finally:
        stream.opened.set()


def _message(stream: Stream, message: str) -> None:
    fields = dict(line.split(": ", 1) for line in message.splitlines() if not line.startswith(":"))
    if not fields:
        stream.heartbeats += 1
        return
    stream.events.append((fields["id"], fields["event"], time.time()))
    stream.opened.set()
    if fields["event"] in FINAL:
        stream.final_task = json.loads(fields["data"])


# --------------------------------------------------------------------------------------------------
# the API process
# --------------------------------------------------------------------------------------------------


def api_worker_pid(stack: BenchStack) -> int:
    master = stack.children["api"].pid
    workers = [pid for pid in process_tree(master) if pid != master]
    assert len(workers) == 1, f"one API process expected, found {workers}"
    return workers[0]


def process_state(pid: int) -> dict[str, Any]:
    stat = proc_stat(pid)
    return {
        "rss_mb": (proc_status_kb(pid, "VmRSS") or 0) / 1024,
        "threads": proc_status_kb_plain(pid, "Threads"),
        "open_files": len(os.listdir(f"/proc/{pid}/fd")),
        "cpu_s": stat.cpu_s if stat else None,
    }


def connections(port: int) -> int:
    """Established TCP connections the server side of ``port`` holds (/proc/net/tcp: local port, state 01)."""
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
            count += 1
    return count


def proc_status_kb_plain(pid: int, key: str) -> int | None:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return None


async def probe(port: int, task_id: str, count: int, *, timeout: float, spacing: float = 0.05) -> list[float]:
    """``count`` plain GETs of a task, one after another: their latencies (ms); a timeout counts as it."""
    latencies = []
    for _ in range(count):
        began = time.monotonic()
        try:
            status, _, _ = await asyncio.wait_for(get(port, f"/v1/tasks/{task_id}"), timeout)
            assert status == 200, status
        except TimeoutError:
            pass
        latencies.append((time.monotonic() - began) * 1000)
        await asyncio.sleep(spacing)
    return latencies


# --------------------------------------------------------------------------------------------------
# one server model
# --------------------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, server: str) -> dict[str, Any]:
    gevent = server == "gevent"
    waiters = args.waiters if gevent else args.gthread_waiters
    streams = args.streams if gevent else 0
    wait = 60 if gevent else args.gthread_wait
    with bench_stack(
        sim_args=["--latency-ms", str(args.latency_ms)],
        env={"EVENTS_HEARTBEAT_SECONDS": str(args.heartbeat)},
        keep=args.keep,
        snapshot=not args.live,
        api_workers=1,
        api_threads=8,
        api_worker_class=server,
        api_worker_connections=waiters + streams + 1000,
    ) as stack:
        port = int(stack.api_url.rsplit(":", 1)[1])
        pid = api_worker_pid(stack)
        submitted = submit_jobs(stack.api_url, [seed_body()] * (waiters + streams + 1), parallelism=16)
        assert not submitted.errors, submitted.errors[:3]
        probe_task, *ids = submitted.ids
        asyncio.run(get(port, f"/v1/tasks/{probe_task}"))  # warm
        before = process_state(pid)
        say("waiters", f"{server}: API process {pid} idle: {before}")
        result = asyncio.run(_hold_and_finish(stack, args, server, pid, port, probe_task, ids, waiters, wait))
        result.update(server=server, waiters=waiters, streams=streams, wait_s=wait, before=before)
        return result


async def _hold_and_finish(
    stack: BenchStack,
    args: argparse.Namespace,
    server: str,
    pid: int,
    port: int,
    probe_task: str,
    ids: list[str],
    n_waiters: int,
    wait: int,
) -> dict[str, Any]:
    waiters = [Waiter(task_id) for task_id in ids[:n_waiters]]
    streams = [Stream(task_id) for task_id in ids[n_waiters:]]
    base_files = process_state(pid)["open_files"]
    began = time.monotonic()
    tasks = []
    for index, client in enumerate([*waiters, *streams]):  # in batches, within the listen backlog
        tasks.append(
            asyncio.create_task(
                run_waiter(port, client, wait, again=server == "gevent")
                if isinstance(client, Waiter)
                else run_stream(port, client)
            )
        )
        if index % 200 == 199:
            await asyncio.sleep(0.05)
    expected = len(waiters) + len(streams)
    await _until(lambda: connections(port) >= expected, 60, "the API to hold all")
    await asyncio.wait_for(asyncio.gather(*(stream.opened.wait() for stream in streams)), 60)
    opened_s = time.monotonic() - began
    say("waiters", f"{server}: {expected} open requests held after {opened_s:.1f}s")

    busy = wait_for_quiet(max_wait=args.quiet_wait) if args.quiet_wait > 0 else None
    with ProcessSampler(pid, interval=0.2) as sampler:
        cpu0, t0 = process_state(pid)["cpu_s"], time.monotonic()
        probes = await probe(port, probe_task, args.probes if server == "gevent" else 5, timeout=60)
        remaining = args.hold - (time.monotonic() - t0)
        if remaining > 0:
            await asyncio.sleep(remaining)
        held = process_state(pid)
        held_connections = connections(port)
        hold_s = time.monotonic() - t0
        hold_cpu = (held["cpu_s"] or 0) - (cpu0 or 0)
    say("waiters", f"{server}: held {hold_s:.1f}s: {held}; probe p50 {percentile(probes, 50):.1f} ms")

    finished: dict[str, Any] = {}
    if server == "gevent":
        loop = asyncio.get_running_loop()
        worker_began = time.monotonic()
        await loop.run_in_executor(None, lambda: stack.start_worker("w0", pool="threads", concurrency=100))
        await asyncio.wait_for(asyncio.gather(*tasks), 300)
        finished = _delivery(waiters, streams)
        finished["run_s"] = time.monotonic() - worker_began
        stack.stop_worker("w0")
    else:
        await asyncio.wait_for(asyncio.gather(*tasks), wait * 3 + 30)
    await _until(lambda: connections(port) == 0, 30, "the API's connections to close")
    after = process_state(pid)
    errors = [client.error for client in [*waiters, *streams] if client.error]
    return {
        "opened_s": opened_s,
        "connections_held": held_connections,
        "busy_before_hold": busy,
        "held": held,
        "hold_s": hold_s,
        "hold_cpu_s": hold_cpu,
        "peak_rss_mb": sampler.peak_rss_mb,
        "peak_pss_mb": sampler.peak_pss_mb,
        "open_files_base": base_files,
        "probe_ms": {
            "n": len(probes),
            "first": probes[0],
            "p50": percentile(probes, 50),
            "p99": percentile(probes, 99),
            "max": max(probes),
        },
        "delivery": finished,
        "after": after,
        "errors": len(errors),
        "error_examples": errors[:5],
        "heartbeats": sum(stream.heartbeats for stream in streams),
    }


def _delivery(waiters: list[Waiter], streams: list[Stream]) -> dict[str, Any]:
    """Every client got the final task? And how long after its ``finished_at``."""
    waiter_ms = [
        (waiter.received - parse_time(waiter.task["finished_at"])) * 1000
        for waiter in waiters
        if waiter.status == 200 and waiter.task and waiter.task["status"] in FINAL and waiter.received
    ]
    stream_ms = [
        (stream.events[-1][2] - parse_time(stream.final_task["finished_at"])) * 1000
        for stream in streams
        if stream.final_task is not None
    ]
    complete = [
        stream
        for stream in streams
        if [(event_id, name) for event_id, name, _ in stream.events]
        == [("1", "queued"), ("2", "running"), ("3", "succeeded")]
        and stream.ended is not None
    ]
    return {
        "waiters_final": len(waiter_ms),
        "waiters_asked_again": sum(waiter.asks > 1 for waiter in waiters),
        "waiter_ms": _spread(waiter_ms),
        "streams_complete": len(complete),
        "stream_ms": _spread(stream_ms),
    }


def _spread(values: list[float]) -> dict[str, float | None]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values, default=None)}


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, lambda: wait_until(predicate, timeout=timeout, what=what, interval=0.2))


# --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    params = {k: getattr(args, k) for k in vars(args) if k not in ("no_write", "keep", "profile")}
    data = new_data("waiters", params)
    data["runs"] = [measure(args, server.strip()) for server in args.servers.split(",") if server.strip()]
    finish(data, render, args)
    return 0 if all(run["errors"] == 0 for run in data["runs"]) else 1


def render(data: dict[str, Any]) -> str:
    p = data["params"]
    out = header(data, "Waiting requests and event streams in one API process (`python -m bench waiters`)")
    out += [
        f"One gunicorn worker process; tasks queued (no generation worker) while the requests are held "
        f"{p['hold']:g} s; heartbeat every {p['heartbeat']:g} s; then one worker (threads, 100) runs them at "
        f"{p['latency_ms']:g} ms simulated latency.",
        "",
        markdown_table(
            [
                "server",
                "waiting (Prefer: wait)",
                "streams",
                "RSS idle MB",
                "RSS held MB",
                "KB per open request",
                "threads idle / held",
                "API CPU while held",
                "plain GET first / p50 / p99 / max ms",
                "errors",
            ],
            [
                [
                    r["server"],
                    r["waiters"],
                    r["streams"],
                    fmt(r["before"]["rss_mb"], 1),
                    fmt(r["peak_rss_mb"], 1),
                    fmt(1024 * (r["peak_rss_mb"] - r["before"]["rss_mb"]) / (r["waiters"] + r["streams"]), 0),
                    f"{r['before']['threads']} / {r['held']['threads']}",
                    f"{100 * r['hold_cpu_s'] / max(r['hold_s'], 1e-9):.1f} %",
                    " / ".join(fmt(r["probe_ms"][k], 1) for k in ("first", "p50", "p99", "max")),
                    r["errors"],
                ]
                for r in data["runs"]
            ],
        ),  # fmt: skip
        "",
    ]
    for r in data["runs"]:
        d = r["delivery"]
        if not d:
            continue
        out += [
            f"**{r['server']}, once the tasks ran** ({fmt(d['run_s'], 1)} s): {d['waiters_final']} of "
            f"{r['waiters']} waiters got their final task ({d['waiters_asked_again']} asked again after a "
            f"60 s wait), {fmt(d['waiter_ms']['p50'], 1)} / {fmt(d['waiter_ms']['p99'], 1)} / "
            f"{fmt(d['waiter_ms']['max'], 1)} ms (p50 / p99 / max) after the task's `finished_at`; "
            f"{d['streams_complete']} of {r['streams']} streams got events 1, 2, 3 and their end, the final "
            f"one {fmt(d['stream_ms']['p50'], 1)} / {fmt(d['stream_ms']['p99'], 1)} / "
            f"{fmt(d['stream_ms']['max'], 1)} ms after it. Afterwards: no connection left open, "
            f"{r['after']['open_files']} open files (idle: {r['open_files_base']}; the rest: Redis "
            f"connections the pool keeps), RSS {fmt(r['after']['rss_mb'], 1)} MB.",
            "",
        ]
    return "\n".join(out)
