"""asyncio streams (open_connection / start_server) on the loop."""
from __future__ import annotations

import asyncio
import hashlib

import pytest

from .utils import MiB, payload, run

pytestmark = pytest.mark.timeout(60)


async def echo_handler(reader, writer):
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
    finally:
        writer.close()
        await writer.wait_closed()


def test_stream_echo_10mib_with_drain(loop):
    data = payload(10 * MiB + 13)

    async def main():
        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)

            async def send():
                view = memoryview(data)
                for i in range(0, len(view), 256 * 1024):
                    writer.write(view[i:i + 256 * 1024])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            h = hashlib.sha256()
            n = 0
            while chunk := await reader.read(1 << 20):
                h.update(chunk)
                n += len(chunk)
            await sender
            assert n == len(data)
            assert h.digest() == hashlib.sha256(data).digest()
            assert reader.at_eof()
            writer.close()
            await writer.wait_closed()

    run(loop, main())


def test_readline_readexactly_readuntil(loop):
    blob = bytes(range(256)) * 4

    async def handler(reader, writer):
        writer.write(b"line one\nline two\r\n")
        writer.write(len(blob).to_bytes(4, "big") + blob)
        writer.write(b"key=value;tail")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main():
        async with await asyncio.start_server(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert await reader.readline() == b"line one\n"
            assert await reader.readline() == b"line two\r\n"
            size = int.from_bytes(await reader.readexactly(4), "big")
            assert await reader.readexactly(size) == blob
            assert await reader.readuntil(b";") == b"key=value;"
            with pytest.raises(asyncio.IncompleteReadError) as ei:
                await reader.readexactly(100)
            assert ei.value.partial == b"tail"
            assert await reader.read() == b""
            assert await reader.readline() == b""
            writer.close()
            await writer.wait_closed()

    run(loop, main())


def test_writer_wait_closed_and_peer_eof(loop):
    async def main():
        seen = asyncio.get_running_loop().create_future()

        async def handler(reader, writer):
            seen.set_result(await reader.read())       # until EOF
            writer.close()
            await writer.wait_closed()

        async with await asyncio.start_server(handler, "127.0.0.1", 0) as server:
            addr = server.sockets[0].getsockname()
            reader, writer = await asyncio.open_connection(*addr)
            assert writer.get_extra_info("peername") == addr
            assert writer.can_write_eof()
            writer.write(b"last words")
            writer.close()
            assert writer.is_closing()
            await writer.wait_closed()
            assert await asyncio.wait_for(seen, 10) == b"last words"

    run(loop, main())


def test_many_stream_clients(loop):
    async def handler(reader, writer):
        line = await reader.readline()
        writer.write(line.upper())
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def client(port, i):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"client {i}\n".encode())
        line = await reader.readline()
        assert await reader.read() == b""
        writer.close()
        await writer.wait_closed()
        return line

    async def main():
        async with await asyncio.start_server(handler, "127.0.0.1", 0, backlog=300) as server:
            port = server.sockets[0].getsockname()[1]
            lines = await asyncio.gather(*(client(port, i) for i in range(200)))
        assert lines == [f"CLIENT {i}\n".encode() for i in range(200)]

    run(loop, main())


def test_stream_read_limit(loop):
    async def handler(reader, writer):
        writer.write(b"x" * 1000 + b"\n")
        await writer.drain()
        writer.close()
        await writer.wait_closed()

    async def main():
        async with await asyncio.start_server(handler, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=100)
            with pytest.raises(ValueError):
                await reader.readline()
            writer.close()
            await writer.wait_closed()

    run(loop, main())
