"""TCP with protocols and transports: servers, echo, transport API, flow control,
BufferedProtocol, refused connections, many clients."""
from __future__ import annotations

import asyncio
import hashlib
import socket
import sys
import threading

import pytest

from .utils import (
    CollectProtocol,
    EchoServerProtocol,
    MiB,
    ipv6_loopback_available,
    payload,
    refused_address,
    run,
    wait_for_condition,
)

pytestmark = pytest.mark.timeout(60)

SIZES = [0, 1, 100, 65535, 65536, 65537, 1 * MiB + 3, 5 * MiB + 7]


async def echo_roundtrip(loop, host, port, data):
    tr, proto = await loop.create_connection(lambda: CollectProtocol(loop), host, port)
    if data:
        tr.write(data)
    assert tr.can_write_eof()
    tr.write_eof()
    await proto.done
    assert proto.eof
    assert proto.lost == 1 and proto.lost_exc is None
    assert tr.is_closing()
    return bytes(proto.data)


@pytest.mark.parametrize("size", SIZES)
def test_echo_sizes(loop, size):
    data = payload(size, seed=size)

    async def main():
        server = await loop.create_server(EchoServerProtocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            got = await echo_roundtrip(loop, "127.0.0.1", port, data)
        finally:
            server.close()
            await server.wait_closed()
        assert len(got) == len(data)
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()

    run(loop, main())


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_echo_ipv6(loop):
    data = payload(300_000)

    async def main():
        server = await loop.create_server(EchoServerProtocol, "::1", 0)
        sockname = server.sockets[0].getsockname()
        assert sockname[0] == "::1"
        try:
            assert await echo_roundtrip(loop, "::1", sockname[1], data) == data
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_many_writes_in_one_go(loop):
    """Thousands of small writes without yielding, then EOF: all arrive, in order."""
    chunks = [payload(i % 1000 + 1, seed=i) for i in range(5000)]

    async def main():
        server = await loop.create_server(EchoServerProtocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            tr, proto = await loop.create_connection(lambda: CollectProtocol(loop),
                                                     "127.0.0.1", port)
            for c in chunks:
                tr.write(c)
            tr.write_eof()
            await proto.done
            assert bytes(proto.data) == b"".join(chunks)
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


# ----------------------------------------------------------------------------- servers
def test_server_object(loop):
    async def main():
        server = await loop.create_server(EchoServerProtocol, "127.0.0.1", 0)
        assert server.get_loop() is loop
        assert server.is_serving()
        assert len(server.sockets) == 1
        host, port = server.sockets[0].getsockname()
        assert host == "127.0.0.1" and port > 0
        assert await echo_roundtrip(loop, host, port, b"ping") == b"ping"
        server.close()
        assert not server.is_serving()
        await server.wait_closed()
        assert not server.sockets
        with pytest.raises(ConnectionRefusedError):
            await loop.create_connection(asyncio.Protocol, host, port)

    run(loop, main())


def test_server_start_serving_later(loop):
    async def main():
        server = await loop.create_server(EchoServerProtocol, "127.0.0.1", 0,
                                          start_serving=False)
        assert not server.is_serving()
        port = server.sockets[0].getsockname()[1]
        await server.start_serving()
        assert server.is_serving()
        assert await echo_roundtrip(loop, "127.0.0.1", port, b"late") == b"late"
        server.close()
        await server.wait_closed()

    run(loop, main())


def test_server_serve_forever_cancelled(loop):
    async def main():
        server = await loop.create_server(EchoServerProtocol, "127.0.0.1", 0,
                                          start_serving=False)
        port = server.sockets[0].getsockname()[1]
        task = loop.create_task(server.serve_forever())
        await asyncio.sleep(0.01)
        assert server.is_serving()
        assert await echo_roundtrip(loop, "127.0.0.1", port, b"x" * 1000) == b"x" * 1000
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not server.is_serving()
        with pytest.raises(ConnectionRefusedError):
            await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)

    run(loop, main())


def test_server_async_with(loop):
    async def main():
        async with await loop.create_server(EchoServerProtocol, "127.0.0.1", 0) as server:
            port = server.sockets[0].getsockname()[1]
            assert await echo_roundtrip(loop, "127.0.0.1", port, b"abc") == b"abc"
        assert not server.is_serving()
        await server.wait_closed()

    run(loop, main())


@pytest.mark.skipif(not hasattr(asyncio.Server, "close_clients"),
                    reason="Server.close_clients/abort_clients are new in Python 3.13")
@pytest.mark.parametrize("how", ["close_clients", "abort_clients"])
def test_server_close_clients_abort_clients(loop, how):
    """3.13's Server keeps its transports: close_clients()/abort_clients() end every
    accepted connection, and wait_closed() returns once they are gone."""
    async def main():
        accepted = []

        class Server(EchoServerProtocol):
            def connection_made(self, transport):
                super().connection_made(transport)
                accepted.append(transport)

        server = await loop.create_server(Server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        clients = []
        for _ in range(3):
            tr, proto = await loop.create_connection(lambda: CollectProtocol(loop),
                                                     "127.0.0.1", port)
            tr.write(b"hello")
            await wait_for_condition(lambda p=proto: p.data == b"hello")
            clients.append((tr, proto))
        assert len(accepted) == 3
        server.close()
        getattr(server, how)()
        assert all(t.is_closing() for t in accepted)
        for tr, proto in clients:
            await proto.done
            assert proto.data == b"hello"
        await asyncio.wait_for(server.wait_closed(), 5)

    run(loop, main())


def test_server_close_keeps_existing_connections(loop):
    """Server.close() stops listening; connections already accepted go on."""
    async def main():
        server = await loop.create_server(EchoServerProtocol, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        tr, proto = await loop.create_connection(lambda: CollectProtocol(loop),
                                                 "127.0.0.1", port)
        tr.write(b"before")
        await wait_for_condition(lambda: proto.data == b"before")
        server.close()
        tr.write(b" after")
        tr.write_eof()
        await proto.done
        assert proto.data == b"before after"
        await server.wait_closed()

    run(loop, main())


def test_server_from_socket_and_connection_from_socket(loop):
    async def main():
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        server = await loop.create_server(EchoServerProtocol, sock=lsock)
        addr = lsock.getsockname()
        assert server.sockets[0].getsockname() == addr
        csock = socket.create_connection(addr)
        csock.setblocking(False)
        tr, proto = await loop.create_connection(lambda: CollectProtocol(loop), sock=csock)
        tr.write(b"via sock=")
        tr.write_eof()
        await proto.done
        assert proto.data == b"via sock="
        server.close()
        await server.wait_closed()

    run(loop, main())


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
def test_server_two_addresses(loop):
    async def main():
        server = await loop.create_server(EchoServerProtocol, ["127.0.0.1", "::1"], 0)
        try:
            assert len(server.sockets) == 2
            for s in server.sockets:
                host, port = s.getsockname()[:2]
                assert await echo_roundtrip(loop, host, port, host.encode()) == host.encode()
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_connect_accepted_socket(loop):
    async def main():
        with socket.create_server(("127.0.0.1", 0)) as lsock:
            client = socket.create_connection(lsock.getsockname())
            accepted, _ = lsock.accept()
        accepted.setblocking(False)
        tr, _ = await loop.connect_accepted_socket(EchoServerProtocol, accepted)
        try:
            def talk():
                with client:
                    client.sendall(b"accepted")
                    client.shutdown(socket.SHUT_WR)
                    out = b""
                    while chunk := client.recv(4096):
                        out += chunk
                    return out

            assert await loop.run_in_executor(None, talk) == b"accepted"
        finally:
            tr.close()

    run(loop, main())


# ---------------------------------------------------------------------------- transports
def test_transport_writelines_and_extra_info(loop):
    async def main():
        server_transports = []

        class Server(EchoServerProtocol):
            def connection_made(self, transport):
                super().connection_made(transport)
                server_transports.append(transport)

        server = await loop.create_server(Server, "127.0.0.1", 0)
        saddr = server.sockets[0].getsockname()
        try:
            tr, proto = await loop.create_connection(lambda: CollectProtocol(loop), *saddr)
            assert tr.get_protocol() is proto
            assert tr.get_extra_info("peername") == saddr
            sockname = tr.get_extra_info("sockname")
            assert sockname[0] == "127.0.0.1"
            sock = tr.get_extra_info("socket")
            assert sock.family == socket.AF_INET and sock.type == socket.SOCK_STREAM
            assert sock.fileno() >= 0
            assert sock.getsockname() == sockname
            assert tr.get_extra_info("no such key", "default") == "default"
            await wait_for_condition(lambda: server_transports)
            st = server_transports[0]
            assert st.get_extra_info("peername") == sockname
            assert st.get_extra_info("sockname") == saddr
            assert not tr.is_closing()
            tr.writelines([b"one ", bytearray(b"two "), memoryview(b"three "), b""])
            tr.write(memoryview(b"xxfourxx")[2:6])
            tr.write(bytearray(b" five"))
            tr.write_eof()
            await proto.done
            assert proto.data == b"one two three four five"
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_write_eof_half_close(loop):
    """After write_eof the peer sees EOF, and the writer can still read."""
    async def main():
        got_eof = loop.create_future()

        class Server(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                self.data = b""

            def data_received(self, data):
                self.data += data

            def eof_received(self):
                got_eof.set_result(self.data)
                self.transport.write(b"answer to " + self.data)
                self.transport.close()

        server = await loop.create_server(Server, "127.0.0.1", 0)
        try:
            tr, proto = await loop.create_connection(lambda: CollectProtocol(loop),
                                                     *server.sockets[0].getsockname())
            tr.write(b"question")
            tr.write_eof()
            assert await got_eof == b"question"
            await proto.done
            assert proto.data == b"answer to question"
            assert proto.eof
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_eof_received_true_keeps_transport_open(loop):
    async def main():
        state = {}

        class Server(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                self.n = 0

            def data_received(self, data):
                self.n += len(data)

            def eof_received(self):
                loop.call_later(0.02, self.reply)
                return True

            def reply(self):
                state["closing_at_reply"] = self.transport.is_closing()
                self.transport.write(f"got {self.n} bytes".encode())
                self.transport.close()

        server = await loop.create_server(Server, "127.0.0.1", 0)
        try:
            tr, proto = await loop.create_connection(lambda: CollectProtocol(loop),
                                                     *server.sockets[0].getsockname())
            tr.write(b"z" * 100_000)
            tr.write_eof()
            await proto.done
            assert proto.data == b"got 100000 bytes"
            assert state["closing_at_reply"] is False
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_close_calls_connection_lost_once(loop):
    async def main():
        server = await loop.create_server(EchoServerProtocol, "127.0.0.1", 0)
        try:
            tr, proto = await loop.create_connection(lambda: CollectProtocol(loop),
                                                     *server.sockets[0].getsockname())
            assert proto.made == 1
            tr.write(b"bye" * 10000)
            tr.close()
            assert tr.is_closing()
            tr.close()                              # idempotent
            assert await proto.done is None
            await asyncio.sleep(0.05)
            assert proto.lost == 1
            assert proto.lost_exc is None
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


@pytest.mark.parametrize("how", ["close", "abort"])
def test_connection_lost_at_the_next_turn(loop, how):
    """close() with nothing left to send, and abort(), call connection_lost at the next
    loop turn, as a selector loop does (the protocol, and whatever it holds, is let go
    then: CPython's test_create_connection_memory_leak checks that of an SSL client).
    Nothing is delivered after close()."""
    async def main():
        server = await loop.create_server(EchoServerProtocol, "127.0.0.1", 0)
        try:
            tr, proto = await loop.create_connection(lambda: CollectProtocol(loop),
                                                     *server.sockets[0].getsockname())
            tr.write(b"echo me")
            await wait_for_condition(lambda: proto.data == b"echo me")
            tr.write(b"and me")                     # echoed, maybe after the close
            await wait_for_condition(lambda: tr.get_write_buffer_size() == 0)
            got = bytes(proto.data)
            getattr(tr, how)()
            await asyncio.sleep(0)
            assert proto.lost == 1 and proto.lost_exc is None
            assert tr.get_protocol() is None
            await asyncio.sleep(0.05)
            assert proto.lost == 1 and proto.data == got and not proto.eof
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_close_flushes_buffered_data(loop):
    """close() with a large pending write: everything is sent before the FIN."""
    data = payload(4 * MiB + 1)

    async def main():
        received = loop.create_future()

        class Sink(asyncio.Protocol):
            def connection_made(self, transport):
                self.buf = bytearray()

            def data_received(self, d):
                self.buf += d

            def eof_received(self):
                received.set_result(bytes(self.buf))

        server = await loop.create_server(Sink, "127.0.0.1", 0)
        try:
            tr, proto = await loop.create_connection(lambda: CollectProtocol(loop),
                                                     *server.sockets[0].getsockname())
            tr.write(data)
            tr.close()
            got = await received
            assert len(got) == len(data) and got == data
            await proto.done
            assert proto.lost == 1
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_abort(loop):
    """abort() drops what is buffered: connection_lost(None) once on the aborting side;
    the peer, once it reads, gets less than was written, then the end of the stream."""
    WRITTEN = 64 * MiB                          # more than the kernel buffers take

    async def main():
        peer_lost = loop.create_future()
        peers = []

        class Peer(asyncio.Protocol):
            def connection_made(self, transport):
                self.transport = transport
                self.n = 0
                peers.append(self)
                transport.pause_reading()      # let the aborting side's buffer fill

            def data_received(self, data):
                self.n += len(data)

            def connection_lost(self, exc):
                peer_lost.set_result(exc)

        server = await loop.create_server(Peer, "127.0.0.1", 0)
        try:
            tr, proto = await loop.create_connection(lambda: CollectProtocol(loop),
                                                     *server.sockets[0].getsockname())
            tr.write(b"q" * WRITTEN)
            await asyncio.sleep(0.05)
            assert tr.get_write_buffer_size() > 0
            tr.abort()
            assert tr.is_closing()
            await proto.done
            await asyncio.sleep(0.05)
            assert proto.lost == 1
            assert proto.lost_exc is None
            await wait_for_condition(lambda: peers)
            peers[0].transport.resume_reading()
            await peer_lost
            assert 0 < peers[0].n < WRITTEN
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_write_buffer_limits(loop):
    async def main():
        server = await loop.create_server(EchoServerProtocol, "127.0.0.1", 0)
        try:
            tr, proto = await loop.create_connection(lambda: CollectProtocol(loop),
                                                     *server.sockets[0].getsockname())
            tr.set_write_buffer_limits(high=64 * 1024)
            low, high = tr.get_write_buffer_limits()
            assert high == 64 * 1024
            assert 0 <= low <= high
            tr.set_write_buffer_limits(high=1000, low=10)
            assert tr.get_write_buffer_limits() == (10, 1000)
            with pytest.raises(ValueError):
                tr.set_write_buffer_limits(high=1, low=2)
            assert tr.get_write_buffer_size() == 0
            tr.close()
            await proto.done
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


# -------------------------------------------------------------------------- flow control
def test_pause_resume_writing(loop):
    """A peer that does not read: pause_writing once past the high-water mark, the
    buffer grows with further writes, resume_writing once the peer reads."""
    HIGH = 64 * 1024
    CHUNK = 256 * 1024

    class Writer(asyncio.Protocol):
        def __init__(self):
            self.events = []
            self.resumed = loop.create_future()
            self.lost = loop.create_future()

        def connection_made(self, transport):
            self.transport = transport
            transport.set_write_buffer_limits(high=HIGH)

        def pause_writing(self):
            self.events.append(("pause", self.transport.get_write_buffer_size()))

        def resume_writing(self):
            self.events.append(("resume", self.transport.get_write_buffer_size()))
            if not self.resumed.done():
                self.resumed.set_result(None)

        def connection_lost(self, exc):
            self.lost.set_result(exc)

    async def main():
        with socket.create_server(("127.0.0.1", 0)) as lsock:
            tr, proto = await loop.create_connection(Writer, *lsock.getsockname())
            peer, _ = lsock.accept()
        received = [0]
        try:
            written = 0
            # fill the kernel buffers until the transport buffers past the high-water mark
            while not proto.events and written < 256 * MiB:
                tr.write(b"f" * CHUNK)
                written += CHUNK
                await asyncio.sleep(0)
            assert proto.events and proto.events[0][0] == "pause", proto.events
            assert len(proto.events) == 1
            size = tr.get_write_buffer_size()
            assert size > HIGH
            tr.write(b"g" * CHUNK)                # writes while paused are still taken
            written += CHUNK
            assert tr.get_write_buffer_size() >= size + CHUNK - 1
            await asyncio.sleep(0.05)
            assert [e for e, _ in proto.events] == ["pause"]

            # the peer starts reading (on a thread: it is a plain blocking socket)
            def drain():
                while True:
                    chunk = peer.recv(1 << 20)
                    if not chunk:
                        return
                    received[0] += len(chunk)

            reader = loop.run_in_executor(None, drain)
            await proto.resumed
            assert [e for e, _ in proto.events] == ["pause", "resume"]
            low = tr.get_write_buffer_limits()[0]
            assert proto.events[1][1] <= low
            tr.close()
            await reader
            assert received[0] == written
            assert await proto.lost is None
        finally:
            peer.close()

    run(loop, main())


def test_pause_resume_reading(loop):
    if sys.version_info < (3, 11, 4) and type(loop).__module__.startswith("asyncio"):
        pytest.skip("asyncio's own transports ignore pause_reading() in connection_made "
                    "before 3.11.4 (CPython gh-103607)")
    data = payload(3 * MiB + 5)

    class Reader(CollectProtocol):
        def __init__(self):
            super().__init__(loop)
            self.calls_while_paused = 0
            self.paused = False

        def connection_made(self, transport):
            super().connection_made(transport)
            transport.pause_reading()
            self.paused = True
            assert not transport.is_reading()

        def data_received(self, d):
            if self.paused:
                self.calls_while_paused += 1
            super().data_received(d)

    async def main():
        class Sender(asyncio.Protocol):
            def connection_made(self, transport):
                transport.write(data)
                transport.close()

        server = await loop.create_server(Sender, "127.0.0.1", 0)
        try:
            tr, proto = await loop.create_connection(Reader, *server.sockets[0].getsockname())
            await asyncio.sleep(0.1)
            assert proto.data == b"" and proto.calls_while_paused == 0
            assert not proto.eof and proto.lost == 0
            tr.pause_reading()                       # no-op when paused already
            # resume, take some, pause again in the middle of the stream
            proto.paused = False
            tr.resume_reading()
            assert tr.is_reading()
            await wait_for_condition(lambda: len(proto.data) > 0)
            tr.pause_reading()
            proto.paused = True
            n = len(proto.data)
            await asyncio.sleep(0.1)
            assert len(proto.data) == n and proto.calls_while_paused == 0
            proto.paused = False
            tr.resume_reading()
            tr.resume_reading()                      # no-op when reading already
            await proto.done
            assert proto.eof
            assert len(proto.data) == len(data) and proto.data == data
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


# ------------------------------------------------------------------------ BufferedProtocol
class BufferedCollector(asyncio.BufferedProtocol):
    def __init__(self, loop, bufsize):
        self.buf = bytearray(bufsize)
        self.data = bytearray()
        self.sizehints = []
        self.done = loop.create_future()
        self.eof = False

    def connection_made(self, transport):
        self.transport = transport

    def get_buffer(self, sizehint):
        self.sizehints.append(sizehint)
        return memoryview(self.buf)

    def buffer_updated(self, nbytes):
        assert 0 < nbytes <= len(self.buf)
        self.data += self.buf[:nbytes]

    def eof_received(self):
        self.eof = True

    def connection_lost(self, exc):
        self.done.set_result(exc)


@pytest.mark.parametrize("bufsize", [1, 4096, 1 << 20])
def test_buffered_protocol_client(loop, bufsize):
    data = payload(2 * MiB + 11 if bufsize > 1 else 20_000)

    async def main():
        class Sender(asyncio.Protocol):
            def connection_made(self, transport):
                transport.write(data)
                transport.close()

        server = await loop.create_server(Sender, "127.0.0.1", 0)
        try:
            tr, proto = await loop.create_connection(
                lambda: BufferedCollector(loop, bufsize), *server.sockets[0].getsockname())
            assert await proto.done is None
            assert proto.eof
            assert len(proto.data) == len(data) and proto.data == data
            assert all(isinstance(h, int) for h in proto.sizehints)
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_buffered_protocol_server_echo(loop):
    data = payload(3 * MiB + 1)

    class BufferedEcho(asyncio.BufferedProtocol):
        def connection_made(self, transport):
            self.transport = transport
            self.buf = bytearray(65536)

        def get_buffer(self, sizehint):
            return self.buf

        def buffer_updated(self, nbytes):
            self.transport.write(bytes(self.buf[:nbytes]))

        def eof_received(self):
            return None

    async def main():
        server = await loop.create_server(BufferedEcho, "127.0.0.1", 0)
        try:
            got = await echo_roundtrip(loop, *server.sockets[0].getsockname(), data)
            assert got == data
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


# --------------------------------------------------------------------- errors, concurrency
def test_connection_refused(loop):
    sock, addr = refused_address()

    async def main():
        with pytest.raises(ConnectionRefusedError):
            await loop.create_connection(asyncio.Protocol, *addr)
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(*addr)

    try:
        run(loop, main())
    finally:
        sock.close()


def test_protocol_exception_reaches_handler(loop, loop_errors):
    """An exception in data_received is a fatal error of that transport: the exception
    handler hears of it, the transport is closed, the loop goes on."""
    loop_errors.expect(exception=ZeroDivisionError)

    class Bad(asyncio.Protocol):
        def data_received(self, data):
            1 / 0

    async def main():
        server = await loop.create_server(Bad, "127.0.0.1", 0)
        try:
            tr, proto = await loop.create_connection(lambda: CollectProtocol(loop),
                                                     *server.sockets[0].getsockname())
            tr.write(b"trigger")
            await proto.done                          # the server side went away
            assert await echo_check(loop) == b"fine"
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


@pytest.mark.parametrize("paused", [False, True], ids=["reading", "paused"])
def test_data_before_a_reset_is_delivered_before_connection_lost(loop, paused):
    """Bytes that arrived before the peer's reset reach the protocol, in order, before
    connection_lost(ConnectionResetError), also when they were there before the
    transport existed, and when the protocol pauses reading until after the reset (it
    hears of the reset once it has read them, as with a selector loop)."""
    import struct
    import time

    data = payload(100_000)

    async def main():
        with socket.create_server(("127.0.0.1", 0)) as lsock:
            peer = socket.create_connection(lsock.getsockname())
            sock, _ = lsock.accept()
        peer.sendall(data)
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        peer.close()                               # a reset, after the data
        time.sleep(0.05)                           # both are in the socket
        sock.setblocking(False)
        tr, proto = await loop.create_connection(lambda: CollectProtocol(loop), sock=sock)
        if paused:
            tr.pause_reading()
            await asyncio.sleep(0.1)               # the loop runs; the protocol waits
            assert proto.lost == 0 and bytes(proto.data) == data[:len(proto.data)]
            tr.resume_reading()
        exc = await proto.done
        assert isinstance(exc, ConnectionResetError), exc
        assert len(proto.data) == len(data) and bytes(proto.data) == data

    run(loop, main())


def _address_space_in_use() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def test_write_that_cannot_be_queued_is_not_skipped(loop):
    """A write whose bytes cannot be queued (here the copy's memory cannot be had: an
    address-space limit, RLIMIT_AS, is in force during that one write()) must not be
    skipped while later writes go out: the peer gets a prefix of everything written, in
    order, and if it does not get all of it the writer was told (write() raised, or
    connection_lost got OSError ENOMEM of "send")."""
    import errno
    import resource

    with open("/proc/self/maps") as f:
        if "libasan" in f.read():
            pytest.skip("under AddressSanitizer an allocation that fails aborts the process")
    big = 128 * MiB                       # the refused write
    headroom = 32 * MiB                   # what the process may map beyond its size
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY and hard < _address_space_in_use() + 4 * big:
        pytest.skip(f"RLIMIT_AS hard limit {hard} is too low for this test")
    first = b"A" * big
    second = b"B" * 1000
    told: list = []

    class Writer(asyncio.Protocol):
        def connection_made(self, transport):
            resource.setrlimit(resource.RLIMIT_AS,
                               (_address_space_in_use() + headroom, hard))
            try:
                transport.write(first)
            except MemoryError as e:       # asyncio's own loop may refuse it right here
                told.append(e)
                transport.abort()
                return
            finally:
                resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
            transport.write(second)
            transport.close()

        def connection_lost(self, exc):
            if exc is not None:
                told.append(exc)
            lost.set_result(None)

    lost = loop.create_future()
    got = {"A": 0, "B": 0, "order": True}

    def read_all(sock):
        buf = bytearray(1 << 20)
        view = memoryview(buf)
        with sock:
            while True:
                try:
                    n = sock.recv_into(buf)
                except ConnectionResetError:
                    return
                if not n:
                    return
                chunk = view[:n]
                a = n - len(bytes(chunk).lstrip(b"A"))
                if got["B"] or (a < n and got["A"] + a < big):
                    got["order"] = got["order"] and got["A"] + a == big
                got["A"] += a
                got["B"] += n - a

    async def main():
        server = await loop.create_server(Writer, "127.0.0.1", 0)
        try:
            peer = socket.create_connection(server.sockets[0].getsockname(), timeout=15)
            reader = threading.Thread(target=read_all, args=(peer,))
            reader.start()
            await loop.run_in_executor(None, reader.join, 15)
            assert not reader.is_alive()
            await lost
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())
    assert got["order"], f"the second write went out without the first: {got}"
    if got["A"] + got["B"] < big + len(second):
        assert told, f"the stream was cut ({got}) and the writer was not told"
        exc = told[0]
        assert isinstance(exc, MemoryError) or (
            isinstance(exc, OSError) and exc.errno == errno.ENOMEM and "send" in str(exc)), exc


async def echo_check(loop):
    server = await loop.create_server(EchoServerProtocol, "127.0.0.1", 0)
    try:
        return await echo_roundtrip(loop, *server.sockets[0].getsockname(), b"fine")
    finally:
        server.close()
        await server.wait_closed()


def test_200_concurrent_clients(loop):
    N = 200

    async def client(port, i):
        data = payload(10_000 + i, seed=i)
        return await echo_roundtrip(loop, "127.0.0.1", port, data) == data

    async def main():
        server = await loop.create_server(EchoServerProtocol, "127.0.0.1", 0, backlog=N + 56)
        try:
            port = server.sockets[0].getsockname()[1]
            results = await asyncio.gather(*(client(port, i) for i in range(N)))
            assert all(results)
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_connection_made_before_data_and_lost_last(loop):
    """Event order on the server side: connection_made, data_received*, eof_received,
    connection_lost — from several threads' blocking clients at once."""
    events: dict[int, list] = {}

    class Recorder(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            self.key = len(events)             # not id(self): ids are reused
            events[self.key] = ["made"]

        def data_received(self, data):
            events[self.key].append("data")
            self.transport.write(data)

        def eof_received(self):
            events[self.key].append("eof")

        def connection_lost(self, exc):
            events[self.key].append("lost")

    async def main():
        server = await loop.create_server(Recorder, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()

        def blocking_client():
            with socket.create_connection(addr, timeout=10) as s:
                s.sendall(b"hello" * 1000)
                s.shutdown(socket.SHUT_WR)
                out = b""
                while chunk := s.recv(65536):
                    out += chunk
                return out

        try:
            outs = await asyncio.gather(*(loop.run_in_executor(None, blocking_client)
                                          for _ in range(8)))
            assert all(o == b"hello" * 1000 for o in outs)
            await wait_for_condition(lambda: len(events) == 8 and all(
                e[-1] == "lost" for e in events.values()))
        finally:
            server.close()
            await server.wait_closed()
        for ev in events.values():
            assert ev[0] == "made" and ev[-2:] == ["eof", "lost"]
            assert set(ev[1:-2]) == {"data"}

    run(loop, main())


def test_client_connection_made_before_data(loop):
    """A server that speaks first: on the client side connection_made still comes
    before the first data_received (and create_connection returns after it)."""
    class Greeter(asyncio.Protocol):
        def connection_made(self, transport):
            transport.write(b"220 hello\r\n")
            transport.close()

    class Client(asyncio.Protocol):
        def __init__(self):
            self.order = []
            self.done = loop.create_future()

        def connection_made(self, transport):
            self.order.append("made")

        def data_received(self, data):
            self.order.append("data")

        def eof_received(self):
            self.order.append("eof")

        def connection_lost(self, exc):
            self.order.append("lost")
            self.done.set_result(None)

    async def main():
        server = await loop.create_server(Greeter, "127.0.0.1", 0)
        try:
            for _ in range(20):
                tr, proto = await loop.create_connection(Client,
                                                         *server.sockets[0].getsockname())
                assert proto.order[:1] == ["made"]
                await proto.done
                assert proto.order[0] == "made" and proto.order[-2:] == ["eof", "lost"]
                assert set(proto.order[1:-2]) == {"data"}
        finally:
            server.close()
            await server.wait_closed()

    run(loop, main())


def test_create_connection_returns_before_data_received(loop):
    """Data waiting in the socket before the transport exists reaches the protocol only
    after create_connection() has returned to its caller (a selector loop's first read
    comes a turn after connection_made): a protocol may use what the caller got."""
    a, b = socket.socketpair()
    b.sendall(b"already there")
    caller: dict = {}

    class Client(CollectProtocol):
        def data_received(self, data):
            self.caller_had_transport = "transport" in caller
            super().data_received(data)

    async def main():
        a.setblocking(False)
        tr, proto = await loop.create_connection(lambda: Client(loop), sock=a)
        caller["transport"] = tr
        await wait_for_condition(lambda: proto.data == b"already there")
        assert proto.caller_had_transport
        tr.close()
        await proto.done

    with b:
        run(loop, main())


def test_tasks_of_connection_made_run_before_data_received(loop):
    """On an accepted connection whose data came before the accept, a task started in
    connection_made takes its first step before data_received (as with a selector loop,
    whose first read is queued behind it)."""
    order = []

    class Server(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport

            async def setup():
                order.append("task")

            self.task = loop.create_task(setup())

        def data_received(self, data):
            order.append("data")
            self.transport.close()

    async def main():
        server = await loop.create_server(Server, "127.0.0.1", 0)
        try:
            # connected and sent without yielding: the loop accepts a connection whose
            # data is there already
            with socket.create_connection(server.sockets[0].getsockname()) as c:
                c.sendall(b"early")
                await wait_for_condition(lambda: "data" in order)
                assert c.recv(10) == b""
        finally:
            server.close()
            await server.wait_closed()
        assert order == ["task", "data"]

    run(loop, main())


def test_blocking_peer_thread_with_transport(loop):
    """A thread-side blocking server and a loop-side client, streaming both ways."""
    data = payload(2 * MiB)

    async def main():
        lsock = socket.create_server(("127.0.0.1", 0))

        def serve():
            with lsock:
                conn, _ = lsock.accept()
                with conn:
                    while chunk := conn.recv(1 << 16):
                        conn.sendall(chunk)

        t = threading.Thread(target=serve)
        t.start()
        try:
            got = await echo_roundtrip(loop, *lsock.getsockname(), data)
            assert got == data
        finally:
            await loop.run_in_executor(None, t.join, 10)

    run(loop, main())
