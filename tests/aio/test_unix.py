"""Unix-domain stream sockets (feature "unix")."""
from __future__ import annotations

import asyncio
import os
import socket
import sys

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


@pytest.mark.parametrize("cleanup", [True, False])
def test_unix_server_path_removed_on_close(loop, tmp_path, cleanup):
    """Python 3.13 removes a Unix server's path when the server closes (unless
    cleanup_socket=False, or the path has been replaced since); before 3.13 it stays."""
    requires(loop, "unix")
    path = str(tmp_path / "c.sock")
    kwargs = {} if cleanup else {"cleanup_socket": False}
    if not cleanup and sys.version_info < (3, 13):
        pytest.skip("cleanup_socket= is new in Python 3.13")

    async def main():
        server = await loop.create_unix_server(EchoServerProtocol, path, **kwargs)
        tr, proto = await loop.create_unix_connection(lambda: CollectProtocol(loop), path)
        tr.write(b"x")
        tr.write_eof()
        await proto.done
        assert proto.data == b"x"
        assert os.path.exists(path)
        server.close()
        await server.wait_closed()
        removed = cleanup and sys.version_info >= (3, 13)
        assert os.path.exists(path) == (not removed)

        # a path replaced since the bind is not the server's to remove
        other = str(tmp_path / "d.sock")
        server = await loop.create_unix_server(EchoServerProtocol, other, **kwargs)
        os.unlink(other)
        with socket.socket(socket.AF_UNIX) as stranger:
            stranger.bind(other)
            server.close()
            await server.wait_closed()
            assert os.path.exists(other)

    run(loop, main())
