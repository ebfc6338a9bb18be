"""Nothing the kernel delivered is lost: every byte received before the peer's reset (or
FIN) reaches ``data_received``, in order, before ``connection_lost``, on every backend
and worker setting; sends after the peer has gone are dropped quietly and counted."""
from __future__ import annotations

import fcntl
import socket
import struct
import termios
import threading
import time

import pytest
from support import connect, factory_collecting, wait_until

import proactor

pytestmark = [pytest.mark.linux, pytest.mark.timeout(60)]

WORKERS = [pytest.param(0, id="workers0"), pytest.param(4, id="workers4")]
COMMANDS = 10_000


class Commands(proactor.Handler):
    """Applies numbered commands, one per line, answering each: the answer is sent
    before the command is applied, so a send that raised would lose the command."""

    def __init__(self) -> None:
        self.conn = None
        self.applied = 0
        self.out_of_order = 0
        self.partial = b""
        self.eof = False
        self.lost_exc: list = []
        self.lost = threading.Event()
        self.after_lost = 0              # events that came after connection_lost

    def connection_made(self, conn):
        self.conn = conn

    def data_received(self, conn, data):
        if self.lost.is_set():
            self.after_lost += 1
        time.sleep(0.0002)               # a worker slower than the network
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            conn.send(b"OK " + line + b"\n")
            if int(line.split()[1]) != self.applied:
                self.out_of_order += 1
            self.applied += 1

    def eof_received(self, conn):
        self.eof = True
        conn.close()

    def connection_lost(self, conn, exc):
        self.lost_exc.append(exc)
        self.lost.set()


def _outq(s: socket.socket) -> int:
    """Bytes sent on ``s`` that the peer's kernel has not acknowledged yet."""
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]


def _commands() -> bytes:
    return b"".join(b"CMD %d\n" % i for i in range(COMMANDS))


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("ending", ["rst", "fin"])
def test_every_byte_before_the_peer_left_is_delivered(engine, workers, ending):
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(Commands, handlers), "127.0.0.1", 0,
                           workers=workers)
    s = connect(("127.0.0.1", srv.port))
    s.sendall(_commands())
    if ending == "fin":
        s.shutdown(socket.SHUT_WR)       # a FIN after the commands
        wait_until(lambda: handlers and handlers[0].eof or engine.stats().bytes_out,
                   timeout=10, message="the server working")
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()                            # RST: the answers are never read
    wait_until(lambda: handlers and handlers[0].lost.is_set(), timeout=20,
               message="connection_lost")
    h = handlers[0]
    assert h.applied == COMMANDS, f"{COMMANDS - h.applied} commands lost"
    assert h.out_of_order == 0
    assert h.partial == b""
    assert h.after_lost == 0
    assert len(h.lost_exc) == 1
    exc = h.lost_exc[0]
    assert exc is None or isinstance(exc, (ConnectionResetError, BrokenPipeError)), repr(exc)


def test_send_after_the_peer_left_is_dropped_and_counted(engine, log_errors):
    """A worker sending after the peer has reset the connection sees no exception and no
    ERROR is logged (the fixture checks the log): the bytes are dropped and counted."""
    errors: list = []
    lost = threading.Event()
    entered = threading.Event()
    gone = threading.Event()

    class H(proactor.Handler):
        def data_received(self, conn, data):
            entered.set()
            gone.wait(10)
            wait_until(lambda: conn.closing, timeout=10, message="conn.closing")
            try:
                conn.send(b"x" * 1000)
                conn.writelines([b"y" * 10, memoryview(b"z" * 10)])
            except Exception as e:  # noqa: BLE001 - recorded for the test
                errors.append(e)
            conn.close()                 # does no harm either

        def connection_lost(self, conn, exc):
            lost.set()

    srv = engine.serve_tcp(H, "127.0.0.1", 0, workers=2)
    before = engine.stats().bytes_dropped
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(b"hello")
        assert entered.wait(10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    gone.set()                           # the worker goes on once the reset is seen
    assert lost.wait(20)
    assert errors == []
    assert engine.stats().bytes_dropped - before == 1020


@pytest.mark.parametrize("workers", WORKERS)
def test_send_on_a_closed_connection_is_dropped_and_counted(engine, workers):
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(Commands, handlers), "127.0.0.1", 0,
                           workers=workers)
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(b"CMD 0\n")
        assert s.recv(100) == b"OK CMD 0\n"
    wait_until(lambda: handlers[0].lost.is_set(), message="connection_lost")
    conn_lost_exc = handlers[0].lost_exc
    assert conn_lost_exc == [None]
    before = engine.stats().bytes_dropped
    h = handlers[0]
    assert h.eof
    conn = h.conn
    assert conn.closing and conn.closed
    conn.send(b"late")                   # from another thread, after the close
    conn.send(bytearray(6))
    assert engine.stats().bytes_dropped - before == 10


class Pauser(proactor.Handler):
    """Pauses reading at its first data; records what comes, and how it ends."""

    def __init__(self) -> None:
        self.conn = None
        self.got = bytearray()
        self.order: list = []            # "data", "eof", then connection_lost's exc
        self.lost = threading.Event()

    def connection_made(self, conn):
        self.conn = conn

    def data_received(self, conn, data):
        if not self.got:
            conn.pause_reading()
        self.got.extend(data)
        self.order.append("data")

    def eof_received(self, conn):
        self.order.append("eof")
        conn.close()

    def connection_lost(self, conn, exc):
        self.order.append(exc)
        self.lost.set()

    def check(self, payload: bytes, timeout: float = 20) -> BaseException | None:
        """Wait for connection_lost; everything must have come first, in order."""
        assert self.lost.wait(timeout), f"no connection_lost; got {len(self.got)} bytes"
        if bytes(self.got) != payload:
            raise AssertionError(f"got {len(self.got)} of {len(payload)} bytes")
        assert self.order.count("data") == len(self.order) - 1 - self.order.count("eof")
        return self.order[-1]


def _send_paused(port: int, h: list, payload: bytes, end: str) -> None:
    """Send ``payload`` to a Pauser: the first byte, which pauses it, then the rest, all of
    it into the server's kernel; then reset (``end`` "rst") or half-close ("fin")."""
    s = connect(("127.0.0.1", port))
    s.sendall(payload[:1])
    wait_until(lambda: h and h[0].got, message="the first byte")
    s.sendall(payload[1:])
    wait_until(lambda: _outq(s) == 0, message="all of it in the server's kernel")
    if end == "fin":
        s.shutdown(socket.SHUT_WR)
        h[0].peer = s                    # closed by the test once it is done
    else:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    time.sleep(0.05)                     # the end has reached the server


@pytest.mark.parametrize("workers", WORKERS)
@pytest.mark.parametrize("then", ["resume", "send"])
def test_data_held_by_a_pause_is_delivered_when_the_peer_resets(engine, workers, then):
    """The handler paused reading; the engine had read more already (or the kernel holds
    it), and the peer resets. A paused connection does not see the reset (as in asyncio)
    until it reads again ("resume") or a send fails ("send"); either way what was
    received is delivered, in order, before connection_lost - also while still paused."""
    h: list = []
    srv = engine.serve_tcp(factory_collecting(Pauser, h), "127.0.0.1", 0, workers=workers)
    payload = bytes(range(256)) * 100    # all of it fits in the server's socket buffer
    _send_paused(srv.port, h, payload, "rst")
    if then == "resume":
        h[0].conn.resume_reading()
    else:
        h[0].conn.send(bytes(1 << 20))   # fails: the peer has gone
    exc = h[0].check(payload)
    assert isinstance(exc, (ConnectionResetError, BrokenPipeError)), repr(exc)


@pytest.mark.parametrize("workers", [0, 4])
@pytest.mark.parametrize("engine", [{"buffer_size": 1024}], indirect=True)
def test_drain_of_many_buffers_after_a_failed_send(engine, workers):
    """The same with ~98 receive buffers' worth in the kernel: the drain that follows the
    failed send reads it all, and ends."""
    h: list = []
    srv = engine.serve_tcp(factory_collecting(Pauser, h), "127.0.0.1", 0, workers=workers)
    payload = bytes(i % 251 for i in range(100_000))
    _send_paused(srv.port, h, payload, "rst")
    h[0].conn.send(b"reply")             # fails: the peer reset -> drain
    exc = h[0].check(payload, timeout=10)
    assert isinstance(exc, (ConnectionResetError, BrokenPipeError)), repr(exc)


@pytest.mark.parametrize("workers", [0, 2])
def test_a_handler_that_pauses_again_gets_everything_before_connection_lost(engine, workers):
    """Flow control one chunk at a time (pause in data_received, resume later). The ring
    read ahead of the pause; the peer resets and a send fails: what was held still comes
    before connection_lost, although the handler pauses again at the first of it."""
    got = bytearray()
    lost = threading.Event()
    conns: list = []

    class OneAtATime(proactor.Handler):
        def connection_made(self, conn):
            conns.append(conn)

        def data_received(self, conn, data):
            got.extend(data)
            conn.pause_reading()
            engine.call_later(0.5, conn.resume_reading)

        def connection_lost(self, conn, exc):
            lost.set()

    srv = engine.serve_tcp(OneAtATime, "127.0.0.1", 0, workers=workers)
    payload = bytes(i % 251 for i in range(100_000))
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(payload)
        wait_until(lambda: _outq(s) == 0)
        time.sleep(0.1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    time.sleep(0.05)
    conns[0].send(b"reply")
    assert lost.wait(10)
    assert bytes(got) == payload, f"got {len(got)} of {len(payload)} before connection_lost"


@pytest.mark.parametrize("end", ["rst", "fin"])
@pytest.mark.parametrize("engine", [{"buffer_size": 2048}], indirect=True)
def test_the_end_after_a_long_backlog_is_seen(engine, end):
    """The peer sends more than 32 receive buffers' worth while the handler is paused,
    then resets (or half-closes). Once reading resumes, everything arrives and then the
    end does: the reset was never noticed on io_uring (a multishot recv that read a long
    backlog went back to waiting for a wakeup the reset had already given)."""
    h: list = []
    srv = engine.serve_tcp(factory_collecting(Pauser, h), "127.0.0.1", 0)
    payload = bytes(i % 251 for i in range(100_000))      # 49 buffers of 2 KiB
    _send_paused(srv.port, h, payload, end)
    try:
        h[0].conn.resume_reading()
        exc = h[0].check(payload, timeout=10)
    finally:
        if end == "fin":
            h[0].peer.close()
    if end == "rst":
        assert isinstance(exc, ConnectionResetError), h[0].order[-3:]
    else:
        assert h[0].order[-2:] == ["eof", None]
