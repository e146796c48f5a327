"""A worker process's presence: its record, and its part of the capacity admission hands tasks out against."""

from __future__ import annotations

import redis

from services.keys import Keys
from services.presence import Presence, consuming, process_name

KEYS = Keys("presence-test")


def announced(client: redis.Redis, queues: list[str], slots: int, prefetch: int) -> tuple[list[str], dict]:
    presence = Presence(client, KEYS, "worker@host", queues, slots, prefetch)
    presence.start()
    try:
        capacity = [member.decode() for member in client.zrange(KEYS.capacity, 0, -1)]
        [record] = consuming(client, KEYS)
        return capacity, record
    finally:
        presence.stop()


def test_the_capacity_is_the_slots_times_the_prefetch(redis_client: redis.Redis) -> None:
    capacity, record = announced(redis_client, ["generation"], slots=50, prefetch=2)
    assert capacity == [f"{process_name()}=100"], "each slot's running job and the successor it reserves"
    assert (record["slots"], record["prefetch"], record["queues"]) == (50, 2, ["generation"])
    assert redis_client.zcard(KEYS.capacity) == 0 and consuming(redis_client, KEYS) == [], "withdrawn"


def test_the_default_prefetch_announces_the_slots(redis_client: redis.Redis) -> None:
    capacity, _ = announced(redis_client, ["generation"], slots=50, prefetch=1)
    assert capacity == [f"{process_name()}=50"]


def test_celerys_unlimited_prefetch_announces_the_slots_not_nothing(redis_client: redis.Redis) -> None:
    capacity, record = announced(redis_client, ["generation"], slots=50, prefetch=0)
    assert capacity == [f"{process_name()}=50"], "a capacity of 0 would admit nothing at all"
    assert record["prefetch"] == 0


def test_a_webhook_worker_adds_no_capacity(redis_client: redis.Redis) -> None:
    capacity, record = announced(redis_client, ["webhooks"], slots=0, prefetch=1)
    assert capacity == [] and record["queues"] == ["webhooks"]
