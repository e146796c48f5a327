"""services/redis_connection.py: one place builds every Redis client and the broker's settings, for one
Redis or for the primary that Sentinel names (the failover itself: tests/test_failover.py)."""

from __future__ import annotations

from kombu.utils.url import url_to_parts

from services.config import load_config
from services.redis_connection import broker_transport_options, broker_url, broker_use_ssl, redis_client
from worker.app import create_celery

SENTINELS = {"REDIS_SENTINELS": "10.0.0.1:26379,[fd00::2]:26380", "REDIS_SENTINEL_MASTER": "imagegen"}


def test_without_sentinels_everything_uses_redis_url() -> None:
    config = load_config({"REDIS_URL": "redis://:pw@cache.internal:6380/3"})
    assert broker_url(config) == "redis://:pw@cache.internal:6380/3"
    assert broker_transport_options(config) == {} and broker_use_ssl(config) is None
    pool = redis_client(config).connection_pool
    assert pool.connection_kwargs["host"] == "cache.internal" and pool.connection_kwargs["db"] == 3


def test_with_sentinels_the_broker_is_kombus_sentinel_transport() -> None:
    config = load_config({**SENTINELS, "REDIS_URL": "redis://app:p%40ss%3Bword@ignored:1/2"})
    url = broker_url(config)
    entries = url.split(";")
    assert [entry.split("@")[1] for entry in entries] == ["10.0.0.1:26379/2", "[fd00::2]:26380/2"]
    first = url_to_parts(entries[0])
    assert (first.scheme, first.username, first.password, first.path) == (
        "sentinel",
        "app",
        "p@ss;word",
        "2",
    )
    options = broker_transport_options(config)
    assert options["master_name"] == "imagegen" and "password" not in options["sentinel_kwargs"]
    app = create_celery(config)
    assert app.conf.broker_transport_options["master_name"] == "imagegen"
    assert app.conf.broker_transport_options["visibility_timeout"] == config.visibility_timeout


def test_with_sentinels_the_store_asks_them_for_the_primary() -> None:
    config = load_config(
        {**SENTINELS, "REDIS_URL": "rediss://:pw@ignored:1/4", "REDIS_SENTINEL_PASSWORD": "sentinel-pw"}
    )
    pool = redis_client(config).connection_pool
    assert pool.service_name == "imagegen" and pool.is_master
    assert "Sentinel" in type(pool).__mro__[1].__name__ and pool.timeout == config.store_timeout
    assert pool.connection_kwargs["password"] == "pw" and pool.connection_kwargs["db"] == 4
    assert "SSL" in pool.connection_class.__name__, "rediss://: TLS to the primary"
    sentinels = pool.sentinel_manager.sentinels
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinels] == [26379, 26380]
    assert all(s.connection_pool.connection_kwargs["password"] == "sentinel-pw" for s in sentinels)
    assert broker_use_ssl(config) == {"ssl_cert_reqs": "required"}
    assert broker_transport_options(config)["sentinel_kwargs"]["ssl"] is True


def test_a_new_primary_closes_only_idle_connections_each_taken_out_first() -> None:
    """redis-py closes the idle connections when a thread sees a new primary; ours takes each out of the
    pool first, so that no other thread is handed one while it is being closed (which failed that thread's
    call inside redis-py, with a ValueError or an AttributeError instead of a ConnectionError), and puts
    it back: the pool keeps its size."""
    pool = redis_client(load_config(SENTINELS)).connection_pool
    in_use, idle = pool.make_connection(), pool.make_connection()
    pool.pool.get_nowait(), pool.pool.get_nowait()  # the two places they were made for
    pool.pool.put_nowait(idle)
    closed: list[object] = []
    handed_out_while_closed: list[bool] = []

    def closing(connection: object) -> None:
        closed.append(connection)
        handed_out_while_closed.append(connection in pool.pool.queue)  # another thread could take it

    for connection in (in_use, idle):
        connection.disconnect = lambda connection=connection: closing(connection)
    size = pool.pool.qsize()
    pool.disconnect(inuse_connections=False)
    assert closed == [idle] and handed_out_while_closed == [False]
    assert pool.pool.qsize() == size and idle in pool.pool.queue
    pool.disconnect()  # all of them, in use or not (what redis-py does on close)
    assert sorted(map(id, closed)) == sorted(map(id, [idle, in_use, idle]))
