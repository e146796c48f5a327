"""Scenario ``redis_client``: the client's CPU per Redis call, with hiredis and with redis-py's own parser.

Every process of the service talks to Redis through redis-py, a round trip per store operation: the API
one or two per submission, a worker about twenty per job (``redis_cost``). What a call costs the caller's
CPU, apart from Redis's own work and the wait, is measured here for three calls of the service itself:

- ``PING``: redis-py's fixed cost of a call (the pool, the command's packing, the reply's parsing);
- ``JobStore.create``: the API's whole write of one submission (the create script, ~40 keys and
  arguments, the broker message, and the Python that builds them: ``services/store.py``);
- ``JobStore.renew_leases`` of 500: a worker's batched renewal (``services/leases.py``), a big command
  and a reply of 500 items.

Each variant runs in a child process of its own, CPU time (``time.process_time``) per call over
``--calls`` calls, the best of ``--repeats``; the variants alternate ``--rounds`` times. ``python``
hides hiredis from redis-py (``sys.modules["hiredis"] = None``), which then packs and parses in Python
as it does where hiredis is not installed. The client is the service's own (``redis_client``: the
blocking pool, the health checks). One Redis, started on a free port, serves every child.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import finish, header, new_data, say
from bench.harness import ROOT, fmt, markdown_table, median
from devstack.processes import HOST, free_port, start_redis

DESCRIPTION = "the client's CPU per Redis call (PING, a submission's create, 500 renewals): hiredis or not"

VARIANTS = ("hiredis", "python")
CALLS = ("ping", "create", "renew_500")

# run by each child: python -c CHILD <redis url> <variant> <calls> <renewals> <repeats>
CHILD = r"""
import json, sys, time, timeit
url, variant = sys.argv[1], sys.argv[2]
calls, renewals, repeats = (int(arg) for arg in sys.argv[3:6])
if variant == "python":
    sys.modules["hiredis"] = None
from redis.utils import HIREDIS_AVAILABLE
from services.config import load_config
from services.redis_connection import redis_client
from services.queue import generation_message
from services.store import JobStore, Lease

config = load_config({"REDIS_URL": url})
client = redis_client(config)
store = JobStore(client, "bench-redis-client")
payload = b'{"contents": [{"parts": [{"text": "a small red bicycle"}]}]}' * 10
leases = [Lease(task_id=f"t{n}", token="x", attempt=1, seconds=60) for n in range(500)]

def create():
    store.create(model="gemini-2.5-flash-image", payload=payload, metadata=None, message=generation_message)

def renew():
    store.renew_leases(leases)

out = {"hiredis": HIREDIS_AVAILABLE}
measured = [("ping", client.ping, calls), ("create", create, calls), ("renew_500", renew, renewals)]
for name, call, n in measured:
    for _ in range(max(10, n // 10)):
        call()
    best = min(timeit.Timer(call, timer=time.process_time).repeat(number=n, repeat=repeats)) / n
    out[name] = best * 1e6
client.flushdb()
print(json.dumps(out))
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--calls", type=int, default=2000, help="calls per measurement (2000; renewals: /50)")
    parser.add_argument("--repeats", type=int, default=5, help="measurements per child, the best kept (5)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, every variant in each (3)")
    parser.add_argument("--no-write", action="store_true", help="do not write into bench/results/")


def renewals(calls: int) -> int:
    """Calls of ``renew_500`` per measurement: 500 leases each, so fewer."""
    return max(1, calls // 50)


def child(url: str, variant: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-c",
        CHILD,
        url,
        variant,
        str(args.calls),
        str(renewals(args.calls)),
        str(args.repeats),
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True, timeout=600).stdout
    result: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    if result["hiredis"] != (variant == "hiredis"):
        raise RuntimeError(f"variant {variant}: redis-py's hiredis is {result['hiredis']} (is it installed?)")
    return result


def run(args: argparse.Namespace) -> int:
    data = new_data("redis_client", {k: v for k, v in vars(args).items() if k != "no_write"})
    data["runs"] = []
    with tempfile.TemporaryDirectory(prefix="bench-redis-client-") as tmp:
        port = free_port()
        redis_server = start_redis(Path(tmp) / "data", port, log_dir=Path(tmp), appendfsync="no")
        try:
            for round_no in range(args.rounds):
                for variant in VARIANTS if round_no % 2 == 0 else VARIANTS[::-1]:
                    result = child(f"redis://{HOST}:{port}/0", variant, args)
                    data["runs"].append({"round": round_no, "variant": variant, **result})
                    say("redis_client", f"round {round_no} {variant}: " + ", ".join(
                        f"{name} {result[name]:.1f} µs" for name in CALLS
                    ))  # fmt: skip
        finally:
            redis_server.stop()
    data["summary"] = {
        variant: {name: median(r[name] for r in data["runs"] if r["variant"] == variant) for name in CALLS}
        for variant in VARIANTS
    }
    finish(data, render, args)
    return 0


def render(data: dict[str, Any]) -> str:
    p, s = data["params"], data["summary"]
    title = "The client's CPU per Redis call (`python -m bench redis_client`)"
    out = header(data, title, ran="the working tree")
    out += [
        f"CPU time per call, µs: the best of {p['repeats']} measurements of {p['calls']} calls (renewals: "
        f"{renewals(p['calls'])}) in each child, the median over {p['rounds']} rounds.",
        "",
        markdown_table(
            ["call", "hiredis µs", "redis-py's parser µs", "hiredis / redis-py"],
            [
                [
                    name,
                    fmt(s["hiredis"][name], 1),
                    fmt(s["python"][name], 1),
                    fmt(s["hiredis"][name] / s["python"][name]),
                ]
                for name in CALLS
            ],
        ),
        "",
        markdown_table(
            ["round", "variant", *CALLS],
            [[r["round"], r["variant"], *(fmt(r[name], 1) for name in CALLS)] for r in data["runs"]],
        ),
    ]
    return "\n".join(out) + "\n"
