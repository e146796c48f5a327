"""A Redis primary with replicas and the sentinels that watch them, as processes on free ports: what the
failover test (tests/test_failover.py) and the replication benchmark (bench/replication.py) run on.

The servers are named ``redis-a``, ``redis-b``, … (``redis-a`` starts as the primary), the sentinels
``sentinel-1``, …; after a failover the primary is whichever server the sentinels name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from devstack.processes import HOST, Child, free_port, start_redis, start_sentinel, wait_until

MASTER = "imagegen"


@dataclass
class RedisGroup:
    root: Path
    log_dir: Path
    master: str = MASTER
    servers: dict[str, Child] = field(default_factory=dict)
    ports: dict[str, int] = field(default_factory=dict)
    sentinels: dict[str, Child] = field(default_factory=dict)
    sentinel_ports: list[int] = field(default_factory=list)

    def start(
        self,
        *,
        replicas: int = 1,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 3000,
        failover_timeout_ms: int = 3000,
    ) -> RedisGroup:
        names = [f"redis-{chr(ord('a') + number)}" for number in range(replicas + 1)]
        primary = names[0]
        for name in names:
            self.ports[name] = free_port()
            self.servers[name] = start_redis(
                self.root / name,
                self.ports[name],
                log_dir=self.log_dir,
                name=name,
                replicaof=None if name == primary else self.ports[primary],
                min_replicas_to_write=1,  # no split brain (README, "Redis failover")
            )
        wait_until(
            lambda: self.replicas_in_sync(primary) == replicas,
            timeout=30,
            what=f"{replicas} replica(s) in sync with {primary}",
        )
        for number in range(1, sentinels + 1):
            name, port = f"sentinel-{number}", free_port()
            self.sentinel_ports.append(port)
            self.sentinels[name] = start_sentinel(
                self.root / name,
                port,
                log_dir=self.log_dir,
                master=self.master,
                primary_port=self.ports[primary],
                quorum=quorum,
                down_after_ms=down_after_ms,
                failover_timeout_ms=failover_timeout_ms,
                name=name,
            )
        self.wait_watched(replicas)
        return self

    @property
    def children(self) -> dict[str, Child]:
        return {**self.servers, **self.sentinels}

    def env(self) -> dict[str, str]:
        """The service's variables for this group: every client finds the primary through the sentinels."""
        return {
            "REDIS_URL": "redis://unused/0",
            "REDIS_SENTINELS": ",".join(f"{HOST}:{port}" for port in self.sentinel_ports),
            "REDIS_SENTINEL_MASTER": self.master,
        }

    def client(self, name: str, timeout: float = 1.0) -> redis.Redis:
        return redis.Redis(
            host=HOST, port=self.ports[name], socket_timeout=timeout, socket_connect_timeout=timeout
        )

    def _info(self, name: str) -> dict[str, Any]:
        client = self.client(name)
        try:
            return client.info("replication")
        finally:
            client.close()

    def replicas_in_sync(self, name: str) -> int:
        """How many replicas ``name`` has, online (its own view)."""
        info = self._info(name)
        if info.get("role") != "master":
            return 0
        return sum(
            1
            for key, value in info.items()
            if key.startswith("slave") and isinstance(value, dict) and value.get("state") == "online"
        )

    def sentinel_views(self) -> list[tuple[str, int] | None]:
        """The primary each sentinel names now (None: it does not answer)."""
        views: list[tuple[str, int] | None] = []
        for port in self.sentinel_ports:
            client = redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1)
            try:
                address = client.sentinel_get_master_addr_by_name(self.master)
                views.append((address[0], int(address[1])) if address else None)
            except redis.RedisError:
                views.append(None)
            finally:
                client.close()
        return views

    def agreed_primary(self) -> str | None:
        """The server every sentinel names as the primary, if they all name the same one."""
        views = set(self.sentinel_views())
        if len(views) != 1:
            return None
        (view,) = views
        if view is None:
            return None
        return next((name for name, port in self.ports.items() if port == view[1]), None)

    def wait_watched(self, replicas: int, timeout: float = 30) -> None:
        """Until every sentinel sees the primary up with ``replicas`` replicas and every other sentinel."""
        others = len(self.sentinel_ports) - 1

        def watched() -> bool:
            for port in self.sentinel_ports:
                client = redis.Redis(host=HOST, port=port, socket_timeout=1, socket_connect_timeout=1)
                try:
                    state = client.sentinel_master(self.master)
                finally:
                    client.close()
                if state["is_sdown"] or state["is_odown"] or state["num-slaves"] < replicas:
                    return False
                if state["num-other-sentinels"] < others:
                    return False
            return True

        wait_until(
            watched, timeout=timeout, what="every sentinel to see the primary, its replicas, the others"
        )

    def restart(self, name: str) -> Child:
        """Start ``name`` again on its data, as a process manager would, with the command line it started
        with: the sentinels make a former primary a replica of the new one."""
        child = self.servers[name]
        child.stopped = False
        child.start()
        client = self.client(name, timeout=0.5)
        try:
            wait_until(client.ping, timeout=15, what=f"{name} to answer again")
        finally:
            client.close()
        return child

    def stop(self) -> None:
        for child in reversed(list(self.children.values())):
            child.stop()
