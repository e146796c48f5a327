"""Scenario ``list_latency``: ``GET /v1/tasks`` with up to a million tasks in Redis.

The list endpoint reads per-tenant sorted-set indexes (``services/task_list.py``), never a scan; this
measures that its latency does not grow with the number of tasks. One stack (gunicorn with gevent
workers, ``API_KEYS`` with three tenants: ``big`` holds 90 % of the tasks, ``mid`` 9 %, ``small`` 1 %),
filled in steps up to each size of ``--tasks``, and at each size the same queries, ``--requests`` times
each, one after another over HTTP with the ``big`` tenant's key (one query with ``small``'s):

1. templates: one task of each final status made by the real system: ``succeeded`` and ``failed``
   (a simulator directive answers 400) run by a worker, ``canceled`` canceled while queued;
2. the bulk of the tasks are clones of them, written with pipelines: each clone is its template with
   a new id (also in its output's key), tenant and metadata, every timestamp and expiry moved by the
   same offset (created over the last 30 days), and the keys the store left for the template (record,
   status events, payload while it would still be kept) copied with ``DUMP``/``RESTORE``; entries in
   ``{p}:t:{t}:tasks`` and ``{p}:t:{t}:status:{s}`` scored by creation (``services/keys.py``).
   The real store path is too slow for this: ``JobStore.create`` alone runs at a few thousand a second
   here, with start and succeed under a thousand (``bench/README.md``, scenario ``list_latency``);
3. ``--queued`` tasks of ``big`` stay queued: submitted through the API (the real path) in the first
   step, so its newest at every size (the first page has the same tasks at every size);
4. a sample of the clones is checked against its template: ``GET /v1/tasks/{id}`` shows the same
   task but for id, times and metadata; the list shows it as ``GET`` does; it is in its tenant's index
   and its status's only, scored by its ``created_at``; its status events are the template's.

Metadata is ``{"user": "u<n>", "campaign": "c<m>"}``: users by a Zipf law over ``--users`` values (u1
is the most common), 200 campaigns. Redis runs with AOF off (``CONFIG SET appendonly no``): the load
would write gigabytes of it, and the reads measured write nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import redis

from bench.common import add_common_arguments, finish, header, new_data, say
from bench.harness import (
    BenchStack,
    bench_stack,
    cpu_usage,
    fmt,
    markdown_table,
    percentile,
    seed_body,
    submit_jobs,
    wait_all_final,
    wait_for_quiet,
)
from services import clock
from services.keys import Keys
from services.serialization import dumps
from services.task_list import encode_cursor

DESCRIPTION = (
    "GET /v1/tasks latency at 10^4, 10^5, 10^6 tasks: pages, cursors, status, time and metadata filters"
)

TENANTS = {"big": 0.90, "mid": 0.09, "small": 0.01}
API_KEYS = {tenant: f"bench-list-{tenant}-key-0123456789" for tenant in TENANTS}
CLONED = {"succeeded": 0.90, "failed": 0.06, "canceled": 0.04}
CAMPAIGNS = 200
SPREAD_MS = 30 * 86400 * 1000  # clones are created over the last 30 days
NEWEST_MS = 600 * 1000  # ... up to 10 minutes ago
PER_TASK_KEYS = ("payload", "events", "result", "lease", "webhook_log")  # Keys methods of a task's keys
TIME_FIELDS = ("created_at", "started_at", "finished_at", "next_attempt_at", "deadline_at")
DEEP_PAGES = 50  # the deep page: after this many pages of 100


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--tasks", default="10000,100000,1000000", help="sizes, in increasing order (10000,100000,1000000)"
    )
    parser.add_argument("--requests", type=int, default=200, help="requests per query and size (200)")
    parser.add_argument("--queued", type=int, default=10, help="queued tasks of big, the newest (10)")
    parser.add_argument("--users", type=int, default=20000, help="distinct metadata.user values (20000)")
    parser.add_argument("--seed", type=int, default=1, help="random seed of the generated tasks (1)")
    parser.add_argument(
        "--verify", type=int, default=30, help="clones checked against templates per size (30)"
    )
    add_common_arguments(parser, quiet_wait=10)


# --------------------------------------------------------------------------------------------------
# templates: tasks made by the real system
# --------------------------------------------------------------------------------------------------


@dataclass
class Template:
    record: dict[str, Any]  # the stored record
    created_ms: int
    expires_ms: int  # the record's absolute expiry (ms); -1: none
    others: dict[str, tuple[bytes, int]]  # its other keys (PER_TASK_KEYS) left: DUMP, absolute expiry
    view: dict[str, Any]  # GET /v1/tasks/{id}


def _body(metadata: Mapping[str, str], directive: str = "") -> dict[str, Any]:
    body = seed_body()
    if directive:
        body["contents"][0]["parts"].insert(0, {"text": f"[sim key={uuid.uuid4().hex} {directive}]"})
    return {**body, "metadata": dict(metadata)}


def make_templates(stack: BenchStack, r: redis.Redis, keys: Keys) -> dict[str, Template]:
    """One task of each final status, through the API, a worker and the simulator."""
    big = _auth("big")
    meta = {"user": "u1", "campaign": "c0"}
    canceled = submit_jobs(stack.api_url, [_body(meta)], headers=big).ids[0]  # no worker yet
    stack.http.post(f"{stack.api_url}/v1/tasks/{canceled}/cancel", headers=big).raise_for_status()
    stack.start_worker("w0", pool="threads", concurrency=4)
    run = submit_jobs(stack.api_url, [_body(meta), _body(meta, "script=400")], headers=big)
    assert not run.errors, run.errors
    _, final = wait_all_final(stack.api_url, [*run.ids, canceled], timeout=60, headers=big)
    stack.stop_worker("w0")
    templates = {}
    for task_id, view in final.items():
        others = {}
        for name in PER_TASK_KEYS:
            key = getattr(keys, name)(task_id)
            dumped = r.dump(key)
            if dumped is not None:
                others[name] = (dumped, r.pexpiretime(key))
        record = json.loads(r.get(keys.task(task_id)))  # type: ignore[arg-type]
        created_ms = clock.epoch_ms(record["created_at"])
        templates[view["status"]] = Template(
            record, created_ms, r.pexpiretime(keys.task(task_id)), others, view
        )
    assert set(templates) == set(CLONED), f"templates: {sorted(templates)}"
    return templates


def _auth(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {API_KEYS[tenant]}"}


def _shift(value: str | None, delta_ms: int) -> str | None:
    return None if value is None else clock.iso_from_ms(clock.epoch_ms(value) + delta_ms)


def write_clone(
    pipe: Any, keys: Keys, template: Template, task_id: str, tenant: str, created_ms: int, metadata: Any
) -> None:
    """The template's record and keys under a new id, tenant and metadata, moved in time (not its index
    entries: the caller adds those)."""
    t, delta = template.record, created_ms - template.created_ms
    record = {
        **t,
        "id": task_id,
        "tenant": tenant,
        "metadata": metadata,
        **{name: _shift(t[name], delta) for name in TIME_FIELDS if name in t},
        "attempts": [
            {
                **a,
                "started_at": _shift(a["started_at"], delta),
                "finished_at": _shift(a["finished_at"], delta),
            }
            for a in t["attempts"]
        ],
        "outputs": [{**o, "key": o["key"].replace(t["id"], task_id)} for o in t["outputs"]],
    }
    expires = template.expires_ms + delta if template.expires_ms > 0 else None
    pipe.set(keys.task(task_id), dumps(record), pxat=expires)
    now = clock.now_ms()
    for name, (dumped, expiry) in template.others.items():
        if expiry < 0:
            pipe.restore(getattr(keys, name)(task_id), 0, dumped)
        elif expiry + delta > now:  # still kept (a payload is kept a day after the task is final)
            pipe.restore(getattr(keys, name)(task_id), expiry + delta, dumped, absttl=True)


# --------------------------------------------------------------------------------------------------
# the load
# --------------------------------------------------------------------------------------------------


class Loader:
    """Adds tasks up to a size: clones in pipelines, the queued ones through the API."""

    def __init__(
        self, stack: BenchStack, r: redis.Redis, keys: Keys, templates: dict[str, Template], args: Any
    ):
        self.stack, self.r, self.keys, self.templates = stack, r, keys, templates
        self.rng = random.Random(args.seed)
        self.users = [f"u{n}" for n in range(1, args.users + 1)]
        self.user_weights = list(itertools.accumulate(1 / n for n in range(1, args.users + 1)))
        self.count = len(templates)
        self.per_tenant = {tenant: 0 for tenant in TENANTS}
        self.per_tenant["big"] = len(templates)
        self.statuses = {status: 1 for status in templates} | {"queued": 0}
        self.user_counts: dict[str, int] = {}  # of the users queried (u1 and the last), in the big tenant
        self.clone_ids: list[tuple[str, str]] = []  # (tenant, id) of every 100th clone of the last step
        self.queued = args.queued  # still to submit

    def grow(self, size: int, *, chunk: int = 2000) -> dict[str, Any]:
        began, queued = time.monotonic(), self.queued
        self._queued()
        queued_s = time.monotonic() - began
        clones = size - self.count - queued
        began = time.monotonic()
        self.clone_ids = []
        for start in range(0, clones, chunk):
            self._clones(min(chunk, clones - start))
        clones_s = time.monotonic() - began
        self.count = size
        return {
            "clones": clones,
            "clones_s": clones_s,
            "clones_per_s": clones / clones_s if clones_s else None,
            "queued_submitted": queued,
            "queued_s": queued_s,
        }

    def _metadata(self, k: int) -> list[dict[str, str]]:
        users = self.rng.choices(self.users, cum_weights=self.user_weights, k=k)
        return [{"user": user, "campaign": f"c{self.rng.randrange(CAMPAIGNS)}"} for user in users]

    def _tenants(self, k: int) -> list[str]:
        return self.rng.choices(list(TENANTS), weights=list(TENANTS.values()), k=k)

    def _clones(self, k: int) -> None:
        keys, now = self.keys, clock.now_ms()
        statuses = self.rng.choices(list(CLONED), weights=list(CLONED.values()), k=k)
        index: dict[str, dict[str, int]] = {}
        pipe = self.r.pipeline(transaction=False)
        chosen = zip(statuses, self._tenants(k), self._metadata(k), strict=True)
        for n, (status, tenant, metadata) in enumerate(chosen):
            task_id = str(uuid.UUID(int=self.rng.getrandbits(128), version=4))
            created = now - NEWEST_MS - self.rng.randrange(SPREAD_MS)
            write_clone(pipe, keys, self.templates[status], task_id, tenant, created, metadata)
            index.setdefault(keys.tenant_tasks(tenant), {})[task_id] = created
            index.setdefault(keys.tenant_status(tenant, status), {})[task_id] = created
            self._count(tenant, status, metadata["user"])
            if n % 100 == 0:
                self.clone_ids.append((tenant, task_id))
        for key, members in index.items():
            pipe.zadd(key, members)
        pipe.execute()

    def _queued(self) -> None:
        metadata, self.queued = self._metadata(self.queued), 0
        submitted = submit_jobs(self.stack.api_url, [_body(m) for m in metadata], headers=_auth("big"))
        assert not submitted.errors, submitted.errors[:3]
        for m in metadata:
            self._count("big", "queued", m["user"])

    def _count(self, tenant: str, status: str, user: str) -> None:
        self.per_tenant[tenant] += 1
        self.statuses[status] += 1
        if tenant == "big" and user in (self.users[0], self.users[-1]):
            self.user_counts[user] = self.user_counts.get(user, 0) + 1


# --------------------------------------------------------------------------------------------------
# the check: clones are what the real system would show
# --------------------------------------------------------------------------------------------------


def _normal(view: Mapping[str, Any]) -> Any:
    """A task's view with its id, metadata and download URLs' signatures left out and its times made
    relative to its creation: what a clone must share with its template."""
    created = clock.epoch_ms(view["created_at"])
    text = json.dumps({k: v for k, v in view.items() if k != "metadata"}).replace(view["id"], "<id>")

    def relative(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: relative(v) for k, v in value.items()}
        if isinstance(value, list):
            return [relative(v) for v in value]
        if isinstance(value, str) and value.startswith("http") and "?" in value:
            return value.split("?")[0]
        if isinstance(value, str) and len(value) == 24 and value.endswith("Z") and value[10] == "T":
            return clock.epoch_ms(value) - created
        return value

    return relative(json.loads(text))


def _indexed(r: redis.Redis, keys: Keys, tenant: str, task_id: str) -> dict[str, float | None]:
    names = ["tasks", *(f"status:{s}" for s in ("queued", "running", "succeeded", "failed", "canceled"))]
    pipe = r.pipeline(transaction=False)
    pipe.zscore(keys.tenant_tasks(tenant), task_id)
    for name in names[1:]:
        pipe.zscore(keys.tenant_status(tenant, name.split(":")[1]), task_id)
    return dict(zip(names, pipe.execute(), strict=True))


def verify(stack: BenchStack, r: redis.Redis, keys: Keys, loader: Loader, count: int) -> dict[str, Any]:
    """Check the templates and ``count`` of the last step's clones as the module's doc says. The real
    store scores a task in ``{p}:t:{t}:tasks`` by its creation rounded to the ms, while ``created_at``
    (and the status index) truncate it: a real task's entry there may be 1 ms above its ``created_at``
    (counted in ``real_offsets``); clones are scored by their ``created_at`` in both."""
    problems: list[str] = []
    samples = random.Random(count).sample(loader.clone_ids, min(count, len(loader.clone_ids)))
    templates = loader.templates
    with httpx.Client(base_url=stack.api_url, timeout=30) as client:
        for tenant, task_id in [("big", t.record["id"]) for t in templates.values()] + samples:
            view = client.get(f"/v1/tasks/{task_id}", headers=_auth(tenant)).json()
            template = templates[view["status"]]
            if _normal(view) != _normal(template.view):
                problems.append(f"{task_id}: its view differs from its template's")
            created = clock.epoch_ms(view["created_at"])
            window = {"created_after": view["created_at"], "created_before": clock.iso_from_ms(created + 2)}
            page = client.get("/v1/tasks", params=window, headers=_auth(tenant)).json()
            listed = [_normal(task) for task in page["data"] if task["id"] == task_id]
            if listed != [_normal(view)]:
                problems.append(f"{task_id}: not listed as GET shows it: {listed}")
            indexed = _indexed(r, keys, tenant, task_id)
            in_tasks = indexed.pop("tasks")
            expected = {name: None for name in indexed} | {f"status:{view['status']}": float(created)}
            if indexed != expected or in_tasks not in (created, created + 1):
                problems.append(f"{task_id}: index entries {_indexed(r, keys, tenant, task_id)}")
            if r.lrange(keys.events(task_id), 0, -1) != r.lrange(keys.events(template.record["id"]), 0, -1):
                problems.append(f"{task_id}: status events differ from its template's")
    return {
        "checked": len(samples) + len(templates),
        "problems": problems,
        "real_offsets": real_offsets(r, keys, loader),
    }


def real_offsets(r: redis.Redis, keys: Keys, loader: Loader) -> dict[str, int]:
    """Tasks made by the real store (the templates, the queued ones): how many have their entries in
    ``{p}:t:{t}:tasks`` and in their status's index scored 1 ms after their ``created_at``."""
    queued = r.zrange(keys.tenant_status("big", "queued"), 0, -1)
    made = [(t.record["id"], t.record["status"]) for t in loader.templates.values()]
    made += [(member.decode(), "queued") for member in queued]
    pipe = r.pipeline(transaction=False)
    for task_id, status in made:
        pipe.get(keys.task(task_id))
        pipe.zscore(keys.tenant_tasks("big"), task_id)
        pipe.zscore(keys.tenant_status("big", status), task_id)
    found = pipe.execute()
    offsets = Counter({"tasks": 0, "status": 0, "of": len(made)})
    for raw, in_tasks, in_status in zip(found[::3], found[1::3], found[2::3], strict=True):
        created = clock.epoch_ms(json.loads(raw)["created_at"])
        offsets.update(tasks=int(in_tasks) - created, status=int(in_status) - created)
    return dict(offsets)


# --------------------------------------------------------------------------------------------------
# the measurement
# --------------------------------------------------------------------------------------------------


def queries(
    stack: BenchStack, r: redis.Redis, keys: Keys, loader: Loader
) -> Iterator[tuple[str, str, dict[str, str]]]:
    """(name, tenant, parameters) of each measured query at the current size."""
    now = time.time()
    yield "first page, limit=20", "big", {}
    yield "first page, limit=100", "big", {"limit": "100"}
    yield "first page, limit=20, tenant small", "small", {}
    cursor = None
    with httpx.Client(base_url=stack.api_url, timeout=30, headers=_auth("big")) as client:
        for _ in range(min(DEEP_PAGES, loader.per_tenant["big"] // 200)):
            params = {"limit": "100", **({"cursor": cursor} if cursor else {})}
            cursor = client.get("/v1/tasks", params=params).json()["next_cursor"]
    assert cursor is not None
    yield "deep page: next_cursor followed through 50 pages of 100", "big", {"cursor": cursor}
    middle = loader.per_tenant["big"] // 2
    ((member, score),) = r.zrevrange(keys.tenant_tasks("big"), middle, middle, withscores=True)
    yield "cursor at the middle of the index", "big", {"cursor": encode_cursor(int(score), member.decode())}
    yield f"status=queued (its {loader.statuses['queued']} newest)", "big", {"status": "queued"}
    yield "status=succeeded (90 %)", "big", {"status": "succeeded"}
    yield (
        "created_after/before: one day, 15 days ago",
        "big",
        {"created_after": clock.iso(now - 15 * 86400), "created_before": clock.iso(now - 14 * 86400)},
    )
    yield f"metadata.user={loader.users[0]} (most common)", "big", {"metadata.user": loader.users[0]}
    yield f"metadata.user={loader.users[-1]} (rare)", "big", {"metadata.user": loader.users[-1]}


def measure(stack: BenchStack, tenant: str, params: Mapping[str, str], n: int) -> dict[str, Any]:
    """``n`` requests one after another (after 5 to warm up): latency percentiles, and the API's and
    Redis's CPU per request."""
    pids = {name: stack.children[name].pid for name in ("api", "redis")}
    latencies: list[float] = []
    with httpx.Client(base_url=stack.api_url, timeout=60, headers=_auth(tenant)) as client:
        for _ in range(5):
            client.get("/v1/tasks", params=params).raise_for_status()
        with cpu_usage(pids) as cpu:
            for _ in range(n):
                began = time.perf_counter()
                response = client.get("/v1/tasks", params=params)
                latencies.append((time.perf_counter() - began) * 1000)
                response.raise_for_status()
    page = response.json()
    return {
        "p50_ms": percentile(latencies, 50),
        "p95_ms": percentile(latencies, 95),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies),
        "returned": len(page["data"]),
        "next_cursor": page["next_cursor"] is not None,
        "response_kb": len(response.content) / 1024,
        "api_cpu_ms": 1000 * cpu["api"] / n,
        "redis_cpu_ms": 1000 * cpu["redis"] / n,
    }


def memory(r: redis.Redis) -> dict[str, Any]:
    info = r.info("memory")
    return {
        "used_memory": info["used_memory"],
        "used_memory_dataset": info["used_memory_dataset"],
        "keys": r.dbsize(),
    }


# --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    sizes = [int(size) for size in args.tasks.split(",")]
    assert sizes == sorted(sizes) and sizes[0] > 100, "--tasks: increasing sizes above 100"
    params = {k: getattr(args, k) for k in vars(args) if k not in ("no_write", "keep", "profile")}
    data = new_data("list_latency", params)
    env = {"API_KEYS": ",".join(f"{t}:{k}" for t, k in API_KEYS.items()), "TENANT_MAX_QUEUED": "0"}
    with bench_stack(
        sim_args=["--latency-ms", "200"],
        env=env,
        keep=args.keep,
        snapshot=not args.live,
        api_worker_class="gevent",
    ) as stack:
        r = redis.Redis.from_url(stack.env["REDIS_URL"])
        r.config_set("appendonly", "no")
        keys = Keys(stack.env["KEY_PREFIX"])
        empty = memory(r)
        loader = Loader(stack, r, keys, make_templates(stack, r, keys), args)
        data["templates"] = {
            s: {"record_bytes": len(dumps(t.record)), "keys": sorted(t.others)}
            for s, t in loader.templates.items()
        }
        data["empty"] = empty
        data["sizes"] = []
        for size in sizes:
            load = loader.grow(size)
            say("list_latency", f"{size} tasks: {load}")
            step: dict[str, Any] = {"tasks": size, "load": load, "memory": memory(r)}
            step["per_tenant"], step["statuses"] = dict(loader.per_tenant), dict(loader.statuses)
            step["user_counts"] = dict(loader.user_counts)
            step["verify"] = verify(stack, r, keys, loader, args.verify)
            step["busy_before"] = wait_for_quiet(max_wait=args.quiet_wait) if args.quiet_wait > 0 else None
            step["loadavg_before"] = list(os.getloadavg())
            step["queries"] = {}
            for name, tenant, query in queries(stack, r, keys, loader):
                step["queries"][name] = {"params": query, **measure(stack, tenant, query, args.requests)}
                say("list_latency", f"{size}: {name}: {step['queries'][name]}")
            data["sizes"].append(step)
    finish(data, render, args)
    return 0 if all(not step["verify"]["problems"] for step in data["sizes"]) else 1


def render(data: dict[str, Any]) -> str:
    sizes, empty = data["sizes"], data["empty"]["used_memory"]
    last = sizes[-1]
    out = header(data, "`GET /v1/tasks` with up to a million tasks (`python -m bench list_latency`)")
    out += [
        "Three tenants (big 90 %, mid 9 %, small 1 % of the tasks), created over 30 days: the bulk "
        f"cloned from tasks the real system made, {data['params']['queued']} of big's queued (its newest, "
        "submitted through the API). Each query "
        f"{data['params']['requests']} times one after another over HTTP, the `big` tenant's key unless said "
        "(gunicorn, gevent, 2 processes).",
        "",
        "Latency, ms (p50 / p95 / p99):",
        "",
        markdown_table(
            ["query", *(f"{s['tasks']:,} tasks" for s in sizes)],
            [[name, *(_percentiles(s["queries"][name]) for s in sizes)] for name in last["queries"]],
        ),
        "",
        f"At {last['tasks']:,} tasks, per request:",
        "",
        markdown_table(
            ["query", "tasks returned", "next_cursor", "response KB", "API CPU ms", "Redis CPU ms"],
            [_costs(name, q) for name, q in last["queries"].items()],
        ),
        "",
        "Load and memory (per task: Redis `used_memory` above the empty store's, over the tasks):",
        "",
        markdown_table(
            ["tasks", "big / mid / small", "statuses", "clones written", "queued via API", "used_memory"]
            + ["per task", "keys", "checked"],
            [_load(s, empty) for s in sizes],
        ),
        "",
        "Tasks made by the real store (templates, queued) scored 1 ms after their `created_at` (CREATE "
        "scores `round(now * 1000)`, `created_at` is truncated): in `{{p}}:t:{{t}}:tasks` {tasks} of {of}, "
        "in their status's index {status}.".format(**last["verify"]["real_offsets"]),
        "",
        f"In the big tenant at {last['tasks']:,}: "
        + ", ".join(f"{u} has {n:,} tasks" for u, n in sorted(last["user_counts"].items()))
        + ". A record is "
        + ", ".join(f"{s} {t['record_bytes']:,} B" for s, t in data["templates"].items())
        + " of JSON.",
        "",
    ]
    out += [
        "Machine busy before measuring (of its CPUs, over 1 s; load average): "
        + ", ".join(
            f"{s['tasks']:,}: {fmt(100 * (s['busy_before'] or 0), 0)} % ({s['loadavg_before'][0]:.2f})"
            for s in sizes
        )
        + ".",
        "",
    ]
    for s in sizes:
        out += [f"- problem at {s['tasks']:,}: {p}" for p in s["verify"]["problems"][:10]]
    return "\n".join(out) + "\n"


def _percentiles(q: Mapping[str, Any]) -> str:
    return " / ".join(fmt(q[f"p{p}_ms"], 1) for p in (50, 95, 99))


def _costs(name: str, q: Mapping[str, Any]) -> list[Any]:
    cursor = "yes" if q["next_cursor"] else "no"
    return [
        name,
        q["returned"],
        cursor,
        fmt(q["response_kb"], 1),
        fmt(q["api_cpu_ms"]),
        fmt(q["redis_cpu_ms"]),
    ]


def _load(s: Mapping[str, Any], empty: int) -> list[Any]:
    load, used, problems = s["load"], s["memory"]["used_memory"], s["verify"]["problems"]
    return [
        f"{s['tasks']:,}",
        " / ".join(f"{s['per_tenant'][t]:,}" for t in TENANTS),
        ", ".join(f"{k} {v:,}" for k, v in s["statuses"].items()),
        f"{load['clones']:,} in {load['clones_s']:.1f} s ({load['clones_per_s']:,.0f}/s)",
        f"{load['queued_submitted']:,} in {load['queued_s']:.1f} s",
        f"{used / 2**20:,.0f} MB",
        f"{(used - empty) / s['tasks']:,.0f} B",
        f"{s['memory']['keys']:,}",
        f"{s['verify']['checked']}: " + (f"{len(problems)} PROBLEMS" if problems else "as their template"),
    ]
