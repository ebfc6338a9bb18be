"""The engine as a whole: stats, stop/join, servers, flow control, the example script."""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import queue
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support import (
    Echo,
    Recorder,
    connect,
    echo_once,
    factory_collecting,
    fill_fd_table,
    free_port,
    has_feature,
    on_engine_thread,
    open_fds,
    recv_exactly,
    recv_until_eof,
    run_echo_clients,
    wait_until,
)

import proactor

pytestmark = [pytest.mark.linux, pytest.mark.timeout(60)]

REPO = Path(__file__).resolve().parent.parent


def test_stats_fields_are_ints_and_move(engine, backend):
    st = engine.stats()
    assert isinstance(st, proactor.Stats)
    for f in dataclasses.fields(st):
        v = getattr(st, f.name)
        if f.name == "backend":
            assert isinstance(v, str) and v
        else:
            assert type(v) is int, (f.name, v)
    if has_feature(backend, "buffer_pool"):
        assert st.buffers_total > 0
    srv = engine.serve_tcp(Echo, "127.0.0.1", 0)
    echo_once(("127.0.0.1", srv.port), b"x" * 1000)
    wait_until(lambda: engine.stats().connections == 0)
    st2 = engine.stats()
    assert st2.bytes_in >= st.bytes_in + 1000
    assert st2.bytes_out >= st.bytes_out + 1000
    assert st2.ops_submitted > st.ops_submitted
    assert st2.ops_completed > st.ops_completed
    assert st2.cq_overflow == 0


def test_stats_counts_connections(engine):
    srv = engine.serve_tcp(Echo, "127.0.0.1", 0)
    socks = [connect(("127.0.0.1", srv.port)) for _ in range(5)]
    try:
        for s in socks:
            s.sendall(b"hi")
            assert recv_exactly(s, 2) == b"hi"
        assert engine.stats().connections == 5
    finally:
        for s in socks:
            s.close()
    wait_until(lambda: engine.stats().connections == 0)


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_from_another_thread_with_clients(make_engine, workers):
    engine = make_engine()
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(Recorder, handlers), "127.0.0.1", 0,
                           workers=workers)
    port = srv.port
    socks = [connect(("127.0.0.1", port)) for _ in range(10)]
    try:
        for s in socks:
            s.sendall(b"ping")
            assert recv_exactly(s, 4) == b"ping"
        assert engine.running
        stopper = threading.Thread(target=engine.stop)
        stopper.start()
        stopper.join()
        assert engine.join(10), "the engine did not stop"
        assert not engine.running
        for s in socks:
            assert recv_until_eof(s) == b""
    finally:
        for s in socks:
            s.close()
    assert all(h.lost_calls == [None] for h in handlers)
    # the listening port is free again
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen(1)
    with pytest.raises(ConnectionRefusedError):
        connect(("127.0.0.1", port)).close()
    with pytest.raises(proactor.EngineClosed):
        engine.serve_tcp(Echo, "127.0.0.1", 0)
    engine.close()      # idempotent
    assert engine.join(0)


def test_serve_tcp_on_port_in_use(engine):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        before = engine.stats()
        with pytest.raises(OSError) as ei:
            engine.serve_tcp(Echo, "127.0.0.1", port)
        assert ei.value.errno == errno.EADDRINUSE
        assert engine.stats().ops_in_flight == before.ops_in_flight
    srv = engine.serve_tcp(Echo, "127.0.0.1", 0)      # the engine is fine
    echo_once(("127.0.0.1", srv.port))


def test_two_servers_and_server_close(engines):
    engine = engines.make()
    s1 = engine.serve_tcp(Echo, "127.0.0.1", 0)
    s2 = engine.serve_tcp(Echo, "127.0.0.1", 0, workers=2)
    assert s1.port != s2.port
    engines.wait_idle(engine)
    assert engine.stats().ops_in_flight == 3       # wakeup read + 2 multishot accepts
    echo_once(("127.0.0.1", s1.port))
    echo_once(("127.0.0.1", s2.port))
    kept = connect(("127.0.0.1", s1.port))
    try:
        kept.sendall(b"a")
        assert recv_exactly(kept, 1) == b"a"
        s1.close()
        wait_until(lambda: s1.closed)
        with pytest.raises(ConnectionRefusedError):
            connect(("127.0.0.1", s1.port)).close()
        kept.sendall(b"still")                       # accepted connections carry on
        assert recv_exactly(kept, 5) == b"still"
    finally:
        kept.close()
    echo_once(("127.0.0.1", s2.port))
    engines.wait_idle(engine)
    assert engine.stats().ops_in_flight == 2


def test_engine_runs_once_and_close_unstarted(engines):
    eng = proactor.Engine(backend=engines.backend)
    eng.close()                                      # never run: just releases its pipe
    assert eng.join(0)
    engine = engines.make()
    with pytest.raises(RuntimeError):
        engine.run()


def test_options(make_engine, backend):
    engine = make_engine(entries=64, buffers=16, buffer_size=4096)
    if has_feature(backend, "buffer_pool"):
        assert engine.stats().buffers_total == 16
    srv = engine.serve_tcp(Echo, "127.0.0.1", 0)
    echo_once(("127.0.0.1", srv.port), b"z" * 100_000)
    if has_feature(backend, "buffer_pool"):
        with pytest.raises(ValueError):
            proactor.Engine(backend=backend, buffers=3)
    with pytest.raises(ValueError):
        proactor.Engine(backend="no-such-backend")


def test_pause_and_resume_reading(engine):
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(Recorder, handlers), "127.0.0.1", 0)
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(b"1")
        assert recv_exactly(s, 1) == b"1"
        h = handlers[0]
        h.conn.pause_reading()
        on_engine_thread(engine, lambda: None)       # the pause has been applied
        s.sendall(b"2")
        time.sleep(0.05)
        assert bytes(h.received) == b"1"
        h.conn.resume_reading()
        assert recv_exactly(s, 1) == b"2"
        assert bytes(h.received) == b"12"


def test_when_drained_and_write_buffer_size(engine):
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(Recorder, handlers), "127.0.0.1", 0)
    drained = threading.Event()
    sizes: list = []
    big = os.urandom(16 << 20)
    with connect(("127.0.0.1", srv.port), rcvbuf=65536) as s:
        s.sendall(b"x")
        assert recv_exactly(s, 1) == b"x"
        conn = handlers[0].conn

        def queue_big():
            conn.send(big)
            sizes.append(conn.get_write_buffer_size())
            conn.when_drained(drained.set)

        on_engine_thread(engine, queue_big)
        assert sizes[0] > 0
        time.sleep(0.05)
        assert not drained.is_set()
        assert recv_exactly(s, len(big)) == big
        assert drained.wait(10)
        assert on_engine_thread(engine, conn.get_write_buffer_size) == 0


def test_connection_info(engine):
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(Recorder, handlers), "127.0.0.1", 0)
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(b"x")
        recv_exactly(s, 1)
        conn = handlers[0].conn
        assert conn.peername == s.getsockname()
        assert conn.sockname == s.getpeername()
        assert conn.fileno() >= 0
        assert not conn.closed
    assert handlers[0].lost.wait(10)
    assert conn.closed and conn.fileno() == -1


# ------------------------------------------------------------------ the example script
def start_example(backend, *args):
    env = dict(os.environ, PROACTOR_BACKEND=backend, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, str(REPO / "examples" / "echo_server.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                            cwd=str(REPO))
    lines: queue.Queue = queue.Queue()

    def reader():
        for line in proc.stdout:
            lines.put(line.decode(errors="replace"))
        lines.put(None)

    threading.Thread(target=reader, daemon=True).start()
    return proc, lines


def wait_listening(proc, lines, timeout=20):
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("the example did not print its address")
        try:
            line = lines.get(timeout=left)
        except queue.Empty:
            continue
        if line is None:
            raise AssertionError(f"the example exited: rc={proc.wait(5)}, stderr="
                                 f"{proc.stderr.read().decode(errors='replace')}")
        m = re.search(r"listening on (127\.0\.0\.1):(\d+)", line)
        if m:
            return m.group(1), int(m.group(2))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("args", [["0"], ["--workers", "2", "FREE"]],
                         ids=["port0", "workers2"])
def test_example_echo_server(backend, sig, args):
    args = [str(free_port()) if a == "FREE" else a for a in args]
    proc, lines = start_example(backend, *args)
    try:
        host, port = wait_listening(proc, lines)
        if args[-1] != "0":
            assert port == int(args[-1])
        with connect((host, port)) as s:
            s.sendall(b"hello example")
            assert recv_exactly(s, 13) == b"hello example"
            proc.send_signal(sig)
            rc = proc.wait(10)
            assert recv_until_eof(s) == b""
        err = proc.stderr.read().decode(errors="replace")
        assert rc == 0, f"exit status {rc} after {sig!r}; stderr: {err}"
        assert "Traceback" not in err, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        proc.stdout.close()
        proc.stderr.close()
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


# ------------------------------------------------------------------ handler failures
def test_handler_factory_raises(engine, log_errors):
    log_errors.expect(r"handler factory raised")
    calls = {"n": 0}

    def factory():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("no handler for you")
        return Echo()

    srv = engine.serve_tcp(factory, "127.0.0.1", 0)
    with connect(("127.0.0.1", srv.port)) as s:
        assert recv_until_eof(s) == b""
    echo_once(("127.0.0.1", srv.port))


@pytest.mark.parametrize("workers", [0, 2])
def test_connection_lost_raises(engine, log_errors, workers):
    log_errors.expect(r"connection_lost of .* raised")

    class BadLost(Echo):
        def connection_lost(self, conn, exc):
            raise RuntimeError("in connection_lost")

    srv = engine.serve_tcp(BadLost, "127.0.0.1", 0, workers=workers)
    echo_once(("127.0.0.1", srv.port))
    wait_until(lambda: log_errors.matching("connection_lost of"))
    echo_once(("127.0.0.1", srv.port))
    wait_until(lambda: len(log_errors.matching("connection_lost of")) == 2)


def test_accept_failures_at_the_fd_limit_are_logged_once_then_counted(engine, log_errors,
                                                                      caplog, monkeypatch):
    """At the fd limit accept fails (EMFILE) and is retried every 0.1 s: the first failure
    is logged, the next ones are counted and reported once a period while they go on (they
    were logged ten times a second), also when an accept gets through between them as an
    fd comes free; the first period without one says so, with the total. The clients that
    waited in the backlog are served. (The fds of this process run out for a while:
    everything the test needs is open before, and they are given back in any case.)"""
    import resource

    from proactor import _common

    every = 0.5
    monkeypatch.setattr(_common, "ACCEPT_FAILURES_REPORTED_EVERY", every, raising=False)
    caplog.set_level(logging.WARNING, logger="proactor")

    def accept_logs() -> list:
        return [r.getMessage() for r in caplog.records
                if r.name == "proactor" and r.getMessage().startswith("accept on")]

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list = []
    with socket.socket() as client, socket.socket() as client2:
        client.settimeout(20)
        client2.settimeout(20)
        try:
            # Lowered before the server starts: io_uring's accept takes the limit in force
            # when it is armed.
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_fds()) + 16, hard))
            srv = engine.serve_tcp(Echo, "127.0.0.1", 0)
            fds = len(open_fds())
            echo_once(("127.0.0.1", srv.port))
            # Its fd closed first: freed later, it would let the next accept through.
            wait_until(lambda: len(open_fds()) <= fds)
            fill_fd_table(held)
            client.connect(("127.0.0.1", srv.port))      # waits in the backlog
            client.sendall(b"ping")
            t0 = time.monotonic()
            wait_until(accept_logs, timeout=10)
            os.close(held.pop())        # one fd: client gets in, and takes it
            assert recv_exactly(client, 4) == b"ping"
            client2.connect(("127.0.0.1", srv.port))     # fails again
            client2.sendall(b"pong")
            # failing for two periods and more: two reports
            wait_until(lambda: len(accept_logs()) >= 3, timeout=10)
            failing = accept_logs()
            assert time.monotonic() - t0 >= 2 * every
            for fd in held:
                os.close(fd)
            held = []
            assert recv_exactly(client2, 4) == b"pong"
            wait_until(lambda: "no attempt failed" in accept_logs()[-1], timeout=10)
            echo_once(("127.0.0.1", srv.port))
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    first, *reports = failing           # a success between failures: still one line
    assert "failed: [Errno 24] Too many open files" in first, failing
    assert "retrying every 0.1 s" in first, failing
    for line in reports[:2]:
        assert re.search(r": \d+ more attempts? failed in the last 0.5 s", line), failing
    logs = accept_logs()
    assert len(logs) <= len(failing) + 2, logs     # the one being made, and the last
    assert re.search(r": no attempt failed in the last 0.5 s \(\d+ failed in all, the "
                     r"first \d+ s ago\)", logs[-1]), logs


def test_stop_lets_busy_workers_finish(make_engine):
    engine = make_engine()
    started = threading.Event()

    class Slow(proactor.Handler):
        def data_received(self, conn, data):
            started.set()
            time.sleep(0.3)
            conn.send(b"done:" + data)

    srv = engine.serve_tcp(Slow, "127.0.0.1", 0, workers=2)
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(b"job")
        assert started.wait(10)
        engine.stop(timeout=10)
        assert recv_until_eof(s) == b"done:job"
    assert engine.join(10)


# ------------------------------------------------------------------ connect_tcp
def test_connect_tcp(engine):
    with socket.socket() as lsock:
        lsock.bind(("127.0.0.1", 0))
        lsock.listen(1)
        lsock.settimeout(10)
        handlers: list = []
        done = threading.Event()
        op = engine.connect_tcp(factory_collecting(Recorder, handlers), "127.0.0.1",
                                lsock.getsockname()[1], lambda op: done.set())
        assert done.wait(10)
        conn = op.result()
        peer, _ = lsock.accept()
        with peer:
            peer.settimeout(10)
            h = handlers[0]
            assert h.made.is_set() and h.conn is conn
            peer.sendall(b"echo me")
            assert recv_exactly(peer, 7) == b"echo me"
            conn.close()
            assert recv_until_eof(peer) == b""
        assert h.lost.wait(10)
        assert h.lost_calls == [None]


def test_connect_tcp_refused(engine):
    from support import closed_port
    done = threading.Event()
    op = engine.connect_tcp(Recorder, "127.0.0.1", closed_port(), lambda op: done.set())
    assert done.wait(10)
    with pytest.raises(ConnectionRefusedError):
        op.result()


STATS_RACE = """
import sys, threading, time
sys.setswitchinterval(1e-6)            # switch threads as often as possible
import proactor
for _ in range(150):
    eng = proactor.Engine(backend=sys.argv[1], entries=64, buffers=64, buffer_size=4096)
    eng.start()
    done = threading.Event()
    def poll():
        while not done.is_set():
            eng.stats()
    ts = [threading.Thread(target=poll) for _ in range(2)]
    for t in ts:
        t.start()
    time.sleep(0.002)
    eng.close()
    done.set()
    for t in ts:
        t.join()
    assert eng.stats().ops_in_flight == 0
print("ok")
"""


def test_stats_from_other_threads_while_closing(backend):
    """stats() may be called from any thread, also while the engine frees its ring. The
    ring is large enough that glibc unmaps it when freed (forced here with a low mmap
    threshold), so a read after the free would crash rather than read stale memory."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-c", STATS_RACE, backend], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("workers", [0, 2])
def test_pause_reading_stops_data_at_once(engine, workers):
    """No data_received (or eof_received) between pause_reading() and resume_reading(),
    even for bytes the engine had already received or queued for the worker pool; then
    everything, in order."""
    got = bytearray()
    during_pause = []
    state = {"paused": False, "pauses": 0}
    done = threading.Event()
    total = 200 * 1000

    class H(proactor.Handler):
        def data_received(self, conn, data):
            if state["paused"]:
                during_pause.append(len(data))
            got.extend(data)
            if state["pauses"] < 3:
                state["pauses"] += 1
                state["paused"] = True
                conn.pause_reading()

                def resume():
                    state["paused"] = False
                    conn.resume_reading()
                engine.call_later(0.2, resume)
            if len(got) >= total:
                done.set()

        def eof_received(self, conn):
            if state["paused"]:
                during_pause.append("eof")
            conn.close()
            eof.set()

    eof = threading.Event()
    srv = engine.serve_tcp(H, "127.0.0.1", 0, workers=workers)
    payload = b"".join(b"%09d\n" % i for i in range(total // 10))
    with connect(("127.0.0.1", srv.port)) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(0, total, 1000):          # many small segments: many completions
            s.sendall(payload[i:i + 1000])
        s.shutdown(socket.SHUT_WR)
        assert done.wait(20)
        assert eof.wait(20)
    assert during_pause == []
    assert bytes(got) == payload


@pytest.mark.parametrize("end", ["resume", "close", "reset"])
def test_worker_events_queued_before_the_pause_are_held(engine, end):
    """With workers, data the engine queued for the pool before pause_reading() took
    effect is held, not delivered. ``resume``: resume_reading() from a thread of its own
    delivers it, in order, then the rest and the EOF. ``close`` (the handler closes from
    another thread): connection_lost exactly once, none of the held data. ``reset`` (by
    the peer, seen once reading resumes): connection_lost once, with the error. Nothing
    is left in the pool."""
    started, go = threading.Event(), threading.Event()

    class H(Recorder):
        def data_received(self, conn, data):
            if not self.received:
                started.set()
                assert go.wait(10)               # meanwhile more data is queued behind
                conn.pause_reading()
            self.received += data

    hs: list = []
    srv = engine.serve_tcp(factory_collecting(H, hs), "127.0.0.1", 0, workers=2)
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(b"a")
        assert started.wait(10)
        s.sendall(b"b" * 5000)
        h = hs[0]
        # in the pool's queue of the connection, behind the event being handled
        wait_until(lambda: h.conn._wq, message="data queued behind")
        go.set()
        wait_until(lambda: h.conn._wheld, message="the queued data held")   # the path is taken
        time.sleep(0.05)
        assert bytes(h.received) == b"a"
        if end == "resume":
            s.sendall(b"c" * 3000)
            s.shutdown(socket.SHUT_WR)
            threading.Thread(target=h.conn.resume_reading).start()
            assert h.lost.wait(10)
            assert bytes(h.received) == b"a" + b"b" * 5000 + b"c" * 3000
            assert h.eof and h.lost_calls == [None]
        elif end == "close":
            threading.Thread(target=h.conn.close).start()
            assert h.lost.wait(10)
            time.sleep(0.05)
            assert bytes(h.received) == b"a" and not h.eof
            assert h.lost_calls == [None]
        else:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            time.sleep(0.05)
            h.conn.resume_reading()
            assert h.lost.wait(10)
            assert (b"a" + b"b" * 5000).startswith(bytes(h.received)) and not h.eof
            assert len(h.lost_calls) == 1
            assert isinstance(h.lost_calls[0], ConnectionResetError)
        assert h.conn._wheld is None
    wait_until(lambda: engine.stats().queue_depth == 0 and engine.stats().connections == 0,
               message="nothing left in the pool")


@pytest.mark.parametrize("workers", [0, 2])
def test_pause_and_resume_from_another_thread_keep_order(engine, workers):
    """Every data_received pauses reading and another thread resumes it a moment later,
    while the peer keeps sending: the bytes arrive complete and in order, none while
    paused, and the EOF after them."""
    resumes: queue.Queue = queue.Queue()
    got = bytearray()
    bad = []
    done = threading.Event()
    paused = threading.Event()

    class H(proactor.Handler):
        def data_received(self, conn, data):
            if paused.is_set():
                bad.append(len(data))
            got.extend(data)
            paused.set()
            conn.pause_reading()
            resumes.put(conn)

        def eof_received(self, conn):
            if paused.is_set():
                bad.append("eof")
            conn.close()
            done.set()

    def resumer():
        r = random.Random(7)
        while (conn := resumes.get()) is not None:
            if r.random() < 0.5:
                time.sleep(r.random() / 5000)
            paused.clear()
            conn.resume_reading()

    t = threading.Thread(target=resumer)
    t.start()
    try:
        srv = engine.serve_tcp(H, "127.0.0.1", 0, workers=workers)
        payload = b"".join(b"%07d\n" % i for i in range(60000))
        with connect(("127.0.0.1", srv.port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for i in range(0, len(payload), 4000):
                s.sendall(payload[i:i + 4000])
            s.shutdown(socket.SHUT_WR)
            assert done.wait(30)
    finally:
        resumes.put(None)
        t.join(10)
    assert bad == []
    assert bytes(got) == payload


def test_a_stale_resume_does_not_restart_reading_of_a_paused_connection(engine):
    """A resume and a pause posted from two threads can reach the engine's thread in
    either order: a resume that arrives after the connection was paused again must not
    turn reading back on (the data would pile up held, unbounded, while paused)."""
    got = []
    conns: list = []

    class H(proactor.Handler):
        def data_received(self, conn, data):
            got.append(len(data))
            conn.pause_reading()
            conns.append(conn)

    srv = engine.serve_tcp(H, "127.0.0.1", 0)
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(b"a")
        wait_until(lambda: conns)
        conn = conns[0]
        # the stale resume, as the engine's thread runs it when it comes last
        on_engine_thread(engine, lambda: conn._set_reading(True))
        before = engine.stats().bytes_in
        s.setblocking(False)
        try:
            for _ in range(400):
                s.send(b"b" * 65536)
        except BlockingIOError:
            pass
        time.sleep(0.3)
        assert got == [1]
        # the kernel's buffers hold what was sent; the engine read (and held) little
        assert engine.stats().bytes_in - before < 256 * 1024
        conn.close()


def test_receive_buffers_run_dry_without_a_resubmission_storm(make_engine, backend):
    """64 clients echo 2 MiB in all through a pool of 2 x 64-byte buffers, dry nearly all
    the time. A multishot recv that ends with ENOBUFS waits for buffers to be back in the
    ring, and the waiting connections are re-armed in turn, as many as there are buffers:
    not every waiting connection at every loop turn (that was ~17 submissions per buffer
    filled here, ~100 with more connections). Every byte comes back, in order."""
    engine = make_engine(buffers=2, buffer_size=64)
    srv = engine.serve_tcp(Echo, "127.0.0.1", 0)
    rng = random.Random(2)
    payloads = [rng.randbytes(32 * 1024) for _ in range(64)]
    before = engine.stats()
    run_echo_clients(("127.0.0.1", srv.port), payloads, timeout=55, send_chunk=65536)
    wait_until(lambda: engine.stats().connections == 0, timeout=10)
    if not has_feature(backend, "buffer_pool"):
        return
    after = engine.stats()
    received = after.bytes_in - before.bytes_in
    assert received == 2 << 20
    # Each filled buffer costs about one submission here: the echo's send (the recvs
    # that fill them are fewer: a multishot recv fills several). Bounded per buffer.
    per_buffer = (after.ops_submitted - before.ops_submitted) / (received / 64)
    assert per_buffer <= 3, f"{per_buffer:.1f} submissions per 64-byte buffer received"


def test_a_connection_waiting_for_buffers_gets_its_turn_during_a_flood(make_engine, backend):
    """Pool of 2 x 64 bytes: one client floods an echo without pause, and another's 4 KiB
    must still come back while the flood goes on. The waiting connections are re-armed
    in turn, and one that finds the pool emptied again by the flooder keeps its place:
    the recv re-armed first takes both buffers, so a fixed order starves the other."""
    engine = make_engine(buffers=2, buffer_size=64)
    srv = engine.serve_tcp(Echo, "127.0.0.1", 0)
    addr = ("127.0.0.1", srv.port)
    stop = threading.Event()
    flood = connect(addr)

    def send_flood() -> None:
        chunk = b"f" * 65536
        try:
            while not stop.is_set():
                flood.sendall(chunk)
        except OSError:
            pass

    def drain_flood() -> None:
        try:
            while flood.recv(1 << 20):
                pass
        except OSError:
            pass

    threads = [threading.Thread(target=send_flood), threading.Thread(target=drain_flood)]
    for t in threads:
        t.start()
    try:
        wait_until(lambda: engine.stats().bytes_in > (256 << 10), timeout=20)
        payload = random.Random(5).randbytes(4096)
        with connect(addr, timeout=10) as s:
            s.sendall(payload)
            assert recv_exactly(s, len(payload)) == payload
        assert threads[0].is_alive(), "the flood ended first: the test proved nothing"
    finally:
        stop.set()
        threads[0].join(20)
        flood.shutdown(socket.SHUT_RDWR)
        threads[1].join(20)
        flood.close()


def test_a_connection_paused_while_waiting_for_buffers_stays_paused(make_engine, backend):
    """Pool of 2 x 64 bytes: the first recv fills both buffers and stops for want of more
    (ENOBUFS); the handler pauses at the first 64 bytes. When the buffers come back the
    paused connection is not re-armed (nothing more is read while paused), and after
    resume_reading() every byte arrives, in order."""
    engine = make_engine(buffers=2, buffer_size=64)
    got = bytearray()
    conns: list = []

    class H(proactor.Handler):
        def data_received(self, conn, data):
            got.extend(data)
            if not conns:
                conns.append(conn)
                conn.pause_reading()

    srv = engine.serve_tcp(H, "127.0.0.1", 0)
    payload = random.Random(6).randbytes(64 << 10)
    before = engine.stats().bytes_in
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(payload)                  # fits in the socket buffers
        wait_until(lambda: conns)
        time.sleep(0.3)
        assert engine.stats().bytes_in - before < 1024
        conns[0].resume_reading()
        wait_until(lambda: len(got) >= len(payload), timeout=20)
        assert bytes(got) == payload


def test_connections_closed_while_waiting_for_buffers(make_engine, backend):
    """Pool of 2 x 64 bytes: 64 clients send 8 KiB each and their connections are closed
    at their first bytes, while they wait for buffers; their slots are reused by the
    next wave, which echoes 16 KiB per client through the same pool, every byte in order.
    (A closed connection left on the list of waiters would be linked twice once its slot
    is reused.)"""
    engine = make_engine(buffers=2, buffer_size=64)

    class CloseOrEcho(proactor.Handler):
        close = None

        def data_received(self, conn, data):
            if self.close is None:
                self.close = data[:1] == b"C"
            if self.close:
                conn.close()
            else:
                conn.send(data)

    srv = engine.serve_tcp(CloseOrEcho, "127.0.0.1", 0)
    addr = ("127.0.0.1", srv.port)
    for _ in range(2):
        socks = [connect(addr) for _ in range(64)]
        try:
            for s in socks:
                s.sendall(b"C" * 8192)
            for s in socks:
                assert recv_until_eof(s) == b""
        finally:
            for s in socks:
                s.close()
        wait_until(lambda: engine.stats().connections == 0, timeout=10)
        rng = random.Random(7)
        run_echo_clients(addr, [b"E" + rng.randbytes(16383) for _ in range(32)], timeout=55)
        wait_until(lambda: engine.stats().connections == 0, timeout=10)
