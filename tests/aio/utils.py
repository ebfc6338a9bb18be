"""Helpers of the event-loop suite (imported by conftest.py and the test modules)."""
from __future__ import annotations

import asyncio
import random
import socket
from typing import Any, Awaitable, Optional

import pytest
from support import describe_fds, ipv6_loopback_available, open_fds  # noqa: F401 (shared)

#: Default bound of one ``run()`` (seconds): nothing in this suite may hang.
TIMEOUT = 20.0

#: Skip reason of a feature the proactor loop does not list in ``_proactor_features``.
NOT_YET = "not implemented on proactor's loop yet"

MiB = 1024 * 1024


def run(loop: asyncio.AbstractEventLoop, coro: Awaitable[Any], timeout: float = TIMEOUT) -> Any:
    """``loop.run_until_complete(asyncio.wait_for(coro, timeout))``."""
    return loop.run_until_complete(asyncio.wait_for(coro, timeout))


def requires(loop: asyncio.AbstractEventLoop, feature: str) -> None:
    """Skip the test on a loop that declares its features (``loop._proactor_features``)
    without ``feature``; a loop that declares nothing (asyncio's) never skips."""
    features = getattr(loop, "_proactor_features", None)
    if features is not None and feature not in features:
        pytest.skip(f"{NOT_YET}: {feature}")


def payload(size: int, seed: int = 0) -> bytes:
    """``size`` pseudo-random bytes (deterministic per seed)."""
    return random.Random(seed).randbytes(size)


def ensure_fd_limit(needed: int) -> None:
    """Raise the soft RLIMIT_NOFILE to at least ``needed`` open fds (skip if the hard
    limit is lower). The raised limit is kept: it only ever grows."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = len(open_fds()) + needed + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        if hard != resource.RLIM_INFINITY and hard < want:
            pytest.skip(f"needs {want} fds, RLIMIT_NOFILE hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def tcp_pairs(n: int) -> tuple[list[socket.socket], list[socket.socket]]:
    """``n`` connected TCP socket pairs on 127.0.0.1, non-blocking: (clients, servers)."""
    clients: list[socket.socket] = []
    servers: list[socket.socket] = []
    with socket.create_server(("127.0.0.1", 0), backlog=128) as lsock:
        addr = lsock.getsockname()
        try:
            for _ in range(n):
                c = socket.create_connection(addr, timeout=10)
                clients.append(c)
                s, _ = lsock.accept()
                servers.append(s)
        except BaseException:
            for s in clients + servers:
                s.close()
            raise
    for s in clients + servers:
        s.setblocking(False)
    return clients, servers


def refused_address() -> tuple[socket.socket, tuple]:
    """A bound, not listening TCP socket on 127.0.0.1 and its address: connecting to it
    is refused (the caller keeps the socket open so that the port is not reused)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()


class EchoServerProtocol(asyncio.Protocol):
    """Echoes everything; closes on EOF (after what it wrote went out)."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)

    def eof_received(self) -> Optional[bool]:
        return None           # the transport closes itself


class CollectProtocol(asyncio.Protocol):
    """Client side: records everything it gets; ``done`` resolves at connection_lost."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.data = bytearray()
        self.eof = False
        self.made = 0
        self.lost = 0
        self.lost_exc: Any = "not called"
        self.connected = loop.create_future()
        self.done = loop.create_future()

    def connection_made(self, transport: Any) -> None:
        self.made += 1
        self.transport = transport
        if not self.connected.done():
            self.connected.set_result(None)

    def data_received(self, data: bytes) -> None:
        assert self.made == 1, "data_received before connection_made"
        assert not self.eof, "data_received after eof_received"
        assert self.lost == 0, "data_received after connection_lost"
        self.data += data

    def eof_received(self) -> Optional[bool]:
        self.eof = True
        return None

    def connection_lost(self, exc: Optional[BaseException]) -> None:
        self.lost += 1
        self.lost_exc = exc
        if not self.done.done():
            self.done.set_result(exc)


async def wait_for_condition(predicate: Any, timeout: float = 5.0,
                             interval: float = 0.005, message: str = "") -> None:
    """Poll ``predicate()`` on the running loop until it is truthy."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for "
                                 f"{message or predicate}")
        await asyncio.sleep(interval)


async def assert_ring_idle(loop: asyncio.AbstractEventLoop) -> None:
    """On proactor's loop: wait until nothing is in flight in its ring but the wakeup
    read and no buffer is pinned (every cancelled request's final completion has come).
    Nothing to check on other loops."""
    engine = getattr(loop, "_engine", None)
    if engine is None:
        return
    for _ in range(100):
        st = engine.stats()
        if st.ops_in_flight == 1 and st.pinned_objects == 0:
            return
        await asyncio.sleep(0.01)
    assert (st.ops_in_flight, st.pinned_objects) == (1, 0), st
