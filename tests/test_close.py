"""Closing: peer resets, server-side close/abort, send after close, cancelling ops and
shutting down with ops in flight."""
from __future__ import annotations

import errno
import os
import random
import select
import socket
import struct
import threading
import time

import pytest
from support import (
    Echo,
    Recorder,
    connect,
    echo_once,
    factory_collecting,
    has_feature,
    on_engine_thread,
    recv_exactly,
    recv_until_eof,
    wait_until,
)

import proactor

pytestmark = [pytest.mark.linux, pytest.mark.timeout(60)]

WORKERS = [pytest.param(0, id="workers0"), pytest.param(4, id="workers4")]
BIG = 16 << 20


class OnCommand(proactor.Handler):
    """Runs ``action(conn)`` when a command arrives; records connection_lost."""

    action = staticmethod(lambda conn: None)

    def __init__(self) -> None:
        self.conn = None
        self.lost_calls: list = []
        self.lost = threading.Event()
        self.send_errors: list = []
        self.lost_thread = None

    def connection_made(self, conn):
        self.conn = conn

    def data_received(self, conn, data):
        if data.startswith(b"GO"):
            type(self).action(conn, self)
        else:
            conn.send(data)

    def connection_lost(self, conn, exc):
        self.lost_calls.append(exc)
        try:
            conn.send(b"too late")
        except OSError as e:
            self.send_errors.append(e)
        self.lost.set()


def serve(engine, action, workers=0):
    cls = type("H", (OnCommand,), {"action": staticmethod(action)})
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(cls, handlers), "127.0.0.1", 0, workers=workers)
    return ("127.0.0.1", srv.port), handlers


@pytest.mark.parametrize("workers", WORKERS)
def test_client_reset_while_server_sends(engine, workers):
    payload = random.Random(1).randbytes(1 << 20)

    def flood(conn, h):
        try:
            for _ in range(32):        # 32 MiB queued, far more than the socket buffers
                conn.send(payload)
        except BrokenPipeError:        # on a worker, the reset may already have closed it
            pass

    addr, handlers = serve(engine, flood, workers)
    s = connect(addr, rcvbuf=65536)
    try:
        s.sendall(b"GO")
        recv_exactly(s, 100_000)        # the server is in the middle of sending
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        s.close()                       # RST
    wait_until(lambda: handlers and handlers[0].lost.is_set(), timeout=10,
               message="connection_lost after the peer's reset")
    h = handlers[0]
    assert len(h.lost_calls) == 1
    exc = h.lost_calls[0]
    assert exc is None or isinstance(exc, (ConnectionResetError, BrokenPipeError)), repr(exc)
    # the engine is healthy
    echo_once(addr, b"still alive")
    wait_until(lambda: engine.stats().send_queued == 0, message="send_queued == 0")


@pytest.mark.parametrize("workers", WORKERS)
def test_close_flushes_queued_data(engine, workers):
    payload = random.Random(2).randbytes(BIG)

    def send_and_close(conn, h):
        conn.send(payload[: BIG // 2])
        conn.send(memoryview(payload)[BIG // 2:])
        conn.close()

    addr, handlers = serve(engine, send_and_close, workers)
    with connect(addr) as s:
        s.sendall(b"GO")
        got = recv_until_eof(s)
    assert len(got) == len(payload)
    assert got == payload
    h = handlers[0]
    assert h.lost.wait(10)
    assert h.lost_calls == [None]


@pytest.mark.parametrize("workers", WORKERS)
def test_close_from_another_thread_flushes(engine, workers):
    payload = random.Random(3).randbytes(BIG)
    addr, handlers = serve(engine, lambda conn, h: None, workers)
    with connect(addr) as s:
        s.sendall(b"hi")
        assert recv_exactly(s, 2) == b"hi"
        conn = handlers[0].conn
        conn.send(payload)             # from the test thread
        conn.close()
        assert recv_until_eof(s) == payload
    assert handlers[0].lost.wait(10)
    assert handlers[0].lost_calls == [None]


@pytest.mark.parametrize("workers", WORKERS)
def test_abort_drops_unsent_data(engine, workers):
    payload = random.Random(4).randbytes(BIG)

    def send_and_abort(conn, h):
        conn.send(payload)
        conn.abort()

    addr, handlers = serve(engine, send_and_abort, workers)
    with connect(addr, rcvbuf=65536) as s:
        s.sendall(b"GO")
        wait_until(lambda: handlers and handlers[0].lost.is_set(), timeout=10,
                   message="connection_lost")
        got = recv_until_eof(s)
    assert len(got) < len(payload), "abort() sent everything"
    assert got == payload[: len(got)]
    h = handlers[0]
    assert len(h.lost_calls) == 1
    assert h.lost_calls[0] is None or isinstance(h.lost_calls[0], OSError)
    assert h.conn.closed
    echo_once(addr)


@pytest.mark.parametrize("workers", WORKERS)
def test_send_after_close_is_dropped_and_counted(engine, workers):
    """As with asyncio's transports: send() once the connection is closing drops the data
    (counted in stats().bytes_dropped) and raises nothing, also from connection_lost and
    from another thread; the peer gets none of it."""
    after_close: list = []
    before = engine.stats().bytes_dropped

    def close_then_send(conn, h):
        conn.close()
        assert conn.closing
        try:
            conn.send(b"x")
            with open(__file__, "rb") as f:
                conn.sendfile(f, 0, 5)
        except OSError as e:
            after_close.append(e)

    addr, handlers = serve(engine, close_then_send, workers)
    with connect(addr) as s:
        s.sendall(b"GO")
        assert recv_until_eof(s) == b""
    h = handlers[0]
    assert h.lost.wait(10)
    assert after_close == [] and h.send_errors == []
    h.conn.send(b"yy")                   # from another thread, once closed
    assert h.conn.closed
    # "x", the 5 bytes of the file, "too late" (from connection_lost), "yy"
    assert engine.stats().bytes_dropped - before == 1 + 5 + 8 + 2


def test_close_twice_and_abort_after_close(engine):
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(Recorder, handlers), "127.0.0.1", 0)
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(b"a")
        assert recv_exactly(s, 1) == b"a"
        conn = handlers[0].conn
        conn.close()
        conn.close()
        conn.abort()
        assert recv_until_eof(s) == b""
    assert handlers[0].lost.wait(10)
    wait_until(lambda: conn.closed)
    conn.close()
    conn.abort()
    assert handlers[0].lost_calls == [None]


def test_peer_close_while_idle(engine):
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(Recorder, handlers), "127.0.0.1", 0)
    s = connect(("127.0.0.1", srv.port))
    wait_until(lambda: handlers and handlers[0].made.is_set())
    s.close()
    assert handlers[0].lost.wait(10)
    assert handlers[0].eof
    assert handlers[0].lost_calls == [None]


# ------------------------------------------------------------------ low-level ops
class Calls:
    """Counts the callback runs of each op (and on which thread)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.runs: dict = {}
        self.threads: set = set()

    def __call__(self, op):
        with self.lock:
            self.runs[id(op)] = self.runs.get(id(op), 0) + 1
            self.threads.add(threading.get_ident())

    def count(self, op) -> int:
        with self.lock:
            return self.runs.get(id(op), 0)


def assert_cancelled(op):
    assert op.done()
    with pytest.raises(OSError) as ei:
        op.result()
    assert ei.value.errno == errno.ECANCELED, f"{op.name}: {ei.value!r}"


@pytest.fixture
def stuck_fds():
    """Fds on which nothing ever happens: socketpairs, a pipe, a listening socket."""
    sp1 = socket.socketpair()
    sp2 = socket.socketpair()
    r, w = os.pipe()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1)
    yield {"sock": sp1[0].fileno(), "sock2": sp2[0].fileno(), "pipe": r,
           "listener": lsock.fileno()}
    for s in (*sp1, *sp2, lsock):
        s.close()
    os.close(r)
    os.close(w)


def start_stuck_ops(engine, fds, calls):
    return [
        engine.recv(fds["sock"], 100, calls),
        engine.recv(fds["sock2"], 100, calls),
        engine.read(fds["pipe"], 100, -1, calls),
        engine.readinto(fds["pipe"], bytearray(64), -1, calls),
        engine.timeout(60, calls),
        engine.poll(fds["sock2"], select.POLLIN, calls),
        engine.accept(fds["listener"], calls),
    ]


def start_timed_stuck_ops(engine, fds, calls):
    """Ops with a linked timeout that cannot fire during the test."""
    return [
        engine.recv(fds["sock"], 100, calls, timeout=60),
        engine.read(fds["pipe"], 10, -1, calls, timeout=60),
    ]


def test_cancel_ops_in_flight(engines, stuck_fds):
    engine = engines.make()
    calls = Calls()
    ops = start_stuck_ops(engine, stuck_fds, calls) + start_timed_stuck_ops(
        engine, stuck_fds, calls)
    wait_until(lambda: engine.stats().pinned_objects == len(ops))
    # 1 wakeup read + each op (+ the 2 linked timeouts, where they are requests too)
    in_flight = engine.stats().ops_in_flight
    if has_feature(engines.backend, "linked_timeout_requests"):
        assert in_flight == 1 + len(ops) + 2
    else:
        assert in_flight >= 1 + len(ops)
    assert not any(op.done() for op in ops)
    for op in ops:
        op.cancel()
    wait_until(lambda: all(calls.count(op) for op in ops), timeout=10,
               message="callbacks of the cancelled ops")
    for op in ops:
        assert_cancelled(op)
    for op in ops:
        op.cancel()                    # cancelling a finished op does nothing
    engines.wait_idle(engine)
    assert all(calls.count(op) == 1 for op in ops)
    assert calls.threads == {on_engine_thread(engine, threading.get_ident)}


@pytest.mark.parametrize("timed", [False, True], ids=["plain", "linked_timeout"])
def test_cancel_fd(engines, stuck_fds, timed):
    engine = engines.make()
    calls = Calls()
    tmo = 60 if timed else None
    ops = [engine.recv(stuck_fds["sock"], 10, calls, timeout=tmo) for _ in range(3)]
    other = engine.recv(stuck_fds["sock2"], 10, calls)
    wait_until(lambda: engine.stats().pinned_objects == 4)
    engine.cancel_fd(stuck_fds["sock"])
    wait_until(lambda: all(calls.count(op) for op in ops), timeout=10)
    for op in ops:
        assert_cancelled(op)
    assert not other.done()
    other.cancel()
    wait_until(lambda: calls.count(other) == 1)
    assert_cancelled(other)
    engines.wait_idle(engine)


@pytest.mark.parametrize("timed", [False, True], ids=["plain", "linked_timeout"])
def test_shutdown_with_ops_in_flight(make_engine, stuck_fds, timed):
    """Ops still in flight when the engine closes: each callback runs exactly once, with
    ECANCELED; nothing stays pinned or in flight."""
    engine = make_engine()
    calls = Calls()
    ops = start_stuck_ops(engine, stuck_fds, calls)
    if timed:
        ops += start_timed_stuck_ops(engine, stuck_fds, calls)
    wait_until(lambda: engine.stats().pinned_objects == len(ops))
    cancelled = ops[::2]
    for op in cancelled:
        op.cancel()
    wait_until(lambda: all(calls.count(op) for op in cancelled))
    left = [op for op in ops if op not in cancelled]
    assert not any(calls.count(op) for op in left)
    engine.stop()
    assert engine.join(15), "the engine did not stop with ops in flight"
    engine.close()
    for op in ops:
        assert calls.count(op) == 1, f"{op.name}: callback ran {calls.count(op)} times"
    for op in ops:
        assert_cancelled(op)
    st = engine.stats()
    assert st.pinned_objects == 0
    assert st.ops_in_flight == 0


def test_op_submitted_after_close_fails(make_engine, stuck_fds):
    engine = make_engine()
    engine.close()
    calls = Calls()
    with pytest.raises(proactor.EngineClosed):
        engine.recv(stuck_fds["sock"], 10, calls)
    with pytest.raises(proactor.EngineClosed):
        engine.call_soon(print)


@pytest.mark.parametrize("workers", WORKERS)
def test_stop_with_large_queued_send_delivers_it(make_engine, workers):
    """A graceful stop lets queued data go out before closing."""
    engine = make_engine()
    payload = random.Random(6).randbytes(8 << 20)
    addr, handlers = serve(engine, lambda conn, h: conn.send(payload), workers)
    with connect(addr) as s:
        s.sendall(b"GO")
        recv_exactly(s, 1000)
        engine.stop(timeout=20)
        got = recv_until_eof(s)
    assert engine.join(20)
    assert b"".join([payload[:1000], got]) == payload
    assert handlers[0].lost_calls == [None]


def test_echo_after_many_closes(engine):
    """Slots are reused correctly after many open/close cycles."""
    srv = engine.serve_tcp(Echo, "127.0.0.1", 0)
    addr = ("127.0.0.1", srv.port)
    for i in range(200):
        s = connect(addr)
        if i % 3 == 0:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        elif i % 3 == 1:
            s.sendall(b"x%d" % i)
            assert recv_exactly(s, len(b"x%d" % i)) == b"x%d" % i
        s.close()
    echo_once(addr, b"last")
    wait_until(lambda: engine.stats().connections == 0, timeout=10)


class ReplyThenClose(proactor.Handler):
    """On b"GO": queue a large reply and close gracefully."""

    reply = random.Random(21).randbytes(8 << 20)

    def data_received(self, conn, data):
        if data.startswith(b"GO") and not conn.closed:
            conn.send(self.reply)
            conn.close()


@pytest.mark.parametrize("extra", [False, True])
def test_graceful_close_survives_unread_input(engine, extra):
    """Bytes the peer sends after the server stopped reading (a pipelined request) must
    not turn the graceful close into a reset that destroys the reply in flight."""
    srv = engine.serve_tcp(ReplyThenClose, "127.0.0.1", 0)
    with connect(("127.0.0.1", srv.port)) as c:
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # the reply stays queued
        c.sendall(b"GO")
        time.sleep(0.05)
        if extra:
            c.sendall(b"a pipelined request the server never reads")
        time.sleep(0.3)
        got = recv_until_eof(c)
    assert len(got) == len(ReplyThenClose.reply)
    assert got == ReplyThenClose.reply


class PausedCollector(proactor.Handler):
    def __init__(self, conns: list, lost: list) -> None:
        self.conns, self.lost = conns, lost

    def connection_made(self, conn):
        conn.pause_reading()
        self.conns.append(conn)

    def connection_lost(self, conn, exc):
        self.lost.append(exc)


@pytest.mark.slow
def test_closing_thousands_at_once(engine):
    """More connections closed in one engine callback than one batch of events holds
    (4096): every one reports connection_lost exactly once."""
    n = 4500
    conns: list = []
    lost: list = []
    srv = engine.serve_tcp(lambda: PausedCollector(conns, lost), "127.0.0.1", 0, backlog=4096)
    clients = []
    try:
        for _ in range(n):
            clients.append(socket.create_connection(("127.0.0.1", srv.port), timeout=10))
        wait_until(lambda: len(conns) == n, timeout=30, message="all accepted")

        def close_all() -> None:
            for c in conns:
                c.close()
        engine.call_soon(close_all)
        wait_until(lambda: len(lost) == n, timeout=30, message="every connection_lost")
        assert lost == [None] * n
    finally:
        for s in clients:
            s.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_send_then_close_from_the_handler_while_the_peer_sends(engine, workers):
    """The handler answers the first data and closes while the peer is still sending its
    request: the answer arrives, whatever thread the handler runs on. (On trio, a close()
    from a worker could let the connection finish before the send posted ahead of it.)"""
    reply = b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    failed = []

    class H(proactor.Handler):
        answered = False

        def data_received(self, conn, data):
            if not self.answered:
                self.answered = True
                conn.send(reply)
                conn.close()

        def connection_lost(self, conn, exc):
            if exc is not None:
                failed.append(exc)

    srv = engine.serve_tcp(H, "127.0.0.1", 0, workers=workers)
    body = b"x" * 70000
    for _ in range(40):
        with connect(("127.0.0.1", srv.port), timeout=10) as s:
            s.sendall(b"PUT / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
            assert recv_exactly(s, len(reply)) == reply
    assert failed == []


def test_abort_resets_the_connection(engine):
    """abort() ends the connection with a reset, not an orderly FIN: a peer reading a body
    that ends at the close cannot take the cut one for a whole one."""
    class H(proactor.Handler):
        def data_received(self, conn, data):
            conn.send(b"HTTP/1.0 200 OK\r\n\r\npartial")
            conn.abort()

    srv = engine.serve_tcp(H, "127.0.0.1", 0)
    with connect(("127.0.0.1", srv.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            while s.recv(1 << 16):
                pass


def test_stop_timeout_is_kept_with_a_blocked_worker(make_engine):
    """stop(timeout=T) returns after about T although a handler blocks in a worker: the
    connection is aborted at the deadline and its connection_lost, which comes once the
    worker is free, says why."""
    engine = make_engine()
    release = threading.Event()
    entered = threading.Event()
    lost: list = []
    lost_ev = threading.Event()

    class Blocked(proactor.Handler):
        def data_received(self, conn, data):
            entered.set()
            release.wait(20)

        def connection_lost(self, conn, exc):
            lost.append(exc)
            lost_ev.set()

    srv = engine.serve_tcp(Blocked, "127.0.0.1", 0, workers=2)
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(b"block")
        assert entered.wait(10)
        t0 = time.monotonic()
        engine.stop(timeout=1.0)
        assert engine.join(10)
        elapsed = time.monotonic() - t0
        release.set()
        assert recv_until_eof(s) == b""
    assert elapsed < 3.0, f"stop(timeout=1.0) took {elapsed:.1f} s"
    assert lost_ev.wait(10)
    assert len(lost) == 1
    assert isinstance(lost[0], ConnectionAbortedError), repr(lost[0])
    assert "stop(timeout=1)" in str(lost[0])


@pytest.mark.parametrize("workers", WORKERS)
def test_connections_aborted_at_the_stop_deadline_are_told(make_engine, workers):
    """A client that never reads: the graceful close cannot flush; the connection is
    aborted at the deadline and connection_lost gets an error, not None."""
    engine = make_engine()
    payload = bytes(64 << 20)
    addr, handlers = serve(engine, lambda conn, h: conn.send(payload), workers)
    with connect(addr, rcvbuf=65536) as s:
        s.sendall(b"GO")
        wait_until(lambda: engine.stats().send_queued > 0, message="send queued")
        t0 = time.monotonic()
        engine.stop(timeout=0.3)
        assert engine.join(10)
        elapsed = time.monotonic() - t0
    h = handlers[0]
    assert h.lost.wait(10)
    assert 0.25 < elapsed < 3.0, elapsed
    assert len(h.lost_calls) == 1
    exc = h.lost_calls[0]
    assert isinstance(exc, ConnectionAbortedError), repr(exc)
    assert "stop(timeout=0.3)" in str(exc)
