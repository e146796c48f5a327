"""Scenario ``redis_cost``: what one job costs Redis, from submission to its delivered webhook (issue 13).

The whole stack as processes (``bench_stack``), one generation worker and one webhook worker, a webhook
receiver in this process (``bench.webhook_latency.Receiver``). Redis's own counters are read before and
after (``INFO all``: ``commandstats``, ``total_net_input_bytes``/``total_net_output_bytes``,
``used_memory``, ``aof_current_size``; ``DBSIZE``; the redis-server process's CPU from /proc):

1. **Background**: the stack idle for ``--idle-seconds``, three times: the API alone, then with the
   generation worker, then with the webhook worker too. What each process costs Redis per second with no
   job (sweeper ticks, presence heartbeats, the dispatcher's tick, the broker's BRPOP).
2. **The batch**: N jobs, each with a ``webhook_url``, submitted over HTTP; the measurement ends once the
   receiver has every webhook and the outbox has recorded them. Nothing polls the API meanwhile (the
   receiver says when it is over), so what Redis did is submit + admit + run + succeed + webhook, and the
   background of the batch's duration, which is subtracted (the third idle window's rate).
3. **What a finished task keeps**: the growth of ``used_memory`` and ``DBSIZE`` over the batch, per task
   (every task is final then, its payload still kept for a day), and ``MEMORY USAGE`` of one task's keys.
4. **Calibration** (``--calibrate``, on by default): ``redis-benchmark`` against the same redis-server,
   simple commands, to show what one Redis core does on this machine.

    python -m bench redis_cost [--jobs 1000] [--idle-seconds 10]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import threading
import time
from collections import Counter
from typing import Any

import redis

from bench.common import finish, header, new_data, say
from bench.harness import (
    bench_stack,
    fetch_tasks,
    markdown_table,
    seed_body,
    submit_jobs,
    tree_cpu_seconds,
    wait_for_quiet,
)
from bench.webhook_latency import Receiver, start_webhook_worker
from devstack.processes import HOST, wait_until
from services.webhook_signing import generate_secret

DESCRIPTION = "Redis commands, bytes, CPU and memory per job (submit → webhook) and per idle process"

# our own commands (the snapshots and checks) are left out of the counts
_OURS = {"info", "dbsize"}  # the snapshot itself; the checks come after the second one


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=1000, help="jobs, each with a webhook (1000)")
    parser.add_argument("--latency-ms", type=int, default=1000, help="simulated upstream latency (1000)")
    parser.add_argument("--jitter-ms", type=int, default=500, help="± jitter of that latency (500)")
    parser.add_argument("--concurrency", type=int, default=50, help="generation worker slots (50)")
    parser.add_argument("--webhook-concurrency", type=int, default=20, help="webhook worker slots (20)")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="each background window (10)")
    parser.add_argument("--warmup", type=int, default=20, help="jobs run before measuring (20)")
    parser.add_argument("--quiet-wait", type=float, default=20.0, help="wait for a quiet machine (20 s)")
    parser.add_argument(
        "--monitor-jobs",
        type=int,
        default=200,
        help="then this many more jobs under MONITOR, to count the commands clients send (200; 0: skip)",
    )
    parser.add_argument(
        "--no-calibrate", dest="calibrate", action="store_false", help="skip the redis-benchmark run"
    )
    parser.add_argument("--submit-parallelism", type=int, default=16, help="client threads that POST (16)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir with every component's logs")
    parser.add_argument("--live", action="store_true", help="run the working tree, not a snapshot of it")
    parser.add_argument("--no-write", action="store_true", help="do not write into bench/results/")


def _snapshot(client: redis.Redis, redis_pid: int) -> dict[str, Any]:
    info = client.info("all")
    commands = {
        name.removeprefix("cmdstat_"): {"calls": int(value["calls"]), "usec": int(value["usec"])}
        for name, value in info.items()
        if name.startswith("cmdstat_")
    }
    return {
        "t": time.monotonic(),
        "commands": commands,
        "net_in": int(info["total_net_input_bytes"]),
        "net_out": int(info["total_net_output_bytes"]),
        "used_memory": int(info["used_memory"]),
        "aof_size": int(info.get("aof_current_size", 0)),
        "keys": int(client.dbsize()),
        "cpu_s": tree_cpu_seconds(redis_pid),
    }


def _delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    commands: dict[str, dict[str, int]] = {}
    for name, value in after["commands"].items():
        if name in _OURS:
            continue
        old = before["commands"].get(name, {"calls": 0, "usec": 0})
        calls, usec = value["calls"] - old["calls"], value["usec"] - old["usec"]
        if calls:
            commands[name] = {"calls": calls, "usec": usec}
    return {
        "seconds": after["t"] - before["t"],
        "commands": commands,
        "calls": sum(v["calls"] for v in commands.values()),
        "usec": sum(v["usec"] for v in commands.values()),
        "net_in": after["net_in"] - before["net_in"],
        "net_out": after["net_out"] - before["net_out"],
        "used_memory": after["used_memory"] - before["used_memory"],
        "aof_bytes": after["aof_size"] - before["aof_size"],
        "keys": after["keys"] - before["keys"],
        "cpu_s": after["cpu_s"] - before["cpu_s"],
    }


def _idle(client: redis.Redis, redis_pid: int, seconds: float) -> dict[str, Any]:
    before = _snapshot(client, redis_pid)
    time.sleep(seconds)
    delta = _delta(before, _snapshot(client, redis_pid))
    span = delta["seconds"]
    return {
        "seconds": span,
        "calls_per_s": delta["calls"] / span,
        "net_in_per_s": delta["net_in"] / span,
        "net_out_per_s": delta["net_out"] / span,
        "cpu_ms_per_s": 1000 * delta["cpu_s"] / span,
        "aof_bytes_per_s": delta["aof_bytes"] / span,
        "commands_per_s": {k: v["calls"] / span for k, v in sorted(delta["commands"].items())},
    }


class _Monitor:
    """``MONITOR`` on its own connection: the commands clients send (top level), apart from those that
    scripts run (``client_type`` ``lua``). It slows Redis down, so it runs in a batch of its own."""

    def __init__(self, url: str) -> None:
        self.client = redis.Redis.from_url(url)
        self.top: Counter[str] = Counter()
        self.lua: Counter[str] = Counter()
        self.counting = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="monitor")

    def __enter__(self) -> _Monitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        self.client.close()

    def _run(self) -> None:
        with self.client.monitor() as monitor:
            for entry in monitor.listen():
                if self._stop.is_set():
                    return
                if not self.counting:
                    continue
                name = str(entry.get("command", "")).split(" ", 1)[0].lower()
                (self.lua if entry.get("client_type") == "lua" else self.top)[name] += 1

    def window(self, seconds: float) -> tuple[Counter[str], Counter[str]]:
        """Count for ``seconds`` now (nothing else running): the background."""
        self.counting = True
        time.sleep(seconds)
        self.counting = False
        top, lua = Counter(self.top), Counter(self.lua)
        self.top.clear()
        self.lua.clear()
        return top, lua


def _key_sizes(client: redis.Redis, prefix: str, task_id: str) -> dict[str, int | None]:
    event = f"msg_{task_id}_succeeded"
    keys = {
        "task": f"{prefix}:task:{task_id}",
        "payload (1 d)": f"{prefix}:payload:{task_id}",
        "events": f"{prefix}:events:{task_id}",
        "wh:event": f"{prefix}:wh:event:{event}",
        "wh:state": f"{prefix}:wh:state:{event}",
        "wh:log": f"{prefix}:wh:log:{task_id}",
    }
    return {name: client.memory_usage(key, samples=0) for name, key in keys.items()}


def _monitored_batch(
    stack: Any, receiver: Receiver, body: dict[str, Any], args: argparse.Namespace, done_before: int
) -> dict[str, Any]:
    """``--monitor-jobs`` more jobs under MONITOR: the commands clients send per job (round trips, but
    a pipeline's or a MULTI's commands count one each) and those scripts run, net of the background."""
    jobs = args.monitor_jobs
    with _Monitor(stack.env["REDIS_URL"]) as monitor:
        time.sleep(0.5)
        idle_top, idle_lua = monitor.window(args.idle_seconds)
        idle_s = args.idle_seconds
        monitor.counting = True
        began = time.monotonic()
        submitted = submit_jobs(stack.api_url, [body] * jobs, parallelism=args.submit_parallelism)
        wait_until(lambda: receiver.count() >= done_before + jobs, timeout=300, what="monitored webhooks")
        time.sleep(1.0)
        span = time.monotonic() - began
        monitor.counting = False
        top, lua = Counter(monitor.top), Counter(monitor.lua)
    n = max(1, len(submitted.ids))

    def net(batch: Counter[str], idle: Counter[str]) -> dict[str, float]:
        names = sorted(set(batch) | set(idle), key=lambda k: -batch[k])
        return {k: round((batch[k] - idle[k] * span / idle_s) / n, 2) for k in names}

    return {
        "jobs": n,
        "seconds": span,
        "top_per_job": net(top, idle_top),
        "lua_per_job": net(lua, idle_lua),
        "top_total_per_job": (sum(top.values()) - sum(idle_top.values()) * span / idle_s) / n,
        "lua_total_per_job": (sum(lua.values()) - sum(idle_lua.values()) * span / idle_s) / n,
        "idle_top_per_s": sum(idle_top.values()) / idle_s,
    }


def _calibrate(port: int) -> dict[str, float]:
    """redis-benchmark, 50 clients, simple commands: requests/s of one redis-server on this machine."""
    if shutil.which("redis-benchmark") is None:
        return {}
    out = subprocess.run(
        ["redis-benchmark", "-h", HOST, "-p", str(port), "-c", "50", "-n", "200000", "-q", "--csv",
         "-t", "set,get,lpush,zadd", "-r", "100000"],
        capture_output=True, text=True, timeout=300, check=False,
    ).stdout  # fmt: skip
    rates: dict[str, float] = {}
    for line in out.splitlines()[1:]:
        parts = [p.strip('"') for p in line.split(",")]
        if len(parts) >= 2:
            try:
                rates[parts[0]] = float(parts[1])
            except ValueError:
                pass
    return rates


def run(args: argparse.Namespace) -> int:
    params = {k: v for k, v in vars(args).items() if k != "scenario"}
    data = new_data("redis_cost", params)
    secret = generate_secret()
    receiver = Receiver(secret)
    env = {
        "WEBHOOK_SIGNING_SECRET": secret,
        "WEBHOOK_ALLOW_PRIVATE": "true",
        "WEBHOOK_ALLOW_HTTP": "true",
    }
    body = {**seed_body(), "webhook_url": receiver.url}
    sim_args = ["--latency-ms", str(args.latency_ms), "--latency-jitter-ms", str(args.jitter_ms)]
    sim_args += ["--image-bytes", "0", "--seed", "1"]
    ok = True
    try:
        with bench_stack(sim_args=sim_args, env=env, keep=args.keep, snapshot=not args.live) as stack:
            say("redis_cost", f"stack up in {stack.root}")
            client = redis.Redis.from_url(stack.env["REDIS_URL"])
            prefix = stack.env["KEY_PREFIX"]
            redis_pid = stack.children["redis"].pid
            idle: dict[str, Any] = {}
            time.sleep(1.0)
            idle["api"] = _idle(client, redis_pid, args.idle_seconds)
            stack.start_worker("gen", pool="threads", concurrency=args.concurrency)
            time.sleep(1.0)
            idle["api+generation"] = _idle(client, redis_pid, args.idle_seconds)
            start_webhook_worker(stack, "hooks", args.webhook_concurrency)
            if args.warmup:
                submit_jobs(stack.api_url, [body] * args.warmup, parallelism=args.submit_parallelism)
                wait_until(lambda: receiver.count() >= args.warmup, timeout=120, what="warm-up webhooks")
                time.sleep(2.0)
            idle["api+generation+webhooks"] = _idle(client, redis_pid, args.idle_seconds)
            data["idle"] = idle
            data["busy_before"] = wait_for_quiet(max_wait=args.quiet_wait)

            expected = args.warmup + args.jobs
            before = _snapshot(client, redis_pid)
            submitted = submit_jobs(stack.api_url, [body] * args.jobs, parallelism=args.submit_parallelism)
            say("redis_cost", f"submitted {len(submitted.ids)} in {submitted.seconds:.1f} s")
            timeout = 120 + 10 * args.jobs * args.latency_ms / 1000 / args.concurrency
            wait_until(
                lambda: receiver.count() >= expected, timeout=timeout, what="every webhook", interval=0.2
            )
            time.sleep(1.0)  # the dispatcher records the delivery after the POST's answer
            after = _snapshot(client, redis_pid)
            batch = _delta(before, after)
            data["outbox_due_after"] = client.zcard(f"{prefix}:wh:due")
            data["active_after"] = client.scard(f"{prefix}:active")
            tasks = fetch_tasks(stack.api_url, submitted.ids)
            data["statuses"] = {
                s: sum(1 for t in tasks if t["status"] == s) for s in {t["status"] for t in tasks}
            }
            data["webhooks_received"] = receiver.count() - args.warmup
            data["submit_errors"] = submitted.errors[:10]
            data["key_sizes"] = _key_sizes(client, prefix, submitted.ids[0]) if submitted.ids else {}
            if args.monitor_jobs:
                data["monitor"] = _monitored_batch(stack, receiver, body, args, expected)
            data["calibration"] = (
                _calibrate(client.connection_pool.connection_kwargs["port"]) if args.calibrate else {}
            )
            client.close()
    finally:
        receiver.stop()

    n = max(1, len(submitted.ids))
    background = idle["api+generation+webhooks"]
    span = batch["seconds"]
    per_job = {
        "calls": batch["calls"] / n,
        "calls_net": (batch["calls"] - background["calls_per_s"] * span) / n,
        "script_usec": batch["commands"].get("evalsha", {}).get("usec", 0) / n,
        "scripts": batch["commands"].get("evalsha", {}).get("calls", 0) / n,
        "net_in": batch["net_in"] / n,
        "net_in_net": (batch["net_in"] - background["net_in_per_s"] * span) / n,
        "net_out": batch["net_out"] / n,
        "net_out_net": (batch["net_out"] - background["net_out_per_s"] * span) / n,
        "cpu_ms": 1000 * batch["cpu_s"] / n,
        "cpu_ms_net": (1000 * batch["cpu_s"] - background["cpu_ms_per_s"] * span) / n,
        "aof_bytes": batch["aof_bytes"] / n,
        "kept_memory": batch["used_memory"] / n,
        "kept_keys": batch["keys"] / n,
    }
    per_job["jobs_per_core_s"] = 1000 / per_job["cpu_ms_net"] if per_job["cpu_ms_net"] > 0 else None
    data["batch"] = batch
    data["per_job"] = per_job
    data["by_command"] = {
        name: {"calls_per_job": v["calls"] / n, "usec_per_call": v["usec"] / v["calls"]}
        for name, v in sorted(batch["commands"].items(), key=lambda item: -item[1]["calls"])
    }
    ok = (
        data["statuses"].get("succeeded") == args.jobs
        and data["webhooks_received"] == args.jobs
        and data["outbox_due_after"] == 0
        and not submitted.errors
    )
    data["ok"] = ok
    finish(data, render, args)
    return 0 if ok else 1


def render(data: dict[str, Any]) -> str:
    p, j, b = data["params"], data["per_job"], data["batch"]
    lines = header(data, "Redis cost per job: submit → admit → run → succeed → webhook")
    lines += [
        f"{p['jobs']} jobs with a webhook each, smallest images, simulator {p['latency_ms']} ± "
        f"{p['jitter_ms']} ms, one generation worker ({p['concurrency']} threads), one webhook worker "
        f"({p['webhook_concurrency']}), "
        f"API gunicorn 2 × 8 threads. Batch {b['seconds']:.1f} s; statuses {data['statuses']}; webhooks "
        f"received {data['webhooks_received']}; outbox due after {data['outbox_due_after']}; "
        f"machine busy before {data['busy_before']:.0%}.",
        "",
        "Per job (raw = everything Redis did during the batch / N; net = minus the idle background of the "
        "batch's duration):",
        "",
        markdown_table(
            ["figure", "raw", "net of background"],
            [
                [
                    "commands executed (sent by clients and run by scripts)",
                    round(j["calls"], 1),
                    round(j["calls_net"], 1),
                ],
                ["of which scripts (EVALSHA)", round(j["scripts"], 2), "–"],
                ["time in scripts, µs (commandstats; includes their commands)", round(j["script_usec"]), "–"],
                ["redis-server CPU ms (/proc)", round(j["cpu_ms"], 3), round(j["cpu_ms_net"], 3)],
                ["network in, bytes", round(j["net_in"]), round(j["net_in_net"])],
                ["network out, bytes", round(j["net_out"]), round(j["net_out_net"])],
                ["AOF growth, bytes", round(j["aof_bytes"]), "–"],
                ["memory kept after the batch, bytes (payload still kept 1 d)", round(j["kept_memory"]), "–"],
                ["keys kept", round(j["kept_keys"], 2), "–"],
                ["jobs/s one Redis core would take (1000 / net CPU ms)", "–", fmt0(j["jobs_per_core_s"])],
            ],
        ),
        "",
        "By command (per job, during the batch, background included):",
        "",
        markdown_table(
            ["command", "calls per job", "µs per call"],
            [
                [k, round(v["calls_per_job"], 2), round(v["usec_per_call"], 2)]
                for k, v in data["by_command"].items()
            ],
        ),
        "",
        "Background, idle (per second):",
        "",
        markdown_table(
            ["processes up", "commands/s", "net in B/s", "net out B/s", "redis CPU ms/s", "AOF B/s"],
            [
                [
                    name,
                    round(v["calls_per_s"], 1),
                    round(v["net_in_per_s"]),
                    round(v["net_out_per_s"]),
                    round(v["cpu_ms_per_s"], 2),
                    round(v["aof_bytes_per_s"]),
                ]
                for name, v in data["idle"].items()
            ],
        ),
        "",
        "`MEMORY USAGE` of one finished task's keys (bytes): "
        + ", ".join(f"{k} {v}" for k, v in data["key_sizes"].items()),
        "",
    ]
    if data.get("monitor"):
        mon = data["monitor"]
        lines += [
            f"Under MONITOR ({mon['jobs']} more jobs, {mon['seconds']:.1f} s; net of the background, "
            f"{mon['idle_top_per_s']:.1f} commands/s sent when idle): per job, "
            f"**{mon['top_total_per_job']:.1f} commands sent by clients** (a pipeline's or a transaction's "
            f"commands count one each) and {mon['lua_total_per_job']:.1f} run by scripts.",
            "",
            markdown_table(
                ["command", "sent by clients, per job", "run by scripts, per job"],
                [
                    [k, v, mon["lua_per_job"].get(k, 0.0)]
                    for k, v in mon["top_per_job"].items()
                    if abs(v) >= 0.05 or abs(mon["lua_per_job"].get(k, 0.0)) >= 0.05
                ]
                + [
                    [k, 0.0, v]
                    for k, v in mon["lua_per_job"].items()
                    if k not in mon["top_per_job"] and abs(v) >= 0.05
                ],
            ),
            "",
        ]
    if data.get("calibration"):
        lines += [
            "redis-benchmark on the same redis-server (50 clients, requests/s): "
            + ", ".join(f"{k} {v:,.0f}" for k, v in data["calibration"].items()),
            "",
        ]
    return "\n".join(lines)


def fmt0(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}"
