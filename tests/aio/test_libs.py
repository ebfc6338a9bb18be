"""Real libraries on the loop (each skips when it is not installed in the venv)."""
from __future__ import annotations

import asyncio

import pytest

from .utils import MiB, payload, run

pytestmark = pytest.mark.timeout(60)


def test_anyio_tcp_echo(loop):
    anyio = pytest.importorskip("anyio")
    from anyio.abc import SocketAttribute

    data = payload(1 * MiB + 5)

    async def main():
        async def handle(stream):
            async with stream:
                try:
                    while True:
                        await stream.send(await stream.receive(65536))
                except (anyio.EndOfStream, anyio.BrokenResourceError):
                    pass

        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = listener.extra(SocketAttribute.local_port)
        async with listener, anyio.create_task_group() as tg:
            tg.start_soon(listener.serve, handle)
            async with await anyio.connect_tcp("127.0.0.1", port) as client:
                async def send():
                    for i in range(0, len(data), 100_000):
                        await client.send(data[i:i + 100_000])
                    await client.send_eof()

                tg.start_soon(send)
                got = bytearray()
                try:
                    while True:
                        got += await client.receive(1 << 20)
                except anyio.EndOfStream:
                    pass
            assert got == data
            # a thread round trip and a timeout, for good measure
            assert await anyio.to_thread.run_sync(sum, [1, 2, 3]) == 6
            with anyio.move_on_after(0.01) as scope:
                await anyio.sleep(10)
            assert scope.cancelled_caught
            tg.cancel_scope.cancel()

    run(loop, main())


def test_aiohttp_round_trip(loop):
    pytest.importorskip("aiohttp")
    from aiohttp import ClientSession, web

    body = payload(300_000)

    async def hello(request):
        return web.Response(text="hello " + request.match_info["name"])

    async def echo(request):
        return web.Response(body=await request.read(),
                            content_type="application/octet-stream")

    async def main():
        app = web.Application()
        app.router.add_get("/hello/{name}", hello)
        app.router.add_post("/echo", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = runner.addresses[0][1]
            async with ClientSession() as session:
                for _ in range(3):                          # keep-alive reuse
                    async with session.get(f"http://127.0.0.1:{port}/hello/proactor") as r:
                        assert r.status == 200
                        assert await r.text() == "hello proactor"
                async with session.post(f"http://127.0.0.1:{port}/echo", data=body) as r:
                    assert r.status == 200
                    assert await r.read() == body
                results = await asyncio.gather(*(
                    session.get(f"http://127.0.0.1:{port}/hello/{i}") for i in range(20)))
                for i, r in enumerate(results):
                    assert await r.text() == f"hello {i}"
                    r.release()
        finally:
            await runner.cleanup()

    run(loop, main())
