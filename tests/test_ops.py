"""Low-level operations on real files, pipes and sockets, timers and cross-thread calls."""
from __future__ import annotations

import errno
import os
import queue
import random
import select
import socket
import threading
import time

import pytest
from support import (
    OpWaiter,
    closed_port,
    ipv6_loopback_available,
    on_engine_thread,
    recv_exactly,
    run_op,
    wait_until,
)

pytestmark = [pytest.mark.linux, pytest.mark.timeout(60)]


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.bin"
    content = random.Random(11).randbytes(100_000)
    path.write_bytes(content)
    return path, content


@pytest.fixture
def socketpair():
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    yield a, b
    a.close()
    b.close()


def test_openat_write_read_close(engine, tmp_path):
    path = tmp_path / "new.bin"
    op = run_op(lambda cb: engine.openat(str(path), os.O_RDWR | os.O_CREAT | os.O_EXCL,
                                          0o600, cb))
    fd = op.result()
    assert isinstance(fd, int) and fd >= 0
    closed = False
    try:
        payload = random.Random(1).randbytes(200_000)
        op = run_op(lambda cb: engine.write(fd, payload, 0, cb))
        assert op.result() == len(payload)
        op = run_op(lambda cb: engine.read(fd, len(payload) + 10, 0, cb))
        assert op.result() == payload
        assert path.read_bytes() == payload
        assert os.stat(path).st_mode & 0o777 == 0o600
        op = run_op(lambda cb: engine.close_fd(fd, cb))
        assert op.result() is None
        closed = True
        with pytest.raises(OSError):
            os.fstat(fd)
    finally:
        if not closed:
            os.close(fd)


def test_openat_missing_file(engine, tmp_path):
    op = run_op(lambda cb: engine.openat(str(tmp_path / "nope"), os.O_RDONLY, 0, cb))
    with pytest.raises(FileNotFoundError) as ei:
        op.result()
    assert ei.value.errno == errno.ENOENT
    assert "openat" in str(ei.value)


def test_openat_relative_to_dir_fd(engine, tmp_path):
    (tmp_path / "rel.txt").write_bytes(b"relative")
    dfd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fd = run_op(lambda cb: engine.openat("rel.txt", os.O_RDONLY, 0, cb,
                                             dir_fd=dfd)).result()
        try:
            assert run_op(lambda cb: engine.read(fd, 100, 0, cb)).result() == b"relative"
        finally:
            os.close(fd)
    finally:
        os.close(dfd)


def test_read_at_offsets(engine, data_file):
    path, content = data_file
    fd = os.open(path, os.O_RDONLY)
    try:
        for off, n in [(0, 10), (1, 1), (4095, 2), (50_000, 30_000), (99_990, 100),
                       (100_000, 10), (200_000, 10)]:
            got = run_op(lambda cb: engine.read(fd, n, off, cb)).result()
            assert got == content[off:off + n], (off, n)
        # offset -1: the file position, which advances
        os.lseek(fd, 10, os.SEEK_SET)
        assert run_op(lambda cb: engine.read(fd, 5, -1, cb)).result() == content[10:15]
        assert run_op(lambda cb: engine.read(fd, 5, -1, cb)).result() == content[15:20]
    finally:
        os.close(fd)


def test_readinto(engine, data_file):
    path, content = data_file
    fd = os.open(path, os.O_RDONLY)
    try:
        buf = bytearray(b"\xff" * 1000)
        assert run_op(lambda cb: engine.readinto(fd, buf, 300, cb)).result() == 1000
        assert buf == content[300:1300]
        # into part of a bigger buffer, through a memoryview
        big = bytearray(b"-" * 100)
        n = run_op(lambda cb: engine.readinto(fd, memoryview(big)[10:20], 5, cb)).result()
        assert n == 10
        assert big == b"-" * 10 + content[5:15] + b"-" * 80
        # short read at the end of the file
        buf = bytearray(64)
        assert run_op(lambda cb: engine.readinto(fd, buf, 99_980, cb)).result() == 20
        assert buf[:20] == content[99_980:]
    finally:
        os.close(fd)
    with pytest.raises((TypeError, BufferError)):
        engine.readinto(0, b"read-only", 0, lambda op: None)


def test_writev_gathers(engine, tmp_path):
    path = tmp_path / "v.bin"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        parts = [b"ab", bytearray(b"cd"), memoryview(b"xxefgh")[2:], b"", b"\x00" * 5000,
                 random.Random(2).randbytes(70_000)]
        total = sum(len(p) for p in parts)
        assert run_op(lambda cb: engine.writev(fd, parts, 0, cb)).result() == total
        assert path.read_bytes() == b"".join(bytes(p) for p in parts)
        # at an offset, over existing data
        assert run_op(lambda cb: engine.writev(fd, [b"XY", b"Z"], 1, cb)).result() == 3
        assert path.read_bytes()[:6] == b"aXYZef"
    finally:
        os.close(fd)


def test_sendmsg_gathers(engine, socketpair):
    a, b = socketpair
    parts = [b"hello ", bytearray(b"gathered "), memoryview(b"__world")[2:],
             random.Random(3).randbytes(50_000)]
    expected = b"".join(bytes(p) for p in parts)
    n = run_op(lambda cb: engine.sendmsg(a.fileno(), parts, cb)).result()
    assert n == len(expected)
    assert recv_exactly(b, n) == expected


def test_send_and_recv(engine, socketpair):
    a, b = socketpair
    assert run_op(lambda cb: engine.send(a.fileno(), b"ping", cb)).result() == 4
    assert recv_exactly(b, 4) == b"ping"
    w = OpWaiter()
    engine.recv(a.fileno(), 100, w)
    time.sleep(0.02)
    assert not w.event.is_set()
    b.sendall(b"pong")
    assert w.wait().result() == b"pong"
    b.shutdown(socket.SHUT_WR)
    assert run_op(lambda cb: engine.recv(a.fileno(), 100, cb)).result() == b""


def test_timeout_op_fires(engine):
    t0 = time.monotonic()
    op = run_op(lambda cb: engine.timeout(0.05, cb))
    elapsed = time.monotonic() - t0
    assert op.result() is None
    assert 0.045 <= elapsed < 5, elapsed


def test_linked_timeout_on_recv(engine, socketpair):
    a, b = socketpair
    t0 = time.monotonic()
    op = run_op(lambda cb: engine.recv(a.fileno(), 100, cb, timeout=0.1))
    elapsed = time.monotonic() - t0
    with pytest.raises(TimeoutError) as ei:
        op.result()
    assert ei.value.errno == errno.ETIMEDOUT
    assert 0.09 <= elapsed < 5, elapsed
    # the socket is still usable and nothing of the timed-out op lingers
    b.sendall(b"later")
    assert run_op(lambda cb: engine.recv(a.fileno(), 100, cb, timeout=5)).result() == b"later"


def test_linked_timeout_not_hit(engine, tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"quick")
    fd = os.open(path, os.O_RDONLY)
    try:
        op = run_op(lambda cb: engine.read(fd, 10, 0, cb, timeout=5))
        assert op.result() == b"quick"
    finally:
        os.close(fd)


def connect_via_engine(engine, host, port, timeout=None):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        op = run_op(lambda cb: engine.connect(s.fileno(), (host, port), cb, timeout=timeout))
    except BaseException:
        s.close()
        raise
    return s, op


HOSTS = ["127.0.0.1", pytest.param("::1", marks=pytest.mark.skipif(
    not ipv6_loopback_available(), reason="no IPv6 loopback here"))]


@pytest.mark.parametrize("host", HOSTS)
@pytest.mark.parametrize("timeout", [None, 5.0])
def test_connect_to_listening_port(engine, host, timeout):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as lsock:
        lsock.bind((host, 0))
        lsock.listen(1)
        lsock.settimeout(10)
        s, op = connect_via_engine(engine, host, lsock.getsockname()[1], timeout)
        with s:
            assert op.result() is None
            peer, _ = lsock.accept()
            with peer:
                s.sendall(b"via engine")
                assert recv_exactly(peer, 10) == b"via engine"
                assert peer.getpeername()[:2] == s.getsockname()[:2]


@pytest.mark.parametrize("host", HOSTS)
def test_connect_refused(engine, host):
    s, op = connect_via_engine(engine, host, closed_port(host))
    with s:
        with pytest.raises(ConnectionRefusedError) as ei:
            op.result()
    assert ei.value.errno == errno.ECONNREFUSED
    assert "connect" in str(ei.value)


def test_connect_linked_timeout(engine):
    """connect() to a listener whose accept queue is full hangs (SYNs are dropped): the
    linked timeout ends it with TimeoutError (ETIMEDOUT)."""
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(0)
        fillers = []
        try:
            for _ in range(4):
                f = socket.socket()
                f.setblocking(False)
                try:
                    f.connect(lsock.getsockname())
                except BlockingIOError:
                    pass
                fillers.append(f)
            time.sleep(0.05)
            t0 = time.monotonic()
            s, op = connect_via_engine(engine, "127.0.0.1", lsock.getsockname()[1], 0.3)
            elapsed = time.monotonic() - t0
            s.close()
        finally:
            for f in fillers:
                f.close()
    with pytest.raises(TimeoutError) as ei:
        op.result()
    assert ei.value.errno == errno.ETIMEDOUT
    assert "connect" in str(ei.value)
    assert 0.25 <= elapsed < 5, elapsed


def test_accept_and_poll_ops(engine):
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        w = OpWaiter()
        engine.accept(lsock.fileno(), w)
        with socket.create_connection(lsock.getsockname(), timeout=10) as c:
            fd = w.wait().result()
            with socket.socket(fileno=fd) as server_side:
                assert server_side.getpeername() == c.getsockname()
                pw = OpWaiter()
                engine.poll(fd, select.POLLIN, pw)
                time.sleep(0.02)
                assert not pw.event.is_set()
                c.sendall(b"!")
                assert pw.wait().result() & select.POLLIN


def test_nop_and_bad_fd(engine):
    assert run_op(lambda cb: engine.nop(cb)).result() == 0
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    op = run_op(lambda cb: engine.read(r, 10, 0, cb))
    with pytest.raises(OSError) as ei:
        op.result()
    assert ei.value.errno == errno.EBADF
    assert "read" in str(ei.value)


def test_result_before_completion(engine, socketpair):
    a, b = socketpair
    w = OpWaiter()
    op = engine.recv(a.fileno(), 10, w)
    with pytest.raises(RuntimeError):
        op.result()
    with pytest.raises(RuntimeError):
        op.exception()
    assert not op.done()
    b.sendall(b"x")
    assert w.wait().result() == b"x"
    assert op.done() and op.exception() is None


def test_registered_buffers(engines, tmp_path):
    engine = engines.make()
    path = tmp_path / "fixed.bin"
    content = random.Random(4).randbytes(8192)
    path.write_bytes(b"\x00" * 8192)
    fd = os.open(path, os.O_RDWR)
    results: queue.Queue = queue.Queue()
    bufs = [bytearray(4096), bytearray(8192)]
    try:
        def setup():
            engine.register_buffers(bufs)
            bufs[0][:] = content[:4096]
            engine.write_fixed(fd, 0, 4096, 4096, results.put)

        on_engine_thread(engine, setup)
        op = results.get(timeout=10)
        assert op.result() == 4096
        assert path.read_bytes() == b"\x00" * 4096 + content[:4096]
        assert engine.stats().pinned_objects >= 2      # the registered buffers

        on_engine_thread(engine, lambda: engine.read_fixed(fd, 1, 4000, 4096, results.put,
                                                           buf_offset=100))
        op = results.get(timeout=10)
        assert op.result() == 4000
        assert bufs[1][100:4100] == content[:4000]
        assert bufs[1][:100] == b"\x00" * 100
        with pytest.raises(ValueError):
            on_engine_thread(engine, lambda: engine.read_fixed(fd, 0, 5000, 0, results.put))
        with pytest.raises(RuntimeError):
            engine.register_buffers([bytearray(10)])   # not on the engine's thread
        on_engine_thread(engine, engine.unregister_buffers)
        assert engine.stats().pinned_objects == 0
    finally:
        os.close(fd)
    engines.wait_idle(engine)


def test_call_soon_from_another_thread(engine):
    got: list = []
    done = threading.Event()
    for i in range(100):
        engine.call_soon(lambda i=i: got.append((i, threading.get_ident())))
    engine.call_soon(done.set)
    assert done.wait(10)
    assert [i for i, _ in got] == list(range(100))
    idents = {t for _, t in got}
    assert len(idents) == 1 and threading.get_ident() not in idents
    assert idents == {on_engine_thread(engine, threading.get_ident)}


def test_call_soon_from_many_threads(engine):
    got: list = []
    lock = threading.Lock()
    n_threads, per_thread = 8, 200

    def post(k):
        for i in range(per_thread):
            engine.call_soon(lambda i=i: got.append((k, i)))

    threads = [threading.Thread(target=post, args=(k,)) for k in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wait_until(lambda: len(got) == n_threads * per_thread, timeout=10)
    with lock:
        for k in range(n_threads):
            assert [i for kk, i in got if kk == k] == list(range(per_thread))


def test_call_later_order_on_engine_thread(engine):
    order: list = []
    done = threading.Event()

    def schedule():
        engine.call_later(0.06, order.append, "c")
        engine.call_later(0.02, order.append, "a")
        h = engine.call_later(0.03, order.append, "cancelled")
        engine.call_later(0.04, order.append, "b")
        engine.call_later(0.0, order.append, "now")
        engine.call_soon(order.append, "soon")
        engine.call_later(0.08, done.set)
        h.cancel()

    t0 = time.monotonic()
    on_engine_thread(engine, schedule)
    assert done.wait(10)
    assert order == ["soon", "now", "a", "b", "c"]
    assert time.monotonic() - t0 >= 0.075


def test_call_later_from_another_thread(engine):
    order: list = []
    done = threading.Event()
    t0 = time.monotonic()
    engine.call_later(0.05, order.append, 2)
    engine.call_later(0.01, order.append, 1)
    h = engine.call_later(0.03, order.append, "cancelled")
    h.cancel()
    h2 = engine.call_later(0.02, order.append, "cancelled too")
    time.sleep(0.005)
    h2.cancel()
    engine.call_later(0.1, done.set)
    assert done.wait(10)
    assert order == [1, 2]
    assert time.monotonic() - t0 >= 0.095
    # call_at in the loop's clock
    ev = threading.Event()
    engine.call_at(engine.time() + 0.02, ev.set)
    assert ev.wait(10)


def test_raising_callbacks_are_logged_and_survived(engine, log_errors):
    log_errors.expect(r"callback of nop raised")
    log_errors.expect(r"call of .* raised")

    def bad_cb(op):
        raise ZeroDivisionError("in an op callback")

    engine.nop(bad_cb)
    engine.call_soon(lambda: 1 / 0)
    wait_until(lambda: len(log_errors.records) >= 2)
    assert run_op(lambda cb: engine.nop(cb)).result() == 0


def test_many_ops_at_once(engine, data_file):
    """More ops than the submission queue holds, all submitted in one go."""
    path, content = data_file
    fd = os.open(path, os.O_RDONLY)
    results: dict = {}
    done = threading.Event()
    n = 5000

    def cb_for(i):
        def cb(op):
            results[i] = op.result()
            if len(results) == n:
                done.set()
        return cb

    try:
        def submit_all():
            for i in range(n):
                engine.read(fd, 16, i * 16, cb_for(i))

        on_engine_thread(engine, submit_all)
        assert done.wait(20)
        for i in range(n):
            assert results[i] == content[i * 16:i * 16 + 16], i
    finally:
        os.close(fd)


@pytest.mark.parametrize("timeout", [None, 10.0], ids=["plain", "linked_timeout"])
def test_many_ops_small_rings(make_engine, data_file, timeout):
    """A tiny SQ and CQ: submissions overflow the SQ (submitted in the middle of a batch,
    linked pairs never split) and completions overflow the CQ; every op still completes
    exactly once with its own result."""
    path, content = data_file
    engine = make_engine(entries=8, cq_entries=16)
    fd = os.open(path, os.O_RDONLY)
    counts: dict = {}
    results: dict = {}
    done = threading.Event()
    n = 3000

    def cb_for(i):
        def cb(op):
            counts[i] = counts.get(i, 0) + 1
            results[i] = op.result()
            if len(counts) == n:
                done.set()
        return cb

    try:
        def submit_all():
            for i in range(n):
                engine.read(fd, 32, i * 32, cb_for(i), timeout=timeout)

        on_engine_thread(engine, submit_all)
        assert done.wait(30), f"{len(counts)} of {n} completed"
        time.sleep(0.05)
        assert set(counts.values()) == {1}
        for i in range(n):
            assert results[i] == content[i * 32:i * 32 + 32], i
    finally:
        os.close(fd)


def test_completions_flow_while_another_thread_submits(engine):
    """A thread that keeps submitting ops must not starve the engine: completions (and
    stop) are handled while it submits, not only once it pauses."""
    called = [0]
    submitted = [0]
    stop = threading.Event()

    def cb(op):
        called[0] += 1

    def producer():
        deadline = time.monotonic() + 3.0
        while not stop.is_set() and submitted[0] < 300_000 and time.monotonic() < deadline:
            engine.nop(cb)
            submitted[0] += 1

    t = threading.Thread(target=producer)
    t.start()
    try:
        time.sleep(0.4)
        before = called[0], submitted[0]
        time.sleep(0.4)
        after = called[0], submitted[0]
        still_submitting = t.is_alive()
    finally:
        stop.set()
        t.join()
    if still_submitting:
        assert after[0] > before[0], (
            f"no op completed in 0.4 s while another thread kept submitting: "
            f"(completed, submitted) went from {before} to {after}")
    wait_until(lambda: called[0] == submitted[0], timeout=30,
               message="every submitted op to complete")
