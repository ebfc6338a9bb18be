"""The worker pool: per-connection order, one worker per connection at a time, handler
exceptions, backpressure."""
from __future__ import annotations

import random
import threading
import time

import pytest
from support import (
    Echo,
    connect,
    factory_collecting,
    recv_exactly,
    recv_until_eof,
    run_echo_clients,
    wait_until,
)

import proactor

pytestmark = [pytest.mark.linux, pytest.mark.timeout(60)]


class Sequencer(proactor.Handler):
    """Echoes; records the events of its connection, which threads ran them and whether
    two of them ever ran at the same time."""

    def __init__(self) -> None:
        self.rng = random.Random(id(self))
        self.busy = False
        self.overlaps = 0
        self.threads: set = set()
        self.events: list = []
        self.received = bytearray()
        self.lost = threading.Event()

    def _enter(self, what: str) -> None:
        if self.busy:
            self.overlaps += 1
        self.busy = True
        self.threads.add(threading.get_ident())
        self.events.append(what)

    def _leave(self) -> None:
        self.busy = False

    def connection_made(self, conn):
        self._enter("made")
        time.sleep(self.rng.uniform(0, 0.002))
        self._leave()

    def data_received(self, conn, data):
        self._enter("data")
        time.sleep(self.rng.uniform(0, 0.002))
        self.received += data
        conn.send(data)
        self._leave()

    def eof_received(self, conn):
        self._enter("eof")
        time.sleep(self.rng.uniform(0, 0.002))
        conn.close()
        self._leave()

    def connection_lost(self, conn, exc):
        self._enter("lost")
        self.exc = exc
        self._leave()
        self.lost.set()


def numbered(client: int, count: int) -> bytes:
    return b"".join(b"%04d:%06d\n" % (client, i) for i in range(count))


def test_per_connection_order_and_exclusion(engine):
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(Sequencer, handlers), "127.0.0.1", 0,
                           workers=8)
    nclients, nmsgs = 24, 250
    payloads = [numbered(i, nmsgs) for i in range(nclients)]
    # one message (12 bytes) per send, no Nagle: many small events per connection
    run_echo_clients(("127.0.0.1", srv.port), payloads, half_close=True, send_chunk=12,
                     nodelay=True, timeout=50)
    assert len(handlers) == nclients
    for h in handlers:
        assert h.lost.wait(10)
    by_payload = {bytes(h.received): h for h in handlers}
    assert sorted(by_payload) == sorted(payloads), "a connection's data came out of order"
    all_threads: set = set()
    for h in handlers:
        assert h.overlaps == 0, "two workers ran the same connection at once"
        assert h.events[0] == "made" and h.events[-2:] == ["eof", "lost"], h.events[:3]
        assert set(h.events[1:-2]) == {"data"}
        assert h.exc is None
        all_threads |= h.threads
    assert threading.get_ident() not in all_threads
    assert len(all_threads) > 1, "the events of 24 connections all ran on one worker"
    wait_until(lambda: engine.stats().queue_depth == 0, message="the queue to drain")


class Boom(Exception):
    pass


class RaisesOnBoom(proactor.Handler):
    def __init__(self) -> None:
        self.lost_calls: list = []
        self.lost = threading.Event()

    def data_received(self, conn, data):
        if b"boom" in data:
            raise Boom("handler failure for the test")
        conn.send(data)

    def connection_lost(self, conn, exc):
        self.lost_calls.append(exc)
        self.lost.set()


@pytest.mark.parametrize("workers", [0, 4])
def test_raising_handler_loses_only_its_connection(engine, log_errors, workers):
    log_errors.expect(r"handler of .* raised")
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(RaisesOnBoom, handlers), "127.0.0.1", 0,
                           workers=workers)
    addr = ("127.0.0.1", srv.port)
    others = [connect(addr) for _ in range(4)]
    try:
        for i, s in enumerate(others):
            s.sendall(b"before %d" % i)
            assert recv_exactly(s, 8) == b"before %d" % i
        with connect(addr) as bad:
            bad.sendall(b"boom")
            assert recv_until_eof(bad) == b""        # closed by the server (EOF or reset)
        wait_until(lambda: any(h.lost.is_set() for h in handlers), message="connection_lost")
        failed = [h for h in handlers if h.lost.is_set()]
        assert len(failed) == 1
        assert len(failed[0].lost_calls) == 1
        assert isinstance(failed[0].lost_calls[0], Boom)
        # every other connection still works, and new ones too
        for i, s in enumerate(others):
            s.sendall(b"after  %d" % i)
            assert recv_exactly(s, 8) == b"after  %d" % i
        with connect(addr) as s:
            s.sendall(b"new")
            assert recv_exactly(s, 3) == b"new"
    finally:
        for s in others:
            s.close()
    wait_until(lambda: all(h.lost.is_set() for h in handlers), timeout=10)
    assert [len(h.lost_calls) for h in handlers] == [1] * len(handlers)
    assert len(log_errors.matching(r"handler of .* raised")) == 1


class SlowEcho(proactor.Handler):
    def data_received(self, conn, data):
        time.sleep(0.0005)
        conn.send(data)


def test_backpressure_bounds_the_queue(engine):
    """One slow worker, clients sending faster than it handles: reading pauses, nothing is
    lost, and the queue stays near ``max_queue`` (a bounded overshoot: events already read
    when reading pauses, a few per connection)."""
    max_queue, nclients = 16, 8
    srv = engine.serve_tcp(SlowEcho, "127.0.0.1", 0, workers=1, max_queue=max_queue)
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(engine.stats().queue_depth)
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        rng = random.Random(5)
        payloads = [rng.randbytes(256 * 1024) for _ in range(nclients)]
        run_echo_clients(("127.0.0.1", srv.port), payloads, send_chunk=2048, nodelay=True,
                         timeout=50)
    finally:
        stop.set()
        sampler.join()
    peak = max(samples)
    assert peak >= max_queue // 2, f"the queue never filled (peak {peak}): test too weak"
    bound = max_queue + nclients * 4
    assert peak <= bound, (f"queue_depth reached {peak} with max_queue={max_queue} and "
                           f"{nclients} connections (allowed up to {bound})")


def test_worker_send_from_other_thread_order(engine):
    """conn.send() from a worker thread keeps the order of the calls."""
    class Chatty(proactor.Handler):
        def data_received(self, conn, data):
            for i in range(200):
                conn.send(b"%05d" % i)

    srv = engine.serve_tcp(Chatty, "127.0.0.1", 0, workers=2)
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(b"go")
        assert recv_exactly(s, 1000) == b"".join(b"%05d" % i for i in range(200))


@pytest.mark.parametrize("workers", [1, 3])
def test_echo_with_workers_many_clients(engine, workers):
    srv = engine.serve_tcp(Echo, "127.0.0.1", 0, workers=workers, max_queue=64)
    rng = random.Random(workers)
    run_echo_clients(("127.0.0.1", srv.port),
                     [rng.randbytes(rng.randint(1, 200_000)) for _ in range(40)], timeout=50)


class QuitAfterResponse(proactor.Handler):
    """Echoes lines; on b"QUIT" queues a large response and closes gracefully. Lines, so
    that it does not matter how the bytes are split into data_received calls."""

    response = random.Random(12).randbytes(8 << 20)

    def __init__(self) -> None:
        self.after_close: list = []
        self.lost_calls: list = []
        self.lost = threading.Event()
        self.closed_by_me = False
        self.partial = b""

    def data_received(self, conn, data):
        if self.closed_by_me or conn.closing or self.lost_calls:
            self.after_close.append(data)
            return
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()
        for line in lines:
            if line == b"slow":
                time.sleep(0.1)        # the next lines queue up behind this one
            if line == b"QUIT":
                conn.send(self.response)
                conn.close()
                self.closed_by_me = True
                return                 # what follows it is not for us any more
            conn.send(line + b"\n")

    def connection_lost(self, conn, exc):
        self.lost_calls.append(exc)
        self.lost.set()


@pytest.mark.parametrize("workers", [0, 4])
def test_graceful_close_with_more_data_already_read(engine, workers):
    """The handler closes (after queueing a response) while more of the client's data has
    already been read and, with workers, queued for it. The close must stay graceful: the
    whole response arrives, connection_lost(None), no handler error, and no
    data_received after the close."""
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(QuitAfterResponse, handlers), "127.0.0.1", 0,
                           workers=workers)
    with connect(("127.0.0.1", srv.port), nodelay=True) as s:
        s.sendall(b"slow\n")
        wait_until(lambda: handlers and engine.stats().bytes_in >= 5, message="slow read")
        s.sendall(b"QUIT\n")          # both queued while the handler sleeps on "slow"
        s.sendall(b"more\n")
        got = recv_until_eof(s)
    h = handlers[0]
    assert h.lost.wait(10)
    assert h.lost_calls == [None], h.lost_calls
    assert len(got) == 5 + len(QuitAfterResponse.response), len(got)
    assert got == b"slow\n" + QuitAfterResponse.response
    assert h.after_close == [], "data_received was called after the handler closed"
