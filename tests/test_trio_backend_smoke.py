"""Smoke tests of the trio backend, driving :class:`proactor._trio.TrioEngine` directly.

The shared behavioural suite runs on trio too (the ``backend`` fixture); these tests are
self-contained (own fixture and helpers) and reach ``TrioEngine`` without going through
the backend choice, plus the portable fallbacks (no ``pread``, no ``MSG_DONTWAIT``). Every test ends
with the engine back at its idle baseline, stopped, no fd left open and no unexpected
ERROR logged.
"""
from __future__ import annotations

import errno
import logging
import os
import random
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any, Callable, Optional

import pytest

import proactor
from proactor._trio import TrioEngine

pytestmark = pytest.mark.timeout(60)

HOST = "127.0.0.1"


# ---------------------------------------------------------------------------- helpers
def wait_until(pred: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or pred}")
        time.sleep(0.005)


def open_fds() -> set:
    if not os.path.isdir("/proc/self/fd"):
        return set()
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        out.add(int(name))
    return out


def connect(port: int, timeout: float = 20.0) -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def recv_exactly(s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        b = s.recv(min(n - len(buf), 1 << 20))
        if not b:
            raise AssertionError(f"EOF after {len(buf)} of {n} bytes")
        buf += b
    return bytes(buf)


def recv_until_eof(s: socket.socket) -> bytes:
    buf = bytearray()
    while True:
        try:
            b = s.recv(1 << 20)
        except ConnectionResetError:
            break
        if not b:
            break
        buf += b
    return bytes(buf)


def echo_clients(port: int, payloads: list, timeout: float = 50.0) -> None:
    """One thread per client: send while reading; every byte must come back in order."""
    errors: list = []

    def client(p: bytes) -> None:
        try:
            with connect(port) as s:
                t = threading.Thread(target=s.sendall, args=(p,))
                t.start()
                got = recv_exactly(s, len(p))
                t.join()
                assert got == p, "echo differs"
        except BaseException as e:  # noqa: BLE001 - collected for the main thread
            errors.append(e)

    threads = [threading.Thread(target=client, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not errors, errors[:3]


class Echo(proactor.Handler):
    def data_received(self, conn: Any, data: bytes) -> None:
        conn.send(data)


class Recorder(proactor.Handler):
    def __init__(self) -> None:
        self.conn: Any = None
        self.data = bytearray()
        self.events: list = []
        self.lost_calls: list = []
        self.lost = threading.Event()
        self.threads: set = set()

    def connection_made(self, conn: Any) -> None:
        self.conn = conn
        self.events.append("made")
        self.threads.add(threading.get_ident())

    def data_received(self, conn: Any, data: bytes) -> None:
        self.data += data
        self.events.append("data")
        self.threads.add(threading.get_ident())

    def eof_received(self, conn: Any) -> None:
        self.events.append("eof")
        conn.close()

    def connection_lost(self, conn: Any, exc: Optional[BaseException]) -> None:
        self.events.append("lost")
        self.lost_calls.append(exc)
        self.lost.set()


def collecting(cls: type, into: list) -> Callable[[], Any]:
    def make() -> Any:
        h = cls()
        into.append(h)
        return h
    return make


class Calls:
    def __init__(self) -> None:
        self.ops: list = []
        self.threads: set = set()
        self.lock = threading.Lock()

    def __call__(self, op: Any) -> None:
        with self.lock:
            self.ops.append(op)
            self.threads.add(threading.get_ident())

    def count(self, op: Any) -> int:
        with self.lock:
            return sum(1 for o in self.ops if o is op)


def run_op(start: Callable[[Callable], Any], timeout: float = 10.0) -> Any:
    ev = threading.Event()
    seen: list = []

    def cb(op: Any) -> None:
        seen.append(op)
        ev.set()
    op = start(cb)
    assert ev.wait(timeout), "callback did not run"
    assert seen == [op]
    return op


def on_loop(engine: TrioEngine, fn: Callable[[], Any]) -> Any:
    box: dict = {}
    ev = threading.Event()

    def call() -> None:
        try:
            box["v"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["e"] = e
        ev.set()
    engine.call_soon(call)
    assert ev.wait(10)
    if "e" in box:
        raise box["e"]
    return box["v"]


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list = []
        self.expected: list = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def unexpected(self) -> list:
        return [r.getMessage() for r in self.records
                if not any(x in r.getMessage() for x in self.expected)]


# ---------------------------------------------------------------------------- fixture
class Harness:
    def __init__(self) -> None:
        self.engines: list = []
        self.listeners: dict = {}

    def make(self, **options: Any) -> TrioEngine:
        eng = TrioEngine(**options)
        eng.start()
        self.engines.append(eng)
        return eng

    def idle_problems(self, eng: TrioEngine) -> dict:
        st = eng.stats()
        listeners = sum(len(s.addresses) for s in eng._servers if not s.closed)
        want = {"ops_in_flight": 1 + listeners, "pinned_objects": 0, "connections": 0,
                "queue_depth": 0, "send_queued": 0}
        return {k: (getattr(st, k), v) for k, v in want.items() if getattr(st, k) != v}


@pytest.fixture
def errors() -> Any:
    h = Errors()
    log = logging.getLogger("proactor")
    log.addHandler(h)
    try:
        yield h
    finally:
        log.removeHandler(h)


@pytest.fixture
def harness(errors: Errors) -> Any:
    before = open_fds()
    h = Harness()
    yield h
    problems = []
    for eng in h.engines:
        if eng.running:
            try:
                wait_until(lambda: not h.idle_problems(eng), 10, "idle")
            except AssertionError:
                problems.append(f"not idle: {h.idle_problems(eng)}")
        eng.stop()
        if not eng.join(20):
            problems.append("engine did not stop")
        eng.close()
    try:
        wait_until(lambda: len(open_fds()) <= len(before), 5, "fds closed")
    except AssertionError:
        problems.append(f"fd leak: {sorted(open_fds() - before)}")
    problems += errors.unexpected()
    if problems:
        pytest.fail("teardown: " + "; ".join(map(str, problems)), pytrace=False)


@pytest.fixture
def engine(harness: Harness) -> TrioEngine:
    return harness.make()


WORKERS = [pytest.param(0, id="workers0"), pytest.param(4, id="workers4")]


# ---------------------------------------------------------------------------- tests
def test_imports_without_the_extension() -> None:
    """The trio backend needs neither the cffi extension nor the io_uring module."""
    code = (
        "import sys\n"
        "sys.modules['proactor._uring_cffi'] = None\n"
        "import socket, proactor\n"
        "from proactor._trio import TrioEngine, TrioConnection, TrioServer, backend\n"
        "assert backend == 'trio' and 'proactor._io_uring' not in sys.modules\n"
        "class Echo(proactor.Handler):\n"
        "    def data_received(self, conn, data): conn.send(data)\n"
        "with TrioEngine() as e:\n"
        "    e.start()\n"
        "    srv = e.serve_tcp(Echo)\n"
        "    with socket.create_connection(('127.0.0.1', srv.port)) as s:\n"
        "        s.sendall(b'hi'); assert s.recv(2) == b'hi'\n"
        "assert 'proactor._io_uring' not in sys.modules and e.stats().backend == 'trio'\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("workers", WORKERS)
def test_echo_many_clients(engine: TrioEngine, workers: int) -> None:
    rng = random.Random(5 + workers)
    srv = engine.serve_tcp(Echo, HOST, 0, workers=workers)
    payloads = [rng.randbytes(rng.choice((1, 100, 1500, rng.randint(1, 65536))))
                for _ in range(100)]
    echo_clients(srv.port, payloads)
    total = sum(map(len, payloads))
    wait_until(lambda: engine.stats().bytes_out >= total)    # counted after send()
    st = engine.stats()
    assert st.backend == "trio" and st.bytes_in >= total


@pytest.mark.parametrize("workers", WORKERS)
def test_multi_megabyte_payloads(engine: TrioEngine, workers: int) -> None:
    rng = random.Random(9)
    srv = engine.serve_tcp(Echo, HOST, 0, workers=workers)
    echo_clients(srv.port, [rng.randbytes(n) for n in (6 << 20, 5 << 20, (3 << 20) + 7)])


def test_workers_keep_order_and_never_share_a_connection(engine: TrioEngine) -> None:
    """Per connection: events in order, one worker at a time, all off the I/O thread."""
    io_thread = on_loop(engine, threading.get_ident)
    busy: dict = {}
    bad: list = []
    seqs: dict = {}

    class Seq(proactor.Handler):
        def data_received(self, conn: Any, data: bytes) -> None:
            if busy.get(conn):
                bad.append("two workers on one connection")
            busy[conn] = True
            if threading.get_ident() == io_thread:
                bad.append("handler on the I/O thread")
            time.sleep(random.random() / 5000)
            seqs.setdefault(conn, bytearray()).extend(data)
            busy[conn] = False
            conn.send(data)

    srv = engine.serve_tcp(Seq, HOST, 0, workers=4)
    payloads = [b"".join(b"%08d" % i for i in range(20_000)) for _ in range(8)]
    echo_clients(srv.port, payloads)
    assert not bad, bad[:3]
    assert all(bytes(v) == payloads[0] for v in seqs.values())


def test_backpressure_pauses_reading_and_resumes(engine: TrioEngine) -> None:
    class Slow(Echo):
        def data_received(self, conn: Any, data: bytes) -> None:
            time.sleep(0.0005)
            conn.send(data)

    srv = engine.serve_tcp(Slow, HOST, 0, workers=1, max_queue=8)
    pool = srv.pool
    seen = {"paused": False}
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen["paused"] = seen["paused"] or pool.paused
            time.sleep(0.0005)
    w = threading.Thread(target=watch)
    w.start()
    try:
        rng = random.Random(3)
        echo_clients(srv.port, [rng.randbytes(300_000) for _ in range(32)])
    finally:
        stop.set()
        w.join()
    assert seen["paused"], "the pool never applied backpressure"


@pytest.mark.parametrize("workers", WORKERS)
def test_close_flushes_then_eof(engine: TrioEngine, workers: int) -> None:
    payload = random.Random(1).randbytes(8 << 20)
    handlers: list = []

    class SendClose(Recorder):
        def data_received(self, conn: Any, data: bytes) -> None:
            conn.send(payload)
            conn.close()
            conn.send(b"late")                 # dropped: the peer gets the payload only

    srv = engine.serve_tcp(collecting(SendClose, handlers), HOST, 0, workers=workers)
    with connect(srv.port) as s:
        s.sendall(b"go")
        assert recv_until_eof(s) == payload
    h = handlers[0]
    assert h.lost.wait(10) and h.lost_calls == [None]
    assert h.events == ["made", "lost"]        # data_received is overridden


def test_abort_drops_queued_data(engine: TrioEngine) -> None:
    handlers: list = []

    class SendAbort(Recorder):
        def data_received(self, conn: Any, data: bytes) -> None:
            conn.send(bytes(32 << 20))
            conn.abort()

    srv = engine.serve_tcp(collecting(SendAbort, handlers), HOST, 0)
    with connect(srv.port) as s:
        s.sendall(b"go")
        h = wait_until(lambda: handlers and handlers[0].lost.wait(10) and handlers[0])
        got = recv_until_eof(s)
    assert len(got) < 32 << 20
    assert h.lost_calls == [None]


def test_peer_reset_reports_os_error(engine: TrioEngine) -> None:
    handlers: list = []

    class Flood(Recorder):
        def data_received(self, conn: Any, data: bytes) -> None:
            for _ in range(16):
                conn.send(bytes(1 << 20))

    srv = engine.serve_tcp(collecting(Flood, handlers), HOST, 0)
    s = connect(srv.port)
    s.sendall(b"go")
    recv_exactly(s, 10_000)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
    s.close()
    h = wait_until(lambda: handlers and handlers[0].lost.wait(10) and handlers[0])
    exc = h.lost_calls[0]
    assert len(h.lost_calls) == 1
    assert isinstance(exc, (ConnectionResetError, BrokenPipeError)), exc
    assert "(send)" in str(exc) or "(recv)" in str(exc)


def test_handler_exception_loses_only_its_connection(engine: TrioEngine,
                                                      errors: Errors) -> None:
    errors.expected.append("raised; aborting the connection")
    handlers: list = []

    class Boom(Recorder):
        def data_received(self, conn: Any, data: bytes) -> None:
            if data.startswith(b"boom"):
                raise ValueError("boom")
            conn.send(data)

    srv = engine.serve_tcp(collecting(Boom, handlers), HOST, 0)
    with connect(srv.port) as bad, connect(srv.port) as good:
        bad.sendall(b"boom")
        assert recv_until_eof(bad) == b""
        good.sendall(b"fine")
        assert recv_exactly(good, 4) == b"fine"
        wait_until(lambda: any(h.lost_calls for h in handlers))
        lost = [h for h in handlers if h.lost_calls]
        assert len(lost) == 1 and isinstance(lost[0].lost_calls[0], ValueError)


def test_pause_and_resume_reading(engine: TrioEngine) -> None:
    handlers: list = []
    srv = engine.serve_tcp(collecting(Recorder, handlers), HOST, 0)
    with connect(srv.port) as s:
        s.sendall(b"1")
        h = wait_until(lambda: handlers and handlers[0].data and handlers[0])
        h.conn.pause_reading()
        time.sleep(0.05)
        s.sendall(b"2")
        time.sleep(0.2)
        assert bytes(h.data) == b"1"
        h.conn.resume_reading()
        wait_until(lambda: bytes(h.data) == b"12")
        assert h.conn.peername == s.getsockname()
        assert h.conn.sockname == s.getpeername()
        assert h.conn.fileno() >= 0


def test_when_drained_and_write_buffer_size(engine: TrioEngine) -> None:
    handlers: list = []
    drained = threading.Event()

    class Big(Recorder):
        def data_received(self, conn: Any, data: bytes) -> None:
            conn.send(bytes(16 << 20))
            assert conn.get_write_buffer_size() > 0
            conn.when_drained(drained.set)

    srv = engine.serve_tcp(collecting(Big, handlers), HOST, 0)
    with connect(srv.port) as s:
        s.sendall(b"go")
        assert not drained.wait(0.2)
        recv_exactly(s, 16 << 20)
        assert drained.wait(10)
        assert handlers[0].conn.get_write_buffer_size() == 0


def test_connect_tcp(engine: TrioEngine) -> None:
    srv = engine.serve_tcp(Echo, HOST, 0)
    handlers: list = []
    op = run_op(lambda cb: engine.connect_tcp(collecting(Recorder, handlers), HOST, srv.port,
                                              cb))
    conn = op.result()
    conn.send(b"ping")
    wait_until(lambda: bytes(handlers[0].data) == b"ping")
    conn.close()
    assert handlers[0].lost.wait(10) and handlers[0].lost_calls == [None]
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port = probe.getsockname()[1]
    op = run_op(lambda cb: engine.connect_tcp(Recorder, HOST, port, cb))
    with pytest.raises(ConnectionRefusedError, match=r"\(connect\)"):
        op.result()


def test_bind_errors_raise_at_once(engine: TrioEngine) -> None:
    srv = engine.serve_tcp(Echo, HOST, 0)
    with pytest.raises(OSError) as ei:
        engine.serve_tcp(Echo, HOST, srv.port)
    assert ei.value.errno == errno.EADDRINUSE


def test_timers_and_call_soon(engine: TrioEngine) -> None:
    io_thread = on_loop(engine, threading.get_ident)
    got: list = []
    engine.call_later(0.05, got.append, "late")
    h = engine.call_later(0.02, got.append, "cancelled")
    h.cancel()
    engine.call_at(engine.time() + 0.01, got.append, "at")
    engine.call_soon(lambda: got.append(threading.get_ident() == io_thread))
    wait_until(lambda: len(got) == 3)
    time.sleep(0.05)
    assert got == [True, "at", "late"]


def test_ops_on_a_pipe_and_cancel(engine: TrioEngine) -> None:
    r, w = os.pipe()
    try:
        op = run_op(lambda cb: engine.write(w, b"hello", -1, cb))
        assert op.result() == 5
        op = run_op(lambda cb: engine.read(r, 100, -1, cb))
        assert op.result() == b"hello"
        # a read with nothing to read: cancel, then a timeout
        calls = Calls()
        stuck = [engine.read(r, 10, -1, calls), engine.readinto(r, bytearray(8), -1, calls)]
        wait_until(lambda: engine.stats().pinned_objects == 2)
        for op in stuck:
            op.cancel()
        wait_until(lambda: all(calls.count(o) == 1 for o in stuck))
        for op in stuck:
            with pytest.raises(OSError) as ei:
                op.result()
            assert ei.value.errno == errno.ECANCELED
        op = run_op(lambda cb: engine.read(r, 10, -1, cb, timeout=0.05))
        with pytest.raises(TimeoutError):
            op.result()
        # two ops waiting on one fd at once, and poll
        calls = Calls()
        a = engine.read(r, 3, -1, calls)
        b = engine.poll(r, select.POLLIN, calls)
        wait_until(lambda: engine.stats().pinned_objects == 2)
        os.write(w, b"abc")
        wait_until(lambda: calls.count(a) and calls.count(b))
        assert a.result() == b"abc" and b.result() & select.POLLIN
    finally:
        os.close(r)
        os.close(w)


def test_file_ops_in_threads(engine: TrioEngine, tmp_path: Any) -> None:
    path = str(tmp_path / "f")
    fd = run_op(lambda cb: engine.openat(path, os.O_RDWR | os.O_CREAT, 0o600, cb)).result()
    try:
        assert run_op(lambda cb: engine.write(fd, b"0123456789", 0, cb)).result() == 10
        assert run_op(lambda cb: engine.writev(fd, [b"ab", b"cd"], 2, cb)).result() == 4
        assert run_op(lambda cb: engine.read(fd, 6, 1, cb)).result() == b"1abcd6"
        buf = bytearray(4)
        assert run_op(lambda cb: engine.readinto(fd, buf, 6, cb)).result() == 4
        assert buf == b"6789"
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0, "offset ops must not move the position"
        bufs = [bytearray(8), bytearray(8)]
        on_loop(engine, lambda: engine.register_buffers(bufs))
        assert engine.stats().pinned_objects == 2
        assert run_op(lambda cb: engine.read_fixed(fd, 1, 4, 0, cb, buf_offset=2)
                      ).result() == 4
        assert bufs[1] == b"\0\x0001ab\0\0"
        assert run_op(lambda cb: engine.write_fixed(fd, 1, 3, 20, cb, buf_offset=2)
                      ).result() == 3
        with pytest.raises(ValueError):
            engine.read_fixed(fd, 1, 9, 0, lambda op: None)
        with pytest.raises(ValueError):
            engine.read_fixed(fd, 5, 1, 0, lambda op: None)
        on_loop(engine, engine.unregister_buffers)
        with open(path, "rb") as f:
            assert f.read() == b"01abcd6789" + b"\0" * 10 + b"01a"
    finally:
        assert run_op(lambda cb: engine.close_fd(fd, cb)).result() is None


def test_socket_ops_accept_connect_send_recv(engine: TrioEngine) -> None:
    lsock = socket.socket()
    lsock.bind((HOST, 0))
    lsock.listen(4)
    c = socket.socket()
    try:
        acc = Calls()
        aop = engine.accept(lsock.fileno(), acc)
        cop = run_op(lambda cb: engine.connect(c.fileno(), lsock.getsockname(), cb))
        assert cop.result() is None
        wait_until(lambda: acc.count(aop))
        fd = aop.result()
        try:
            assert run_op(lambda cb: engine.send(fd, b"xy", cb)).result() == 2
            assert run_op(lambda cb: engine.sendmsg(fd, [b"z", b"w"], cb)).result() == 2
            assert recv_exactly(c, 4) == b"xyzw"
            c.sendall(b"back")
            assert run_op(lambda cb: engine.recv(fd, 10, cb)).result() == b"back"
            # cancel_fd cancels every op on the fd, a closed fd wakes its waiters
            calls = Calls()
            ops = [engine.recv(fd, 10, calls) for _ in range(3)]
            wait_until(lambda: engine.stats().pinned_objects == 3)
            engine.cancel_fd(fd)
            wait_until(lambda: all(calls.count(o) for o in ops))
            assert all(o.exception().errno == errno.ECANCELED for o in ops)
            pending = engine.recv(fd, 10, calls)
            wait_until(lambda: engine.stats().pinned_objects == 1)
        finally:
            run_op(lambda cb: engine.close_fd(fd, cb)).result()
        wait_until(lambda: calls.count(pending))
        assert pending.exception().errno == errno.EBADF
    finally:
        c.close()
        lsock.close()


def test_nop_and_timeout_ops(engine: TrioEngine) -> None:
    assert run_op(engine.nop).result() == 0
    t0 = time.monotonic()
    assert run_op(lambda cb: engine.timeout(0.05, cb)).result() is None
    assert time.monotonic() - t0 >= 0.04
    calls = Calls()
    op = engine.timeout(60, calls)
    op.cancel()
    wait_until(lambda: calls.count(op))
    assert op.exception().errno == errno.ECANCELED


@pytest.mark.parametrize("workers", WORKERS)
def test_shutdown_with_clients_connected(harness: Harness, workers: int) -> None:
    eng = harness.make()
    handlers: list = []
    srv = eng.serve_tcp(collecting(Recorder, handlers), HOST, 0, workers=workers)
    clients = [connect(srv.port) for _ in range(20)]
    calls = Calls()
    r, w = os.pipe()
    try:
        for c in clients:
            c.sendall(b"hi")
        wait_until(lambda: len(handlers) == 20 and all(h.data for h in handlers))
        stuck = eng.read(r, 10, -1, calls)
        wait_until(lambda: eng.stats().pinned_objects == 1)
        eng.stop(timeout=1.0)
        assert eng.join(10)
        for c in clients:
            assert recv_until_eof(c) == b""
        assert all(h.lost_calls == [None] for h in handlers)
        assert calls.count(stuck) == 1 and stuck.exception().errno == errno.ECANCELED
        assert srv.closed and not eng.running
        with pytest.raises(proactor.EngineClosed):
            eng.call_soon(print)
    finally:
        for c in clients:
            c.close()
        os.close(r)
        os.close(w)


def test_shutdown_aborts_at_the_deadline(harness: Harness) -> None:
    """A client that never reads: the graceful close cannot flush; abort at the deadline."""
    eng = harness.make()
    handlers: list = []

    class Big(Recorder):
        def data_received(self, conn: Any, data: bytes) -> None:
            conn.send(bytes(64 << 20))

    srv = eng.serve_tcp(collecting(Big, handlers), HOST, 0)
    with connect(srv.port) as s:
        s.sendall(b"go")
        wait_until(lambda: eng.stats().send_queued > 0)
        t0 = time.monotonic()
        eng.stop(timeout=0.3)
        assert eng.join(10)
        assert 0.25 < time.monotonic() - t0 < 5
        assert handlers[0].lost.wait(10)
        [exc] = handlers[0].lost_calls
        assert isinstance(exc, ConnectionAbortedError), repr(exc)


def test_run_in_the_calling_thread_and_queued_calls() -> None:
    eng = TrioEngine()
    got: list = []
    eng.call_soon(got.append, "before run")        # queued until the loop runs
    srv = eng.serve_tcp(Echo, HOST, 0)

    def client() -> None:
        with connect(srv.port) as s:
            s.sendall(b"x")
            got.append(recv_exactly(s, 1))
        eng.stop()
    t = threading.Thread(target=client)
    t.start()
    eng.run()                  # in this (main) thread, with signal handling
    t.join()
    assert got == ["before run", b"x"]
    assert not eng.running and srv.closed
    with pytest.raises(RuntimeError):
        eng.run()


def test_never_run_engine_closes_its_sockets() -> None:
    before = open_fds()
    eng = TrioEngine()
    eng.serve_tcp(Echo, HOST, 0, workers=2)
    eng.close()
    assert open_fds() <= before
