"""UDP: datagram endpoints and sock_sendto/sock_recvfrom (feature "udp")."""
from __future__ import annotations

import asyncio
import socket

import pytest

from .utils import ipv6_loopback_available, payload, requires, run

pytestmark = pytest.mark.timeout(60)


class EchoDatagram(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data, addr)


class CollectDatagrams(asyncio.DatagramProtocol):
    def __init__(self, loop):
        self.queue = asyncio.Queue()
        self.errors = []
        self.lost = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.queue.put_nowait((data, addr))

    def error_received(self, exc):
        self.errors.append(exc)

    def connection_lost(self, exc):
        self.lost.set_result(exc)


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_datagram_endpoint_echo(loop, host):
    requires(loop, "udp")
    if host == "::1" and not ipv6_loopback_available():
        pytest.skip("no IPv6 loopback")
    sizes = [1, 100, 1400, 8000, 60000]   # not 0: Python < 3.12 does not send empty datagrams

    async def main():
        server_tr, _ = await loop.create_datagram_endpoint(EchoDatagram, local_addr=(host, 0))
        saddr = server_tr.get_extra_info("sockname")
        client_tr, client = await loop.create_datagram_endpoint(
            lambda: CollectDatagrams(loop), remote_addr=saddr[:2])
        try:
            assert client_tr.get_extra_info("peername")[:2] == saddr[:2]
            for i, size in enumerate(sizes):
                data = payload(size, seed=i)
                client_tr.sendto(data)
                got, addr = await asyncio.wait_for(client.queue.get(), 5)
                assert got == data
                assert addr[:2] == saddr[:2]
            assert client.errors == []
        finally:
            client_tr.close()
            server_tr.close()
        assert await client.lost is None

    run(loop, main())


def test_datagram_unconnected_sendto(loop):
    requires(loop, "udp")

    async def main():
        server_tr, _ = await loop.create_datagram_endpoint(EchoDatagram,
                                                           local_addr=("127.0.0.1", 0))
        saddr = server_tr.get_extra_info("sockname")
        client_tr, client = await loop.create_datagram_endpoint(
            lambda: CollectDatagrams(loop), local_addr=("127.0.0.1", 0))
        try:
            for i in range(50):
                client_tr.sendto(b"dgram %d" % i, saddr)
            got = sorted([(await asyncio.wait_for(client.queue.get(), 5))[0]
                          for _ in range(50)])
            assert got == sorted(b"dgram %d" % i for i in range(50))
        finally:
            client_tr.close()
            server_tr.close()

    run(loop, main())


def test_sock_sendto_recvfrom(loop):
    requires(loop, "udp")
    if not hasattr(loop, "sock_recvfrom"):
        pytest.skip("loop.sock_recvfrom needs Python 3.11")

    async def main():
        a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with a, b:
            for s in (a, b):
                s.setblocking(False)
                s.bind(("127.0.0.1", 0))
            recv = asyncio.ensure_future(loop.sock_recvfrom(b, 65536))
            await asyncio.sleep(0.01)
            await loop.sock_sendto(a, b"to b", b.getsockname())
            data, addr = await recv
            assert (data, addr) == (b"to b", a.getsockname())
            await loop.sock_sendto(b, payload(30000), a.getsockname())
            buf = bytearray(65536)
            n, addr = await loop.sock_recvfrom_into(a, buf)
            assert bytes(buf[:n]) == payload(30000) and addr == b.getsockname()
            # a cancelled sock_recvfrom loses nothing
            t = asyncio.ensure_future(loop.sock_recvfrom(a, 100))
            await asyncio.sleep(0.02)
            t.cancel()
            with pytest.raises(asyncio.CancelledError):
                await t
            await loop.sock_sendto(b, b"later", a.getsockname())
            assert (await loop.sock_recvfrom(a, 100))[0] == b"later"

    run(loop, main())
