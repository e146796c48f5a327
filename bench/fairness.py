"""Scenario ``fairness``: fair share between tenants under a global cap, against FIFO in the same run.

Issue 10's measurement. Two tenants (``API_KEYS=a:…,b:…``), the simulator at latency L (2 s, no jitter),
the global cap ``UPSTREAM_MAX_CONCURRENCY`` (10; also the admission window, so the API and the workers both
get it), and ``--workers`` worker processes × ``--concurrency`` threads (2 × 16: more threads than the cap,
so the cap is what binds). Each arm starts fresh workers, warms them up, then:

1. tenant A submits ``--jobs`` jobs (1,000) over HTTP;
2. once A's backlog is running (the simulator has ``cap`` calls in flight) and ``--b-after`` seconds more
   have passed, B submits ``--b-jobs`` jobs (5);
3. every task is waited for until final.

The arms differ only in the key B's jobs are sent with:

- ``fair``: B's own key (tenant ``b``): admission (``services/admission.py``) gives each free place to the
  tenant with the fewest admitted tasks per weight, so B's jobs take the next places that free up;
- ``fifo``: A's key: one tenant, so B's jobs queue behind A's backlog in submission order, as every job did
  in Celery's FIFO queue before admission.

Measured per arm:

- B's start delay: from B's submission (just before its first POST) to each of B's tasks' first attempt
  (``started_at`` in the store) and to its upstream call's start in the simulator's call log (each request
  carries ``[sim key=A]`` or ``[sim key=B]``, whatever key it is sent with); max and median. Target for
  ``fair``: max ≤ 2·L + 1 s (a place frees up within L, plus the job's own start-up); ``fifo`` ≈ the
  backlog ahead of B × L / cap;
- A's throughput: A's jobs / (A's last ``finished_at`` − first ``created_at``), and A's rate while B was
  present (B's submission → B's last call finished): A's calls in flight, averaged over that window, / L;
  against cap / L. And A + B jobs over their makespan: admission must not cost throughput;
- the cap: the most calls in flight at once, from the call log (and the simulator's own ``max_in_flight``),
  never above ``cap``;
- nothing lost: every task succeeded, one attempt and one upstream call each, as many calls as tasks.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from typing import Any

from bench.common import add_common_arguments, finish, header, new_data, say
from bench.harness import (
    BenchStack,
    ProcessSampler,
    bench_stack,
    fetch_tasks,
    fmt,
    log_problems,
    machine_usage,
    markdown_table,
    median,
    parse_time,
    seed_body,
    submit_jobs,
    task_timings,
    wait_all_final,
    wait_for_quiet,
)
from devstack.processes import wait_until

DESCRIPTION = (
    "Fair share: tenant A queues N jobs under a cap, then B submits 5: B's start delay, fair against "
    "FIFO (≤ 2·L + 1 s)"
)

KEYS = {"a": "bench-tenant-a-key-0123456789", "b": "bench-tenant-b-key-0123456789"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--jobs", type=int, default=1000, help="tenant A's backlog (1000)")
    parser.add_argument("--b-jobs", type=int, default=5, help="tenant B's jobs (5)")
    parser.add_argument("--latency-ms", type=int, default=2000, help="simulator latency, L (2000)")
    parser.add_argument("--jitter-ms", type=int, default=0, help="simulator latency ± jitter (0)")
    parser.add_argument("--cap", type=int, default=10, help="UPSTREAM_MAX_CONCURRENCY (10)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes (2)")
    parser.add_argument("--concurrency", type=int, default=16, help="threads per worker process (16)")
    parser.add_argument(
        "--b-after",
        type=float,
        default=10,
        help="seconds B waits once A's backlog is running (the simulator at the cap) (10)",
    )
    parser.add_argument(
        "--arms", default="fair,fifo", help="arms in the order run: fair (B's own key), fifo (A's key)"
    )
    add_common_arguments(parser, quiet_wait=10)


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


def _body(tag: str) -> dict[str, Any]:
    """The seed body with ``[sim key=<tag>]`` in its prompt: the simulator's call log says whose call."""
    body = copy.deepcopy(seed_body())
    parts = body["contents"][0]["parts"]
    parts[0]["text"] = f"{parts[0]['text']} [sim key={tag}]"
    return body


# --------------------------------------------------------------------------------------------------
# one arm
# --------------------------------------------------------------------------------------------------


def one_arm(stack: BenchStack, args: argparse.Namespace, arm: str) -> dict[str, Any]:
    latency_s = args.latency_ms / 1000
    b_tenant = "b" if arm == "fair" else "a"
    names = [f"fair-{arm}-w{i}" for i in range(args.workers)]
    workers = {n: stack.start_worker(n, pool="threads", concurrency=args.concurrency).pid for n in names}
    result: dict[str, Any] = {"arm": arm, "b_key": b_tenant, "jobs_a": args.jobs, "jobs_b": args.b_jobs}
    try:
        warm = submit_jobs(stack.api_url, [_body("warm")] * (2 * args.cap), headers=_auth("a"))
        wait_all_final(stack.api_url, warm.ids, timeout=120, headers=_auth("a"))
        stack.sim_reset()
        result["busy_before"] = wait_for_quiet(max_wait=args.quiet_wait) if args.quiet_wait > 0 else None
        timeout = 300 + 3 * args.jobs * latency_s / args.cap
        with ExitStack() as cm:
            machine = cm.enter_context(machine_usage())
            samplers = {n: cm.enter_context(ProcessSampler(pid)) for n, pid in workers.items()}
            a_sub = submit_jobs(
                stack.api_url,
                [_body("A")] * args.jobs,
                parallelism=args.submit_parallelism,
                headers=_auth("a"),
            )
            say("fairness", f"{arm}: A submitted {len(a_sub.ids)} in {a_sub.seconds:.1f}s")
            wait_until(
                lambda: stack.sim_stats()["in_flight"] >= min(args.cap, args.jobs),
                timeout=60,
                what="A's backlog to run",
                interval=0.05,
            )
            running_at = time.time()
            time.sleep(args.b_after)
            b_sub = submit_jobs(stack.api_url, [_body("B")] * args.b_jobs, headers=_auth(b_tenant))
            say("fairness", f"{arm}: B submitted {len(b_sub.ids)} with {b_tenant}'s key")
            try:
                _, b_final = wait_all_final(
                    stack.api_url, b_sub.ids, timeout=timeout, headers=_auth(b_tenant)
                )
                say("fairness", f"{arm}: B final")
                _, a_final = wait_all_final(stack.api_url, a_sub.ids, timeout=timeout, headers=_auth("a"))
            except TimeoutError as exc:
                result["error"] = str(exc)
        wait_until(lambda: stack.sim_stats()["in_flight"] == 0, timeout=60, what="the simulator to be idle")
        sim = stack.sim_stats()
        calls = stack.http.get(f"{stack.simulator_url}/_sim/calls").json()
    finally:
        for name in names:
            stack.stop_worker(name)
    if result.get("error"):
        a_tasks = fetch_tasks(stack.api_url, a_sub.ids, headers=_auth("a"))
        b_tasks = fetch_tasks(stack.api_url, b_sub.ids, headers=_auth(b_tenant))
    else:
        a_tasks = [a_final[i] for i in a_sub.ids]
        b_tasks = [b_final[i] for i in b_sub.ids]
    result.update(
        measure(
            a_tasks,
            b_tasks,
            calls,
            a_submitted=a_sub.started,
            running_at=running_at,
            b_submitted=b_sub.started,
            latency_s=latency_s,
            cap=args.cap,
        )
    )
    result.update(
        a_submit_s=a_sub.seconds,
        b_submit_s=b_sub.seconds,
        submit_errors=(a_sub.errors + b_sub.errors)[:10],
        sim={k: sim.get(k) for k in ("calls", "max_in_flight", "by_key", "by_outcome")},
        machine=dict(machine),
        workers={n: s.as_dict() for n, s in samplers.items()},
        worker_logs={n: log_problems(stack.log_dir / f"{n}.log") for n in names},
        sweeper_log_lines=_sweeper_lines(stack, names),
    )
    result["lost"] = result["lost"] + len(a_sub.errors) + len(b_sub.errors)
    return result


def _sweeper_lines(stack: BenchStack, names: Sequence[str]) -> int:
    """The sweeper's lines in the workers' logs (it logs when it readied, admitted or recovered any task;
    admission after a job logs nothing)."""
    count = 0
    for name in names:
        path = stack.log_dir / f"{name}.log"
        if path.exists():
            count += sum(1 for line in path.read_text(errors="replace").splitlines() if "sweeper:" in line)
    return count


def measure(
    a_tasks: Sequence[Mapping[str, Any]],
    b_tasks: Sequence[Mapping[str, Any]],
    calls: Sequence[Mapping[str, Any]],
    *,
    a_submitted: float,
    running_at: float,
    b_submitted: float,
    latency_s: float,
    cap: int,
) -> dict[str, Any]:
    """B's start delays, A's throughput, the most calls in flight and what was lost, from the task records
    and the simulator's call log (epoch seconds on the same clock)."""
    a_calls = sorted((c for c in calls if c.get("key") == "A"), key=lambda c: c["started"])
    b_calls = sorted((c for c in calls if c.get("key") == "B"), key=lambda c: c["started"])
    b_store = sorted(parse_time(t["started_at"]) - b_submitted for t in b_tasks if t.get("started_at"))
    b_sim = [c["started"] - b_submitted for c in b_calls]
    b_created = [parse_time(t["created_at"]) - b_submitted for t in b_tasks]
    b_done = [parse_time(t["finished_at"]) for t in b_tasks if t.get("finished_at")]
    # B's presence: from its submission until its last upstream call finished (or its last task did)
    b_end = max([c["finished"] for c in b_calls if c.get("finished")] + b_done, default=None)
    presence = (b_end - b_submitted) if b_end else None
    # A's upstream calls in flight on average over that window, per L: A's rate while B was there. (A
    # count of A's calls finished in the window depends on where its ends fall between two waves.)
    a_in_flight = mean_in_flight(a_calls, b_submitted, b_end) if b_end else None
    b_in_flight = mean_in_flight(b_calls, b_submitted, b_end) if b_end else None
    a_timings = task_timings(a_tasks, latency_s=latency_s)
    a_span = (
        a_calls[-1]["finished"] - a_calls[0]["started"] if a_calls and a_calls[-1].get("finished") else None
    )
    all_tasks = [*a_tasks, *b_tasks]
    total_span = task_timings(all_tasks, latency_s=latency_s)["makespan_s"]
    succeeded = sum(1 for t in all_tasks if t["status"] == "succeeded")
    return {
        "b_delay_store_s": b_store,
        "b_delay_sim_s": b_sim,
        "b_created_after_submit_s": b_created,
        "b_delay_max_s": max(b_store, default=None),
        "b_delay_median_s": median(b_store),
        "b_delay_sim_max_s": max(b_sim, default=None),
        "b_delay_sim_median_s": median(b_sim),
        "b_started_of": len(b_store),
        "b_submit_after_a_s": b_submitted - a_submitted,
        "b_submit_after_running_s": b_submitted - running_at,
        "a_started_before_b": sum(1 for c in a_calls if c["started"] < b_submitted),
        "a_makespan_s": a_timings["makespan_s"],
        "a_throughput_per_s": len(a_tasks) / a_timings["makespan_s"] if a_timings["makespan_s"] else None,
        "a_sim_throughput_per_s": len(a_calls) / a_span if a_span else None,
        "b_presence_s": presence,
        "a_in_flight_in_presence": a_in_flight,
        "b_in_flight_in_presence": b_in_flight,
        "a_throughput_in_presence_per_s": a_in_flight / latency_s if a_in_flight is not None else None,
        "total_throughput_per_s": len(all_tasks) / total_span if total_span else None,
        "cap_throughput_per_s": cap / latency_s,
        "max_in_flight_log": max_in_flight(calls),
        "a_statuses": a_timings["statuses"],
        "succeeded": succeeded,
        "lost": len(all_tasks) - succeeded,
        "tasks_with_more_attempts": sum(1 for t in all_tasks if len(t.get("attempts", [])) != 1),
        "calls_a": len(a_calls),
        "calls_b": len(b_calls),
        "calls_other": len(calls) - len(a_calls) - len(b_calls),
        "timeline": timeline(a_calls, b_calls, b_submitted),
    }


def max_in_flight(calls: Sequence[Mapping[str, Any]]) -> int:
    """The most calls open at once in the call log (a call ending at t is closed before one starting at t)."""
    events = [(c["started"], 1) for c in calls]
    events += [(c["finished"], -1) for c in calls if c.get("finished") is not None]
    most = now = 0
    for _, step in sorted(events, key=lambda e: (e[0], e[1])):
        now += step
        most = max(most, now)
    return most


def mean_in_flight(calls: Sequence[Mapping[str, Any]], begin: float, end: float) -> float:
    """The calls' total time open within [begin, end], divided by its length: the mean number in flight."""
    if end <= begin:
        return 0.0
    open_s = sum(
        max(0.0, min(c["finished"], end) - max(c["started"], begin))
        for c in calls
        if c.get("finished") is not None
    )
    return open_s / (end - begin)


def timeline(
    a_calls: Sequence[Mapping[str, Any]], b_calls: Sequence[Mapping[str, Any]], b_submitted: float
) -> dict[str, dict[str, int]]:
    """Upstream calls started per tenant in each second around B's submission (s = 0): from −6 s to 4 s
    after B's last start."""
    last_b = max((c["started"] for c in b_calls), default=b_submitted) - b_submitted
    lo, hi = -6, int(last_b) + 4
    out: dict[str, dict[str, int]] = {}
    for tag, calls in (("A", a_calls), ("B", b_calls)):
        counts = Counter(int((c["started"] - b_submitted) // 1) for c in calls)
        out[tag] = {str(s): counts.get(s, 0) for s in range(lo, hi + 1)}
    return out


def timeline_columns(tl: Mapping[str, Mapping[str, int]]) -> list[str]:
    """The seconds worth showing: −4 … 6 around B's submission, and 2 s either side of B's starts."""
    seconds = [int(s) for s in tl["A"]]
    b_starts = [int(s) for s, n in tl["B"].items() if n]
    keep = {s for s in seconds if -4 <= s <= 6}
    for b in b_starts:
        keep |= {s for s in seconds if b - 2 <= s <= b + 2}
    return [str(s) for s in sorted(keep)]


# --------------------------------------------------------------------------------------------------
# the scenario
# --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    if any(a not in ("fair", "fifo") for a in arms):
        raise SystemExit(f"--arms: fair and/or fifo, not {args.arms!r}")
    params = {k: getattr(args, k) for k in vars(args) if k not in ("no_write", "keep", "profile")}
    params["target_s"] = 2 * args.latency_ms / 1000 + 1
    data = new_data("fairness", params)
    data["runs"] = []
    env = {
        "API_KEYS": ",".join(f"{t}:{k}" for t, k in KEYS.items()),
        "UPSTREAM_MAX_CONCURRENCY": str(args.cap),
    }
    sim_args = ["--latency-ms", str(args.latency_ms), "--latency-jitter-ms", str(args.jitter_ms)]
    sim_args += ["--image-bytes", "0", "--seed", "1"]
    with bench_stack(sim_args=sim_args, env=env, keep=args.keep, snapshot=not args.live) as stack:
        say("fairness", f"stack up in {stack.root}")
        for arm in arms:
            result = one_arm(stack, args, arm)
            data["runs"].append(result)
            say("fairness", f"{arm}: {arm_line(result)}")
    target = params["target_s"]
    fair = next((r for r in data["runs"] if r["arm"] == "fair"), None)
    data["summary"] = {
        "target_s": target,
        "fair_met": fair is not None and (fair["b_delay_max_s"] or 1e9) <= target,
        "cap_exceeded": any(
            max(r["max_in_flight_log"], r["sim"]["max_in_flight"] or 0) > args.cap for r in data["runs"]
        ),
        "lost": sum(r["lost"] for r in data["runs"]),
        "duplicates": sum(r["tasks_with_more_attempts"] for r in data["runs"]),
    }
    finish(data, render, args)
    s = data["summary"]
    ok = (fair is None or s["fair_met"]) and not s["cap_exceeded"] and s["lost"] == 0
    return 0 if ok and not any(r.get("error") for r in data["runs"]) else 1


def arm_line(r: Mapping[str, Any]) -> str:
    return (
        f"B start delay max/median {fmt(r['b_delay_max_s'])}/{fmt(r['b_delay_median_s'])}s "
        f"(sim {fmt(r['b_delay_sim_max_s'])}/{fmt(r['b_delay_sim_median_s'])}s); "
        f"A {fmt(r['a_throughput_per_s'])} jobs/s, {fmt(r['a_throughput_in_presence_per_s'])}/s while B "
        f"present; max in flight {r['max_in_flight_log']} (sim {r['sim']['max_in_flight']}); "
        f"lost {r['lost']}" + (f" ERROR {r['error']}" if r.get("error") else "")
    )


def _log_counts(r: Mapping[str, Any]) -> str:
    counts = Counter[str]()
    for log in r["worker_logs"].values():
        counts.update(log["counts"])
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "clean"


def render(data: dict[str, Any]) -> str:
    p, s = data["params"], data["summary"]
    runs = data["runs"]
    out = header(data, "Fair share: tenant B behind tenant A's backlog (`python -m bench fairness`)")
    out += [
        f"Tenant A submits {p['jobs']} jobs, then (A's backlog running, +{p['b_after']:g} s) tenant B "
        f"submits {p['b_jobs']}; L = {p['latency_ms']} ± {p['jitter_ms']} ms, cap "
        f"UPSTREAM_MAX_CONCURRENCY = {p['cap']}, "
        f"{p['workers']} worker processes × {p['concurrency']} threads. fair: B's jobs with B's key; fifo: "
        "with A's key (one tenant: behind A's backlog, as Celery's FIFO queue did).",
        "",
        f"Target (fair): B's start delay ≤ 2·L + 1 s = {s['target_s']:g} s: **"
        + ("met" if s["fair_met"] else "NOT met")
        + f"**. Cap exceeded: **{'YES' if s['cap_exceeded'] else 'never'}**. Lost: **{s['lost']}**; "
        f"tasks with other than one attempt: {s['duplicates']}.",
        "",
        markdown_table(
            ["", *[r["arm"] for r in runs]],
            [
                ["B's start delay, max s (store `started_at`)", *[r["b_delay_max_s"] for r in runs]],
                ["B's start delay, median s (store)", *[r["b_delay_median_s"] for r in runs]],
                [
                    "B's start delay, max / median s (simulator call log)",
                    *[f"{fmt(r['b_delay_sim_max_s'])} / {fmt(r['b_delay_sim_median_s'])}" for r in runs],
                ],
                ["B submitted, s after A's first POST", *[r["b_submit_after_a_s"] for r in runs]],
                ["A's calls started before B submitted", *[r["a_started_before_b"] for r in runs]],
                [
                    "A's throughput, jobs/s (A's makespan)",
                    *[f"{fmt(r['a_throughput_per_s'])} ({fmt(r['a_makespan_s'], 1)} s)" for r in runs],
                ],
                [
                    "A's rate while B present, jobs/s (A's mean calls in flight / L)",
                    *[
                        f"{fmt(r['a_throughput_in_presence_per_s'])} "
                        f"({fmt(r['a_in_flight_in_presence'], 1)} A + {fmt(r['b_in_flight_in_presence'], 1)}"
                        f" B in flight over {fmt(r['b_presence_s'], 1)} s)"
                        for r in runs
                    ],
                ],
                ["A + B jobs / their makespan, jobs/s", *[r["total_throughput_per_s"] for r in runs]],
                ["cap / L, jobs/s", *[r["cap_throughput_per_s"] for r in runs]],
                [
                    "max calls in flight (call log / simulator)",
                    *[f"{r['max_in_flight_log']} / {r['sim']['max_in_flight']}" for r in runs],
                ],
                ["succeeded / submitted", *[f"{r['succeeded']} / {r['jobs_a'] + r['jobs_b']}" for r in runs]],
                ["upstream calls A + B", *[f"{r['calls_a']} + {r['calls_b']}" for r in runs]],
                ["lost", *[r["lost"] for r in runs]],
                ["worker log warnings/errors", *[_log_counts(r) for r in runs]],
                [
                    "machine busy (all processes, other work too), % of its CPUs; worker CPU s",
                    *[
                        f"{100 * r['machine']['busy_fraction']:.0f} %; "
                        f"{sum(w['cpu_s'] for w in r['workers'].values()):.1f}"
                        for r in runs
                    ],
                ],
            ],
        ),  # fmt: skip
        "",
        "Start delay = B's task's first attempt (`started_at`) or its upstream call's start − the moment B "
        "began submitting. A's throughput = A's jobs / (last `finished_at` − first `created_at`). While B "
        "present = from B's submission to B's last upstream call finished; A's rate then = A's calls in "
        "flight, averaged over that window, / L (B's own share is what A gives up).",
        "",
    ]
    for r in runs:
        tl = r["timeline"]
        shown = timeline_columns(tl)
        cols, previous = [], None
        for second in shown:
            if previous is not None and int(second) != previous + 1:
                cols.append("…")
            cols.append(second)
            previous = int(second)
        out += [
            f"Upstream calls started per second around B's submission (s = 0), {r['arm']}:",
            "",
            markdown_table(
                ["s", *cols],
                [[tag, *(tl[tag].get(c, "") for c in cols)] for tag in ("A", "B")],
            ),
            "",
        ]
    return "\n".join(out)
