"""loop.sock_* on non-blocking sockets, add_reader/add_writer, cancellation under load."""
from __future__ import annotations

import asyncio
import hashlib
import socket

import pytest

from .utils import (
    CollectProtocol,
    EchoServerProtocol,
    MiB,
    assert_ring_idle,
    ensure_fd_limit,
    ipv6_loopback_available,
    payload,
    refused_address,
    run,
    tcp_pairs,
)

pytestmark = pytest.mark.timeout(60)


def nonblocking(sock):
    sock.setblocking(False)
    return sock


async def connected_pair(loop, family=socket.AF_INET, host="127.0.0.1"):
    """(client, accepted) through sock_connect and sock_accept, concurrently."""
    lsock = nonblocking(socket.socket(family, socket.SOCK_STREAM))
    try:
        lsock.bind((host, 0))
        lsock.listen(8)
        client = nonblocking(socket.socket(family, socket.SOCK_STREAM))
        accept = asyncio.ensure_future(loop.sock_accept(lsock))
        await asyncio.sleep(0)
        try:
            await loop.sock_connect(client, lsock.getsockname()[:2])
            conn, addr = await accept
        except BaseException:
            client.close()
            accept.cancel()
            raise
        assert addr[:2] == client.getsockname()[:2]
        assert conn.getpeername()[:2] == client.getsockname()[:2]
        assert conn.gettimeout() == 0          # the accepted socket is non-blocking
        return client, conn
    finally:
        lsock.close()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_sock_connect_accept_recv(loop, family):
    if family == "ipv6":
        if not ipv6_loopback_available():
            pytest.skip("no IPv6 loopback")
        fam, host = socket.AF_INET6, "::1"
    else:
        fam, host = socket.AF_INET, "127.0.0.1"

    async def main():
        client, conn = await connected_pair(loop, fam, host)
        with client, conn:
            await loop.sock_sendall(client, b"hello")
            assert await loop.sock_recv(conn, 100) == b"hello"
            await loop.sock_sendall(conn, b"world")
            assert await loop.sock_recv(client, 100) == b"world"
            client.shutdown(socket.SHUT_WR)
            assert await loop.sock_recv(conn, 100) == b""          # EOF

    run(loop, main())


def test_sock_sendall_multi_mib(loop):
    data = payload(8 * MiB + 3)

    async def main():
        client, conn = await connected_pair(loop)
        with client, conn:
            async def reader():
                h = hashlib.sha256()
                n = 0
                while chunk := await loop.sock_recv(conn, 1 << 18):
                    h.update(chunk)
                    n += len(chunk)
                return n, h.digest()

            rtask = asyncio.ensure_future(reader())
            await loop.sock_sendall(client, data)
            await loop.sock_sendall(client, memoryview(data)[:1000])
            client.shutdown(socket.SHUT_WR)
            n, digest = await rtask
            assert n == len(data) + 1000
            assert digest == hashlib.sha256(data + data[:1000]).digest()

    run(loop, main())


def test_sock_recv_into(loop):
    data = payload(1 * MiB + 17)

    async def main():
        client, conn = await connected_pair(loop)
        with client, conn:
            sender = asyncio.ensure_future(loop.sock_sendall(client, data))
            buf = bytearray(100_000)
            got = bytearray()
            while len(got) < len(data):
                n = await loop.sock_recv_into(conn, buf)
                assert n > 0
                got += buf[:n]
            await sender
            assert got == data
            # into a memoryview slice: only that part is written
            await loop.sock_sendall(client, b"abcdef")
            target = bytearray(b"." * 20)
            n = 0
            while n < 6:
                n += await loop.sock_recv_into(conn, memoryview(target)[5 + n:15])
            assert target == b".....abcdef" + b"." * 9
            client.close()
            assert await loop.sock_recv_into(conn, buf) == 0

    run(loop, main())


def test_sock_connect_refused(loop):
    sock, addr = refused_address()

    async def main():
        with nonblocking(socket.socket()) as s:
            with pytest.raises(ConnectionRefusedError):
                await loop.sock_connect(s, addr)

    try:
        run(loop, main())
    finally:
        sock.close()


@pytest.mark.parametrize("family", ["tcp", "unix"])
def test_sock_connect_starts_at_once(loop, family, tmp_path):
    """sock_connect() calls connect() in the task's first step, as asyncio's loop does:
    a caller that then blocks the loop's thread (a blocking accept() of a thread-based
    peer, say) finds the connection there, instead of waiting for a loop turn that
    cannot come."""
    if family == "tcp":
        lsock = socket.create_server(("127.0.0.1", 0))
        addr = lsock.getsockname()
        client = nonblocking(socket.socket())
    else:
        addr = str(tmp_path / "c.sock")
        lsock = socket.socket(socket.AF_UNIX)
        lsock.bind(addr)
        lsock.listen(1)
        client = nonblocking(socket.socket(socket.AF_UNIX))
    lsock.settimeout(5)

    async def main():
        connect = asyncio.ensure_future(loop.sock_connect(client, addr))
        await asyncio.sleep(0)               # the task's first step has run
        try:
            conn, _ = lsock.accept()         # blocks the loop's thread
        except socket.timeout:
            raise AssertionError("sock_connect() had not connected when it yielded") from None
        await connect
        with conn:
            await loop.sock_sendall(client, b"hi")
            assert conn.recv(10) == b"hi"

    with lsock, client:
        run(loop, main())


def test_cancel_pending_sock_recv(loop):
    """A cancelled sock_recv: the task is cancelled, no data is lost, the loop and the
    socket go on working."""
    async def main():
        client, conn = await connected_pair(loop)
        with client, conn:
            task = asyncio.ensure_future(loop.sock_recv(conn, 1024))
            await asyncio.sleep(0.05)
            assert not task.done()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert task.cancelled()
            await asyncio.sleep(0.01)
            await loop.sock_sendall(client, b"after cancel")
            assert await loop.sock_recv(conn, 1024) == b"after cancel"
            # the same with sock_recv_into, and a timeout doing the cancelling
            buf = bytearray(64)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(loop.sock_recv_into(conn, buf), 0.05)
            await loop.sock_sendall(client, b"again")
            n = await loop.sock_recv_into(conn, buf)
            assert buf[:n] == b"again"

    run(loop, main())


def test_cancel_pending_sock_accept_and_connect(loop):
    async def main():
        with nonblocking(socket.create_server(("127.0.0.1", 0))) as lsock:
            task = asyncio.ensure_future(loop.sock_accept(lsock))
            await asyncio.sleep(0.02)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # the listening socket still accepts
            with nonblocking(socket.socket()) as c:
                accept = asyncio.ensure_future(loop.sock_accept(lsock))
                await loop.sock_connect(c, lsock.getsockname())
                conn, _ = await accept
                conn.close()

    run(loop, main())


# -------------------------------------------------------------------- readers / writers
def test_add_remove_reader(loop):
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    got = []

    async def main():
        fut = loop.create_future()

        def on_readable(tag):
            data = a.recv(100)
            got.append((tag, data))
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(a, on_readable, "sock-object")
        await asyncio.sleep(0.02)
        assert got == []                          # nothing to read yet
        b.send(b"one")
        await asyncio.wait_for(fut, 5)
        assert got == [("sock-object", b"one")]
        # replacing the callback, by fd number
        fut = loop.create_future()
        loop.add_reader(a.fileno(), on_readable, "fd-number")
        b.send(b"two")
        await asyncio.wait_for(fut, 5)
        assert got[-1] == ("fd-number", b"two")
        assert loop.remove_reader(a) is True
        assert loop.remove_reader(a) is False
        b.send(b"three")
        await asyncio.sleep(0.05)
        assert len(got) == 2                      # removed: not called
        assert a.recv(100) == b"three"

    try:
        run(loop, main())
    finally:
        a.close()
        b.close()


def test_reader_level_triggered(loop):
    """The callback keeps being called while the fd stays readable."""
    a, b = socket.socketpair()
    a.setblocking(False)
    calls = []

    async def main():
        done = loop.create_future()

        def on_readable():
            calls.append(a.recv(1))               # one byte at a time
            if len(calls) == 5:
                loop.remove_reader(a)
                done.set_result(None)

        loop.add_reader(a, on_readable)
        b.send(b"abcdefgh")
        await asyncio.wait_for(done, 5)
        assert b"".join(calls) == b"abcde"

    try:
        run(loop, main())
    finally:
        a.close()
        b.close()


def test_add_remove_writer(loop):
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)

    async def main():
        fut = loop.create_future()

        def on_writable():
            loop.remove_writer(a)
            fut.set_result(a.send(b"via writer"))

        loop.add_writer(a, on_writable)
        assert await asyncio.wait_for(fut, 5) == len(b"via writer")
        await asyncio.sleep(0.01)
        assert b.recv(100) == b"via writer"
        assert loop.remove_writer(a) is False

        # fill the socket: the writer is called only once there is room again
        try:
            while True:
                a.send(b"x" * 65536)
        except BlockingIOError:
            pass
        writable = loop.create_future()
        loop.add_writer(a.fileno(), lambda: writable.done() or writable.set_result(True))
        await asyncio.sleep(0.05)
        assert not writable.done()
        while True:
            try:
                if not b.recv(1 << 20):
                    break
            except BlockingIOError:
                break
        assert await asyncio.wait_for(writable, 5)
        assert loop.remove_writer(a.fileno()) is True

    try:
        run(loop, main())
    finally:
        a.close()
        b.close()


def test_reader_and_writer_same_fd(loop):
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)

    async def main():
        r, w = loop.create_future(), loop.create_future()
        loop.add_reader(a, lambda: r.done() or r.set_result(a.recv(10)))
        loop.add_writer(a, lambda: w.done() or w.set_result(True))
        assert await asyncio.wait_for(w, 5)
        assert loop.remove_writer(a)
        b.send(b"ping")
        assert await asyncio.wait_for(r, 5) == b"ping"
        assert loop.remove_reader(a)

    try:
        run(loop, main())
    finally:
        a.close()
        b.close()


# --------------------------------------------------------------- cancellation under load
async def check_loop_still_echoes(loop):
    server = await loop.create_server(EchoServerProtocol, "127.0.0.1", 0)
    try:
        tr, proto = await loop.create_connection(lambda: CollectProtocol(loop),
                                                 *server.sockets[0].getsockname())
        data = payload(500_000)
        tr.write(data)
        tr.write_eof()
        await proto.done
        assert proto.data == data
    finally:
        server.close()
        await server.wait_closed()


def test_cancel_2000_pending_sock_recv(loop):
    N = 2000
    ensure_fd_limit(2 * N + 100)
    clients, servers = tcp_pairs(N)

    async def main():
        tasks = [asyncio.ensure_future(loop.sock_recv(s, 1024)) for s in servers]
        await asyncio.sleep(0.1)
        assert not any(t.done() for t in tasks)
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        assert all(t.cancelled() for t in tasks)
        await check_loop_still_echoes(loop)
        # the sockets whose reads were cancelled still work (and lost nothing)
        for i in (0, N // 2, N - 1):
            clients[i].send(b"still here %d" % i)
            assert await loop.sock_recv(servers[i], 1024) == b"still here %d" % i
        # every cancelled recv's final completion has come
        await assert_ring_idle(loop)

    try:
        run(loop, main())
    finally:
        for s in clients + servers:
            s.close()


def test_cancel_1000_pending_stream_reads(loop):
    N = 1000
    ensure_fd_limit(2 * N + 100)

    async def main():
        writers = []

        async def handler(reader, writer):
            writers.append(writer)

        server = await asyncio.start_server(handler, "127.0.0.1", 0, backlog=N + 24)
        port = server.sockets[0].getsockname()[1]
        conns = []
        try:
            for i in range(0, N, 100):
                conns += await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port)
                                                for _ in range(100)))
            tasks = [asyncio.ensure_future(r.read(1024)) for r, _ in conns]
            await asyncio.sleep(0.1)
            assert not any(t.done() for t in tasks)
            for t in tasks:
                t.cancel()
            results = await asyncio.gather(*tasks, return_exceptions=True)
            assert all(isinstance(r, asyncio.CancelledError) for r in results)
            await check_loop_still_echoes(loop)
            # a reader whose read was cancelled can read again (and lost nothing)
            while len(writers) < N:
                await asyncio.sleep(0.01)
            by_peer = {w.get_extra_info("peername"): w for w in writers}
            for i in (0, N // 2, N - 1):
                reader, writer = conns[i]
                by_peer[writer.get_extra_info("sockname")].write(b"still here %d" % i)
                assert await reader.readexactly(len(b"still here %d" % i)) == \
                    b"still here %d" % i
        finally:
            for _, w in conns:
                w.close()
            for w in writers:
                w.close()
            await asyncio.gather(*(w.wait_closed() for _, w in conns), return_exceptions=True)
            await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
            server.close()
            await server.wait_closed()

    run(loop, main())


class _WeakBuffer(bytearray):
    """A bytearray that can be watched with a weakref."""


def test_sendall_buffer_kept_until_final_completion(loop):
    """The engine's rule, through the loop: the data a sock_sendall handed to the kernel
    stays referenced after the awaiting task is cancelled and the caller dropped it,
    until the cancelled send's final completion has arrived."""
    import gc
    import weakref

    engine = getattr(loop, "_engine", None)
    if engine is None:
        pytest.skip("checks the io_uring engine's pinning (asyncio's loop has none)")
    a, b = socket.socketpair()
    nonblocking(a)
    nonblocking(b)

    async def main():
        data = _WeakBuffer(32 << 20)              # far more than the socket buffers hold
        ref = weakref.ref(data)
        task = asyncio.ensure_future(loop.sock_sendall(a, data))
        await asyncio.sleep(0.05)
        assert not task.done()
        assert engine.stats().pinned_objects >= 1
        del data
        gc.collect()
        assert ref() is not None, "the op must hold the data while the kernel may read it"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        del task        # on 3.10 a cancelled task keeps the CancelledError it caught, and
                        # with it the traceback of sock_sendall's frame (which holds data)
        gc.collect()                               # the task and its frame are gone now
        if engine.stats().pinned_objects:          # the send's final completion is to come
            assert ref() is not None, "released before the kernel was done with it"
        for _ in range(100):                       # the cancel's completion, then release
            gc.collect()
            if ref() is None:
                break
            await asyncio.sleep(0.01)
        assert ref() is None, "the data is released after the final completion"
        assert engine.stats().pinned_objects == 0

    try:
        run(loop, main())
    finally:
        a.close()
        b.close()


def test_cancel_500_pending_sock_sendall(loop):
    """Tasks cancelled mid-send (their peers do not read, so the sends wait in the
    kernel): all end cancelled, the loop still works, and on proactor's loop nothing is
    left in flight or pinned afterwards."""
    N = 500
    ensure_fd_limit(2 * N + 100)
    clients, servers = tcp_pairs(N)
    data = b"s" * (8 << 20)                        # far more than the socket buffers hold

    async def main():
        tasks = [asyncio.ensure_future(loop.sock_sendall(s, data)) for s in servers]
        await asyncio.sleep(0.2)
        assert not any(t.done() for t in tasks)
        for t in tasks:
            t.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, asyncio.CancelledError) for r in results)
        await check_loop_still_echoes(loop)
        await assert_ring_idle(loop)

    try:
        run(loop, main())
    finally:
        for s in clients + servers:
            s.close()


def test_closing_a_watched_socket_closes_it(loop):
    """A socket watched with add_reader and closed without remove_reader really closes
    (the peer sees EOF), as with a selector loop."""
    a, b = socket.socketpair()
    nonblocking(a)
    b.settimeout(5)

    async def main():
        loop.add_reader(a, lambda: None)
        await asyncio.sleep(0.01)
        a.close()
        await asyncio.sleep(0.05)
        assert b.recv(10) == b""
        loop.remove_reader(a)

    try:
        run(loop, main())
    finally:
        a.close()
        b.close()
