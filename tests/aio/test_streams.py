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


def test_stream_echo_through_two_tiny_receive_buffers():
    """proactor's loop with a receive pool of 2 x 64 bytes (``new_event_loop(buffers=2,
    buffer_size=64)``; clients and server share it): 32 stream clients echo 1 MiB in all.
    The pool is dry nearly all the time, yet every byte comes back, in order, without a
    storm of resubmissions (there were ~13 submissions per 64 bytes received: every
    connection waiting for buffers was re-armed at every loop turn)."""
    import proactor

    try:
        lp = proactor.new_event_loop(buffers=2, buffer_size=64)
    except proactor.UringUnavailable as e:
        pytest.skip(f"proactor's loop is unavailable here: {getattr(e, 'reason', e)}")
    if not isinstance(lp, proactor.ProactorEventLoop):
        lp.close()
        pytest.skip("proactor.new_event_loop() falls back to asyncio's loop here")

    async def client(port, data):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)

        async def send():
            for i in range(0, len(data), 8192):
                writer.write(data[i:i + 8192])
                await writer.drain()
            writer.write_eof()

        sender = asyncio.create_task(send())
        got = bytearray()
        while chunk := await reader.read(65536):
            got += chunk
        await sender
        writer.close()
        await writer.wait_closed()
        return bytes(got)

    async def main():
        engine = asyncio.get_running_loop()._engine
        server = await asyncio.start_server(echo_handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        datas = [payload(32 * 1024, seed=i) for i in range(32)]
        before = engine.stats()
        async with server:
            results = await asyncio.gather(*(client(port, d) for d in datas))
        after = engine.stats()
        assert results == datas
        received = after.bytes_in - before.bytes_in
        assert received == 2 * 32 * 32 * 1024        # the server's and the clients'
        per_64 = (after.ops_submitted - before.ops_submitted) / (received / 64)
        assert per_64 <= 3, f"{per_64:.1f} submissions per 64 bytes received"

    try:
        lp.run_until_complete(asyncio.wait_for(main(), 50))
    finally:
        lp.close()
