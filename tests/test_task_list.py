"""``GET /v1/tasks``: newest first, stable cursor paging, filters, tenant isolation, bad parameters; and
the index's upkeep (an expired record's entry is dropped, a rare filter stops at the scan budget)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any

import httpx
import pytest
import redis

from devstack.processes import wait_until
from services import task_list
from services.clock import epoch_ms, now_ms
from services.errors import InvalidRequest
from services.store import JobStore, TaskStatus
from services.task_list import Query, TaskList
from tests.stack import ApiServer, Stack, seed_body, with_directive


def submit(stack: Stack, run: str, body: dict[str, Any] | None = None, **headers: str) -> str:
    response = stack.http.post(
        f"{stack.api_url}/v1/images/generations",
        json={**(body or seed_body()), "metadata": {"run": run}},
        headers=headers,
    )
    assert response.status_code == 202, response.text
    return str(response.json()["id"])


def listed(stack: Stack, query: str, url: str | None = None, **headers: str) -> httpx.Response:
    return stack.http.get(f"{url or stack.api_url}/v1/tasks?{query}", headers=headers)


def all_pages(stack: Stack, query: str) -> list[list[str]]:
    pages: list[list[str]] = []
    cursor = ""
    while True:
        body = listed(stack, query + (f"&cursor={cursor}" if cursor else "")).json()
        pages.append([task["id"] for task in body["data"]])
        if body["next_cursor"] is None:
            return pages
        cursor = body["next_cursor"]


def test_pages_are_newest_first_and_stable_while_tasks_arrive(stack: Stack) -> None:
    run = uuid.uuid4().hex
    ids = [submit(stack, run) for _ in range(5)]
    first = listed(stack, f"metadata.run={run}&limit=2").json()
    assert [task["id"] for task in first["data"]] == ids[::-1][:2]
    assert first["data"][0]["metadata"] == {"run": run} and "links" in first["data"][0]
    later = [submit(stack, run) for _ in range(3)]  # created while the client pages
    rest: list[str] = []
    cursor = first["next_cursor"]
    while cursor:
        page = listed(stack, f"metadata.run={run}&limit=2&cursor={cursor}").json()
        rest += [task["id"] for task in page["data"]]
        cursor = page["next_cursor"]
    assert rest == ids[::-1][2:], "the rest in order, none repeated, none of those created meanwhile"
    assert sum(all_pages(stack, f"metadata.run={run}&limit=3"), []) == (ids + later)[::-1]


def test_filters_by_status_and_creation_time(stack: Stack) -> None:
    run = uuid.uuid4().hex
    done = submit(stack, run)
    stack.wait_final(done)
    failed = submit(stack, run, with_directive(script="400"))
    stack.wait_final(failed)
    slow = submit(stack, run, with_directive(delay_ms="3000"))
    by_status = {
        status: sum(all_pages(stack, f"metadata.run={run}&status={status}"), [])
        for status in ("succeeded", "failed", "canceled")
    }
    assert by_status == {"succeeded": [done], "failed": [failed], "canceled": []}
    stack.http.post(f"{stack.api_url}/v1/tasks/{slow}/cancel")
    assert sum(all_pages(stack, f"metadata.run={run}&status=canceled"), []) == [slow], "moved with its status"
    created = stack.task(failed)["created_at"]
    after = sum(all_pages(stack, f"metadata.run={run}&created_after={created}"), [])
    assert after == [slow, failed], "created_after is inclusive"
    before = sum(all_pages(stack, f"metadata.run={run}&created_before={created}"), [])
    assert before == [done], "created_before is exclusive"


@pytest.mark.parametrize(
    ("query", "field"),
    [
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("limit=ten", "limit"),
        ("status=done", "status"),
        ("created_after=yesterday", "created_after"),
        ("cursor=not-a-cursor", "cursor"),
        ("batch=1", "batch"),
        ("&".join(f"metadata.k{n}=v" for n in range(11)), "metadata.k10"),
        ("status=queued&status=bogus", "status"),  # a repeated parameter, not its first value only
        ("limit=5&limit=5", "limit"),
        ("metadata.k=a&metadata.k=b", "metadata.k"),
    ],
)
def test_bad_parameters_are_400_naming_them(stack: Stack, query: str, field: str) -> None:
    response = listed(stack, query)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == field


def test_a_metadata_key_may_have_90_characters_not_91() -> None:
    """The limit the message states is the one applied, on the key (not ``metadata.`` and the key)."""
    longest = "k" * task_list.MAX_METADATA_KEY
    assert task_list.query_from_params([(f"metadata.{longest}", "v")]).metadata == ((longest, "v"),)
    with pytest.raises(InvalidRequest) as refused:
        task_list.query_from_params([(f"metadata.{longest}k", "v")])
    assert refused.value.field == f"metadata.{longest}k"
    assert f"key of at most {task_list.MAX_METADATA_KEY} characters" in refused.value.message


def test_a_tenant_lists_its_own_tasks_only(stack: Stack) -> None:
    keys = (("list-a", "list-key-a"), ("list-b", "list-key-b"))
    api = ApiServer(dataclasses.replace(stack.config, api_keys=keys))
    try:
        run = uuid.uuid4().hex
        body = {**seed_body(), "metadata": {"run": run}}
        for _, key in keys:
            response = stack.http.post(
                f"{api.url}/v1/images/generations", json=body, headers={"Authorization": f"Bearer {key}"}
            )
            assert response.status_code == 202
        seen = {
            tenant: [
                task["metadata"]
                for task in listed(stack, "limit=100", api.url, Authorization=f"Bearer {key}").json()["data"]
            ]
            for tenant, key in keys
        }
        assert seen == {"list-a": [{"run": run}], "list-b": [{"run": run}]}
    finally:
        api.stop()


# --------------------------------------------------------------------------------------------------
# the index, on a real Redis
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def store(redis_client: redis.Redis) -> JobStore:
    return JobStore(redis_client, prefix="list-test")


def test_an_entry_whose_record_expired_is_dropped(store: JobStore) -> None:
    ids = [store.create(model="m", payload=b"{}", metadata=None, tenant="t")["id"] for _ in range(3)]
    store._redis.delete(store.keys.task(ids[1]))  # as if its 30 days were up
    page = TaskList(store._redis, store.keys).page("t", Query())
    # (their order is tested elsewhere: created in the same millisecond, these three are ordered by id)
    assert sorted(task["id"] for task in page.tasks) == sorted([ids[0], ids[2]]) and page.next_cursor is None
    assert store._redis.zcard(store.keys.tenant_tasks("t")) == 2


def test_a_rare_filter_stops_at_the_scan_budget_with_a_cursor(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(task_list, "SCAN_BUDGET", 5)
    created = store.create(model="m", payload=b"{}", metadata={"k": "rare"}, tenant="t")
    rare = created["id"]
    # the others are newer by a millisecond at least: created in the same one, they would be ordered by
    # id, and the rare task could be among the 5 newest
    wait_until(lambda: now_ms() > epoch_ms(created["created_at"]), timeout=5, what="the next millisecond")
    for _ in range(7):
        store.create(model="m", payload=b"{}", metadata={"k": "common"}, tenant="t")
    tasks = TaskList(store._redis, store.keys)
    first = tasks.page("t", Query(metadata=(("k", "rare"),)))
    assert first.tasks == [] and first.next_cursor is not None, "5 examined, none matched: go on"
    second = tasks.page("t", Query(metadata=(("k", "rare"),), cursor=first.next_cursor))
    assert [task["id"] for task in second.tasks] == [rare] and second.next_cursor is None
    assert store.get(rare)["status"] == TaskStatus.QUEUED


def test_a_page_without_a_metadata_filter_reads_only_the_records_it_shows(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = []
    for _ in range(30):
        ids.append(store.create(model="m", payload=b"{}", metadata={"k": "v"}, tenant="t")["id"])
        time.sleep(0.002)  # one creation ms each: the cursor's score is its own task's only
    client = store._redis
    read: list[int] = []
    mget = client.mget
    monkeypatch.setattr(client, "mget", lambda keys: read.append(len(keys)) or mget(keys))
    tasks = TaskList(client, store.keys)
    first = tasks.page("t", Query(limit=5))
    second = tasks.page("t", Query(limit=5, cursor=first.next_cursor))
    queued = tasks.page("t", Query(limit=5, status="queued"))
    assert [task["id"] for task in first.tasks + second.tasks] == ids[::-1][:10]
    assert [task["id"] for task in queued.tasks] == ids[::-1][:5]
    assert read == [5, 5, 5], "the page's own records (after the cursor's entry), not a batch of 200"
    read.clear()
    store._redis.delete(store.keys.task(ids[-2]))  # one gone: one more read, of a batch
    assert [task["id"] for task in tasks.page("t", Query(limit=5)).tasks] == ids[::-1][:1] + ids[::-1][2:6]
    assert read == [5, 25]
    read.clear()
    assert len(tasks.page("t", Query(limit=5, metadata=(("k", "v"),))).tasks) == 5
    assert read == [29], "a metadata filter drops most records it reads: a batch at a time"


def test_the_index_scores_a_task_with_its_own_created_at(store: JobStore) -> None:
    """A time window [created_at, created_at + 1 ms) finds the task: the index's score is the record's
    millisecond (it was rounded from the clock while the record's was truncated, so half the tasks were
    outside their own window)."""
    tasks = TaskList(store._redis, store.keys)
    for _ in range(40):
        task = store.create(model="m", payload=b"{}", metadata=None, tenant="t")
        created = epoch_ms(task["created_at"])
        window = Query(created_after=created, created_before=created + 1)
        assert task["id"] in [found["id"] for found in tasks.page("t", window).tasks]
        assert store._redis.zscore(store.keys.tenant_tasks("t"), task["id"]) == created
