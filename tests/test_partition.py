"""A partitioned worker host: its tasks run again elsewhere within the lease, its late results are refused
when its link comes back, and a stale clock on it does no harm.

The API, Redis, S3 and the simulator listen on one address (a bridge in the root namespace); two worker
"hosts" are network namespaces of their own, each joined to the bridge by a veth pair, each running one
Celery worker (``ip netns exec``). Host 1's worker runs with its wall clock ten minutes behind, or
ahead (libfaketime; its monotonic clock is left alone). With calls in flight on host 1, its link goes
down (``ip link set ... down`` on the bridge's end of its veth): host 2 takes its tasks over once their
leases expire in Redis (a TTL and deadlines on Redis's clock, whatever host 1's clock says). With the
link back, host 1 reads the answers it paid for, and every write of them is refused (its attempt is not
the task's open one any more): each task has exactly one succeeded attempt and one set of outputs, and
the only calls made twice are those in flight at the cut (counted from the simulator's own call log).

Names (namespaces, bridge, veths) carry a random suffix and the subnet is a random private /24 that no
interface of the machine uses, so that runs side by side never collide; everything is deleted at the end,
even on failure. Without root or ``ip netns`` (a CI without the permission) the test is skipped, with the
reason.
"""

from __future__ import annotations

import glob
import os
import random
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.processes import wait_until
from services import presence
from services.clock import parse_iso
from tests.fault_kit import (
    FAULT_ENV,
    LEASE,
    STAMP_SLACK,
    attempt_pid,
    calls_by_task,
    paid_twice,
    settle_succeeded,
    slow_bodies,
    stored_attempts,
    submit_many,
    task_ids_by_key,
)
from tests.report import FaultRow, record
from tests.stack import Stack

pytestmark = pytest.mark.timeout(180)

CALL_MS = 4000  # each upstream call takes this long: the cut comes well before any answers
# Each worker holds at most this many tasks (prefetch multiplier 1), so that of 2 x PER_HOST tasks
# submitted at once each host gets PER_HOST: the first worker to read the queue cannot take them all.
PER_HOST = 8


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


def _faketime_library() -> str | None:
    found = sorted(glob.glob("/usr/lib/*/faketime/libfaketimeMT.so.1"))
    return found[0] if found else None


class Network:
    """A bridge with the services' address, and one namespace per worker host joined to it by a veth."""

    def __init__(self, hosts: int) -> None:
        suffix = secrets.token_hex(3)
        self.bridge = f"iqbr{suffix}"
        self.namespaces = {n: f"iq-{suffix}-h{n}" for n in range(1, hosts + 1)}
        self.outer = {n: f"iqo{n}{suffix}" for n in self.namespaces}  # the bridge's end of host n's veth
        self.inner = {n: f"iqi{n}{suffix}" for n in self.namespaces}
        self.subnet = self._free_subnet()
        self.service_ip = f"{self.subnet}.1"

    @staticmethod
    def _free_subnet() -> str:
        """A 10.x.y.0/24 that no address or route of the machine touches."""
        used = _ip("-o", "-4", "addr", "show").stdout + _ip("-4", "route", "show", "table", "all").stdout
        for _ in range(100):
            subnet = f"10.{random.randint(200, 254)}.{random.randint(0, 255)}"  # noqa: S311 - not a secret
            if f"{subnet}." not in used:
                return subnet
        raise RuntimeError("no free 10.x.y.0/24 for the test network")

    def up(self) -> None:
        _ip("link", "add", self.bridge, "type", "bridge")
        _ip("addr", "add", f"{self.service_ip}/24", "dev", self.bridge)
        _ip("link", "set", self.bridge, "up")
        for n, namespace in self.namespaces.items():
            _ip("netns", "add", namespace)
            _ip(
                "link",
                "add",
                self.outer[n],
                "type",
                "veth",
                "peer",
                "name",
                self.inner[n],
                "netns",
                namespace,
            )
            _ip("link", "set", self.outer[n], "master", self.bridge)
            _ip("link", "set", self.outer[n], "up")
            _ip("-n", namespace, "addr", "add", f"{self.host_ip(n)}/24", "dev", self.inner[n])
            _ip("-n", namespace, "link", "set", self.inner[n], "up")
            _ip("-n", namespace, "link", "set", "lo", "up")

    def down(self) -> None:
        """Delete everything ``up`` made (what is already gone is skipped). A namespace's deletion takes
        its veth end, and so the pair, with it; the processes in it must have been stopped first."""
        for n, namespace in self.namespaces.items():
            _ip("link", "del", self.outer[n], check=False)
            _ip("netns", "del", namespace, check=False)
        _ip("link", "del", self.bridge, check=False)

    def leftovers(self) -> list[str]:
        names = _ip("-o", "link", "show").stdout + _ip("netns", "list").stdout
        mine = [self.bridge, *self.outer.values(), *self.namespaces.values()]
        return [name for name in mine if re.search(rf"\b{re.escape(name)}\b", names)]

    def host_ip(self, n: int) -> str:
        return f"{self.subnet}.{10 + n}"

    def wrapper(self, n: int) -> list[str]:
        return ["ip", "netns", "exec", self.namespaces[n]]

    def cut(self, n: int) -> None:
        _ip("link", "set", self.outer[n], "down")

    def restore(self, n: int) -> None:
        _ip("link", "set", self.outer[n], "up")


def _netns_unavailable() -> str | None:
    """Why this machine cannot run the test, or None."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    probe = f"iq-probe-{secrets.token_hex(3)}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"ip netns add is not permitted here: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def network() -> Iterator[Network]:
    reason = _netns_unavailable()
    if reason:
        pytest.skip(f"partition test skipped: {reason}")
    net = Network(hosts=2)
    try:
        net.up()
        yield net
    finally:
        net.down()
        assert not net.leftovers(), f"left behind: {net.leftovers()}"


@pytest.fixture(params=[-600, 600], ids=["clock-behind", "clock-ahead"])
def clock_offset(request: pytest.FixtureRequest) -> int:
    """Seconds host 1's wall clock is off by: ten minutes behind, or ahead."""
    return int(request.param)


@pytest.fixture
def partition_stack(tmp_path: Path, network: Network, clock_offset: int) -> Iterator[Stack]:
    """The services on the bridge's address, worker1 in host 1 (its clock off), worker2 in host 2."""
    stack = Stack(
        tmp_path,
        {**FAULT_ENV, "UPSTREAM_TIMEOUT": "20", "WORKER_CONCURRENCY": str(PER_HOST)},
        host=network.service_ip,
    )
    try:
        stack.start(0, webhook_worker=False)
        library = _faketime_library()
        stale = (
            {"LD_PRELOAD": library, "FAKETIME": f"{clock_offset:+d}", "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
            if library
            else {}
        )
        stack.start_worker("worker1", stale, wrapper=network.wrapper(1))
        stack.start_worker("worker2", wrapper=network.wrapper(2))
        stack.wait_ready(["worker1", "worker2"])
        yield stack
    finally:
        stack.stop()  # before the network: a namespace's processes keep it alive


def refused(stack: Stack, task_ids: list[str], what: str = "result") -> list[str]:
    """The tasks for which a worker logged one of its attempt's ``what`` (a regex: ``result``,
    ``result|failure``) as refused."""
    logs = stack.worker_logs()
    return [
        task_id
        for task_id in task_ids
        if re.search(rf"task {task_id}: attempt \d+'s (?:{what}) is refused", logs)
    ]


def held_by(stack: Stack, bodies: list[dict], ids: list[str], pid: int) -> list[str]:
    """The tasks with a call in flight at the simulator whose open attempt is ``pid``'s."""
    keys = task_ids_by_key(bodies, ids)
    held = []
    for call in stack.sim_call_log():
        if call["finished"] is None and call["key"] in keys:
            attempts = stack.stored(keys[call["key"]])["attempts"]
            if attempts and attempts[-1]["finished_at"] is None and attempt_pid(attempts[-1]) == pid:
                held.append(keys[call["key"]])
    return held


def test_a_cut_off_worker_host_is_taken_over_and_its_late_results_refused(
    partition_stack: Stack, network: Network, clock_offset: int
) -> None:
    stack = partition_stack
    host1 = stack.children["worker1"]
    host1_pid, host2_pid = host1.pid, stack.children["worker2"].pid
    bodies = slow_bodies(2 * PER_HOST, CALL_MS)
    ids = submit_many(stack, bodies)
    wait_until(
        lambda: len(held_by(stack, bodies, ids, host1_pid)) >= PER_HOST // 2,
        timeout=30,
        what=f"host 1 to hold {PER_HOST // 2} calls in flight",
    )
    cut_begun = time.time()
    network.cut(1)
    cut_at = time.time()
    tasks = settle_succeeded(stack, ids, timeout=60)  # on host 2 alone: host 1 is still cut off
    all_done = time.time() - cut_at
    assert host1.alive() and host1.pid == host1_pid and host1.restarts == 0, "host 1's worker ran on"

    attempts = stored_attempts(stack, ids)
    taken_over = [task_id for task_id in ids if attempts[task_id][0]["outcome"] == "worker_lost"]
    assert taken_over, "host 1 held attempts when it was cut off"
    for task_id in ids:
        outcomes = [a["outcome"] for a in attempts[task_id]]
        assert outcomes in (["succeeded"], ["worker_lost", "succeeded"]), (task_id, attempts[task_id])
        assert all(attempt_pid(a) == host1_pid for a in attempts[task_id] if a["outcome"] == "worker_lost")
    takeovers = sorted(parse_iso(attempts[task_id][1]["started_at"]).timestamp() for task_id in taken_over)
    renewal = LEASE / 3  # the lease keeper's interval (services/runtime.py)
    # Judged on Redis's clock, whatever host 1's says: not before the lease its last renewal gave has run
    # out (a clock behind would have the task taken over at once) ...
    first_takeover = takeovers[0] - cut_at
    assert first_takeover >= LEASE - renewal - 0.2, f"taken over {first_takeover:.2f}s after the cut"
    # ... and soon after it did (a clock ahead would hide the task for as long as it is ahead), or after
    # host 2 had a free slot: it runs PER_HOST jobs at once, its own first ones among them.
    busy = sorted(
        parse_iso(a["finished_at"]).timestamp()
        for task_id in ids
        for a in attempts[task_id]
        if attempt_pid(a) == host2_pid
        and parse_iso(a["started_at"]).timestamp() < cut_at < parse_iso(a["finished_at"]).timestamp()
    )
    free_at_cut = PER_HOST - len(busy)
    for index, started in enumerate(takeovers):
        slot_free = cut_at if index < free_at_cut else busy[index - free_at_cut]
        assert started <= max(cut_at + LEASE, slot_free) + 2.0, (
            f"taken over {started - cut_at:.2f}s after the cut (a slot of host 2 free "
            f"{slot_free - cut_at:.2f}s after it)"
        )
    if _faketime_library():  # the offset did reach host 1: it stamped its attempts that far off
        stamped = [parse_iso(attempts[task_id][0]["started_at"]).timestamp() for task_id in taken_over]
        assert all(abs(stamp - cut_at - clock_offset) < 60 for stamp in stamped), "host 1's clock was not off"

    before = {task_id: [(o["key"], o["sha256"]) for o in tasks[task_id]["outputs"]] for task_id in ids}
    network.restore(1)
    restored_at = time.time()
    # Back on the network, host 1 ends each call it had: answered (paid), and the write of it refused; or
    # failed. Its own metrics tell when none is left in flight.
    host1_metrics = f"http://{network.host_ip(1)}:{stack.metrics_ports['worker1']}/metrics"

    def host1_done() -> bool:
        in_flight = re.search(
            r"^imagegen_upstream_in_flight (\S+)$", stack.http.get(host1_metrics).text, re.M
        )
        paid = [task_id for task_id in ids if len(calls_by_task(stack, bodies, ids)[task_id]) == 2]
        return in_flight is not None and float(in_flight[1]) == 0 and set(refused(stack, ids)) >= set(paid)

    wait_until(host1_done, timeout=60, what="host 1 to end its calls and see their results refused")
    refused_after = time.time() - restored_at

    # The only calls made twice are those of the attempts host 1 held at the cut, each paid once more.
    # Such a call was sent before the cut, or into the cut link within moments of it: nothing but the
    # request itself lies between an attempt's start (a Redis round trip that got its answer) and its
    # call. TCP then delivers the request when the link is back, and the simulator logs it then.
    calls = calls_by_task(stack, bodies, ids)
    twice = [task_id for task_id in ids if len(calls[task_id]) == 2]
    assert all(len(calls[task_id]) in (1, 2) for task_id in ids), {
        t: calls[t] for t in ids if len(calls[t]) > 2
    }
    assert set(twice) <= set(taken_over), "only a task taken over is called again"
    late = 0
    for task_id in twice:
        first, second = sorted(calls[task_id], key=lambda call: call["started"])
        takeover = parse_iso(attempts[task_id][1]["started_at"]).timestamp()
        if first["started"] < cut_at + 0.5:  # host 1's, in flight at the cut; then host 2's
            assert first["finished"] is None or first["finished"] > cut_begun, (task_id, first)
            assert second["started"] >= takeover - STAMP_SLACK, (task_id, second)
        else:  # host 2's, then host 1's, delivered once the link was back
            assert takeover - STAMP_SLACK <= first["started"] < restored_at, (task_id, first)
            assert second["started"] >= restored_at, (task_id, second)
            late += 1
    assert twice, "host 1 had calls in flight at the cut"
    assert set(refused(stack, ids)) == set(twice), "host 1's results refused: exactly those it paid for"
    for task_id in ids:
        task = stack.task(task_id)
        assert [(o["key"], o["sha256"]) for o in task["outputs"]] == before[task_id], "nothing overwritten"
        assert [a["outcome"] for a in task["attempts"]].count("succeeded") == 1
        recorded = sorted(o["key"] for o in task["outputs"])
        wait_until(
            lambda task_id=task_id, recorded=recorded: stack.output_objects(task_id) == recorded,
            timeout=30,
            what=f"task {task_id}'s bucket to hold only its recorded outputs (stale uploads deleted)",
        )
    duplicates = paid_twice(stack, bodies)
    assert duplicates == len(twice), "each call in flight at the cut is paid twice, and no other"

    # Host 1 is back with its clock still ten minutes off: it consumes again and its work is recorded
    # like any other (its timestamps are off; no lease, retry or takeover depends on them).
    client, keys = stack.runtime.redis, stack.runtime.keys
    wait_until(
        lambda: any(w["process"].endswith(f":{host1_pid}") for w in presence.consuming(client, keys)),
        timeout=30,
        what="host 1 to consume again",
    )
    after_bodies = slow_bodies(2 * PER_HOST, 500)
    after_ids = submit_many(stack, after_bodies)
    settle_succeeded(stack, after_ids, timeout=60)
    after_attempts = stored_attempts(stack, after_ids)
    assert all(len(a) == 1 for a in after_attempts.values()), "none taken over once host 1 is back"
    on_host1 = sum(attempt_pid(a[0]) == host1_pid for a in after_attempts.values())
    assert on_host1, "host 1 took none of the tasks submitted once it was back"
    assert {attempt_pid(a[0]) for a in after_attempts.values()} <= {host1_pid, host2_pid}
    assert paid_twice(stack, after_bodies) == 0
    skew = f"{abs(clock_offset) // 60} min {'behind' if clock_offset < 0 else 'ahead'}"
    if not _faketime_library():
        skew = "not skewed (no libfaketime)"
    record(
        FaultRow(
            f"cut a worker host's link (netns) with calls in flight, restore it; its clock {skew}",
            len(ids) + len(after_ids),
            len(ids) + len(after_ids),
            0,
            0,
            duplicates,
            f"taken over {first_takeover:.1f}-{takeovers[-1] - cut_at:.1f}s after the cut (lease "
            f"{LEASE:.0f}s); "
            f"all done {all_done:.1f}s after it",
            note=f"{len(taken_over)} tasks taken over, {len(twice)} of them with a call in flight at the cut "
            f"({late} delivered only once the link was back; each paid twice); their late results refused "
            f"within {refused_after:.1f}s of the link coming back, stale uploads deleted; "
            f"then {len(after_ids)} more tasks, {on_host1} on the host with the stale clock, none taken over",
        )
    )
