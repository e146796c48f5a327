"""devstack.processes.free_port: the test servers' ports, out of the way of outgoing connections."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from devstack import processes
from devstack.processes import HOST, LOWEST_PORT, free_port

EPHEMERAL_FLOOR = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


NO_ROOM = EPHEMERAL_FLOOR <= LOWEST_PORT + 1000


@pytest.mark.skipif(NO_ROOM, reason="no room below this system's ephemeral ports")
def test_ports_come_from_below_the_range_outgoing_connections_take_theirs_from() -> None:
    ports = [free_port() for _ in range(500)]
    assert all(LOWEST_PORT <= port < EPHEMERAL_FLOOR for port in ports)
    assert len(set(ports)) == len(ports)  # never the same twice in a process
    for port in ports[:20]:
        with socket.socket() as sock:
            sock.bind((HOST, port))


def test_a_port_something_listens_on_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    held = socket.create_server((HOST, 0))
    try:
        taken = held.getsockname()[1]
        other = free_port()
        picks = iter([taken, other])
        monkeypatch.setattr(processes, "_given", set())
        monkeypatch.setattr(processes.random, "randrange", lambda *_: next(picks))
        monkeypatch.setattr(processes, "_ephemeral_floor", lambda: 60000)
        assert free_port() == other
    finally:
        held.close()


def test_without_room_below_the_ephemeral_range_the_system_picks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processes, "_ephemeral_floor", lambda: 1024)
    port = free_port()
    with socket.socket() as sock:
        sock.bind((HOST, port))
