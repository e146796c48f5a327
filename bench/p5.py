"""Scenario ``p5``: scale-out — 1, 2, 4 worker processes at a fixed concurrency each, under a global cap.

Each run starts k fresh workers (threads pool, ``--concurrency`` c each), warms each up, and submits
``--waves`` × k × c jobs (small images, latency L = 1 s, no jitter), so that every run has the same ideal
makespan. ``UPSTREAM_MAX_CONCURRENCY`` (the global cap, ``services/limits.py``) is set above the largest
total (``--cap``, default 1.2 × the largest k·c), so that the limiter runs on every call without binding.
throughput = jobs / makespan; linear = k × the 1-process throughput; target ≥ 0.9× linear. The
simulator's ``max_in_flight`` must never exceed the cap.

``--binding-cap`` adds one more run at the largest k with the cap below k·c (default 0.75 × k·c), where the
limiter must hold the calls in flight at the cap: its throughput is compared with cap / L.

Writes a PNG plot of throughput against processes (matplotlib, ``pip install -e '.[bench]'``).
"""

from __future__ import annotations

import argparse
from typing import Any

from bench.common import (
    add_batch_arguments,
    add_common_arguments,
    batch_line,
    finish,
    header,
    new_data,
    profile_dir,
    public,
    run_batch,
    say,
    submitter,
    worker_env,
)
from bench.harness import (
    RESULTS_DIR,
    BenchStack,
    bench_stack,
    fmt,
    markdown_table,
    seed_body,
    submit_jobs,
    wait_all_final,
)

DESCRIPTION = "P5: 1, 2, 4 worker processes under a global cap: ≥ 0.9× linear, the cap never exceeded"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--processes", default="1,2,4", help="worker process counts (1,2,4)")
    parser.add_argument("--concurrency", type=int, default=25, help="threads per worker process (25)")
    parser.add_argument("--waves", type=int, default=8, help="jobs per run = waves × k × c (8)")
    parser.add_argument("--latency-ms", type=int, default=1000, help="simulator latency (1000)")
    parser.add_argument("--cap", type=int, default=0, help="UPSTREAM_MAX_CONCURRENCY (0: 1.2 × max k·c)")
    parser.add_argument(
        "--binding-cap",
        type=float,
        default=0.75,
        help="extra run at the largest k with the cap at this fraction of k·c (0.75; 0 skips it)",
    )
    add_common_arguments(parser, quiet_wait=10)
    add_batch_arguments(parser)


def one_run(
    stack: BenchStack, args: argparse.Namespace, k: int, cap: int, label: str, profile: bool
) -> dict[str, Any]:
    latency_s = args.latency_ms / 1000
    c = args.concurrency
    names = [f"{label}-w{i}" for i in range(k)]
    env = worker_env(args) | {"UPSTREAM_MAX_CONCURRENCY": str(cap)}
    workers = {name: stack.start_worker(name, pool="threads", concurrency=c, env=env).pid for name in names}
    body = seed_body()
    try:
        warm = submit_jobs(stack.api_url, [body] * (k * c), parallelism=16)
        wait_all_final(stack.api_url, warm.ids, timeout=120)
        jobs = args.waves * k * c
        slots = min(k * c, cap)
        result = run_batch(
            stack,
            workers,
            [body] * jobs,
            latency_s=latency_s,
            ideal_s=jobs * latency_s / slots,
            quiet_wait=args.quiet_wait,
            submit=submitter(args),
            profile_to=profile_dir("p5", label) if profile else None,
        )
    finally:
        for name in names:
            stack.stop_worker(name)
    result.update(
        processes=k,
        concurrency=c,
        cap=cap,
        slots=slots,
        throughput_per_s=jobs / result["makespan_s"] if result["makespan_s"] else None,
        ideal_throughput_per_s=slots / latency_s,
        cap_exceeded=(result["sim"]["max_in_flight"] or 0) > cap,
        label=label,
    )
    return public(result)


def run(args: argparse.Namespace) -> int:
    counts = [int(x) for x in args.processes.split(",") if x.strip()]
    cap = args.cap or int(1.2 * max(counts) * args.concurrency)
    params = {k: getattr(args, k) for k in vars(args) if k not in ("no_write", "keep", "profile")}
    params["cap_used"] = cap
    data = new_data("p5", params)
    data["runs"] = []
    sim_args = ["--latency-ms", str(args.latency_ms), "--image-bytes", "0", "--seed", "1"]
    with bench_stack(sim_args=sim_args, keep=args.keep, snapshot=not args.live) as stack:
        say("p5", f"stack up in {stack.root}; cap {cap}")
        for k in counts:
            result = one_run(stack, args, k, cap, f"p5-k{k}", args.profile)
            data["runs"].append(result)
            say("p5", f"k={k}: {fmt(result['throughput_per_s'], 1)} jobs/s; {batch_line(result)}")
        if args.binding_cap:
            k = max(counts)
            binding = max(1, int(args.binding_cap * k * args.concurrency))
            result = one_run(stack, args, k, binding, f"p5-k{k}-cap{binding}", args.profile)
            result["binding"] = True
            data["runs"].append(result)
            say(
                "p5",
                f"k={k} cap={binding}: {fmt(result['throughput_per_s'], 1)} jobs/s; {batch_line(result)}",
            )
    base = next((r for r in data["runs"] if r["processes"] == 1 and not r.get("binding")), None)
    for r in data["runs"]:
        if base and base["throughput_per_s"] and r["throughput_per_s"]:
            linear = (
                base["throughput_per_s"] * min(r["slots"], r["processes"] * r["concurrency"]) / base["slots"]
            )
            r["linear_per_s"] = linear
            r["vs_linear"] = r["throughput_per_s"] / linear
        r["vs_ideal"] = (r["throughput_per_s"] or 0) / r["ideal_throughput_per_s"]
    scaling = [r for r in data["runs"] if not r.get("binding")]
    data["summary"] = {
        "min_vs_linear": min((r.get("vs_linear") or 0) for r in scaling),
        "binding_vs_cap": next((r["vs_ideal"] for r in data["runs"] if r.get("binding")), None),
        "cap_exceeded": any(r["cap_exceeded"] for r in data["runs"]),
        "max_in_flight": {r["label"]: r["sim"]["max_in_flight"] for r in data["runs"]},
        "failures": sum(r["failures"] for r in data["runs"]),
        "target_vs_linear": 0.95,
    }
    data["plot"] = plot(data, args)
    finish(data, render, args)
    return 0 if data["summary"]["failures"] == 0 and not data["summary"]["cap_exceeded"] else 1


def plot(data: dict[str, Any], args: argparse.Namespace) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        say("p5", "matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return None
    runs = [r for r in data["runs"] if not r.get("binding")]
    ks = [r["processes"] for r in runs]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    ax.plot(ks, [r["throughput_per_s"] for r in runs], "o-", label="measured")
    ax.plot(ks, [r.get("linear_per_s") for r in runs], "--", label="linear (k × 1 process)")
    ax.plot(ks, [r["ideal_throughput_per_s"] for r in runs], ":", label="ideal min(k·c, cap) / L")
    for r in data["runs"]:
        if r.get("binding"):
            ax.plot([r["processes"]], [r["throughput_per_s"]], "s", label=f"cap {r['cap']} (binding)")
            ax.axhline(r["ideal_throughput_per_s"], color="grey", linewidth=0.5)
    ax.set_xlabel("worker processes (k)")
    ax.set_ylabel("jobs / s")
    ax.set_xticks(ks)
    ax.set_title(f"P5 scale-out: c = {args.concurrency} threads each, L = {args.latency_ms} ms")
    ax.legend()
    ax.grid(alpha=0.3)
    if args.no_write:
        plt.close(fig)
        return None
    path = RESULTS_DIR / f"p5-{data['started'][:19].replace(':', '').replace('-', '').replace('T', '-')}.png"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    fig.savefig(RESULTS_DIR / "p5-latest.png")
    plt.close(fig)
    return str(path.relative_to(RESULTS_DIR.parents[1]))


def render(data: dict[str, Any]) -> str:
    p, s = data["params"], data["summary"]
    out = header(data, "P5: scale-out (`python -m bench p5`)")
    out += [
        f"c = {p['concurrency']} threads per process, L = {p['latency_ms']} ms, "
        f"{p['waves']} waves of k·c jobs per run, global cap UPSTREAM_MAX_CONCURRENCY = "
        f"{p['cap_used']} (binding run: see the last row).",
        "",
        f"**lowest throughput against linear: {fmt(s['min_vs_linear'])}** "
        f"(target ≥ {s['target_vs_linear']}); "
        f"cap exceeded: **{'YES' if s['cap_exceeded'] else 'never'}** (max in flight per run: "
        f"{', '.join(f'{k} {v}' for k, v in s['max_in_flight'].items())}).",
        "",
        markdown_table(
            [
                "k",
                "c",
                "cap",
                "jobs",
                "makespan s",
                "jobs/s",
                "linear jobs/s",
                "vs linear",
                "ideal jobs/s",
                "vs ideal",
                "max in flight",
                "CPU ms/job",
                "foreign CPU s",
                "failures",
            ],
            [
                [
                    r["processes"],
                    r["concurrency"],
                    r["cap"],
                    r["jobs"],
                    r["makespan_s"],
                    fmt(r["throughput_per_s"], 1),
                    fmt(r.get("linear_per_s"), 1),
                    r.get("vs_linear"),
                    fmt(r["ideal_throughput_per_s"], 1),
                    r["vs_ideal"],
                    r["sim"]["max_in_flight"],
                    fmt(r["cpu_per_job_ms"], 1),
                    fmt(r["machine"]["foreign_s"], 1),
                    r["failures"],
                ]
                for r in data["runs"]
            ],
        ),  # fmt: skip
        "",
    ]
    if data.get("plot"):
        out += [f"![throughput against processes]({data['plot'].split('/')[-1]})", ""]
    return "\n".join(out)
