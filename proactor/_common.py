"""What every backend shares: the handler API, operations, timers, the worker pool, stats.

A backend (``_io_uring.py`` now, trio next) runs one I/O thread and turns finished
operations into calls on a :class:`Handler`. Whether those calls run on the I/O thread
(``workers=0``) or on a :class:`WorkerPool` (half-sync/half-async) is decided here, the
same way for every backend.
"""
from __future__ import annotations

import dataclasses
import heapq
import logging
import socket
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Optional

from ._errors import os_error

logger = logging.getLogger("proactor")

__all__ = ["Handler", "Stats", "Op", "TimerHandle", "WorkerPool", "bind_tcp"]


class Handler:
    """Receives a connection's events. Subclass it and override what you need.

    One handler object is made per connection by the ``handler_factory`` given to
    ``serve_tcp``. With ``workers=0`` the methods run on the engine's I/O thread and must
    not block; with ``workers=N`` they run on a worker thread, one call at a time per
    connection and in the order the events happened.
    """

    def connection_made(self, conn: Any) -> None:
        """The connection is established; ``conn.send()`` may be called from now on."""

    def data_received(self, conn: Any, data: bytes) -> None:
        """``data`` arrived (a copy: keep it as long as you like)."""

    def eof_received(self, conn: Any) -> None:
        """The peer shut down its sending side. The default closes the connection
        once everything already sent has been delivered; override to keep sending."""
        conn.close()

    def connection_lost(self, conn: Any, exc: Optional[BaseException]) -> None:
        """The connection is closed: ``exc`` is ``None`` after an orderly close, else the
        ``OSError`` (or the handler's own exception) that ended it. Called exactly once."""


@dataclasses.dataclass(frozen=True)
class Stats:
    """A snapshot of the engine's counters; cheap to take while it runs."""

    backend: str
    ops_submitted: int
    ops_completed: int
    ops_in_flight: int
    buffers_in_use: int
    buffers_total: int
    pinned_objects: int
    connections: int
    queue_depth: int
    bytes_in: int
    bytes_out: int
    send_queued: int
    cq_overflow: int


class Op:
    """One submitted operation. Its ``callback(op)`` runs on the I/O thread when the
    operation's final completion has arrived; then ``result()`` returns the value or
    raises the ``OSError`` that ended it (``ECANCELED`` after :meth:`cancel`).

    The objects the kernel reads or writes (buffers, the address) are referenced by the
    op until that final completion, whatever happens to the caller in between.
    """

    __slots__ = ("_engine", "_index", "name", "_callback", "_keep", "_convert",
                 "_value", "_exc", "_done", "_timed", "_cancel_req")

    def __init__(self, engine: Any, name: str, callback: Optional[Callable[[Op], Any]],
                 keep: Any, convert: Optional[Callable[[int], Any]]) -> None:
        self._engine = engine
        self._index = -1
        self.name = name
        self._callback = callback
        self._keep = keep
        self._convert = convert
        self._value: Any = None
        self._exc: Optional[BaseException] = None
        self._done = False
        self._timed = False          # has a linked timeout
        self._cancel_req = False     # cancel() was called

    def done(self) -> bool:
        return self._done

    def result(self) -> Any:
        if not self._done:
            raise RuntimeError(f"{self.name} has not completed yet")
        if self._exc is not None:
            raise self._exc
        return self._value

    def exception(self) -> Optional[BaseException]:
        if not self._done:
            raise RuntimeError(f"{self.name} has not completed yet")
        return self._exc

    def cancel(self) -> None:
        """Ask for cancellation. The callback still comes, after the final completion."""
        if not self._done:
            self._engine._cancel_op(self)

    def _complete(self, res: int) -> None:
        """Record the final CQE's result (called once, on the I/O thread)."""
        if res < 0:
            self._resolve(None, os_error(res, self.name))
        elif self._convert is not None:
            try:
                value = self._convert(res)
            except BaseException as e:  # noqa: BLE001 - reported through result()
                self._resolve(None, e)
            else:
                self._resolve(value, None)
        else:
            self._resolve(res, None)

    def _resolve(self, value: Any, exc: Optional[BaseException]) -> None:
        """Set the outcome, drop the pinned objects and run the callback."""
        self._value = value
        self._exc = exc
        self._done = True
        cb = self._callback
        self._callback = None
        if cb is not None:
            try:
                cb(self)
            except Exception:
                logger.exception("callback of %s raised", self.name)
        self._keep = None          # the kernel is done with them, and so is the callback

    def __repr__(self) -> str:
        state = "done" if self._done else "pending"
        return f"<Op {self.name} {state}>"


class TimerHandle:
    """Returned by ``call_later``/``call_at``; :meth:`cancel` stops the call."""

    __slots__ = ("when", "_fn", "_args", "cancelled")

    def __init__(self, when: float, fn: Callable[..., Any], args: tuple) -> None:
        self.when = when
        self._fn = fn
        self._args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True

    def __lt__(self, other: TimerHandle) -> bool:
        return self.when < other.when


class Timers:
    """A heap of timers run on the I/O thread."""

    def __init__(self) -> None:
        self._heap: list[TimerHandle] = []

    def add(self, when: float, fn: Callable[..., Any], args: tuple) -> TimerHandle:
        h = TimerHandle(when, fn, args)
        heapq.heappush(self._heap, h)
        return h

    def timeout(self, now: float) -> Optional[float]:
        """Seconds until the next timer (0 if one is due), None when there is none."""
        heap = self._heap
        while heap and heap[0].cancelled:
            heapq.heappop(heap)
        if not heap:
            return None
        return max(0.0, heap[0].when - now)

    def run_due(self, now: float) -> None:
        heap = self._heap
        while heap and heap[0].when <= now:
            h = heapq.heappop(heap)
            if h.cancelled:
                continue
            try:
                h._fn(*h._args)
            except Exception:
                logger.exception("timer callback %r raised", h._fn)

    def __len__(self) -> int:
        return sum(1 for h in self._heap if not h.cancelled)


# Kinds of handler events queued to a worker pool.
MADE, DATA, EOF, LOST = range(4)


def run_handler_event(conn: Any, kind: int, arg: Any) -> None:
    """Deliver one event to ``conn``'s handler; a raising handler loses its connection."""
    h = conn._handler
    try:
        if kind == DATA:
            if not conn._closing:      # after close() the handler gets no more data
                h.data_received(conn, arg)
        elif kind == MADE:
            h.connection_made(conn)
        elif kind == EOF:
            if not conn._closing:
                h.eof_received(conn)
        else:
            h.connection_lost(conn, arg)
    except Exception as e:
        handler_failed(conn, e, kind)


def handler_failed(conn: Any, exc: BaseException, kind: int = DATA) -> None:
    if kind == LOST:
        logger.exception("connection_lost of %r raised", conn)
        return
    logger.error("handler of %r raised; aborting the connection", conn, exc_info=exc)
    conn._fail(exc)


class WorkerPool:
    """Half-sync/half-async: the I/O thread queues handler events, N threads run them.

    Events are handed over a batch at a time (one lock round trip per I/O loop turn).
    Each connection has its own queue; a connection is on the ready queue at most once,
    so no two workers ever run the same connection and its events stay in order, while
    different connections spread over the workers. ``pending`` counts queued events: the
    I/O thread stops reading from connections while it is above ``max_queue`` and
    resumes them when the workers have brought it under half of that.
    """

    def __init__(self, engine: Any, workers: int, max_queue: int = 4096) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._engine = engine
        self.max_queue = max_queue
        self._low_water = max_queue // 2
        self._cond = threading.Condition(threading.Lock())
        self._ready: deque = deque()
        self.pending = 0
        self.paused = False        # the I/O thread has paused reading because of us
        self._stopping = False
        self._batch: list = []          # I/O thread only: events of the current turn
        self._paused_conns: list = []   # I/O thread only: paused for backpressure
        self._threads = [threading.Thread(target=self._work, name=f"proactor-worker-{i}",
                                          daemon=True) for i in range(workers)]
        for t in self._threads:
            t.start()

    @property
    def full(self) -> bool:
        return self.pending >= self.max_queue

    def submit(self, items: list) -> None:
        """Queue ``(conn, kind, arg)`` events; called by the I/O thread once per batch."""
        with self._cond:
            ready = self._ready
            woken = 0
            for conn, kind, arg in items:
                conn._wq.append((kind, arg))
                if not conn._wsched:
                    conn._wsched = True
                    ready.append(conn)
                    woken += 1
            self.pending += len(items)
            if woken:
                self._cond.notify(woken)

    def _work(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._ready:
                    if self._stopping:
                        return
                    cond.wait()
                conn = self._ready.popleft()
                items = conn._wq
                conn._wq = []
            for kind, arg in items:
                run_handler_event(conn, kind, arg)
            with cond:
                self.pending -= len(items)
                if conn._wq:
                    self._ready.append(conn)
                    cond.notify()
                else:
                    conn._wsched = False
                resume = self.paused and self.pending <= self._low_water
                if resume:
                    self.paused = False
            if resume:
                self._engine._resume_reading_for(self)

    def idle(self) -> bool:
        with self._cond:
            return self.pending == 0

    def shutdown(self, timeout: Optional[float] = None) -> bool:
        """Let the workers finish what is queued, then join them. True if all exited."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in self._threads:
            if t is threading.current_thread():
                continue
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)


def bind_tcp(host: Optional[str], port: int, backlog: int, reuse_port: bool) -> list:
    """Listening sockets for every address ``getaddrinfo(host, port)`` gives (passive).

    Binds and listens now, so errors (``EADDRINUSE``...) raise here as ``OSError`` naming
    the address. With ``port=0`` every address gets the port the first one was given.
    ``SO_REUSEADDR`` is set except on Windows, where it would let another socket steal
    the port; ``reuse_port`` needs ``SO_REUSEPORT`` (Linux, BSD, macOS).
    """
    if reuse_port and not hasattr(socket, "SO_REUSEPORT"):
        raise ValueError("reuse_port=True is not supported on this platform")
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    socks: list = []
    try:
        for family, type_, proto, _, addr in infos:
            s = socket.socket(family, type_, proto)
            socks.append(s)
            if sys.platform != "win32":
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(socks) > 1:
                addr = (addr[0], socks[0].getsockname()[1]) + tuple(addr[2:])
            try:
                s.bind(addr)
            except OSError as e:
                raise OSError(e.errno, f"error while attempting to bind on address "
                                       f"{addr!r}: {e.strerror}") from None
            s.listen(backlog)
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks
