"""The trio backend: the Proactor simulated on synchronous (readiness-based) I/O.

Where io_uring is missing (macOS, Windows, Linux with seccomp blocking it) this module
gives the same engine API as :mod:`proactor._io_uring`, with trio doing the waiting:
trio tasks wait until a descriptor is ready, perform the non-blocking call themselves,
and turn each finished operation into a completion event for the handler. It imports
neither the cffi extension nor anything Linux-only.

Theory of operation
===================

The loop
--------
* **One thread runs** ``trio.run`` (the I/O thread): :meth:`TrioEngine.run` runs it in
  the calling thread, :meth:`TrioEngine.start` on a background one. Every socket call,
  every handler call with ``workers=0`` and every op callback happens there.
* **The cross-thread entry** is trio's own: ``TrioToken.run_sync_soon``, which appends to
  trio's queue and writes one byte to trio's wakeup socketpair - no polling. Other
  threads (workers, a ``conn.send()`` from anywhere) append ``(fn, args)`` to a deque and
  call ``run_sync_soon(self._run_cmds)`` only when no such call is pending, so a burst
  of sends from the workers costs one wakeup. Before the loop runs, the deque just
  fills up; the loop drains it first thing.
* **A scheduler task** runs what the I/O thread queued for "soon" (``call_soon``,
  deferred closes), the ``call_later``/``call_at`` timer heap, and hands the worker
  pools their events once per loop turn: a task rescheduled during one trio batch runs
  in the next, after every reader that ran in this one has queued its events. When
  there is nothing to do it is parked (``wait_task_rescheduled``) with the next timer
  as its deadline, so an idle engine sleeps in ``epoll_wait``/``kqueue``/IOCP.

Connections
-----------
* **Tasks per connection.** A *reader* task per connection: ``wait_readable``, one
  ``recv``, deliver ``data_received`` (or queue it to the pool), repeat. A *writer* task
  exists only while data is queued: ``conn.send()`` on the I/O thread first tries the
  non-blocking ``send`` itself, and only what the kernel did not take is queued; the
  writer waits for writability and drains the queue in order (gathered into one
  ``sendmsg`` where the platform has it). Order holds because nothing is sent directly
  while anything is queued. An error of such a direct ``send`` is reported as a
  completion would be, on a later turn: the handler calling ``send()`` does not see
  its connection close under it mid-call; later data is dropped until the abort.
* **Close and abort map onto cancel scopes.** Each reader runs in the connection's
  read scope, each writer in its write scope. ``close()`` cancels the read scope (stop
  reading now) and lets the writer drain the queue; ``abort()`` drops the queue and
  cancels both. Reading pauses (``pause_reading``, worker-pool backpressure, shutdown)
  do not cancel: the reader parks before its next ``recv`` and the kernel keeps the data.
* **Final completion.** A connection is finished when its closing was requested and
  both its tasks have *exited* (a cancel is only a request; the task still has to
  unwind). Only then is the socket closed (after ``notify_closing``) and
  ``connection_lost`` delivered - exactly once, after every other event of the
  connection.

Low-level operations
--------------------
* Each op is a task in its own cancel scope (with the ``timeout=`` as its deadline).
  ``op.cancel()`` cancels the scope; the op ends with ``ECANCELED`` (``ETIMEDOUT`` when
  the deadline fired) when the task caught that cancellation, else with its real
  result - a cancel can lose the race, as with io_uring. The callback runs when the
  task has ended: nothing touches the op's buffers after that (the op holds them until
  then), which is this backend's "final completion".
* Sockets, pipes and character devices: wait for readiness, then one non-blocking call.
  Socket ops on raw fds borrow a ``socket.socket(fileno=fd)`` for the call and
  ``detach()`` it afterwards (no dup, the fd is never closed by it); ``MSG_DONTWAIT``
  keeps the call from blocking where it exists, else (Windows) the borrowed socket is
  switched to non-blocking mode. ``accept``, ``connect`` and writes to a blocking pipe
  switch ``O_NONBLOCK`` on for the call only. Waits on one fd by several ops share one
  trio wait (trio allows one waiter per fd and direction).
* Regular files (and everything on Windows that is not a socket) are read and written
  in ``trio.to_thread.run_sync`` with ``abandon_on_cancel=False``: blocking file I/O never
  runs on the I/O thread, and a cancel while the thread runs waits for the thread (its
  real result wins). ``os.pread``/``os.pwrite`` where they exist, else a per-fd lock
  around ``lseek`` + ``read``/``write`` that restores the file position.

Shutdown
--------
As in the io_uring engine: stop accepting and reading, let the worker pools drain, close
every connection gracefully (queued data is flushed), abort what is left at the
deadline, cancel the low-level ops and wait for their final completions, then end the
loop and join the workers. Every socket the engine opened is closed by then.

What the backends do alike (the engine's life, the posted calls and the timer heap,
worker-pool backpressure, a connection's flags, close and drain bookkeeping) lives in
:class:`~proactor._common.BaseEngine`, ``BaseConnection`` and ``BaseServer``; the classes
here supply the trio side of it through their hook methods.
"""
from __future__ import annotations

import errno
import logging
import math
import os
import select
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections import deque
from itertools import islice
from typing import Any, Callable, Optional

import trio

from ._common import (
    _GIVE_UP,
    DATA,
    EOF,
    LOST,
    MADE,
    RESET,
    BaseConnection,
    BaseEngine,
    BaseServer,
    Handler,
    Op,
    Stats,
    WorkerPool,
    handler_failed,
    run_handler_event,
)
from ._errors import EngineClosed, os_error

logger = logging.getLogger("proactor")

__all__ = ["TrioEngine", "TrioConnection", "TrioServer", "backend"]

backend = "trio"

_WINDOWS = sys.platform == "win32"
_get_ident = threading.get_ident
_monotonic = time.monotonic
_wait_readable = trio.lowlevel.wait_readable
_wait_writable = trio.lowlevel.wait_writable

#: Per-call "do not block" flag for socket calls (absent on Windows).
_DONTWAIT = getattr(socket, "MSG_DONTWAIT", 0)
_HAVE_SENDMSG = hasattr(socket.socket, "sendmsg")
_HAVE_SENDFILE = hasattr(os, "sendfile")
_HAVE_PREAD = hasattr(os, "pread")
_FILE_WINDOW = 128 * 1024          # bytes read at a time where os.sendfile is missing
_SENDFILE_MAX = 1 << 30            # bytes asked of one os.sendfile call


class _FileChunk:
    """A queued part of a file (``conn.sendfile``): its own fd, closed when done."""

    __slots__ = ("fd", "offset", "left", "no_sendfile")

    def __init__(self, fd: int, offset: int, left: int) -> None:
        self.fd = fd
        self.offset = offset
        self.left = left
        self.no_sendfile = not _HAVE_SENDFILE

    def __len__(self) -> int:
        return self.left

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def send_some(self, sock: socket.socket) -> int:
        """Send what the socket takes now; BlockingIOError if nothing."""
        if not self.no_sendfile:
            try:
                n = os.sendfile(sock.fileno(), self.fd, self.offset,
                                min(self.left, _SENDFILE_MAX))
            except OSError as e:
                if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                                   errno.ENOTSOCK):
                    raise
                self.no_sendfile = True      # e.g. a file system without it: read instead
            else:
                if n == 0:
                    raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
                return n
        want = min(self.left, _FILE_WINDOW)
        if _HAVE_PREAD:
            data = os.pread(self.fd, want, self.offset)
        else:
            os.lseek(self.fd, self.offset, os.SEEK_SET)
            data = os.read(self.fd, want)
        if not data:
            raise OSError(errno.ENODATA, os.strerror(errno.ENODATA))
        return sock.send(data)
_IOV_MAX = 64
#: connect_ex results that mean "in progress".
_CONNECT_PENDING = {errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN,
                    getattr(errno, "WSAEWOULDBLOCK", -1)}
#: accept errors that concern only the connection being accepted.
_ACCEPT_TRANSIENT = {errno.ECONNABORTED, errno.EPROTO if hasattr(errno, "EPROTO") else -1,
                     errno.EINTR, errno.EAGAIN}
_AT_FDCWD = -100
#: Calls from other threads run per loop turn (a thread posting without pause must not
#: keep the loop from completing anything).
_CMDS_PER_TURN = 1024

# fd kinds for the low-level ops
_FILE, _STREAM, _SOCK = range(3)


def _linger_lite(sock: socket.socket) -> None:
    """Before a graceful close: send our FIN after the data and read what the peer sent
    meanwhile. Closing a socket with unread data makes the kernel answer with RST, which
    can destroy the reply just sent before the peer reads it. (As in the io_uring engine;
    a full lingering close would also wait for the peer's FIN.)"""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.setblocking(False)
        for _ in range(64):
            if not sock.recv(16384):
                break
    except OSError:
        pass


def _reset_on_close(sock: socket.socket) -> None:
    """Make the close of an aborted connection a reset (RST, not FIN): the peer must not
    take a stream cut short for a whole one (a body that ends at the close). As in the
    io_uring engine."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                        struct.pack("HH" if sys.platform == "win32" else "ii", 1, 0))
    except OSError:
        pass


class TrioConnection(BaseConnection):
    """A TCP connection served by the engine (see :class:`BaseConnection` for which
    methods any thread may call)."""

    __slots__ = ("_sock", "_aborted", "_bp_paused", "_sd_paused", "_no_read", "_rpark",
                 "_sendq", "_sendq_bytes", "_nfiles", "_writing", "_tasks", "_rscope", "_wscope",
                 "_close_taken", "_reset")

    def __init__(self, engine: TrioEngine, sock: socket.socket, server: Optional[TrioServer],
                 pool: Optional[WorkerPool]) -> None:
        super().__init__(engine, sock.fileno(), server, pool)
        self._sock = sock
        self._aborted = False
        self._bp_paused = False          # paused by worker-pool backpressure
        self._sd_paused = False          # paused by the shutdown
        self._no_read = False            # any of the three
        self._rpark: Any = None          # trio.Event the paused reader waits on
        self._sendq: deque = deque()     # what the kernel has not taken yet, in order
        self._sendq_bytes = 0
        self._nfiles = 0                 # _FileChunk items in _sendq
        self._writing = False            # a writer task exists
        self._tasks = 0                  # reader + writer tasks not yet exited
        self._rscope = trio.CancelScope()
        self._wscope: Any = None
        # The engine's thread has taken the close. ``_closing`` is set at once by a close()
        # from any thread, before the sends that thread posted ahead of it have run:
        # finishing on ``_closing`` would drop them.
        self._close_taken = False
        self._reset = False              # aborted with a reset (RST at the close)

    # -- sending
    def _send_now(self, data: Any) -> None:
        if self._closed or self._aborted or not data:
            if data:
                self._engine._dropped(len(data))
            return
        eng = self._engine
        if not self._sendq:
            try:
                n = self._sock.send(data)
            except BlockingIOError:
                n = 0
            except OSError as e:
                # Reported like a completion on a later turn: the handler that is
                # sending now must not see the connection close under it (its next
                # send() would raise). Until then further data is dropped.
                if self._fail_exc is None:
                    self._fail_exc = os_error(e.errno or errno.EIO, "send")
                self._aborted = True
                self._closing = True     # conn.closing: sends are dropped from now on
                eng._ready.append((self._abort, ()))
                eng._wake_sched()
                return
            eng._ncompleted += 1
            eng._bytes_out += n
            if n == len(data):
                return
            data = memoryview(data)[n:]
        self._enqueue(data)

    def _sendfile_now(self, fd: int, offset: int, count: int) -> None:
        if self._closed or self._aborted:
            os.close(fd)
            self._engine._dropped(count)
            return
        self._nfiles += 1
        self._enqueue(_FileChunk(fd, offset, count))

    def _enqueue(self, item: Any) -> None:
        """Queue bytes or a _FileChunk for the writer task, starting it if needed."""
        eng = self._engine
        self._sendq.append(item)
        n = len(item)
        self._sendq_bytes += n
        eng._send_queued += n
        if not self._writing:
            self._writing = True
            self._tasks += 1
            self._wscope = trio.CancelScope()
            eng._nwrite += 1
            eng._nursery.start_soon(eng._writer, self)

    def _queued_size(self) -> int:
        return self._sendq_bytes

    def _want_drain(self) -> bool:
        # The writer calls _on_drained when it has emptied the queue (or _finish does).
        return bool(self._sendq)

    # -- reading
    def _set_reading(self, on: bool) -> None:
        self._update_read()

    def _pause_for_pool(self) -> bool:
        if self._bp_paused or self._closing:
            return False
        self._bp_paused = True
        self._update_read()
        return True

    def _resume_for_pool(self) -> None:
        self._bp_paused = False
        self._update_read()

    def _update_read(self) -> None:
        no = self._user_paused or self._bp_paused or self._sd_paused
        self._no_read = no
        if not no and self._rpark is not None:
            ev, self._rpark = self._rpark, None
            ev.set()

    # -- closing
    def _close_now(self, abort: int) -> None:
        if self._closed:
            return
        self._closing = self._close_taken = True
        eng = self._engine
        self._rscope.cancel()                 # stop reading
        if abort:
            self._aborted = True
            self._reset = self._reset or abort == RESET
            self._drop_queue()
            if self._wscope is not None:
                self._wscope.cancel()
        # Finish from the scheduler, never inside the caller (a handler's close()).
        eng._ready.append((self._maybe_finish, ()))
        eng._wake_sched()

    def _drop_queue(self) -> None:
        if self._sendq:
            self._engine._send_queued -= self._sendq_bytes
            if self._nfiles:
                for item in self._sendq:
                    if type(item) is _FileChunk:
                        item.close()
                self._nfiles = 0
            self._sendq.clear()
            self._sendq_bytes = 0

    def _task_exited(self) -> None:
        self._tasks -= 1
        if self._close_taken:
            self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._closed or not self._close_taken or self._tasks:
            return
        if self._sendq and not self._aborted:
            return                            # still flushing (cannot happen: a writer runs)
        self._finish()

    def _finish(self) -> None:
        """Both tasks have exited: close the socket, report ``connection_lost``."""
        self._closed = True
        eng = self._engine
        eng._conns.discard(self)
        self._drop_queue()
        sock = self._sock
        try:
            trio.lowlevel.notify_closing(sock)
        except Exception:  # noqa: BLE001 - nobody waits on it; closing is what matters
            pass
        if not self._aborted:
            _linger_lite(sock)
        elif self._reset:
            _reset_on_close(sock)
        sock.close()
        if self._drain_cbs:
            self._on_drained()
        eng._deliver(self, LOST, self._fail_exc)

    # -- information
    def _sock_call(self, name: str) -> Any:
        try:
            return getattr(self._sock, name)()
        except OSError as e:
            raise os_error(e.errno or errno.EBADF, name) from None


class TrioServer(BaseServer):
    """Listening sockets of one ``serve_tcp`` call."""

    def __init__(self, engine: TrioEngine, socks: list, factory: Callable[[], Handler],
                 pool: Optional[WorkerPool]) -> None:
        super().__init__(engine, socks, factory, pool)
        self._socks = socks
        self._scope = trio.CancelScope()
        self._open_listeners = len(socks)

    def _start(self) -> None:
        eng = self._engine
        if self._closing or eng._shutting:
            self._closing = True
            self._close_socks()
            return
        for s in self._socks:
            s.setblocking(False)
            eng._nursery.start_soon(eng._listen, self, s)

    def _close_socks(self) -> None:
        for s in self._socks:
            if s.fileno() != -1:
                s.close()
                self._open_listeners -= 1

    def close(self) -> None:
        """Stop accepting; connections already accepted carry on."""
        try:
            super().close()
        except EngineClosed:
            pass

    def _close_now(self) -> None:
        self._closing = True
        self._scope.cancel()


class _OpRec:
    """A low-level op in flight: its task's cancel scope and why it was cancelled."""

    __slots__ = ("op", "fd", "scope", "cancelled")

    def __init__(self, op: Op, fd: int, scope: trio.CancelScope) -> None:
        self.op = op
        self.fd = fd
        self.scope = scope
        self.cancelled = False


class _Watch:
    """One trio wait on (fd, direction), shared by every op waiting for it."""

    __slots__ = ("events", "scope", "error")

    def __init__(self) -> None:
        self.events: list = []
        self.scope = trio.CancelScope()
        self.error: Optional[BaseException] = None


class TrioEngine(BaseEngine):
    """A Proactor on trio (see the module docstring). The same API as
    :class:`proactor._io_uring.UringEngine`.

    Options: ``buffer_size`` (bytes asked for per ``recv``, default 64 KiB). The ring
    options of the io_uring engine (``entries``, ``cq_entries``, ``buffers``,
    ``setup_flags``) are accepted and ignored, so one set of options fits both.
    """

    backend = "trio"
    _server_class = TrioServer
    _cmds_per_turn = _CMDS_PER_TURN

    def __init__(self, *, buffer_size: int = 65536, entries: Optional[int] = None,
                 cq_entries: Optional[int] = None, buffers: Optional[int] = None,
                 setup_flags: Any = None) -> None:
        if buffer_size <= 0:
            raise ValueError("buffer_size must be > 0")
        super().__init__()
        self._recv_size = buffer_size
        self._token: Any = None
        self._nursery: Any = None
        self._touched: list = []             # pools with events batched in this turn
        self._sched_task: Any = None
        self._sched_parked = False
        self._conns: set = set()
        self._next_op = 0
        self._watches: dict = {}
        self._fd_locks: dict[int, threading.Lock] = {}
        # counters (written on the I/O thread, read from anywhere)
        self._ncompleted = 0
        self._nread = 0                      # readers armed (alive and not paused)
        self._nwrite = 0                     # writer tasks
        self._nlisten = 0                    # listener tasks
        self._ntimed = 0                     # ops in flight with a timeout (deadline)
        self._bytes_in = 0
        self._bytes_out = 0
        self._send_queued = 0
        self._loop_running = False
        # life
        self._done: Any = None               # trio.Event: the shutdown has finished
        self._shutting = False
        self._hard = False                   # low-level ops are being cancelled

    # ------------------------------------------------------------------ running
    def _run(self, handle_signals: bool) -> None:
        signals = handle_signals and threading.current_thread() is threading.main_thread()
        try:
            trio.run(self._main, signals)
        except BaseException as e:
            if not self._started.is_set():
                self._start_exc = e
            raise
        finally:
            self._teardown()
            self._started.set()
            self._stopped.set()

    def stop(self, timeout: float = 5.0) -> None:
        """Begin a graceful shutdown (from any thread): stop accepting, let handlers
        finish what is queued and queued sends go out (for at most ``timeout`` seconds),
        then close everything and join the workers."""
        try:
            super().stop(timeout)
        except EngineClosed:
            pass

    def _close_never_run(self, timeout: float) -> None:
        self._teardown()

    async def _main(self, signals: bool) -> None:
        self._done = trio.Event()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if signals:
                await nursery.start(self._watch_signals)
            nursery.start_soon(self._scheduler)
            self._token = trio.lowlevel.current_trio_token()
            self._thread_id = _get_ident()
            self._loop_running = True
            self._run_cmds()                 # what was posted before the loop ran
            self._started.set()
            await self._done.wait()
            nursery.cancel_scope.cancel()
        self._loop_running = False

    async def _watch_signals(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            task_status.started()
            async for signum in signals:
                logger.info("signal %d: shutting down", signum)
                self._begin_shutdown(5.0)

    # ------------------------------------------------------------------ scheduling
    def _wakeup(self) -> None:
        token = self._token
        if token is not None:        # else the loop drains _cmds when it starts
            try:
                token.run_sync_soon(self._run_cmds)
            except trio.RunFinishedError:
                raise EngineClosed("the engine is shut down") from None

    def _run_cmds(self) -> None:
        # Clear the flag first: a post after this line schedules another run.
        self._wake_pending = False
        super()._run_cmds()
        if self._cmds and not self._wake_pending and self._token is not None:
            # A thread posts faster than we run: let the other tasks have this turn.
            self._wake_pending = True
            self._token.run_sync_soon(self._run_cmds)

    def _wake_sched(self) -> None:
        if self._sched_parked:
            self._sched_parked = False
            trio.lowlevel.reschedule(self._sched_task)

    def _sched_abort(self, _: Any) -> Any:
        self._sched_parked = False
        return trio.lowlevel.Abort.SUCCEEDED

    async def _scheduler(self) -> None:
        """Runs ``call_soon`` calls and due timers, and hands the pools their batches
        once per loop turn; parked (no CPU) while there is nothing to do."""
        self._sched_task = trio.lowlevel.current_task()
        ready = self._ready
        timers = self._timers
        heap = timers._heap
        wait = trio.lowlevel.wait_task_rescheduled
        while True:
            if ready:
                self._run_ready()
            if self._touched:
                self._flush_pools()
            if heap:
                timers.run_due(_monotonic())
            if ready or self._touched:
                await trio.lowlevel.cancel_shielded_checkpoint()
                continue
            tmo = timers.timeout(_monotonic()) if heap else None
            if tmo is not None and tmo <= 0:
                await trio.lowlevel.cancel_shielded_checkpoint()
                continue
            self._sched_parked = True
            if tmo is None:
                await wait(self._sched_abort)
            else:
                with trio.move_on_after(tmo):
                    await wait(self._sched_abort)
            self._sched_parked = False

    def _flush_pools(self) -> None:
        touched, self._touched = self._touched, []
        for p in touched:
            batch, p._batch = p._batch, []
            if batch:
                p.submit(batch)

    # ------------------------------------------------------------------ events
    def _deliver(self, c: TrioConnection, kind: int, arg: Any) -> None:
        p = c._wpool
        if p is None:
            run_handler_event(c, kind, arg)
            return
        b = p._batch
        if not b:
            self._touched.append(p)
            self._wake_sched()
        b.append((c, kind, arg))

    # ------------------------------------------------------------------ connection tasks
    async def _reader(self, c: TrioConnection) -> None:
        fd = c._fd
        recv = c._sock.recv
        size = self._recv_size
        p = c._wpool
        wait = _wait_readable
        armed = True
        self._nread += 1
        try:
            with c._rscope:
                while True:
                    if c._no_read:
                        self._nread -= 1
                        armed = False
                        while c._no_read:
                            ev = c._rpark = trio.Event()
                            await ev.wait()
                        self._nread += 1
                        armed = True
                    await wait(fd)
                    if c._no_read:
                        continue                 # paused meanwhile: leave it in the kernel
                    try:
                        data = recv(size)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        c._fail(os_error(e.errno or errno.EIO, "recv"))
                        return
                    self._ncompleted += 1
                    if c._deaf:
                        return                   # closed by the handler side
                    if not data:
                        if not c._closing:
                            self._deliver(c, EOF, None)
                        return
                    self._received(c, p, data)
            if c._closing and not c._deaf:
                self._drain_input(c, p)
        except Exception as e:  # noqa: BLE001 - a bug here must not end the engine
            logger.exception("reader of %r failed", c)
            c._fail(e)
        finally:
            if armed:
                self._nread -= 1
            c._task_exited()

    def _received(self, c: TrioConnection, p: Optional[WorkerPool], data: bytes) -> None:
        """Hand ``data`` read from ``c`` to its handler, or to its pool's batch."""
        self._bytes_in += len(data)
        if p is None:
            try:
                c._data_received(c, data)
            except Exception as e:
                handler_failed(c, e)
            return
        # Bytes of one connection read in the same turn go to the worker as one event
        # (up to 64 KiB), as with the io_uring engine.
        b = p._batch
        j = c._bidx
        if j < len(b) and b[j][0] is c and b[j][1] == DATA and len(b[j][2]) < 65536:
            b[j] = (c, DATA, b[j][2] + data)
            return
        if not b:
            self._touched.append(p)
            self._wake_sched()
        c._bidx = len(b)
        b.append((c, DATA, data))
        if p.pending + len(b) >= p.max_queue:
            self._backpressure(p, c)

    def _drain_input(self, c: TrioConnection, p: Optional[WorkerPool]) -> None:
        """``c`` failed (the peer's reset, a failed send): what the kernel had received
        before still reaches the handler, before ``connection_lost``. Reads what is
        there without waiting (a reset peer sends nothing more), pauses or not."""
        sock = c._sock
        # At most what the kernel can hold for it (SO_RCVBUF; Linux reports twice what
        # was asked, for its overhead): a live peer cannot keep the drain going.
        try:
            left = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        except OSError:
            left = 1 << 24
        size = max(self._recv_size, 65536)
        while left > 0:
            try:
                data = sock.recv(min(size, left))    # the socket is non-blocking
            except OSError:              # EAGAIN: all read; or the reset itself
                return
            if not data or c._deaf:
                return
            left -= len(data)
            self._ncompleted += 1
            self._received(c, p, data)

    async def _writer(self, c: TrioConnection) -> None:
        """Drains ``c``'s send queue in order; exits when it is empty (or cancelled)."""
        sock = c._sock
        fd = c._fd
        q = c._sendq
        wait = _wait_writable
        try:
            with c._wscope:
                while q:
                    await wait(fd)
                    if not q:
                        break            # aborted after epoll had already woken us
                    head = q[0]
                    try:
                        if type(head) is _FileChunk:
                            try:
                                n = head.send_some(sock)
                            except BlockingIOError:
                                continue
                            except OSError as e:
                                c._fail(os_error(e.errno or errno.EIO, "sendfile"))
                                return
                            head.offset += n
                            head.left -= n
                            if not head.left:
                                q.popleft()
                                head.close()
                                c._nfiles -= 1
                            self._ncompleted += 1
                            self._bytes_out += n
                            c._sendq_bytes -= n
                            self._send_queued -= n
                            continue
                        if _HAVE_SENDMSG and len(q) > 1:
                            if c._nfiles:    # gather up to the first file only
                                chunks = []
                                for item in islice(q, _IOV_MAX):
                                    if type(item) is _FileChunk:
                                        break
                                    chunks.append(item)
                                n = sock.sendmsg(chunks)
                            else:
                                n = sock.sendmsg(islice(q, _IOV_MAX))
                        else:
                            n = sock.send(head)
                    except BlockingIOError:
                        continue
                    except OSError as e:
                        c._fail(os_error(e.errno or errno.EIO, "send"))
                        return
                    self._ncompleted += 1
                    self._bytes_out += n
                    c._sendq_bytes -= n
                    self._send_queued -= n
                    while n:
                        head = q[0]
                        size = len(head)
                        if n >= size:
                            q.popleft()
                            n -= size
                        else:
                            q[0] = memoryview(head)[n:]
                            n = 0
                if c._drain_cbs:
                    c._on_drained()
        except Exception as e:  # noqa: BLE001 - a bug here must not end the engine
            logger.exception("writer of %r failed", c)
            c._fail(e)
        finally:
            c._writing = False
            c._wscope = None
            self._nwrite -= 1
            c._task_exited()

    async def _listen(self, srv: TrioServer, lsock: socket.socket) -> None:
        self._nlisten += 1
        fd = lsock.fileno()
        try:
            with srv._scope:
                while True:
                    await _wait_readable(fd)
                    for _ in range(64):
                        try:
                            s, _addr = lsock.accept()
                        except BlockingIOError:
                            break
                        except OSError as e:
                            if e.errno in _ACCEPT_TRANSIENT:
                                continue
                            srv._accept_failed(fd, os_error(e.errno or errno.EIO, "accept"))
                            await trio.sleep(0.1)
                            break
                        self._ncompleted += 1
                        self._accepted(srv, s)
        except Exception:  # noqa: BLE001 - a bug here must not end the engine
            logger.exception("listener of %r failed", srv)
        finally:
            self._nlisten -= 1
            try:
                trio.lowlevel.notify_closing(lsock)
            except Exception:  # noqa: BLE001
                pass
            lsock.close()
            srv._open_listeners -= 1

    def _accepted(self, srv: TrioServer, s: socket.socket) -> None:
        try:
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            logger.warning("cannot set up an accepted socket: %s", e)
            s.close()
            return
        c = TrioConnection(self, s, srv, srv.pool)
        self._start_conn(c, srv._factory)

    def _start_conn(self, c: TrioConnection, factory: Callable[[], Handler]) -> bool:
        """Make ``c``'s handler, deliver ``connection_made``, start its reader."""
        self._conns.add(c)
        if not c._make_handler(factory):
            c._close_taken = True
            self._ready.append((c._maybe_finish, ()))
            self._wake_sched()
            return False
        c._tasks = 1
        self._nursery.start_soon(self._reader, c)
        self._deliver(c, MADE, None)
        return True

    # ------------------------------------------------------------------ servers
    def _connect_tcp(self, handler_factory: Callable[[], Handler], family: int, proto: int,
                     addr: Any, callback: Optional[Callable[[Op], Any]],
                     timeout: Optional[float]) -> Op:
        s = socket.socket(family, socket.SOCK_STREAM, proto)
        try:
            s.setblocking(False)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            s.close()
            raise
        op = self._new_op("connect", callback, None, timeout)
        try:
            return self._launch(op, s.fileno(), self._do_connect_tcp,
                                (s, addr, handler_factory), timeout, s.close)
        except BaseException:
            s.close()
            raise

    async def _do_connect_tcp(self, s: socket.socket, addr: Any,
                              factory: Callable[[], Handler]) -> TrioConnection:
        try:
            err = s.connect_ex(addr)
            if err:
                if err not in _CONNECT_PENDING:
                    raise os_error(err, "connect")
                await self._wait(s.fileno(), True)
                err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise os_error(err, "connect")
        except BaseException:
            s.close()
            raise
        c = TrioConnection(self, s, None, None)
        if not self._start_conn(c, factory):
            raise c._fail_exc  # type: ignore[misc]
        return c

    # ------------------------------------------------------------------ low-level ops
    def _new_op(self, name: str, callback: Optional[Callable[[Op], Any]], keep: Any,
                timeout: Optional[float]) -> Op:
        op = Op(self, name, callback, keep, None)
        op._timed = timeout is not None
        return op

    def _launch(self, op: Op, fd: int, fn: Callable[..., Any], args: tuple,
                timeout: Optional[float] = None,
                dropped: Optional[Callable[[], Any]] = None) -> Op:
        """Run ``await fn(*args)`` as ``op`` (from any thread); its value is the result.
        ``dropped()`` runs if the op ends before ``fn`` started."""
        if _get_ident() != self._thread_id:
            self._post(self._launch, op, fd, fn, args, timeout, dropped)
            return op
        if op._cancel_req or self._hard:
            if dropped is not None:
                dropped()
            self._ready.append((op._resolve, (None, os_error(errno.ECANCELED, op.name))))
            self._wake_sched()
            return op
        deadline = math.inf if timeout is None else trio.current_time() + max(0.0, timeout)
        rec = _OpRec(op, fd, trio.CancelScope(deadline=deadline))
        idx = self._next_op
        self._next_op = idx + 1
        op._index = idx
        self._ops[idx] = rec
        if timeout is not None:
            self._ntimed += 1
        if fn is None:                       # nop: no task, completed from the scheduler
            self._ready.append((self._op_done, (rec, 0, None)))
            self._wake_sched()
        else:
            self._nursery.start_soon(self._op_task, rec, fn, args)
        return op

    async def _op_task(self, rec: _OpRec, fn: Callable[..., Any], args: tuple) -> None:
        op = rec.op
        value: Any = None
        exc: Optional[BaseException] = None
        with rec.scope:
            try:
                value = await fn(*args)
            except OSError as e:
                exc = e if e.errno is None or getattr(e, "operation", None) \
                    else os_error(e.errno, op.name)
            except trio.ClosedResourceError:
                exc = os_error(errno.EBADF, op.name)       # close_fd while waiting
            except trio.BusyResourceError:
                exc = os_error(errno.EBUSY, op.name)
            except Exception as e:  # noqa: BLE001 - reported through result()
                exc = e
        if rec.scope.cancelled_caught:
            value = None
            timed_out = not rec.cancelled and trio.current_time() >= rec.scope.deadline
            exc = os_error(errno.ETIMEDOUT if timed_out else errno.ECANCELED, op.name)
        self._op_done(rec, value, exc)

    def _op_done(self, rec: _OpRec, value: Any, exc: Optional[BaseException]) -> None:
        op = rec.op
        del self._ops[op._index]
        self._ncompleted += 1
        if op._timed:
            self._ntimed -= 1
            self._ncompleted += 1
        op._resolve(value, exc)

    def _cancel_submitted(self, op: Op) -> None:
        rec = self._ops.get(op._index)
        if rec is not None and rec.op is op:
            rec.cancelled = True
            rec.scope.cancel()

    async def _wait(self, fd: int, writable: bool) -> None:
        """Wait until ``fd`` is readable (writable); any number of ops may wait on one
        fd (trio allows one waiter per fd and direction: one watcher task waits for all)."""
        key = (fd, writable)
        w = self._watches.get(key)
        if w is None:
            w = self._watches[key] = _Watch()
            self._nursery.start_soon(self._watch, key, w)
        ev = trio.Event()
        w.events.append(ev)
        try:
            await ev.wait()
        except BaseException:
            if not ev.is_set():
                w.events.remove(ev)
                if not w.events and self._watches.get(key) is w:
                    del self._watches[key]
                    w.scope.cancel()
            raise
        if w.error is not None:
            raise w.error

    async def _watch(self, key: tuple, w: _Watch) -> None:
        fd, writable = key
        with w.scope:
            try:
                await (_wait_writable if writable else _wait_readable)(fd)
            except (trio.ClosedResourceError, trio.BusyResourceError, OSError) as e:
                w.error = e
        if self._watches.get(key) is w:
            del self._watches[key]
        for ev in w.events:
            ev.set()

    async def _wait_or_thread(self, fd: int, writable: bool) -> bool:
        """Wait for readiness; False if ``fd`` cannot be waited for (epoll and kqueue
        refuse some character devices, e.g. ``/dev/null``): do its I/O in a thread."""
        try:
            await self._wait(fd, writable)
        except OSError as e:
            if e.errno in (errno.EPERM, errno.EINVAL):
                return False
            raise
        return True

    def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        return trio.to_thread.run_sync(fn, *args, abandon_on_cancel=False)

    # -- reads and writes, by kind of fd
    async def _do_readinto(self, fd: int, mv: memoryview, offset: int, as_bytes: bool) -> Any:
        try:
            kind = _fd_kind(fd)
            if kind == _FILE:
                n = await self._in_thread(self._file_readinto, fd, mv, offset)
            elif kind == _SOCK:
                n = await self._sock_io(fd, False, lambda s: s.recv_into(mv, len(mv), _DONTWAIT))
            else:
                while True:
                    if not await self._wait_or_thread(fd, False):
                        n = await self._in_thread(self._file_readinto, fd, mv, offset)
                        break
                    try:
                        n = _readinto(fd, mv)
                        break
                    except BlockingIOError:
                        continue
            return bytes(mv[:n]) if as_bytes else n
        finally:
            mv.release()

    async def _do_write(self, fd: int, mv: memoryview, offset: int) -> int:
        try:
            kind = _fd_kind(fd)
            if kind == _FILE:
                return await self._in_thread(self._file_write, fd, mv, offset)
            if kind == _SOCK:
                return await self._sock_io(fd, True, lambda s: s.send(mv, _DONTWAIT))
            while True:
                if not await self._wait_or_thread(fd, True):
                    return await self._in_thread(self._file_write, fd, mv, offset)
                try:
                    return _nonblocking(fd, os.write, fd, mv)
                except BlockingIOError:
                    continue
        finally:
            mv.release()

    async def _do_writev(self, fd: int, views: list, offset: int) -> int:
        try:
            kind = _fd_kind(fd)
            if kind == _FILE:
                return await self._in_thread(self._file_writev, fd, views, offset)
            if kind == _SOCK:
                data = b"".join(views)
                return await self._sock_io(fd, True, lambda s: s.send(data, _DONTWAIT))
            while True:
                if not await self._wait_or_thread(fd, True):
                    return await self._in_thread(self._file_writev, fd, views, offset)
                try:
                    return _nonblocking(fd, _writev, fd, views)
                except BlockingIOError:
                    continue
        finally:
            for v in views:
                v.release()

    # These run in a worker thread of trio.to_thread.
    def _file_readinto(self, fd: int, mv: memoryview, offset: int) -> int:
        if offset < 0:
            return _readinto(fd, mv)
        if hasattr(os, "preadv"):
            return os.preadv(fd, [mv], offset)
        if hasattr(os, "pread"):
            data = os.pread(fd, len(mv), offset)
            mv[:len(data)] = data
            return len(data)
        with self._fd_lock(fd):
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            os.lseek(fd, offset, os.SEEK_SET)
            try:
                return _readinto(fd, mv)
            finally:
                os.lseek(fd, pos, os.SEEK_SET)

    def _file_write(self, fd: int, mv: Any, offset: int) -> int:
        if offset < 0:
            return os.write(fd, mv)
        if hasattr(os, "pwrite"):
            return os.pwrite(fd, mv, offset)
        with self._fd_lock(fd):
            pos = os.lseek(fd, 0, os.SEEK_CUR)
            os.lseek(fd, offset, os.SEEK_SET)
            try:
                return os.write(fd, mv)
            finally:
                os.lseek(fd, pos, os.SEEK_SET)

    def _file_writev(self, fd: int, views: list, offset: int) -> int:
        if offset >= 0 and hasattr(os, "pwritev"):
            return os.pwritev(fd, views, offset)
        if offset < 0:
            return _writev(fd, views)
        return self._file_write(fd, b"".join(views), offset)

    def _fd_lock(self, fd: int) -> threading.Lock:
        lock = self._fd_locks.get(fd)
        if lock is None:
            lock = self._fd_locks.setdefault(fd, threading.Lock())
        return lock

    async def _sock_io(self, fd: int, writable: bool, call: Callable[[socket.socket], Any]
                       ) -> Any:
        """``call(s)`` on a borrowed socket object for ``fd`` until it does not block."""
        s = _borrow(fd)
        try:
            while True:
                try:
                    return call(s)
                except BlockingIOError:
                    pass
                await self._wait(fd, writable)
        finally:
            s.detach()

    @staticmethod
    def _view(buf: Any, writable: bool = False) -> memoryview:
        mv = memoryview(buf)
        if writable and mv.readonly:
            mv.release()
            raise TypeError("a writable buffer is required")
        if mv.ndim != 1 or mv.itemsize != 1:
            mv = mv.cast("B")
        return mv

    def read(self, fd: int, nbytes: int, offset: int, callback: Callable[[Op], Any], *,
             timeout: Optional[float] = None) -> Op:
        """Read up to ``nbytes`` at ``offset`` (-1: the file position); result: bytes."""
        buf = bytearray(nbytes)
        op = self._new_op("read", callback, buf, timeout)
        return self._launch(op, fd, self._do_readinto, (fd, memoryview(buf), offset, True),
                            timeout)

    def readinto(self, fd: int, buf: Any, offset: int, callback: Callable[[Op], Any], *,
                 timeout: Optional[float] = None) -> Op:
        """Read into the writable buffer ``buf`` at ``offset``; result: bytes read."""
        mv = self._view(buf, writable=True)
        op = self._new_op("read", callback, buf, timeout)
        return self._launch(op, fd, self._do_readinto, (fd, mv, offset, False), timeout)

    def write(self, fd: int, data: Any, offset: int, callback: Callable[[Op], Any], *,
              timeout: Optional[float] = None) -> Op:
        """Write ``data`` at ``offset`` (-1: the file position); result: bytes written
        (possibly fewer than asked, as with ``os.pwrite``)."""
        mv = self._view(data)
        op = self._new_op("write", callback, data, timeout)
        return self._launch(op, fd, self._do_write, (fd, mv, offset), timeout)

    def writev(self, fd: int, buffers: list, offset: int, callback: Callable[[Op], Any], *,
               timeout: Optional[float] = None) -> Op:
        """Gathered write of several buffers at ``offset``; result: bytes written."""
        views = [self._view(b) for b in buffers]
        op = self._new_op("writev", callback, buffers, timeout)
        return self._launch(op, fd, self._do_writev, (fd, views, offset), timeout)

    def sendmsg(self, fd: int, buffers: list, callback: Callable[[Op], Any], *, flags: int = 0,
                timeout: Optional[float] = None) -> Op:
        """Gathered send of several buffers on a socket; result: bytes sent."""
        op = self._new_op("sendmsg", callback, buffers, timeout)
        if _HAVE_SENDMSG:
            def call(s: socket.socket) -> int:
                return s.sendmsg(buffers, (), flags | _DONTWAIT)
        else:
            data = b"".join(buffers)

            def call(s: socket.socket) -> int:
                return s.send(data, flags)
        return self._launch(op, fd, self._sock_io, (fd, True, call), timeout)

    def send(self, fd: int, data: Any, callback: Callable[[Op], Any], *, flags: int = 0,
             timeout: Optional[float] = None) -> Op:
        """One send on a socket fd; result: bytes sent."""
        op = self._new_op("send", callback, data, timeout)
        return self._launch(op, fd, self._sock_io,
                            (fd, True, lambda s: s.send(data, flags | _DONTWAIT)), timeout)

    def recv(self, fd: int, nbytes: int, callback: Callable[[Op], Any], *, flags: int = 0,
             timeout: Optional[float] = None) -> Op:
        """One recv on a socket fd; result: bytes (empty at EOF)."""
        buf = bytearray(nbytes)

        def call(s: socket.socket) -> bytes:
            n = s.recv_into(buf, nbytes, flags | _DONTWAIT)
            return bytes(memoryview(buf)[:n])
        op = self._new_op("recv", callback, buf, timeout)
        return self._launch(op, fd, self._sock_io, (fd, False, call), timeout)

    def connect(self, fd: int, address: Any, callback: Callable[[Op], Any], *,
                family: Optional[int] = None, timeout: Optional[float] = None) -> Op:
        """Connect socket ``fd`` to a numeric ``address``; result: None. With ``timeout``
        the op ends with ``TimeoutError`` (ETIMEDOUT) if it is not connected by then.
        (``family`` is accepted for compatibility: the socket knows its own.)"""
        op = self._new_op("connect", callback, None, timeout)
        return self._launch(op, fd, self._do_connect, (fd, address), timeout)

    async def _do_connect(self, fd: int, address: Any) -> None:
        s = _borrow(fd)
        try:
            err = _nonblocking(fd, s.connect_ex, address, sock=s)
            if err == 0:
                return None
            if err not in _CONNECT_PENDING:
                raise os_error(err, "connect")
            await self._wait(fd, True)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise os_error(err, "connect")
            return None
        finally:
            s.detach()

    def accept(self, fd: int, callback: Callable[[Op], Any], *,
               timeout: Optional[float] = None) -> Op:
        """Accept one connection on listening socket ``fd``; result: the new fd."""
        op = self._new_op("accept", callback, None, timeout)
        return self._launch(op, fd, self._do_accept, (fd,), timeout)

    async def _do_accept(self, fd: int) -> int:
        s = _borrow(fd)
        try:
            while True:
                try:
                    conn, _ = _nonblocking(fd, s.accept, sock=s)
                except BlockingIOError:
                    await self._wait(fd, False)
                    continue
                return conn.detach()
        finally:
            s.detach()

    def openat(self, path: Any, flags: int, mode: int, callback: Callable[[Op], Any], *,
               dir_fd: int = _AT_FDCWD) -> Op:
        """Open ``path`` (relative to ``dir_fd``, default the cwd); result: the fd."""
        op = self._new_op("openat", callback, None, None)
        dfd = None if dir_fd == _AT_FDCWD else dir_fd
        return self._launch(op, -1, self._in_thread_op, (_open, path, flags, mode, dfd))

    async def _in_thread_op(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self._in_thread(fn, *args)

    def close_fd(self, fd: int, callback: Optional[Callable[[Op], Any]] = None) -> Op:
        """Close ``fd`` (waking the ops that wait on it: they end with EBADF); result: None."""
        op = self._new_op("close", callback, None, None)
        return self._launch(op, fd, self._do_close, (fd,))

    async def _do_close(self, fd: int) -> None:
        kind = _fd_kind(fd)
        if kind != _FILE or not _WINDOWS:
            try:
                trio.lowlevel.notify_closing(fd)
            except Exception:  # noqa: BLE001 - not something trio waits on
                pass
        if kind == _SOCK:                     # Windows: a socket handle, not an fd
            socket.socket(fileno=fd).close()
        elif kind == _FILE:
            await self._in_thread(os.close, fd)
        else:
            os.close(fd)
        return None

    def timeout(self, seconds: float, callback: Callable[[Op], Any]) -> Op:
        """A timer as an op; result: None when it expires (ECANCELED if cancelled)."""
        op = self._new_op("timeout", callback, None, None)
        return self._launch(op, -1, trio.sleep, (max(0.0, seconds),))

    def poll(self, fd: int, mask: int, callback: Callable[[Op], Any], *,
             timeout: Optional[float] = None) -> Op:
        """Wait until ``fd`` is ready for ``mask`` (select.POLLIN, ...); result: the events."""
        if not hasattr(select, "poll"):
            raise NotImplementedError("poll() needs select.poll (not on Windows)")
        op = self._new_op("poll", callback, None, timeout)
        return self._launch(op, fd, self._do_poll, (fd, mask), timeout)

    async def _do_poll(self, fd: int, mask: int) -> int:
        wmask = select.POLLOUT | getattr(select, "POLLWRNORM", 0)
        want_r = bool(mask & ~wmask)
        want_w = bool(mask & wmask)
        p = select.poll()
        p.register(fd, mask)
        ev = p.poll(0)
        if ev:
            return ev[0][1]
        fired = [0]
        if want_r and want_w:
            async with trio.open_nursery() as n:
                async def one(writable: bool) -> None:
                    await self._wait(fd, writable)
                    fired[0] |= (mask & wmask) if writable else (mask & ~wmask)
                    n.cancel_scope.cancel()
                n.start_soon(one, False)
                n.start_soon(one, True)
        else:
            await self._wait(fd, want_w)
            fired[0] = mask & (wmask if want_w else ~wmask)
        # The readiness seen is the result, even if another op (a read sharing this
        # wakeup) consumed it meanwhile - as io_uring reports its wakeup's mask.
        ev = p.poll(0)
        return (ev[0][1] if ev else 0) | fired[0]

    def nop(self, callback: Callable[[Op], Any]) -> Op:
        """An op that does nothing; result: 0 (its callback comes on a later turn)."""
        op = self._new_op("nop", callback, None, None)
        return self._launch(op, -1, None, ())

    def cancel_fd(self, fd: int) -> None:
        """Cancel every low-level op in flight on ``fd`` (each still completes)."""
        self._in_loop(self._cancel_fd, fd)

    def _cancel_fd(self, fd: int) -> None:
        for rec in list(self._ops.values()):
            if rec.fd == fd and not rec.op._done:
                rec.cancelled = True
                rec.scope.cancel()

    def register_buffers(self, buffers: list) -> None:
        """Register writable buffers for ``read_fixed``/``write_fixed`` (engine thread).
        They stay referenced until the engine is closed or :meth:`unregister_buffers`.
        (Emulated: fixed ops are plain reads and writes into/from these buffers.)"""
        self._check_loop("register_buffers")
        views = [self._view(b, writable=True) for b in buffers]
        self._registered = list(zip(buffers, views))
        self._fixed_lens = [len(v) for v in views]

    def unregister_buffers(self) -> None:
        self._check_loop("unregister_buffers")
        if any(r.op.name in ("read_fixed", "write_fixed") for r in self._ops.values()):
            raise RuntimeError("fixed-buffer operations are still in flight")
        for _, mv in self._registered:
            mv.release()
        self._registered = []
        self._fixed_lens = []

    def _fixed_view(self, index: int, nbytes: int, buf_offset: int) -> memoryview:
        """The checked range of registered buffer ``index``."""
        _, mv = self._registered[index]
        return mv[buf_offset:buf_offset + nbytes]

    def _read_fixed(self, fd: int, index: int, nbytes: int, offset: int,
                    callback: Callable[[Op], Any], buf_offset: int,
                    timeout: Optional[float]) -> Op:
        view = self._fixed_view(index, nbytes, buf_offset)
        op = self._new_op("read_fixed", callback, None, timeout)   # the engine pins
        # registered buffers itself
        return self._launch(op, fd, self._do_readinto, (fd, view, offset, False), timeout)

    def _write_fixed(self, fd: int, index: int, nbytes: int, offset: int,
                     callback: Callable[[Op], Any], buf_offset: int,
                     timeout: Optional[float]) -> Op:
        view = self._fixed_view(index, nbytes, buf_offset)
        op = self._new_op("write_fixed", callback, None, timeout)
        return self._launch(op, fd, self._do_write, (fd, view, offset), timeout)

    # ------------------------------------------------------------------ statistics
    def stats(self) -> Stats:
        """Counters, readable from any thread.

        Counted as the io_uring engine counts its requests, so one idle baseline fits
        both: in flight are the cross-thread entry while the loop runs (the io_uring
        engine's wakeup read), one accept per listening socket, one recv per reading
        connection, one send per connection with a writer, each low-level op and, for
        an op with ``timeout=``, its deadline (io_uring's linked timeout). Submitted is
        completed + in flight. Pinned: every low-level op in flight (it holds its
        buffers until its final completion) and every registered buffer. No receive
        buffer pool and no completion queue here: ``buffers_*`` and ``cq_overflow``
        are 0."""
        in_flight = (int(self._loop_running) + self._nlisten + self._nread + self._nwrite
                     + len(self._ops) + self._ntimed)
        done = self._ncompleted
        return self._stats(
            ops_submitted=done + in_flight, ops_completed=done, ops_in_flight=in_flight,
            buffers_in_use=0, buffers_total=0, connections=len(self._conns),
            bytes_in=self._bytes_in, bytes_out=self._bytes_out,
            send_queued=self._send_queued, cq_overflow=0,
        )

    # ------------------------------------------------------------------ shutdown
    def _begin_shutdown(self, timeout: float) -> None:
        if self._shutting:
            return
        self._shutting = True
        for srv in self._servers:
            srv._close_now()
        for c in list(self._conns):
            c._sd_paused = True
            c._update_read()
        self._nursery.start_soon(self._shutdown, timeout)

    async def _shutdown(self, timeout: float) -> None:
        deadline = self._set_stop_deadline(timeout)

        def late() -> bool:
            return _monotonic() >= deadline

        # 1. reading has stopped; let the workers finish what is queued
        while self._pools and not late() and not all(p.idle() for p in self._pools):
            await trio.sleep(0.01)
        aborted = False
        while True:
            # 2. close every connection gracefully (flush), abort at the deadline
            for c in list(self._conns):
                c.close()
            while self._conns or self._nlisten:
                if late() and not aborted:
                    aborted = True
                    for c in list(self._conns):
                        self._abort_at_deadline(c)
                await trio.sleep(0.01)
            # 3. cancel the low-level ops and wait for their final completions
            self._hard = True
            for rec in list(self._ops.values()):
                rec.op._cancel_req = True    # reported as ECANCELED, not a timeout
                rec.cancelled = True
                rec.scope.cancel()
            # A file operation runs in a thread, which cannot be interrupted: its buffer
            # is written until it returns, so the engine waits for it, however long.
            hard = max(deadline, _monotonic()) + _GIVE_UP
            while self._ops and _monotonic() < hard:
                await trio.sleep(0.01)
            if self._ops:
                logger.error("%d operations did not complete after being cancelled (a "
                             "file operation in a thread?); still waiting for them",
                             len(self._ops))
                while self._ops:
                    await trio.sleep(0.05)
            if not self._conns:            # a connect_tcp may have finished meanwhile
                break
        # 4. let what is queued run, then refuse new calls
        for _ in range(100):
            if not (self._ready or self._touched or self._cmds):
                break
            await trio.sleep(0)
        self._closed = True
        self._run_cmds()
        self._run_ready()
        self._flush_pools()
        self._done.set()

    def _teardown(self) -> None:
        self._closed = True
        self._thread_id = None
        self._loop_running = False
        self._shutdown_pools()
        for srv in self._servers:       # servers of a never-run (or crashed) engine
            srv._closing = True
            srv._close_socks()
        for c in list(self._conns):
            c._closed = True
            c._sock.close()
        self._conns.clear()
        for _, mv in self._registered:
            mv.release()
        self._registered = []
        self._fixed_lens = []

    def __repr__(self) -> str:
        state = "running" if self.running else "closed" if self._closed else "idle"
        return f"<TrioEngine {state}>"


# ---------------------------------------------------------------------------- helpers
def _fd_kind(fd: int) -> int:
    """How the low-level ops do I/O on ``fd``: in a thread (regular files; on Windows
    everything but sockets), by readiness (pipes, sockets, ttys), or as a Windows socket."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        if _WINDOWS:
            return _SOCK             # a SOCKET handle is not a C runtime fd
        raise
    if _WINDOWS:
        return _FILE
    if stat.S_ISREG(mode) or stat.S_ISBLK(mode) or stat.S_ISDIR(mode):
        return _FILE
    return _STREAM


def _borrow(fd: int) -> socket.socket:
    """A socket object for ``fd`` that does not own it (``detach()`` it when done)."""
    s = socket.socket(fileno=fd)
    if not _DONTWAIT:
        s.setblocking(False)         # Windows: no per-call flag
    return s


def _nonblocking(fd: int, fn: Callable[..., Any], *args: Any,
                 sock: Optional[socket.socket] = None) -> Any:
    """``fn(*args)`` with ``O_NONBLOCK`` set on ``fd`` for the duration of the call."""
    if _WINDOWS:
        if sock is not None:
            sock.setblocking(False)
        return fn(*args)
    if not os.get_blocking(fd):
        return fn(*args)
    os.set_blocking(fd, False)
    try:
        return fn(*args)
    finally:
        os.set_blocking(fd, True)


def _readinto(fd: int, mv: memoryview) -> int:
    if hasattr(os, "readv"):
        return os.readv(fd, [mv])
    data = os.read(fd, len(mv))
    mv[:len(data)] = data
    return len(data)


def _writev(fd: int, views: list) -> int:
    if hasattr(os, "writev"):
        return os.writev(fd, views)
    return os.write(fd, b"".join(views))


def _open(path: Any, flags: int, mode: int, dir_fd: Optional[int]) -> int:
    if dir_fd is None:
        return os.open(path, flags, mode)
    return os.open(path, flags, mode, dir_fd=dir_fd)

