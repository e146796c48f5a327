"""Scenario ``pool``: which Celery pool for workers that hold many slow, I/O-bound upstream calls in flight.

One worker process at concurrency C runs N jobs against the simulator at a fixed latency L, for each pool
in turn, on the same stack, in alternating order over several rounds. The ideal makespan is N·L/C: every
slot busy with an upstream call all the time. The prefork reference runs at a smaller concurrency with
N scaled to keep the same number of waves (N·Cp/C jobs), so its ideal makespan is the same.

Each run: start the worker (``--pool`` on the command line), warm it up with one job per worker process
(so that the measurement is of the steady state, not of first-use set-up), reset the simulator's
counters, submit the N jobs over HTTP, wait until all are final, then read every task over HTTP.

    python -m bench pool [--jobs N] [--latency-ms L] [--concurrency C] [--image-bytes B[,B2]]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from bench.harness import (
    BenchStack,
    ProcessSampler,
    bench_stack,
    code_fingerprint,
    code_info,
    cpu_usage,
    fetch_tasks,
    fmt,
    log_problems,
    machine_info,
    machine_usage,
    markdown_table,
    median,
    parse_time,
    seed_body,
    submit_jobs,
    task_timings,
    wait_all_final,
    wait_for_quiet,
    write_results,
)

DESCRIPTION = "Celery pool for many slow I/O-bound upstream calls: threads vs gevent (vs prefork)"
POOLS = ("threads", "gevent", "prefork")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=400, help="jobs per run (default 400)")
    parser.add_argument("--latency-ms", type=int, default=2000, help="simulated upstream latency (2000)")
    parser.add_argument(
        "--jitter-ms", type=int, default=0, help="uniform ± jitter of the latency (0: every call takes L)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=100, help="slots of the threads/gevent worker (100)"
    )
    parser.add_argument(
        "--image-bytes",
        default="0,1500000",
        help="comma-separated simulator image sizes, one stack each (default '0,1500000': smallest, ~1.5 MB)",
    )
    parser.add_argument(
        "--pools", default=",".join(POOLS), help="comma-separated pools (threads,gevent,prefork)"
    )
    parser.add_argument(
        "--prefork-concurrency", type=int, default=8, help="processes of the prefork reference (8)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="rounds; the pool order alternates (2)")
    parser.add_argument(
        "--warmup", type=int, default=1, help="warm-up jobs per worker process before measuring (1; 0 = cold)"
    )
    parser.add_argument("--submit-parallelism", type=int, default=16, help="client threads that POST (16)")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=20,
        help="before each run, wait up to this many seconds for the machine to be <25%% busy (20; 0 = no)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dirs with every component's logs")
    parser.add_argument(
        "--live",
        action="store_true",
        help="run the working tree, not a snapshot taken when each stack starts",
    )
    parser.add_argument("--no-write", action="store_true", help="do not write into bench/results/")


def run(args: argparse.Namespace) -> int:
    pools = [p.strip() for p in args.pools.split(",") if p.strip()]
    sizes = [int(s) for s in str(args.image_bytes).split(",") if s.strip()]
    latency_s = args.latency_ms / 1000
    params = {
        "jobs": args.jobs,
        "latency_ms": args.latency_ms,
        "jitter_ms": args.jitter_ms,
        "concurrency": args.concurrency,
        "image_bytes": sizes,
        "pools": pools,
        "prefork_concurrency": args.prefork_concurrency,
        "rounds": args.rounds,
        "warmup_per_process": args.warmup,
        "submit_parallelism": args.submit_parallelism,
        "live": args.live,
    }
    data: dict[str, Any] = {
        "scenario": "pool",
        "command": "python -m bench pool " + " ".join(sys.argv[2:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "code": code_info(),
        "params": params,
        "runs": [],
    }
    began = time.monotonic()
    for image_bytes in sizes:
        sim_args = ["--latency-ms", str(args.latency_ms), "--latency-jitter-ms", str(args.jitter_ms)]
        sim_args += ["--image-bytes", str(image_bytes), "--seed", "1"]
        with bench_stack(sim_args=sim_args, keep=args.keep, snapshot=not args.live) as stack:
            _say(f"stack up in {stack.root} (image_bytes={image_bytes})")
            dirty = None
            for round_no in range(args.rounds):
                order = pools if round_no % 2 == 0 else list(reversed(pools))
                for position, pool in enumerate(order):
                    if dirty:
                        _say(f"skipping {pool} round {round_no}: {dirty}")
                        continue
                    name = f"{pool}-r{round_no}"
                    result = run_one(
                        stack, args, name=name, pool=pool, image_bytes=image_bytes, latency_s=latency_s
                    )
                    result.update(round=round_no, position=position)
                    data["runs"].append(result)
                    _say(_line(result))
                    if result.get("error"):
                        dirty = f"an earlier run left the queue in an unknown state ({result['error']})"
    data["elapsed_s"] = time.monotonic() - began
    data["code"]["changed_during_run"] = code_fingerprint() != data["code"]["fingerprint"]
    data["summary"] = summarize(data["runs"])
    markdown = render(data)
    print(markdown)
    if not args.no_write:
        path = write_results("pool", data, markdown)
        _say(f"wrote {path} and {path.with_suffix('.md')} (and pool-latest.*)")
    failed = sum(r["failures"] for r in data["runs"]) + sum(1 for r in data["runs"] if r.get("error"))
    return 1 if failed else 0


def run_one(
    stack: BenchStack,
    args: argparse.Namespace,
    *,
    name: str,
    pool: str,
    image_bytes: int,
    latency_s: float,
) -> dict[str, Any]:
    prefork = pool == "prefork"
    concurrency = args.prefork_concurrency if prefork else args.concurrency
    jobs = max(1, round(args.jobs * concurrency / args.concurrency)) if prefork else args.jobs
    processes = concurrency if prefork else 1
    ideal = jobs * latency_s / concurrency
    body = seed_body()
    result: dict[str, Any] = {
        "pool": pool,
        "image_bytes": image_bytes,
        "concurrency": concurrency,
        "jobs": jobs,
        "ideal_s": ideal,
    }
    worker = stack.start_worker(name, pool=pool, concurrency=concurrency)
    try:
        if args.warmup > 0:
            warm = submit_jobs(stack.api_url, [body] * (args.warmup * processes), parallelism=processes)
            wait_all_final(stack.api_url, warm.ids, timeout=60 + 10 * latency_s)
        stack.sim_reset()
        result["busy_before"] = wait_for_quiet(max_wait=args.quiet_wait) if args.quiet_wait > 0 else None
        result["loadavg_before"] = list(os.getloadavg())
        others = {n: stack.children[n].pid for n in ("simulator", "s3", "api", "redis")}
        timeout = 60 + 6 * ideal
        with (
            machine_usage() as machine,
            ProcessSampler(worker.pid) as sampler,
            cpu_usage(others) as other_cpu,
        ):
            submitted = submit_jobs(stack.api_url, [body] * jobs, parallelism=args.submit_parallelism)
            try:
                seen_final, final = wait_all_final(stack.api_url, submitted.ids, timeout=timeout)
            except TimeoutError as exc:
                result["error"] = str(exc)
                seen_final, final = time.time(), {}
        sim = stack.sim_stats()
        tasks = (
            [final[i] for i in submitted.ids]
            if not result.get("error")
            else fetch_tasks(stack.api_url, submitted.ids)
        )
    finally:
        stack.stop_worker(name)
    timings = task_timings(tasks, latency_s=latency_s)
    makespan = timings["makespan_s"]
    result.update(
        {
            "makespan_s": makespan,
            "ratio": makespan / ideal if makespan else None,
            "submit_s": submitted.seconds,
            "submit_errors": submitted.errors[:10],
            "observed_s": seen_final - submitted.started,
            "timings": timings,
            "starts_per_half_second": _start_histogram(tasks),
            "failures": timings["failures"] + len(submitted.errors),
            "worker": sampler.as_dict(),
            "cpu_per_job_ms": 1000 * sampler.cpu_s / jobs,
            "other_cpu_s": other_cpu,
            "machine": {
                **machine,
                # CPU used on this machine by processes outside this stack and this client: noise
                "foreign_s": machine["busy_s"] - sampler.cpu_s - sum(other_cpu.values()) - machine["self_s"],
            },
            "sim": {k: sim.get(k) for k in ("calls", "max_in_flight", "by_outcome")},
            "worker_log": log_problems(stack.log_dir / f"{name}.log"),
        }
    )
    return result


def _start_histogram(tasks: list[dict[str, Any]]) -> dict[str, int]:
    """How many first attempts began in each 0.5 s after the first submission: shows how promptly the
    worker refills its slots (waves at 0, L, 2L, … when it is prompt)."""
    if not tasks:
        return {}
    first = min(parse_time(t["created_at"]) for t in tasks)
    counts: dict[str, int] = {}
    for t in tasks:
        if t.get("started_at"):
            bucket = f"{int((parse_time(t['started_at']) - first) * 2) / 2:.1f}"
            counts[bucket] = counts.get(bucket, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: float(item[0])))


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median over rounds per (image size, pool); failures are summed."""
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["image_bytes"], r["pool"]), []).append(r)
    rows = []
    for (image_bytes, pool), rs in groups.items():
        rows.append(
            {
                "image_bytes": image_bytes,
                "pool": pool,
                "runs": len(rs),
                "concurrency": rs[0]["concurrency"],
                "jobs": rs[0]["jobs"],
                "ideal_s": rs[0]["ideal_s"],
                "makespan_s": median(r["makespan_s"] for r in rs),
                "ratio": median(r["ratio"] for r in rs),
                "ratios": [r["ratio"] for r in rs],
                "excess_p50_s": median(r["timings"]["excess_p50_s"] for r in rs),
                "excess_p99_s": median(r["timings"]["excess_p99_s"] for r in rs),
                "overhead_p50_s": median(r["timings"]["overhead_p50_s"] for r in rs),
                "overhead_p99_s": median(r["timings"]["overhead_p99_s"] for r in rs),
                "worker_cpu_s": median(r["worker"]["cpu_s"] for r in rs),
                "cpu_per_job_ms": median(r["cpu_per_job_ms"] for r in rs),
                "peak_rss_mb": median(r["worker"]["peak_rss_mb"] for r in rs),
                "peak_pss_mb": median(r["worker"]["peak_pss_mb"] for r in rs),
                "max_in_flight": median(r["sim"]["max_in_flight"] for r in rs),
                "failures": sum(r["failures"] for r in rs),
                "retried": sum(r["timings"]["retried_tasks"] for r in rs),
                "errors": [r["error"] for r in rs if r.get("error")],
            }
        )
    return rows


def _size(image_bytes: int) -> str:
    return "smallest" if image_bytes == 0 else f"{image_bytes / 1e6:g} MB"


def render(data: dict[str, Any]) -> str:
    p, m, c = data["params"], data["machine"], data["code"]
    changed = f", {len(c['uncommitted'])} uncommitted file(s) in the code dirs" if c["uncommitted"] else ""
    out = [
        "# Celery pool benchmark (`python -m bench pool`)",
        "",
        f"- run: {data['started']}, `{data['command'].strip()}`, {data['elapsed_s']:.0f} s in all",
        f"- code: commit {c['commit']} ({c['subject']}){changed}; fingerprint {c['fingerprint']}; "
        + ("working tree (--live)" if p.get("live") else "each stack ran a snapshot taken at its start")
        + (" — the working tree CHANGED during the run" if c.get("changed_during_run") else ""),
        f"- machine: {m['cpus_usable']} CPUs, {m['mem_gb']} GB, Python {m['python']}, load before "
        f"{m['loadavg_at_start']}; every component (redis, moto S3, simulator, gunicorn API, worker, this "
        "client) shares these CPUs",
        f"- {p['jobs']} jobs at concurrency {p['concurrency']} (prefork: {p['prefork_concurrency']} "
        f"processes, jobs scaled to keep {p['jobs'] / p['concurrency']:g} waves), upstream latency "
        f"{p['latency_ms']} ± {p.get('jitter_ms', 0)} ms, {p['rounds']} round(s) in alternating order, "
        f"{p['warmup_per_process']} warm-up job(s) per worker process",
        "",
        "## Summary (median over rounds)",
        "",
    ]
    headers = [
        "images", "pool", "C", "jobs", "makespan s", "ideal s", "ratio (each round)", "excess p50 s",
        "excess p99 s", "overhead p50/p99 s", "worker CPU s", "CPU ms/job", "peak RSS MB", "peak PSS MB",
        "max in flight", "failures", "retried",
    ]  # fmt: skip
    rows = [
        [
            _size(s["image_bytes"]),
            s["pool"],
            s["concurrency"],
            s["jobs"],
            s["makespan_s"],
            s["ideal_s"],
            f"{fmt(s['ratio'])} ({', '.join(fmt(r) for r in s['ratios'])})",
            s["excess_p50_s"],
            s["excess_p99_s"],
            f"{fmt(s['overhead_p50_s'])} / {fmt(s['overhead_p99_s'])}",
            s["worker_cpu_s"],
            fmt(s["cpu_per_job_ms"], 1),
            fmt(s["peak_rss_mb"], 0),
            fmt(s["peak_pss_mb"], 0),
            fmt(s["max_in_flight"], 0),
            s["failures"],
            s["retried"],
        ]  # fmt: skip
        for s in data["summary"]
    ]
    out += [markdown_table(headers, rows), "", "## Every run, in the order run", ""]
    headers = [
        "images", "round", "pool", "makespan s", "ratio", "submit s", "excess p50/p99 s", "wait p99 s",
        "worker CPU s", "peak RSS MB", "max in flight", "sim calls", "CPU s sim/s3/api/redis",
        "machine busy %", "foreign CPU s", "failures", "log",
    ]  # fmt: skip
    rows = []
    for r in data["runs"]:
        t, o = r["timings"], r["other_cpu_s"]
        counts = r["worker_log"]["counts"]
        rows.append(
            [
                _size(r["image_bytes"]),
                r["round"],
                r["pool"],
                r["makespan_s"],
                r["ratio"],
                r["submit_s"],
                f"{fmt(t['excess_p50_s'])} / {fmt(t['excess_p99_s'])}",
                t["wait_p99_s"],
                r["worker"]["cpu_s"],
                fmt(r["worker"]["peak_rss_mb"], 0),
                r["sim"]["max_in_flight"],
                r["sim"]["calls"],
                "/".join(fmt(o.get(k), 1) for k in ("simulator", "s3", "api", "redis")),
                fmt(100 * r["machine"]["busy_fraction"], 0),
                fmt(r["machine"]["foreign_s"], 1),
                r["failures"] if not r.get("error") else f"{r['failures']} TIMEOUT",
                ", ".join(f"{k} {v}" for k, v in counts.items()) or "clean",
            ]  # fmt: skip
        )
    out += [markdown_table(headers, rows), ""]
    problems = {ex for r in data["runs"] for ex in r["worker_log"]["examples"]}
    if problems:
        out += ["## Worker log lines worth a look (distinct, ids masked)", ""]
        out += [f"- `{line.strip()}`" for line in sorted(problems)] + [""]
    out += [
        "Columns: see bench/README.md. makespan = last finished_at − first created_at; ideal = jobs·L/C; "
        "excess = (finished_at − created_at) − L; overhead = attempt duration − L; CPU and memory are of the "
        "worker's process tree during the measured jobs (warm-up excluded).",
        "",
    ]
    return "\n".join(out)


def _line(r: dict[str, Any]) -> str:
    t = r["timings"]
    return (
        f"{r['pool']:>8} images={r['image_bytes']:<8} round={r['round']} makespan={fmt(r['makespan_s'])}s "
        f"ratio={fmt(r['ratio'])} excess p50/p99={fmt(t['excess_p50_s'])}/{fmt(t['excess_p99_s'])}s "
        f"cpu={fmt(r['worker']['cpu_s'])}s rss={fmt(r['worker']['peak_rss_mb'], 0)}MB "
        f"in_flight={r['sim']['max_in_flight']} failures={r['failures']}"
        + (f" ERROR {r['error']}" if r.get("error") else "")
    )


def _say(message: str) -> None:
    print(f"[bench pool] {message}", file=sys.stderr, flush=True)
