"""Scenario ``p2``: submit rate and latency of ``POST /v1/images/generations``, against a floor.

The seed body is POSTed from 32 concurrent keep-alive connections for ``--duration`` seconds by ``wrk``
(``apt-get install wrk``; without it, a Python asyncio + httpx generator in this file, which is much
slower and says so in the results) to:

- the API as deployed by the benchmarks (gunicorn, ``--api-workers`` × ``--api-threads``), and
- the floor: ``bench/p2_floor.py``, a minimal Flask handler doing only the same Redis writes, served by
  gunicorn with the same settings against the same Redis.

Rounds alternate floor/API. No worker runs: the jobs stay queued (the Redis queue only grows). The API
runs with tenants (``API_KEYS``: every request authenticated as tenant ``bench``, the tenant's limits and
fair-share admission in the create script) unless ``--no-tenants``; ``TENANT_MAX_QUEUED=0``, since no
worker drains the queue. Targets: API rate ≥ 0.8× the floor's; API p99 ≤ 30 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from bench.common import add_common_arguments, finish, header, new_data, profile_dir, profiled, say
from bench.harness import (
    ROOT,
    BenchStack,
    bench_stack,
    cpu_usage,
    fmt,
    markdown_table,
    median,
    percentile,
    process_tree,
    seed_body,
    wait_for_quiet,
)
from devstack.processes import HOST, Child, free_port, wait_until

DESCRIPTION = "P2: submit rate from 32 connections (wrk) against a minimal Redis-writes-only handler (≥ 0.8×)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections (32)")
    parser.add_argument("--duration", type=int, default=10, help="seconds per measurement (10)")
    parser.add_argument("--warmup", type=int, default=2, help="seconds of load before each measurement (2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, floor and API in each (3)")
    parser.add_argument("--api-workers", type=int, default=2, help="gunicorn workers, both servers (2)")
    parser.add_argument("--api-threads", type=int, default=8, help="gunicorn threads per worker (8)")
    parser.add_argument(
        "--generator", choices=("auto", "wrk", "python"), default="auto", help="load generator (auto: wrk)"
    )
    parser.add_argument("--no-tenants", action="store_true", help="no API_KEYS: anonymous submissions")
    add_common_arguments(parser, quiet_wait=10)


TENANT_KEY = "p2-bench-key"
TENANT_ENV = {"API_KEYS": f"bench:{TENANT_KEY}", "TENANT_MAX_QUEUED": "0"}
AUTHORIZATION = f"Bearer {TENANT_KEY}"


def start_floor(stack: BenchStack, args: argparse.Namespace) -> tuple[Child, str]:
    port = free_port()
    gunicorn = Path(sys.executable).with_name("gunicorn")
    cmd = [
        str(gunicorn), "--bind", f"{HOST}:{port}", "--workers", str(args.api_workers),
        "--threads", str(args.api_threads), "--access-logfile", "-", "--graceful-timeout", "10",
        "--pythonpath", str(ROOT), "bench.p2_floor:create_app()",
    ]  # fmt: skip
    child = Child("floor", cmd, {**os.environ, **stack.env}, stack.log_dir / "floor.log").start()
    stack.children["floor"] = child
    url = f"http://{HOST}:{port}"
    wait_until(
        lambda: httpx.get(url + "/", timeout=1).status_code == 404, timeout=30, what="the floor server"
    )
    return child, url


# --------------------------------------------------------------------------------------------------
# load generators
# --------------------------------------------------------------------------------------------------


def run_wrk(url: str, body_path: Path, args: argparse.Namespace, duration: int) -> dict[str, Any]:
    script = body_path.with_suffix(".lua")
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
        + ("" if args.no_tenants else f'wrk.headers["Authorization"] = "{AUTHORIZATION}"\n')
        + f'local f = io.open("{body_path}", "rb")\nwrk.body = f:read("*a")\nf:close()\n'
    )
    cmd = [
        "wrk",
        "-t",
        "2",
        "-c",
        str(args.connections),
        "-d",
        f"{duration}s",
        "--latency",
        "-s",
        str(script),
    ]
    cmd += ["--timeout", "10s", f"{url}/v1/images/generations"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False).stdout
    return parse_wrk(out)


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def parse_wrk(out: str) -> dict[str, Any]:
    def ms(text: str) -> float:
        number, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
        return float(number) * _UNITS[unit]

    latency = {int(p): ms(v) for p, v in re.findall(r"^\s+(50|75|90|99)%\s+(\S+)", out, re.MULTILINE)}
    rate = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "rate_per_s": float(rate.group(1)) if rate else None,
        "requests": int(total.group(1)) if total else 0,
        "p50_ms": latency.get(50),
        "p90_ms": latency.get(90),
        "p99_ms": latency.get(99),
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": errors.group(1).strip() if errors else None,
        "raw": out[-1500:],
    }


def run_python(url: str, body_path: Path, args: argparse.Namespace, duration: int) -> dict[str, Any]:
    """The fallback: asyncio + httpx, one keep-alive connection per simulated client."""
    body = body_path.read_bytes()
    headers = {"Content-Type": "application/json"}
    if not args.no_tenants:
        headers["Authorization"] = AUTHORIZATION
    latencies: list[float] = []
    bad = 0

    async def client(deadline: float) -> None:
        nonlocal bad
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            while time.monotonic() < deadline:
                began = time.monotonic()
                response = await http.post("/v1/images/generations", content=body, headers=headers)
                latencies.append(1000 * (time.monotonic() - began))
                bad += response.status_code // 100 != 2

    async def main() -> float:
        began = time.monotonic()
        await asyncio.gather(*(client(began + duration) for _ in range(args.connections)))
        return time.monotonic() - began

    elapsed = asyncio.run(main())
    return {
        "rate_per_s": len(latencies) / elapsed,
        "requests": len(latencies),
        "p50_ms": percentile(latencies, 50),
        "p90_ms": percentile(latencies, 90),
        "p99_ms": percentile(latencies, 99),
        "non_2xx": bad,
        "socket_errors": None,
    }


def measure(stack: BenchStack, name: str, url: str, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    generate = run_wrk if args.generator_used == "wrk" else run_python
    body_path = stack.root / "body.json"
    if args.warmup:
        generate(url, body_path, args, args.warmup)
    busy = wait_for_quiet(max_wait=args.quiet_wait) if args.quiet_wait > 0 else None
    with ExitStack() as profiling:
        if args.profile:  # the server's processes (gunicorn's workers), samples holding the GIL
            processes = {f"{name}-{child}": child for child in process_tree(pid)[1:]}
            profiling.enter_context(profiled(processes, profile_dir("p2", name)))
        with cpu_usage({"server": pid, "redis": stack.children["redis"].pid}) as cpu:
            result = generate(url, body_path, args, args.duration)
    result.update(server=name, busy_before=busy, cpu_s=cpu)
    result["server_cpu_ms_per_request"] = 1000 * cpu["server"] / max(1, result["requests"])
    return result


def run(args: argparse.Namespace) -> int:
    args.generator_used = (
        ("wrk" if shutil.which("wrk") else "python") if args.generator == "auto" else args.generator
    )
    params = {k: getattr(args, k) for k in vars(args) if k not in ("no_write", "keep", "profile")}
    data = new_data("p2", params)
    data["runs"] = []
    with bench_stack(
        env={} if args.no_tenants else TENANT_ENV,
        keep=args.keep,
        snapshot=not args.live,
        api_workers=args.api_workers,
        api_threads=args.api_threads,
    ) as stack:
        say("p2", f"stack up in {stack.root}; load generator: {args.generator_used}")
        (stack.root / "body.json").write_text(json.dumps(seed_body()))
        floor, floor_url = start_floor(stack, args)
        servers = {"floor": (floor_url, floor.pid), "api": (stack.api_url, stack.children["api"].pid)}
        for round_no in range(args.rounds):
            for name in ("floor", "api") if round_no % 2 == 0 else ("api", "floor"):
                url, pid = servers[name]
                result = measure(stack, name, url, pid, args)
                result["round"] = round_no
                data["runs"].append(result)
                say(
                    "p2",
                    f"round {round_no} {name}: {fmt(result['rate_per_s'], 0)}/s "
                    f"p50 {fmt(result['p50_ms'])} ms p99 {fmt(result['p99_ms'])} ms "
                    f"non-2xx {result['non_2xx']}",
                )
        data["queued_messages"] = stack_llen(stack)
    api = [r for r in data["runs"] if r["server"] == "api"]
    floors = [r for r in data["runs"] if r["server"] == "floor"]
    rounds = sorted({r["round"] for r in data["runs"]})
    rate = {(r["server"], r["round"]): r["rate_per_s"] for r in data["runs"]}
    ratios = [rate["api", n] / rate["floor", n] for n in rounds]
    data["summary"] = {
        "generator": args.generator_used,
        "api_rate_per_s": median(r["rate_per_s"] for r in api),
        "floor_rate_per_s": median(r["rate_per_s"] for r in floors),
        "ratio": median(ratios),
        "ratios": ratios,
        "api_p50_ms": median(r["p50_ms"] for r in api),
        "api_p99_ms": median(r["p99_ms"] for r in api),
        "floor_p99_ms": median(r["p99_ms"] for r in floors),
        "api_cpu_ms_per_request": median(r["server_cpu_ms_per_request"] for r in api),
        "floor_cpu_ms_per_request": median(r["server_cpu_ms_per_request"] for r in floors),
        "non_2xx": sum(r["non_2xx"] for r in data["runs"]),
        "target_ratio": 0.8,
        "target_p99_ms": 30,
    }
    finish(data, render, args)
    return 0 if data["summary"]["non_2xx"] == 0 else 1


def stack_llen(stack: BenchStack) -> int | None:
    import redis

    client = redis.Redis.from_url(stack.env["REDIS_URL"])
    try:
        return int(client.llen("generation"))
    finally:
        client.close()


def render(data: dict[str, Any]) -> str:
    p, s = data["params"], data["summary"]
    out = header(data, "P2: submit rate (`python -m bench p2`)")
    out += [
        f"{p['connections']} connections, {p['duration']} s per measurement after {p['warmup']} s "
        "of warm-up, "
        f"load generator **{s['generator']}**, both servers gunicorn {p['api_workers']} workers × "
        f"{p['api_threads']} threads, {p['rounds']} round(s) alternating.",
        "",
        f"**rate ratio {fmt(s['ratio'])}** (API {fmt(s['api_rate_per_s'], 0)}/s against the floor's "
        f"{fmt(s['floor_rate_per_s'], 0)}/s; target ≥ {s['target_ratio']}), "
        f"**API p99 {fmt(s['api_p99_ms'])} ms** (target ≤ {s['target_p99_ms']} ms). "
        f"Server CPU per request: API {fmt(s['api_cpu_ms_per_request'])} ms, "
        f"floor {fmt(s['floor_cpu_ms_per_request'])} ms.",
        "",
        markdown_table(
            [
                "round",
                "server",
                "requests/s",
                "p50 ms",
                "p90 ms",
                "p99 ms",
                "server CPU ms/req",
                "redis CPU s",
                "non-2xx",
                "socket errors",
            ],
            [
                [
                    r["round"],
                    r["server"],
                    fmt(r["rate_per_s"], 0),
                    r["p50_ms"],
                    r["p90_ms"],
                    r["p99_ms"],
                    r["server_cpu_ms_per_request"],
                    fmt(r["cpu_s"]["redis"], 1),
                    r["non_2xx"],
                    r["socket_errors"] or "",
                ]
                for r in data["runs"]
            ],
        ),  # fmt: skip
        "",
    ]
    return "\n".join(out)
