"""What every backend shares: the handler API, operations, timers, the worker pool, stats,
and the base classes of the engines, connections and servers.

A backend (``_io_uring.py``, ``_trio.py``) runs one I/O thread and turns finished
operations into calls on a :class:`Handler`. Whether those calls run on the I/O thread
(``workers=0``) or on a :class:`WorkerPool` (half-sync/half-async) is decided here, the
same way for every backend.

:class:`BaseEngine`, :class:`BaseConnection` and :class:`BaseServer` hold what the
backends do alike: the engine's life (``start``/``stop``/``join``/``close``), the calls
posted from other threads and the ``call_soon``/``call_at`` timers, worker-pool
backpressure, ``serve_tcp``'s checks, the connection's flags, close and drain
bookkeeping. A backend subclasses them and supplies the I/O through the hook methods
marked "Backend:" (each one line of docstring saying what it must do).
"""
from __future__ import annotations

import dataclasses
import errno
import heapq
import logging
import os
import socket
import stat
import sys
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Optional, TypeVar

from ._errors import EngineClosed, os_error

try:
    import fcntl as _fcntl
except ImportError:                           # Windows
    _fcntl = None  # type: ignore[assignment]

_OFF_MAX = (1 << 63) - 1                      # the largest file offset (off_t)
#: After stop()'s deadline, how long the workers may take for the last events (the
#: aborted connections' connection_lost) before the engine stops waiting for them.
_POOL_GRACE = 0.25
#: After stop()'s deadline (or its aborts, if they came late), how long the shutdown waits
#: for the final completions of what it cancelled and aborted before it gives up on them.
_GIVE_UP = 0.2

logger = logging.getLogger("proactor")

__all__ = ["Handler", "Stats", "Op", "TimerHandle", "WorkerPool", "bind_tcp",
           "BaseEngine", "BaseConnection", "BaseServer"]

_get_ident = threading.get_ident

#: While accepts on a listening socket keep failing, they are reported this often (s).
ACCEPT_FAILURES_REPORTED_EVERY = 60.0


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
    #: Bytes handed to ``send()``/``sendfile()`` once their connection was closing,
    #: dropped (the peer had gone, or the connection was being closed).
    bytes_dropped: int


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
# How a connection closes (BaseConnection._close_now; the C layer's px_close too).
GRACEFUL, ABORT, RESET = range(3)


def run_handler_event(conn: Any, kind: int, arg: Any) -> None:
    """Deliver one event to ``conn``'s handler; a raising handler loses its connection.

    Data and EOF are dropped once the handler side has closed the connection (``_deaf``:
    its own ``close()``/``abort()``, or it raised); a failure the engine saw (the peer's
    reset, a failed send) does not stop what was received before it."""
    h = conn._handler
    try:
        if kind == DATA:
            if not conn._deaf:
                h.data_received(conn, arg)
        elif kind == MADE:
            h.connection_made(conn)
        elif kind == EOF:
            if not conn._deaf:
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
    conn._deaf = True                  # it gets nothing more but connection_lost
    conn._fail(exc)


class WorkerPool:
    """Half-sync/half-async: the I/O thread queues handler events, N threads run them.

    Events are handed over a batch at a time (one lock round trip per I/O loop turn).
    Each connection has its own queue; a connection is on the ready queue at most once,
    so no two workers ever run the same connection and its events stay in order, while
    different connections spread over the workers. ``pending`` counts queued events: the
    I/O thread stops reading from connections while it is above ``max_queue`` and
    resumes them when the workers have brought it under half of that. The data and EOF
    of a connection its handler paused are held aside (``_wheld``, not in ``pending``:
    what was read before the pause took effect) until ``resume_reading()``.
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
                n = len(items)
                if conn._wheld is not None and items:   # paused, events held: these are
                    if items[-1][0] == LOST:     # newer, they wait behind them; once it
                        items = [*conn._wheld, *items]   # is lost, all go, in order
                        conn._wheld = None
                    else:
                        conn._wheld.extend(items)
                        items = []
            for i, (kind, arg) in enumerate(items):
                if conn._user_paused and kind != MADE and self._hold(conn, items, i):
                    break
                run_handler_event(conn, kind, arg)
            with cond:
                self.pending -= n
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

    def _hold(self, conn: Any, items: list, i: int) -> bool:
        """``conn`` is paused: keep ``items[i:]`` (data and EOF that came before the pause
        took effect) for :meth:`release`, unless it was resumed meanwhile or is lost (then
        they run now, before ``connection_lost``). True if held."""
        with self._cond:
            if not conn._user_paused or items[-1][0] == LOST:
                return False
            if conn._wheld is None:
                conn._wheld = deque()
            conn._wheld.extend(items[i:])
            return True

    def release(self, conn: Any) -> None:
        """End the user's pause of ``conn`` (any thread): what was held goes first in its
        queue, before events that came later."""
        with self._cond:
            conn._user_paused = False
            held, conn._wheld = conn._wheld, None
            if held:
                conn._wq[:0] = held
                self.pending += len(held)
                if not conn._wsched:
                    conn._wsched = True
                    self._ready.append(conn)
                    self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return self.pending == 0

    def alive(self) -> int:
        """How many of the worker threads are still running."""
        return sum(t.is_alive() for t in self._threads)

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


def _nbytes(data: Any) -> int:
    return len(data) if type(data) is bytes else memoryview(data).nbytes


def run_calls(calls: deque, n: int) -> None:
    """Run the first ``n`` ``(fn, args)`` of ``calls``; one that raises is logged."""
    pop = calls.popleft
    for _ in range(n):
        fn, args = pop()
        try:
            fn(*args)
        except Exception:
            logger.exception("call of %r raised", fn)


class BaseConnection:
    """A TCP connection served by the engine. ``send``, ``writelines``, ``sendfile``,
    ``close``, ``abort``, ``when_drained``, ``resume_reading`` and
    ``get_write_buffer_size`` may be called from any thread; everything else from the
    handler (or the engine's thread).

    The state and bookkeeping every backend keeps alike; a backend adds its own slots
    and the methods marked "Backend:"."""

    __slots__ = ("_engine", "_fd", "_handler", "_data_received", "_wpool", "_wq", "_wsched",
                 "_closing", "_closed", "_fail_exc", "_user_paused", "_drain_cbs", "_bidx",
                 "_wheld", "_abort_how", "_deaf", "server", "__weakref__")

    def __init__(self, engine: Any, fd: int, server: Any, pool: Optional[WorkerPool]) -> None:
        self._engine = engine
        self._fd = fd
        self._handler: Any = None
        self._data_received: Any = None
        self._wpool = pool
        self._wq: list = []              # the worker pool's queue of this connection
        self._wsched = False             # on the pool's ready queue
        self._wheld: Optional[deque] = None   # the pool's events held while paused
        self._abort_how = RESET          # ABORT for asyncio's transports: a FIN, as asyncio
        self._closing = False            # no more sends taken; the close is under way
        self._deaf = False               # the handler gets no more data or EOF
        self._closed = False
        self._fail_exc: Optional[BaseException] = None
        self._user_paused = False
        self._drain_cbs: Optional[list] = None
        self._bidx = 0                   # index of its last DATA event in the pool's batch
        self.server = server

    def _make_handler(self, factory: Callable[[], Handler]) -> bool:
        """Give the connection ``factory()``'s handler. If the factory raises: log it, keep
        the exception for ``connection_lost``, mark the connection closing, return False
        (the backend then closes it)."""
        try:
            h = factory()
        except Exception as e:
            logger.exception("handler factory raised; closing the new connection")
            self._fail_exc = e
            self._handler = Handler()
            self._closing = self._deaf = True
            return False
        self._handler = h
        self._data_received = h.data_received
        return True

    # -- sending
    def send(self, data: Any) -> None:
        """Queue ``data`` (bytes-like, copied) to be sent after what was queued before.

        Once the connection is closing or closed (``conn.closing``) - closed by you, by
        the peer's reset, by a failed send or by the engine's stop - the data is dropped
        and counted (``stats().bytes_dropped``), as asyncio's transports do: a peer that
        leaves is routine, and ``connection_lost(conn, exc)`` says why it ended."""
        if self._closing:
            self._engine._dropped(_nbytes(data))
            return
        if type(data) is not bytes:
            data = bytes(data)
        if _get_ident() == self._engine._thread_id:
            self._send_now(data)
        else:
            self._engine._post(self._send_now, data)

    def writelines(self, chunks: Iterable[Any]) -> None:
        """Queue several chunks; queued chunks go out gathered into one ``sendmsg``."""
        for c in chunks:
            self.send(c)

    def _send_now(self, data: bytes) -> None:
        """Backend: queue ``data`` to go out after what was queued before (engine's thread)."""
        raise NotImplementedError

    def sendfile(self, file: Any, offset: int = 0, count: Optional[int] = None) -> None:
        """Queue ``count`` bytes of a regular file (an fd or an object with ``fileno()``)
        from ``offset`` (to its end if ``count`` is None), after what was queued before.

        The file is duplicated at once: the caller may close its own fd as soon as this
        returns. The bytes are read when the queue reaches them, a window at a time, and
        never pass through Python objects (io_uring: read by the kernel into memory the
        engine owns and sent from there; trio: ``os.sendfile``). They count in
        ``get_write_buffer_size()`` until sent. If the file turns out shorter than
        promised, or cannot be read, the connection is aborted and ``connection_lost``
        gets the ``OSError`` (``ENODATA`` for a short file; operation "sendfile").

        Raises ``OSError`` if the fd is not a regular file open for reading or cannot be
        duplicated (``EMFILE``: then nothing is queued), ``ValueError`` for a negative or
        too large offset or count. Once the connection is closing the file is not
        queued, as with :meth:`send` (its bytes count in ``stats().bytes_dropped``).
        From another thread than the engine's, a failure to queue the file once the call
        has returned aborts the connection (``connection_lost`` gets the error)."""
        fd = file if isinstance(file, int) else file.fileno()
        if offset < 0 or (count is not None and count < 0):
            raise ValueError("offset and count must be >= 0")
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"not a regular file: fd {fd} (sendfile)")
        if _fcntl is not None and _fcntl.fcntl(fd, _fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY:
            raise OSError(errno.EBADF, f"not open for reading: fd {fd} (sendfile)")
        if count is None:
            count = max(0, st.st_size - offset)
        if offset + count > _OFF_MAX:
            raise ValueError("offset + count is beyond the largest file offset")
        if self._closing:
            self._engine._dropped(count)
            return
        if not count:
            return
        dup = os.dup(fd)                     # the caller may close ``fd`` once we return
        try:
            if _get_ident() == self._engine._thread_id:
                self._sendfile_now(dup, offset, count)
            else:
                self._engine._post(self._sendfile_posted, dup, offset, count)
        except BaseException:
            os.close(dup)
            raise

    def _sendfile_posted(self, fd: int, offset: int, count: int) -> None:
        try:
            self._sendfile_now(fd, offset, count)
        except OSError as e:
            os.close(fd)
            self._fail(e)                    # the bytes after it must not go out

    def _sendfile_now(self, fd: int, offset: int, count: int) -> None:
        """Backend: queue ``count`` bytes of file ``fd`` from ``offset``, taking ``fd``
        over (engine's thread). If it raises, ``fd`` is still the caller's."""
        raise NotImplementedError

    def get_write_buffer_size(self) -> int:
        """Bytes queued and not yet sent (from any thread: a snapshot). A ``send()`` from
        another thread than the engine's counts once the engine's thread has queued it."""
        if self._closed:
            return 0
        return self._queued_size()

    def _queued_size(self) -> int:
        """Backend: bytes queued and not yet sent on this open connection (any thread)."""
        raise NotImplementedError

    def when_drained(self, callback: Callable[[], Any]) -> None:
        """Run ``callback()`` on the engine's thread once everything queued is sent (or
        the connection has closed). Not run if the engine has stopped."""
        try:
            self._engine._in_loop(self._when_drained, callback)
        except EngineClosed:
            pass                           # nothing runs any more, nothing is sent

    def _when_drained(self, callback: Callable[[], Any]) -> None:
        if self._closed or not self._want_drain():
            self._engine.call_soon(callback)
            return
        if self._drain_cbs is None:
            self._drain_cbs = []
        self._drain_cbs.append(callback)

    def _want_drain(self) -> bool:
        """Backend: True if data is still queued; then call ``_on_drained()`` once it is sent."""
        raise NotImplementedError

    def _on_drained(self) -> None:
        cbs, self._drain_cbs = self._drain_cbs, None
        for cb in cbs or ():
            self._engine.call_soon(cb)

    # -- reading
    def pause_reading(self) -> None:
        """Stop receiving (the kernel keeps the data in the socket). No ``data_received``
        or ``eof_received`` comes until :meth:`resume_reading`: what the engine had
        already received (or queued for the worker pool) is held and comes, in order,
        after the resume."""
        self._user_paused = True
        if not self._closed:
            self._engine._in_loop(self._set_reading, False)

    def resume_reading(self) -> None:
        """Undo :meth:`pause_reading` (from any thread)."""
        if self._wpool is not None:
            self._wpool.release(self)
        else:
            self._user_paused = False
        if not self._closed:
            self._engine._in_loop(self._set_reading, True)

    def _set_reading(self, on: bool) -> None:
        """Backend: stop (``on`` false) or restart reading for the user (engine's thread)."""
        raise NotImplementedError

    def _pause_for_pool(self) -> bool:
        """Backend: stop reading for pool backpressure; True if the pool must resume it later."""
        raise NotImplementedError

    def _resume_for_pool(self) -> None:
        """Backend: end the pause of ``_pause_for_pool`` (engine's thread)."""
        raise NotImplementedError

    # -- closing
    def close(self) -> None:
        """Close after the queued data has been sent. ``connection_lost`` follows; no
        ``data_received`` or ``eof_received`` comes after this call."""
        self._deaf = True
        if self._closing or self._closed:
            return
        self._closing = True
        self._engine._in_loop(self._close_now, GRACEFUL)

    def abort(self) -> None:
        """Close now: unsent data is dropped, in-flight requests are cancelled, and the
        peer gets a reset (RST), so it cannot take what it received for all there was.
        ``connection_lost`` follows; no ``data_received`` or ``eof_received`` comes
        after this call."""
        self._deaf = True
        self._abort()

    def _abort(self) -> None:
        """Abort without silencing the handler: data already received is still delivered
        (before ``connection_lost``)."""
        self._closing = True
        if not self._closed:
            self._engine._in_loop(self._close_now, self._abort_how)

    def _close_now(self, abort: int) -> None:
        """Backend: stop reading and close, after the queued data if ``abort`` is
        ``GRACEFUL``, else now (with a reset if ``RESET``) (engine's thread);
        ``connection_lost`` follows once everything in flight has ended."""
        raise NotImplementedError

    def _fail(self, exc: BaseException) -> None:
        """The connection failed with ``exc`` (what ``connection_lost`` gets): abort it.
        What was received before still reaches the handler, unless it is ``_deaf``."""
        if self._fail_exc is None:
            self._fail_exc = exc
        self._abort()

    # -- information
    @property
    def closing(self) -> bool:
        """True once the connection is closing or closed (whoever began it): sends are
        dropped from then on, ``connection_lost`` is on its way."""
        return self._closing

    @property
    def closed(self) -> bool:
        """True once the connection is closed (``connection_lost`` has been queued)."""
        return self._closed

    def fileno(self) -> int:
        return -1 if self._closed else self._fd

    def _sockinfo(self, name: str) -> Any:
        if self._closed:
            raise os_error(errno.EBADF, name)
        return self._sock_call(name)

    def _sock_call(self, name: str) -> Any:
        """Backend: the result of the socket method ``name`` (``getpeername``...) on the fd."""
        raise NotImplementedError

    @property
    def peername(self) -> Any:
        return self._sockinfo("getpeername")

    @property
    def sockname(self) -> Any:
        return self._sockinfo("getsockname")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "closing" if self._closing else "open"
        return f"<{type(self).__name__} fd={self._fd} {state}>"


class BaseServer:
    """Listening sockets of one ``serve_tcp`` call."""

    def __init__(self, engine: Any, socks: list, factory: Callable[[], Handler],
                 pool: Optional[WorkerPool]) -> None:
        self._engine = engine
        self._factory = factory
        self.pool = pool
        self.addresses = [s.getsockname() for s in socks]
        self._closing = False
        self._open_listeners = 0             # listening sockets not closed yet
        #: listening socket (the backend's key) -> its accept failures (_accept_failed)
        self._accept_failing: dict = {}

    @property
    def port(self) -> int:
        return self.addresses[0][1]

    def _accept_failed(self, listener: Any, exc: OSError) -> None:
        """Called by the backend when an accept on ``listener`` (its key for the listening
        socket) failed and is retried in 0.1 s: at the fd limit (EMFILE), or short of
        memory. The first failure is logged; the next ones are counted and reported every
        :data:`ACCEPT_FAILURES_REPORTED_EVERY` seconds while they go on, and the first
        report without any says so, with the total. At the fd limit accepts fail and
        succeed in turn as fds come and go: that is one line a minute too, not ten or
        twenty a second."""
        trouble = self._accept_failing.get(listener)
        if trouble is not None:
            trouble[0] += 1
            trouble[1] += 1
            trouble[3] = exc
            return
        every = ACCEPT_FAILURES_REPORTED_EVERY
        logger.warning("accept on %s failed: %s; retrying every 0.1 s (further failures "
                       "are counted and reported every %g s)", self.addresses, exc, every)
        # failures since the last report, in all, since when, the last error
        self._accept_failing[listener] = [0, 1, time.monotonic(), exc]
        self._engine.call_later(every, self._accept_report, listener)

    def _accept_report(self, listener: Any) -> None:
        """The periodic report of :meth:`_accept_failed` (engine's thread)."""
        trouble = self._accept_failing.get(listener)
        if trouble is None:
            return
        if self._closing:
            del self._accept_failing[listener]
            return
        every = ACCEPT_FAILURES_REPORTED_EVERY
        recent, total, since, exc = trouble
        if recent:
            logger.warning("accept on %s: %d more attempt%s failed in the last %g s (%s); "
                           "retrying every 0.1 s", self.addresses, recent,
                           "" if recent == 1 else "s", every, exc)
            trouble[0] = 0
            self._engine.call_later(every, self._accept_report, listener)
        else:
            del self._accept_failing[listener]
            logger.warning("accept on %s: no attempt failed in the last %g s (%d failed in "
                           "all, the first %.0f s ago)", self.addresses, every, total,
                           time.monotonic() - since)

    def _start(self) -> None:
        """Backend: start accepting on the sockets (engine's thread, once it runs)."""
        raise NotImplementedError

    def _close_socks(self) -> None:
        """Backend: close the sockets that were never handed to the running engine."""
        raise NotImplementedError

    def close(self) -> None:
        """Stop accepting; connections already accepted carry on."""
        if not self._closing:
            self._closing = True
            self._engine._in_loop(self._close_now)

    def _close_now(self) -> None:
        """Backend: stop accepting and close the listening sockets (engine's thread)."""
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        return self._closing and self._open_listeners == 0

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.addresses}>"


_Engine = TypeVar("_Engine", bound="BaseEngine")


class BaseEngine:
    """What every engine does alike: its life, calls from other threads, timers, worker-pool
    backpressure, ``serve_tcp``. A backend sets ``backend``, ``_server_class`` and
    ``_cmds_per_turn``, has a ``_shutting`` that is true once the shutdown has begun, and
    provides ``run()``, ``_begin_shutdown(timeout)`` and the methods marked "Backend:"."""

    backend: str
    #: The server class ``serve_tcp`` makes.
    _server_class: Any = BaseServer
    #: At most this many calls posted from other threads run per loop turn.
    _cmds_per_turn: int

    def __init__(self) -> None:
        self._thread_id: Optional[int] = None
        self._thread: Optional[threading.Thread] = None
        self._cmds: deque = deque()          # (fn, args) posted from other threads
        self._wake_pending = False           # the engine's thread was woken for _cmds
        self._ready: deque = deque()         # call_soon on the engine's thread
        self._timers = Timers()
        self._servers: list = []
        self._pools: list[WorkerPool] = []
        self._ops: dict = {}                 # low-level ops in flight by index (Op, _OpRec)
        self._registered: list = []          # (buffer, view) of register_buffers
        self._fixed_lens: list[int] = []     # their sizes
        self._started = threading.Event()
        self._stopped = threading.Event()
        self._start_exc: Optional[BaseException] = None
        self._closed = False
        self._ran = False
        self._ndropped = 0                   # bytes_dropped
        self._drop_lock = threading.Lock()
        self._stop_timeout = 5.0             # of the stop() under way
        self._stop_deadline = 0.0            # when it must be over (time.monotonic())

    # ------------------------------------------------------------------ running
    def start(self: _Engine) -> _Engine:
        """Run the loop on a new thread; returns once it runs (io_uring: the ring is set up)."""
        t = threading.Thread(target=self._run_thread, name="proactor-io", daemon=True)
        self._thread = t
        t.start()
        self._started.wait()
        if self._start_exc is not None:
            raise self._start_exc
        return self

    def run(self, *, handle_signals: bool = True) -> None:
        """Run the loop in this thread until :meth:`stop` (or SIGINT/SIGTERM when
        ``handle_signals`` and this is the main thread) has shut everything down."""
        if self._ran:
            raise RuntimeError("an engine runs once")
        self._ran = True
        self._run(handle_signals)

    def _run(self, handle_signals: bool) -> None:
        """Backend: set up, run the loop until the shutdown is done, tear down (this thread)."""
        raise NotImplementedError

    def _run_thread(self) -> None:
        try:
            self.run(handle_signals=False)
        except BaseException as e:  # noqa: BLE001 - reported by start()/join()
            if self._start_exc is None:
                logger.exception("proactor engine thread died")
                self._start_exc = e

    def stop(self, timeout: float = 5.0) -> None:
        """Begin a graceful shutdown (from any thread): stop accepting, let handlers
        finish what is queued and in-flight sends complete (for at most ``timeout``
        seconds), then close everything and join the workers.

        Connections still open at the deadline are aborted: their unsent data is
        dropped, the peer gets a reset, and ``connection_lost`` gets a
        ``ConnectionAbortedError`` saying so. The engine has stopped within about
        ``timeout`` + 0.5 s; worker threads still inside a handler then are left to
        finish on their own (they are daemon threads), with a warning."""
        if not self._closed:
            self._post(self._begin_shutdown, timeout)

    def _set_stop_deadline(self, timeout: float) -> float:
        """Record when the shutdown that ``stop(timeout)`` began must be over."""
        self._stop_timeout = timeout
        self._stop_deadline = time.monotonic() + max(0.0, timeout)
        return self._stop_deadline

    def _abort_at_deadline(self, c: BaseConnection) -> None:
        """Abort ``c``: the shutdown's deadline has passed (its handler hears no more)."""
        c._deaf = True
        c._fail(OSError(errno.ECONNABORTED,
                        f"the engine's stop(timeout={self._stop_timeout:g}) ran out before "
                        "the connection finished: aborted, unsent data dropped (stop)"))

    def _begin_shutdown(self, timeout: float) -> None:
        """Backend: start the shutdown that ``stop(timeout)`` asks for (engine's thread)."""
        raise NotImplementedError

    def join(self, timeout: Optional[float] = None) -> bool:
        """Wait for a :meth:`start`-ed engine to finish; True when it has."""
        return self._stopped.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """:meth:`stop` and :meth:`join`; a never-run engine closes what it opened."""
        if not self._ran:
            self._ran = True
            self._closed = True
            self._cmds.clear()
            self._close_never_run(timeout)
            self._stopped.set()
            return
        self.stop(timeout)
        if self._thread_id != _get_ident():
            self.join()

    def _close_never_run(self, timeout: float) -> None:
        """Backend: close what an engine that never ran opened (sockets, pools, memory)."""
        raise NotImplementedError

    def _shutdown_pools(self) -> None:
        """Let every worker pool finish what is queued and join its threads, until the
        stop deadline (and a short grace for the last events: connection_lost)."""
        if not self._stop_deadline:          # no stop(): the loop ended some other way
            self._set_stop_deadline(self._stop_timeout)
        deadline = max(self._stop_deadline, time.monotonic()) + _POOL_GRACE
        busy = 0
        for p in self._pools:
            if not p.shutdown(timeout=max(0.0, deadline - time.monotonic())):
                busy += p.alive()
        if busy:
            logger.warning("%d worker thread(s) still inside a handler after "
                           "stop(timeout=%g); left to finish on their own", busy,
                           self._stop_timeout)

    def __enter__(self: _Engine) -> _Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def running(self) -> bool:
        return self._started.is_set() and not self._stopped.is_set()

    # ------------------------------------------------------------------ scheduling
    def time(self) -> float:
        return time.monotonic()

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the engine's thread soon (thread-safe)."""
        if _get_ident() == self._thread_id:
            self._ready.append((fn, args))
            self._wake_sched()
        else:
            self._post(fn, *args)

    call_soon_threadsafe = call_soon

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> TimerHandle:
        return self.call_at(time.monotonic() + delay, fn, *args)

    def call_at(self, when: float, fn: Callable[..., Any], *args: Any) -> TimerHandle:
        """Run ``fn(*args)`` on the engine's thread at ``time()`` >= ``when``; returns a
        handle with ``cancel()`` (usable from any thread). From another thread it is
        scheduled through the loop."""
        h = TimerHandle(when, fn, args)
        if _get_ident() == self._thread_id:
            self._push_timer(h)
        else:
            self._post(self._push_timer, h)
        return h

    def _push_timer(self, h: TimerHandle) -> None:
        heap = self._timers._heap
        heapq.heappush(heap, h)
        if heap[0] is h:
            self._wake_sched()           # it may sleep until a later deadline

    def _wake_sched(self) -> None:
        """Backend: make the engine's thread look at ``_ready`` and the timers again (default:
        nothing, for a loop that looks every turn)."""

    def _post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Hand a call to the engine's thread (from any thread) and wake it."""
        if self._closed:
            raise EngineClosed("the engine is shut down")
        self._cmds.append((fn, args))
        if not self._wake_pending:
            self._wake_pending = True
            self._wakeup()

    def _wakeup(self) -> None:
        """Backend: wake the engine's thread to run ``_run_cmds`` (any thread; once per batch)."""
        raise NotImplementedError

    def _in_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        if _get_ident() == self._thread_id:
            fn(*args)
        else:
            self._post(fn, *args)

    def _run_cmds(self) -> None:
        """Run calls posted by other threads: at most a bounded number per loop turn, so
        completions and timers keep flowing however fast other threads post."""
        cmds = self._cmds
        run_calls(cmds, min(len(cmds), self._cmds_per_turn))

    def _run_ready(self) -> None:
        ready = self._ready
        run_calls(ready, len(ready))

    def _check_loop(self, what: str) -> None:
        if _get_ident() != self._thread_id:
            raise RuntimeError(f"{what}() must be called on the engine's thread")

    # ------------------------------------------------------------------ worker pools
    def _backpressure(self, p: WorkerPool, c: BaseConnection) -> None:
        """The pool's queue is full: stop reading from this connection until it drains."""
        if c._pause_for_pool():
            p._paused_conns.append(c)
        with p._cond:
            if p.pending > p._low_water:
                p.paused = True
                return
        self._resume_pool(p)   # the workers drained it meanwhile

    def _resume_reading_for(self, p: WorkerPool) -> None:
        """Called by a worker when its pool's queue is low again."""
        try:
            self._post(self._resume_pool, p)
        except EngineClosed:
            pass

    def _resume_pool(self, p: WorkerPool) -> None:
        paused, p._paused_conns = p._paused_conns, []
        for c in paused:
            c._resume_for_pool()

    # ------------------------------------------------------------------ servers
    def serve_tcp(self, handler_factory: Callable[[], Handler], host: Optional[str] = "127.0.0.1",
                  port: int = 0, *, workers: int = 0, backlog: int = 1024,
                  reuse_port: bool = False, max_queue: int = 4096) -> Any:
        """Listen on ``host:port`` and serve each connection with ``handler_factory()``.

        ``workers=0`` runs handlers on the engine's thread; ``workers=N`` runs them on N
        worker threads (half-sync/half-async), at most ``max_queue`` events queued before
        reading pauses. Binding happens now (errors raise here); accepting starts once
        the engine runs. Callable from any thread."""
        if self._closed or self._shutting:
            raise EngineClosed("the engine is shut down")
        socks = bind_tcp(host, port, backlog, reuse_port)
        pool = None
        if workers:
            pool = WorkerPool(self, workers, max_queue)
            self._pools.append(pool)
        srv = self._server_class(self, socks, handler_factory, pool)
        self._servers.append(srv)
        try:
            self._in_loop(srv._start)
        except EngineClosed:
            srv._close_socks()
            raise
        return srv

    def connect_tcp(self, handler_factory: Callable[[], Handler], host: str, port: int,
                    callback: Optional[Callable[[Op], Any]] = None, *,
                    timeout: Optional[float] = None) -> Op:
        """Open a client connection served by ``handler_factory()`` (on the engine's
        thread). The returned op's result is the connection; the handler's
        ``connection_made`` runs before ``callback``."""
        family, _, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        return self._connect_tcp(handler_factory, family, proto, addr, callback, timeout)

    def _connect_tcp(self, handler_factory: Callable[[], Handler], family: int, proto: int,
                     addr: Any, callback: Optional[Callable[[Op], Any]],
                     timeout: Optional[float]) -> Op:
        """Backend: connect to the resolved ``addr`` as ``connect_tcp`` says (any thread)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ low-level ops
    def _cancel_op(self, op: Op) -> None:
        if _get_ident() != self._thread_id:
            self._post(self._cancel_op, op)
            return
        if op._done or op._cancel_req:
            return
        op._cancel_req = True          # first: an op not submitted yet ends when it would be
        self._cancel_submitted(op)

    def _cancel_submitted(self, op: Op) -> None:
        """Backend: request the cancellation of ``op`` if it is in flight (engine's thread)."""
        raise NotImplementedError

    def _check_fixed(self, index: int, nbytes: int, buf_offset: int) -> None:
        lens = self._fixed_lens
        if not 0 <= index < len(lens):
            raise ValueError(f"no registered buffer {index}")
        if buf_offset < 0 or nbytes < 0 or buf_offset + nbytes > lens[index]:
            raise ValueError("range outside the registered buffer")

    def read_fixed(self, fd: int, index: int, nbytes: int, offset: int,
                   callback: Callable[[Op], Any], *, buf_offset: int = 0,
                   timeout: Optional[float] = None) -> Op:
        """Read into registered buffer ``index`` (from ``buf_offset``); result: bytes read.
        A range outside the buffer raises ValueError."""
        self._check_fixed(index, nbytes, buf_offset)
        return self._read_fixed(fd, index, nbytes, offset, callback, buf_offset, timeout)

    def write_fixed(self, fd: int, index: int, nbytes: int, offset: int,
                    callback: Callable[[Op], Any], *, buf_offset: int = 0,
                    timeout: Optional[float] = None) -> Op:
        """Write from registered buffer ``index`` (from ``buf_offset``); result: bytes
        written. A range outside the buffer raises ValueError."""
        self._check_fixed(index, nbytes, buf_offset)
        return self._write_fixed(fd, index, nbytes, offset, callback, buf_offset, timeout)

    def _read_fixed(self, fd: int, index: int, nbytes: int, offset: int,
                    callback: Callable[[Op], Any], buf_offset: int,
                    timeout: Optional[float]) -> Op:
        """Backend: submit ``read_fixed`` (its range is checked)."""
        raise NotImplementedError

    def _write_fixed(self, fd: int, index: int, nbytes: int, offset: int,
                     callback: Callable[[Op], Any], buf_offset: int,
                     timeout: Optional[float]) -> Op:
        """Backend: submit ``write_fixed`` (its range is checked)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ statistics
    def _dropped(self, nbytes: int) -> None:
        """Count bytes a ``send()`` on a closing connection dropped (any thread)."""
        with self._drop_lock:
            self._ndropped += nbytes

    def _stats(self, **counters: int) -> Stats:
        """A :class:`Stats` of ``counters`` and what every engine counts alike: the objects
        pinned (low-level ops in flight, registered buffers), the worker queues' depth and
        the bytes dropped by sends on closing connections."""
        return Stats(backend=self.backend,
                     pinned_objects=len(self._ops) + len(self._registered),
                     queue_depth=sum(p.pending for p in self._pools),
                     bytes_dropped=self._ndropped, **counters)
