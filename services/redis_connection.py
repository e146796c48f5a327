"""Every connection to Redis is made here: the store's client, the scrape client and the Celery broker's
settings, for one Redis (``REDIS_URL``) or for the primary that Sentinel names (``REDIS_SENTINELS``).

With sentinels, ``REDIS_URL`` gives only what is the same on every server: the scheme (``rediss://``: TLS),
the user and password, the database number and any TLS options in its query; its host and port are not
used. Every new connection asks the sentinels for the current primary (redis-py's
``SentinelManagedConnection``), so after a failover the clients reach the new primary on their next
connection: a call that was on the old one fails (``StoreUnavailable``: the API's 503), as does every call
while no primary is known, and the next one goes to the new primary. A connection kept to a server that
has become a replica is dropped on its first write (READONLY), and the call fails the same way.

The sentinels themselves are asked with ``REDIS_SENTINEL_PASSWORD`` (if they have one), over TLS when
``REDIS_URL`` is ``rediss://``, with ``STORE_TIMEOUT`` and no retry (a sentinel that does not answer is
skipped for the next one).

The Celery broker (``worker/app.py``) is kombu's ``sentinel://`` transport on the same sentinels and primary.
"""

from __future__ import annotations

import contextlib
import queue
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import redis
from redis.backoff import NoBackoff
from redis.connection import SSLConnection, parse_url
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from services.config import Config
from services.metrics import SCRAPE_TIMEOUT


class _BlockingSentinelPool(SentinelConnectionPool, redis.BlockingConnectionPool):
    """Sentinel's pool (connections to the current primary) with the blocking pool's waiting: once all its
    connections are in use, the next caller waits for one, up to ``timeout``."""

    def disconnect(self, inuse_connections: bool = True) -> None:
        """Close connections; ``inuse_connections=False`` (what redis-py does from the thread that first
        sees a new primary) closes only the idle ones, each taken out of the pool first. redis-py closes
        them where they lie, while other threads may be taking them out to use them: a thread's call
        then fails inside redis-py on a connection closed under it (``ValueError: I/O operation on closed
        file``, ``AttributeError``), not as a ``ConnectionError``, and its job with an internal error."""
        if inuse_connections:
            super().disconnect(inuse_connections=True)
            return
        idle: list[Any] = []
        with contextlib.suppress(queue.Empty):
            while True:
                idle.append(self.pool.get_nowait())
        for connection in idle:
            if connection is not None:
                connection.disconnect()
            self.pool.put_nowait(connection)

    def release(self, connection: Any) -> None:
        # A connection to a former primary is dropped, and the blocking pool leaves a free place for a new
        # one; unlisted here, so that failovers do not pile up dead connections in the pool's list.
        if not self.owns_connection(connection) and connection in self._connections:  # type: ignore[no-untyped-call]
            self._connections.remove(connection)
        super().release(connection)  # type: ignore[no-untyped-call]


def redis_client(config: Config) -> redis.Redis:
    """The process's client: a pool whose callers, once all its connections are in use, wait for one (up
    to ``STORE_TIMEOUT``) instead of failing at once: under gevent (the API) any number of requests may
    need one at the same moment, e.g. waiters woken together (``services/task_events.py``)."""
    return _client(
        config,
        timeout=config.store_timeout,
        max_connections=max(64, config.worker_concurrency * 4),
        health_check_interval=30,
    )


def scrape_client(config: Config) -> redis.Redis:
    """A client for ``GET /metrics``: ``SCRAPE_TIMEOUT`` to connect and per call, no retries, so that a
    scrape never hangs on a Redis that is down."""
    return _client(config, timeout=SCRAPE_TIMEOUT, max_connections=4, retry=Retry(NoBackoff(), 0))


def _client(config: Config, *, timeout: float, max_connections: int, **options: Any) -> redis.Redis:
    settings: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "max_connections": max_connections,
        "timeout": timeout,  # the wait for a free connection of the pool
        **options,
    }
    if not config.redis_sentinels:
        return redis.Redis(
            connection_pool=redis.BlockingConnectionPool.from_url(config.redis_url, **settings)
        )
    server = _server_settings(config.redis_url)
    pool = _BlockingSentinelPool(  # type: ignore[no-untyped-call]  # redis.sentinel is untyped
        config.redis_sentinel_master,
        _sentinel(config, timeout, tls=bool(server.get("ssl"))),
        **server,
        **settings,
    )
    return redis.Redis(connection_pool=pool)


def _server_settings(url: str) -> dict[str, Any]:
    """What ``REDIS_URL`` says of every server behind Sentinel: credentials, database, TLS (``ssl``, which
    ``SentinelConnectionPool`` turns into its TLS connection class) and TLS options."""
    settings: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]  # untyped in redis-py
    settings.pop("host", None)
    settings.pop("port", None)
    if settings.pop("connection_class", None) is SSLConnection:
        settings["ssl"] = True
    return settings


def _sentinel(config: Config, timeout: float, *, tls: bool) -> Sentinel:
    sentinel_settings: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if config.redis_sentinel_password is not None:
        sentinel_settings["password"] = config.redis_sentinel_password
    if tls:
        sentinel_settings["ssl"] = True
    return Sentinel(list(config.redis_sentinels), sentinel_kwargs=sentinel_settings)  # type: ignore[no-untyped-call]


# the Celery broker ------------------------------------------------------------------------------------
def broker_url(config: Config) -> str:
    """``REDIS_URL``, or with sentinels kombu's ``sentinel://[user:password@]host:port/db;…``: one entry a
    sentinel, each with the primary's credentials and database (kombu reads them from the first)."""
    if not config.redis_sentinels:
        return config.redis_url
    parts = urlsplit(config.redis_url)
    credentials = ""
    if parts.username or parts.password:
        user = quote(unquote(parts.username or ""), safe="")
        password = quote(unquote(parts.password or ""), safe="")
        credentials = f"{user}:{password}@" if password else f"{user}@"
    database = _server_settings(config.redis_url).get("db", 0)
    return ";".join(
        f"sentinel://{credentials}{_host(host)}:{port}/{database}" for host, port in config.redis_sentinels
    )


def broker_transport_options(config: Config) -> dict[str, Any]:
    """kombu's options for the broker: the primary's name and how to reach the sentinels (sentinel only)."""
    if not config.redis_sentinels:
        return {}
    sentinel_settings: dict[str, Any] = {
        "socket_timeout": config.store_timeout,
        "socket_connect_timeout": config.store_timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if config.redis_sentinel_password is not None:
        sentinel_settings["password"] = config.redis_sentinel_password
    if _server_settings(config.redis_url).get("ssl"):
        sentinel_settings["ssl"] = True
    return {"master_name": config.redis_sentinel_master, "sentinel_kwargs": sentinel_settings}


def broker_use_ssl(config: Config) -> dict[str, Any] | None:
    """TLS to the primary behind Sentinel (``rediss://``): kombu's ``sentinel://`` URL cannot say it. The
    ``ssl_*`` options of ``REDIS_URL``'s query are passed on; without any, the certificate is verified."""
    if not config.redis_sentinels:
        return None
    server = _server_settings(config.redis_url)
    if not server.get("ssl"):
        return None
    options = {name: value for name, value in server.items() if name.startswith("ssl_")}
    options.setdefault("ssl_cert_reqs", "required")
    return options


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host else host
