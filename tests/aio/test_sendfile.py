"""loop.sendfile / loop.sock_sendfile (feature "sendfile")."""
from __future__ import annotations

import asyncio
import hashlib
import socket

import pytest

from .utils import MiB, payload, requires, run

pytestmark = pytest.mark.timeout(60)


class Sink(asyncio.Protocol):
    def __init__(self, loop):
        self.data = bytearray()
        self.done = loop.create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data

    def eof_received(self):
        self.done.set_result(bytes(self.data))


@pytest.fixture
def data_file(tmp_path):
    data = payload(3 * MiB + 7)
    path = tmp_path / "data.bin"
    path.write_bytes(data)
    return path, data


def test_loop_sendfile(loop, data_file):
    requires(loop, "sendfile")
    path, data = data_file

    async def main():
        sinks = []

        def factory():
            sinks.append(Sink(loop))
            return sinks[-1]

        server = await loop.create_server(factory, "127.0.0.1", 0)
        try:
            tr, _ = await loop.create_connection(asyncio.Protocol,
                                                 *server.sockets[0].getsockname())
            tr.write(b"header:")
            with open(path, "rb") as f:
                sent = await loop.sendfile(tr, f)
                assert sent == len(data)
                assert f.tell() == len(data)
                # a part of the file, by offset and count
                sent = await loop.sendfile(tr, f, offset=100, count=1000)
                assert sent == 1000
                assert f.tell() == 1100
            tr.write(b":trailer")
            tr.write_eof()
            got = await sinks[0].done
            tr.close()
        finally:
            server.close()
            await server.wait_closed()
        want = b"header:" + data + data[100:1100] + b":trailer"
        assert len(got) == len(want)
        assert hashlib.sha256(got).digest() == hashlib.sha256(want).digest()

    run(loop, main())


def test_sock_sendfile(loop, data_file):
    requires(loop, "sendfile")
    path, data = data_file

    async def main():
        with socket.create_server(("127.0.0.1", 0)) as lsock:
            client = socket.create_connection(lsock.getsockname())
            peer, _ = lsock.accept()
        client.setblocking(False)

        def read_all():
            with peer:
                out = bytearray()
                while chunk := peer.recv(1 << 20):
                    out += chunk
                return bytes(out)

        reader = loop.run_in_executor(None, read_all)
        with client, open(path, "rb") as f:
            assert await loop.sock_sendfile(client, f) == len(data)
            client.shutdown(socket.SHUT_WR)
            assert await reader == data

    run(loop, main())
