"""Echo server on asyncio's API, on proactor's loop or another, for compare.py.

The shape of ../shared/bench/peers/asyncio_echo.py, with ``--loop proactor``.

usage: python bench/asyncio_echo.py [--loop proactor|uvloop|asyncio] [--api protocol|streams] PORT
"""
from __future__ import annotations

import argparse
import asyncio


class Echo(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data)


async def echo_stream(reader, writer):
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


async def main(port, api):
    loop = asyncio.get_running_loop()
    if api == "protocol":
        server = await loop.create_server(Echo, "127.0.0.1", port, backlog=1024)
    else:
        server = await asyncio.start_server(echo_stream, "127.0.0.1", port, backlog=1024)
    print(f"listening on 127.0.0.1:{port} ({type(loop).__name__})", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--loop", default="proactor", choices=["proactor", "uvloop", "asyncio"])
    p.add_argument("--api", default="protocol", choices=["protocol", "streams"])
    a = p.parse_args()
    if a.loop == "proactor":
        import proactor
        proactor.run(main(a.port, a.api))
    elif a.loop == "uvloop":
        import uvloop
        uvloop.run(main(a.port, a.api))
    else:
        asyncio.run(main(a.port, a.api))
