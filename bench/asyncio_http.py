"""Keep-alive HTTP/1.1 'hello' server with httptools on proactor's loop (or another),
the shape of ../shared/bench/peers/asyncio_http.py, for compare.py's HTTP mode.

usage: python bench/asyncio_http.py [--loop proactor|uvloop|asyncio] PORT
"""
from __future__ import annotations

import argparse
import asyncio

import httptools

BODY = b"Hello, World!"
RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
            % (len(BODY), BODY))


class Http(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport
        self.parser = httptools.HttpRequestParser(self)

    def data_received(self, data):
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self):
        self.transport.write(RESPONSE)
        if not self.parser.should_keep_alive():
            self.transport.close()


async def main(port):
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Http, "127.0.0.1", port, backlog=1024)
    print(f"listening on 127.0.0.1:{port} ({type(loop).__name__})", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--loop", default="proactor", choices=["proactor", "uvloop", "asyncio"])
    a = p.parse_args()
    if a.loop == "proactor":
        import proactor
        proactor.run(main(a.port))
    elif a.loop == "uvloop":
        import uvloop
        uvloop.run(main(a.port))
    else:
        asyncio.run(main(a.port))
