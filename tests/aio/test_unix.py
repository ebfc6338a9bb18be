"""Unix-domain stream sockets (feature "unix")."""
from __future__ import annotations

import asyncio
import socket

import pytest

from .utils import CollectProtocol, EchoServerProtocol, MiB, payload, requires, run

pytestmark = pytest.mark.timeout(60)


async def echo_handler(reader, writer):
    while chunk := await reader.read(65536):
        writer.write(chunk)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


def test_unix_stream_echo(loop, tmp_path):
    requires(loop, "unix")
    path = str(tmp_path / "s.sock")
    data = payload(2 * MiB + 1)

    async def main():
        server = await asyncio.start_unix_server(echo_handler, path)
        async with server:
            assert server.sockets[0].getsockname() == path
            reader, writer = await asyncio.open_unix_connection(path)

            async def send():
                writer.write(data)
                await writer.drain()
                writer.write_eof()

            sender = asyncio.ensure_future(send())
            got = await reader.read(-1)
            await sender
            assert got == data
            writer.close()
            await writer.wait_closed()

    run(loop, main())


def test_unix_server_protocol(loop, tmp_path):
    requires(loop, "unix")
    path = str(tmp_path / "p.sock")

    async def main():
        server = await loop.create_unix_server(EchoServerProtocol, path)
        try:
            tr, proto = await loop.create_unix_connection(lambda: CollectProtocol(loop), path)
            assert tr.get_extra_info("socket").family == socket.AF_UNIX
            assert tr.get_extra_info("peername") == path
            tr.write(b"over unix")
            tr.write_eof()
            await proto.done
            assert proto.data == b"over unix"
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_unix_socketpair_transport(loop):
    requires(loop, "unix")

    async def main():
        a, b = socket.socketpair()
        a.setblocking(False)
        tr, proto = await loop.create_connection(lambda: CollectProtocol(loop), sock=a)
        with b:
            b.sendall(b"from the pair")
            b.shutdown(socket.SHUT_WR)
            tr.write(b"back")
            tr.write_eof()
            await proto.done
            assert proto.data == b"from the pair"
            assert b.recv(100) == b"back"

    run(loop, main())
