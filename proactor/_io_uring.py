"""The io_uring backend: one thread owns the ring; completions become handler calls.

Theory of operation
===================

Some facts about io_uring
-------------------------
* A request is described by an SQE that points at memory the kernel will read or write
  later: a buffer, an iovec array, a msghdr, a sockaddr, a timespec. From the moment the
  SQE is submitted until its *final* completion (CQE) has been reaped, that memory belongs
  to the kernel. Freeing or reusing it earlier is a use-after-free done by the kernel.
* A cancel (``IORING_OP_ASYNC_CANCEL``, or closing the ring) is only a *request*. The
  request being cancelled still produces its own CQE - with ``-ECANCELED`` or, if it won
  the race, with its real result. Only that CQE ends it.
* Multishot requests (accept, recv) produce many CQEs; the final one is the CQE without
  ``IORING_CQE_F_MORE``.
* With ``IORING_SETUP_SINGLE_ISSUER|DEFER_TASKRUN`` only the thread that created the ring
  may submit, and completions are only run when that thread enters the kernel to wait.

What does this mean for us?
---------------------------
* **One thread owns the ring** (the I/O unit of the Proactor pattern). The ring is
  created on the thread that calls :meth:`UringEngine.run`, and every submission happens
  there. Other threads (workers, a ``conn.send`` from anywhere) append a command to a
  deque and write a byte to a wakeup pipe whose read end always has a read armed in the
  ring; ``signal.set_wakeup_fd`` points at the same pipe, so Ctrl-C ends a wait too.
* **Who owns a buffer while the kernel holds it.**
  - Receive buffers come from the provided-buffer ring (the memory pool), which lives
    as long as the ring. A buffer picked by the kernel for a recv is copied out into a
    ``bytes`` object during dispatch and given back to the ring at the start of the next
    loop turn. A recv that finds the pool empty ends (ENOBUFS; its bytes stay in the
    socket) and waits in a FIFO: once buffers are back, as many waiters are re-armed as
    there are buffers, not every waiter at every turn.
  - Send data is copied into a C-owned chunk by ``conn.send()``; the chunk is freed by the
    C layer after the send CQE that covered its last byte. The caller's object is free as
    soon as ``send()`` returns.
  - Buffers of low-level ops (``readinto``, ``write``, ``read_fixed``...) are Python
    objects. The :class:`~proactor.Op` holds them (and the cffi views of them) and the
    engine holds the op in ``_ops`` until the op's final CQE - after a cancel, a close, a
    handler exception or a shutdown too. Registered buffers stay referenced as long as
    the ring exists.
  - If the engine must stop while the kernel still holds something (it never should: all
    requests are cancelled and their CQEs awaited), it leaks the memory on purpose
    rather than free it.
* **When an op is finished:** at its final CQE, never at the cancel.
* **How close works:** ``conn.close()`` stops reading at once (the multishot recv is
  cancelled), lets queued data go out, then cancels whatever is still in flight on the
  fd; the fd is closed by the C layer only after the last of the connection's requests
  has completed, and only then does ``connection_lost`` run. ``conn.abort()`` drops the
  unsent data and cancels at once; the same wait for the final CQEs follows.
* The per-CQE bookkeeping (buffer returns, multishot re-arm, send continuation after a
  short send, ENOBUFS re-arm, close sequencing) happens in the C layer
  (``_build/build_uring.py``). Python sees one ``px_event`` per completion a user must
  see, and one ``io_uring_enter`` per loop turn submits everything queued in that turn.

What the backends do alike (the engine's life, calls posted from other threads, timers,
worker-pool backpressure, a connection's flags, close and drain bookkeeping) lives in
:class:`~proactor._common.BaseEngine`, ``BaseConnection`` and ``BaseServer``; the classes
here supply the io_uring side of it through their hook methods. ``UringConnection.send``
and ``UringEngine._dispatch`` stay here in full: they are the hot paths.
"""
from __future__ import annotations

import errno
import logging
import math
import mmap
import os
import signal
import socket
import struct
import threading
import time
from collections import deque
from typing import Any, Callable, Iterable, Optional

from ._common import (
    _GIVE_UP,
    ABORT,
    DATA,
    EOF,
    LOST,
    MADE,
    BaseConnection,
    BaseEngine,
    BaseServer,
    Handler,
    Op,
    Stats,
    WorkerPool,
    _nbytes,
    handler_failed,
    run_handler_event,
)
from ._diagnose import OPCODES, REQUIRED
from ._errors import UringUnavailable, os_error

try:
    from ._uring_cffi import ffi, lib
    _px_send = lib.px_send          # the hottest call, bound once
except ImportError:  # pragma: no cover - not Linux, or not built
    ffi = lib = _px_send = None

logger = logging.getLogger("proactor")

SETUP_COOP_TASKRUN = 1 << 8
SETUP_TASKRUN_FLAG = 1 << 9
SETUP_SINGLE_ISSUER = 1 << 12
SETUP_DEFER_TASKRUN = 1 << 13
#: Setup flag sets tried in order: the best the kernel takes wins.
SETUP_FLAGS_TRIED = (
    SETUP_SINGLE_ISSUER | SETUP_DEFER_TASKRUN,
    SETUP_COOP_TASKRUN | SETUP_TASKRUN_FLAG,
    0,
)

EV_ACCEPT, EV_DATA, EV_EOF, EV_CLOSED, EV_OP, EV_WAKE, EV_DRAINED = range(1, 8)
_ENOMEM = -errno.ENOMEM
_KIND_NAMES = {1: "accept", 2: "recv", 3: "send", 4: "op", 8: "sendfile"}

#: Memory that the kernel may still reference when an engine had to give up waiting
#: for final completions. Never freed, on purpose (see the module docstring).
_leaked: list = []

_get_ident = threading.get_ident
#: Bytes one read/write/send/recv asks for at most: Linux's MAX_RW_COUNT. Larger buffers
#: get a short transfer, as with os.read/os.write (the SQE's length is 32 bits).
_RW_MAX = 0x7FFFF000


def _sockaddr(address: Any, family: int) -> bytes:
    """Pack a numeric (host, port[, flowinfo, scope_id]) address as a struct sockaddr."""
    if family == socket.AF_INET:
        host, port = address[0], address[1]
        return struct.pack("=HH4s8x", socket.AF_INET, socket.htons(port),
                           socket.inet_pton(socket.AF_INET, host))
    if family == socket.AF_INET6:
        host, port = address[0], address[1]
        flow = address[2] if len(address) > 2 else 0
        scope = address[3] if len(address) > 3 else 0
        return struct.pack("=HHI16sI", socket.AF_INET6, socket.htons(port), flow,
                           socket.inet_pton(socket.AF_INET6, host), scope)
    if family == socket.AF_UNIX:
        path = os.fsencode(address)
        return struct.pack("=H", socket.AF_UNIX) + path + b"\0"
    raise ValueError(f"unsupported address family {family}")


class UringConnection(BaseConnection):
    """A TCP connection served by the engine (see :class:`BaseConnection` for which
    methods any thread may call)."""

    __slots__ = ("_r", "_slot", "_gen", "_tid", "_held")

    def __init__(self, engine: UringEngine, slot: int, gen: int, fd: int,
                 server: Optional[UringServer], pool: Optional[WorkerPool]) -> None:
        super().__init__(engine, fd, server, pool)
        self._r = engine._r
        self._tid = engine._thread_id     # the engine's thread: sends go straight in
        self._slot = slot
        self._gen = gen
        # Events that came after pause_reading() (the ring's receive stops a little
        # later than asked): delivered in order once reading resumes.
        self._held: Optional[deque] = None

    # -- sending
    def send(self, data: Any) -> None:
        # BaseConnection.send with the engine's thread kept on the connection and px_send
        # called right here: the hottest call, so no method call in between.
        if self._closing:
            self._engine._dropped(_nbytes(data))
            return
        if type(data) is not bytes:
            data = bytes(data)
        if _get_ident() == self._tid:
            n = _px_send(self._r, self._slot, self._gen, data, len(data))
            if n < 0:
                self._not_queued(n, len(data))
        else:
            self._engine._post(self._send_now, data)

    send.__doc__ = BaseConnection.send.__doc__

    def _send_now(self, data: bytes) -> None:
        n = -errno.EBADF if self._closed else lib.px_send(self._r, self._slot, self._gen,
                                                           data, len(data))
        if n < 0:
            self._not_queued(n, len(data))

    def _not_queued(self, err: int, nbytes: int) -> None:
        """px_send refused ``nbytes`` with ``err``: the connection is closing in C (the
        peer has gone, a send failed), which drops them as ``send()`` does, or there was
        no memory for them: then what follows must not go out without them, so the
        connection fails."""
        self._engine._dropped(nbytes)
        if err == _ENOMEM:
            self._fail(os_error(err, "send"))
        else:
            self._closing = True      # failed in C (and draining): conn.closing tells it

    def _sendfile_now(self, fd: int, offset: int, count: int) -> None:
        if self._closed:
            n = -errno.EBADF
        else:
            n = lib.px_sendfile(self._r, self._slot, self._gen, fd, offset, count)
        if n == _ENOMEM:
            raise os_error(n, "sendfile")      # nothing was queued; the fd is still ours
        if n < 0:             # closing or failed: dropped, as send() does (connection_lost
            os.close(fd)      # reports the failure)
            self._engine._dropped(count)

    def _queued_size(self) -> int:
        with self._engine._life_lock:       # another thread may be asking while it closes
            if self._closed:
                return 0
            return max(0, lib.px_send_queued(self._r, self._slot, self._gen))

    def _want_drain(self) -> bool:
        # The C layer reports EV_DRAINED (-> _on_drained) when the queue has gone out.
        return lib.px_want_drain(self._r, self._slot, self._gen) == 0

    # -- reading
    def _set_reading(self, on: bool) -> None:
        # Follows the state, not ``on``: a pause and a resume posted from two threads
        # may arrive in either order.
        if self._closing:
            return
        if self._user_paused:
            lib.px_pause_reading(self._r, self._slot, self._gen)
        elif self._held:
            self._engine.call_soon(self._release_held)       # the held events first
        else:
            lib.px_resume_reading(self._r, self._slot, self._gen)

    def _hold(self, kind: int, arg: Any) -> None:
        if self._held is None:
            self._held = deque()
        self._held.append((kind, arg))

    def _release_held(self) -> None:
        held = self._held
        while held and not self._user_paused and not self._deaf:
            kind, arg = held.popleft()
            run_handler_event(self, kind, arg)
        if self._deaf or not held:
            self._held = None
        if not self._user_paused and not self._closing:
            lib.px_resume_reading(self._r, self._slot, self._gen)

    def _pause_for_pool(self) -> bool:
        return lib.px_pause_reading(self._engine._r, self._slot, self._gen) == 1

    def _resume_for_pool(self) -> None:
        if not self._closing and not self._user_paused:
            lib.px_resume_reading(self._engine._r, self._slot, self._gen)

    # -- closing
    def _close_now(self, abort: int) -> None:
        if not self._closed:
            if abort and not self._deaf:       # failed: the handler is owed what was
                abort |= lib.PX_CLOSE_DRAIN    # received before, also what is unread
            lib.px_close(self._r, self._slot, self._gen, abort)

    # -- information
    def _sock_call(self, name: str) -> Any:
        s = socket.socket(fileno=self._fd)
        try:
            return getattr(s, name)()
        finally:
            s.detach()


class UringServer(BaseServer):
    """Listening sockets of one ``serve_tcp`` call."""

    def __init__(self, engine: UringEngine, socks: list, factory: Callable[[], Handler],
                 pool: Optional[WorkerPool]) -> None:
        super().__init__(engine, socks, factory, pool)
        self._fds = [s.detach() for s in socks]     # until _start hands them to the ring
        self._slots: list[int] = []

    def _start(self) -> None:
        eng = self._engine
        fds, self._fds = self._fds, []
        for fd in fds:
            slot = lib.px_listen(eng._r, fd)
            if slot < 0:
                os.close(fd)
                logger.error("cannot listen on fd %d: %s", fd, os.strerror(-slot))
                continue
            eng._set_conn(slot, self)
            self._slots.append(slot)
            self._open_listeners += 1
        if self._closing:
            self._closing = False
            self._close_now()

    def _close_socks(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []

    def _close_now(self) -> None:
        eng = self._engine
        for slot in self._slots:
            lib.px_close(eng._r, slot, lib.px_conn_gen(eng._r, slot), ABORT)

    def _rearm(self, slot: int) -> None:
        if not self._closing and self._engine._r is not None:
            lib.px_rearm_accept(self._engine._r, slot)


class UringEngine(BaseEngine):
    """A Proactor on io_uring. See the module docstring for how it works.

    Options: ``entries`` (SQ size), ``cq_entries`` (CQ size, default 8×entries),
    ``buffers`` and ``buffer_size`` (the provided-buffer ring: the receive memory pool).
    """

    backend = "io_uring"
    _server_class = UringServer
    _cmds_per_turn = 4096

    def __init__(self, *, entries: int = 2048, cq_entries: Optional[int] = None,
                 buffers: int = 1024, buffer_size: int = 16384,
                 setup_flags: Optional[Iterable[int]] = None) -> None:
        if lib is None:
            raise UringUnavailable(errno.ENOSYS, "the io_uring extension is not built here")
        if buffers <= 0 or buffers & (buffers - 1) or buffers > 32768:
            raise ValueError("buffers must be a power of two <= 32768")
        super().__init__()
        self._entries = entries
        self._cq_entries = cq_entries or entries * 8
        self._nbufs = buffers
        self._bufsize = buffer_size
        self._setup_flags = tuple(setup_flags) if setup_flags is not None else SETUP_FLAGS_TRIED
        self.setup_flags = 0
        self.features = 0
        self._r: Any = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._wake_w, False)
        self._conns: list[Any] = []          # by slot: connections, servers, None
        self._pool_mem: Any = None
        self._pool_ptr: Any = None
        self._evq: Any = None
        self._shutdown: Optional[dict] = None
        self._final_stats: Optional[Stats] = None
        self._pending_vals: list = []        # events an exception kept from dispatch
        self._touched: list = []             # pools given events in the current batch
        self._life_lock = threading.Lock()   # held to free the ring, and to read it

    # ------------------------------------------------------------------ running
    def _run(self, handle_signals: bool) -> None:
        self._thread_id = _get_ident()
        try:
            self._setup()
        except BaseException as e:
            self._start_exc = e
            self._started.set()
            self._stopped.set()
            self._release()
            raise
        self._started.set()
        restore = None
        if handle_signals and threading.current_thread() is threading.main_thread():
            restore = self._install_signals()
        try:
            self._loop()
        finally:
            if restore:
                restore()
            self._teardown()
            self._stopped.set()

    def _close_never_run(self, timeout: float) -> None:
        for srv in self._servers:       # bound but never handed to a ring
            srv._close_socks()
        for p in self._pools:
            p.shutdown(timeout)
        self._release()

    @property
    def _shutting(self) -> bool:
        return self._shutdown is not None

    # ------------------------------------------------------------------ scheduling
    def _wakeup(self) -> None:
        # The wakeup pipe's read end always has a read armed in the ring (EV_WAKE).
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    # ------------------------------------------------------------------ ring life
    def _setup(self) -> None:
        used = ffi.new("unsigned *")
        feat = ffi.new("unsigned *")
        rp = ffi.new("struct px_ring **")
        err = 0
        for flags in self._setup_flags:
            err = lib.px_setup(rp, self._entries, self._cq_entries, flags, used, feat)
            if err == 0:
                break
            if err not in (-errno.EINVAL,):
                break
        if err:
            e = -err
            if e == errno.EPERM:
                reason = "io_uring_setup: EPERM (blocked by seccomp or kernel.io_uring_disabled)"
            elif e == errno.ENOSYS:
                reason = "io_uring_setup: ENOSYS (the kernel has no io_uring)"
            else:
                reason = f"io_uring_setup: {errno.errorcode.get(e, e)} ({os.strerror(e)})"
            raise UringUnavailable(e, reason)
        self._r = rp[0]
        self.setup_flags = used[0]
        self.features = feat[0]
        missing = [name for name in REQUIRED
                   if not lib.px_opcode_supported(self._r, OPCODES[name])]
        if missing:
            lib.px_destroy(self._r)
            self._r = None
            raise UringUnavailable(errno.ENOSYS, "io_uring lacks opcodes the engine needs: "
                                   + ", ".join(missing))
        self._pool_mem = mmap.mmap(-1, self._nbufs * self._bufsize)
        self._pool_ptr = ffi.from_buffer(self._pool_mem)
        err = lib.px_setup_bufring(self._r, self._pool_ptr, self._nbufs, self._bufsize)
        if err:
            lib.px_destroy(self._r)
            self._r = None
            raise UringUnavailable(-err, "cannot register the provided-buffer ring: "
                                   + os.strerror(-err))
        lib.px_set_wakeup(self._r, self._wake_r)
        nmax = lib.px_max_events(self._r)
        self._evq = memoryview(ffi.buffer(lib.px_events(self._r), nmax * 32)).cast("q")

    def _install_signals(self) -> Callable[[], None]:
        def on_signal(signum: int, frame: Any) -> None:
            logger.info("signal %d: shutting down", signum)
            self.stop()
        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        old_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

        def restore() -> None:
            signal.set_wakeup_fd(old_fd)
            for s, h in old.items():
                signal.signal(s, h)
        return restore

    def _loop(self) -> None:
        r = self._r
        timers = self._timers
        heap = timers._heap
        cmds = self._cmds
        ready = self._ready
        reap = lib.px_reap
        monotonic = time.monotonic
        while True:
            if cmds:
                self._run_cmds()
            if ready:
                self._run_ready()
            if heap:
                timers.run_due(monotonic())
            if self._shutdown is not None and self._shutdown_step():
                return
            if self._pending_vals:
                self._flush_pending()
                continue
            if cmds or ready:
                n = reap(r, 0, -1)
            else:
                tmo = timers.timeout(monotonic()) if heap else None
                if self._shutdown is not None:
                    tmo = 0.02 if tmo is None else min(tmo, 0.02)
                if tmo is None:
                    n = reap(r, 1, -1)
                elif tmo <= 0:
                    n = reap(r, 0, -1)
                else:
                    n = reap(r, 1, int(tmo * 1e9))
            if n > 0:
                self._dispatch(n)
            elif n < 0:
                raise os_error(n, "io_uring_enter")

    # ------------------------------------------------------------------ completions
    def _flush_pending(self) -> None:
        """Dispatch what an exception (KeyboardInterrupt, SystemExit) cut short, before
        the next reap gives their receive buffers back to the kernel."""
        vals, self._pending_vals = self._pending_vals, []
        self._dispatch_vals(vals)

    def _dispatch(self, n: int) -> None:
        self._dispatch_vals(self._evq[: 4 * n].tolist())

    def _dispatch_vals(self, vals: list) -> None:
        conns = self._conns
        pool_mem = self._pool_mem
        ops_pop = self._ops.pop
        it = iter(vals)
        try:
            self._dispatch_events(it, conns, pool_mem, ops_pop)
        except BaseException:
            self._pending_vals = list(it)      # taken off the ring: never to be lost
            raise
        finally:
            self._submit_batches()             # what was queued for workers goes now

    def _submit_batches(self) -> None:
        """Hand each worker pool the events queued for it during this batch."""
        touched, self._touched = self._touched, []
        for p in touched:
            batch, p._batch = p._batch, []
            p.submit(batch)

    def _dispatch_events(self, it: Any, conns: list, pool_mem: Any, ops_pop: Any) -> None:
        touched = self._touched
        for t, i, res, aux in zip(it, it, it, it):
            if t == EV_DATA:
                c = conns[i]
                if c._deaf:
                    continue               # closed by the handler side: it wants no more
                p = c._wpool
                if p is None:
                    if c._user_paused or c._held is not None:
                        c._hold(DATA, pool_mem[aux:aux + res])
                        continue
                    try:
                        c._data_received(c, pool_mem[aux:aux + res])
                    except Exception as e:
                        handler_failed(c, e)
                else:
                    # Bytes of one connection read in the same turn go to the worker
                    # as one event (up to 64 KiB): fewer handoffs, and a connection
                    # that bursts cannot fill the queue with small events.
                    b = p._batch
                    j = c._bidx
                    if j < len(b) and b[j][0] is c and b[j][1] == DATA and len(b[j][2]) < 65536:
                        b[j] = (c, DATA, b[j][2] + pool_mem[aux:aux + res])
                        continue
                    if not b:
                        touched.append(p)
                    c._bidx = len(b)
                    b.append((c, DATA, pool_mem[aux:aux + res]))
                    if p.pending + len(b) >= p.max_queue:
                        self._backpressure(p, c)
            elif t == EV_OP:
                op = ops_pop(i)
                if res >= 0 and op._convert is None:
                    op._resolve(res, None)          # the common case, inline
                else:
                    self._finish_op(op, res)
            elif t == EV_ACCEPT:
                srv = conns[i]
                if res >= 0:
                    self._accepted(srv, res)
                else:
                    srv._accept_failed(i, os_error(res, "accept"))
                    self._timers.add(time.monotonic() + 0.1, srv._rearm, (i,))
            elif t == EV_EOF:
                c = conns[i]
                if res < 0:
                    c._fail(os_error(res, "recv"))
                elif not c._closing:
                    self._deliver(c, EOF, None)
            elif t == EV_CLOSED:
                self._closed_slot(i, res, aux)
            elif t == EV_WAKE:
                self._wake_pending = False
            elif t == EV_DRAINED:
                c = conns[i]
                if c is not None:
                    c._on_drained()

    def _deliver(self, c: UringConnection, kind: int, arg: Any) -> None:
        p = c._wpool
        if p is None:
            if kind == EOF and (c._user_paused or c._held):
                c._hold(kind, arg)             # after the data held before it
                return
            run_handler_event(c, kind, arg)
            return
        if not p._batch:
            self._touched.append(p)
        p._batch.append((c, kind, arg))

    def _accepted(self, srv: UringServer, fd: int) -> None:
        if srv._closing:                       # accepted just before close() took effect
            os.close(fd)
            return
        r = self._r
        slot = lib.px_conn_new(r, fd, 1)
        if slot < 0:
            os.close(fd)
            logger.error("cannot register accepted socket: %s", os.strerror(-slot))
            return
        c = UringConnection(self, slot, lib.px_conn_gen(r, slot), fd, srv, srv.pool)
        self._set_conn(slot, c)
        if not c._make_handler(srv._factory):
            lib.px_close(r, slot, c._gen, 1)
            return
        self._deliver(c, MADE, None)

    def _closed_slot(self, slot: int, res: int, kind: int) -> None:
        c = self._conns[slot]
        self._conns[slot] = None
        if isinstance(c, UringServer):
            c._open_listeners -= 1
            return
        if c is None:
            return
        c._closed = True
        c._closing = True
        if c._fail_exc is not None:
            exc: Optional[BaseException] = c._fail_exc
        elif res < 0:
            exc = os_error(res, _KIND_NAMES.get(kind, "io"))
        else:
            exc = None
        if c._drain_cbs:
            c._on_drained()
        held, c._held = c._held, None
        if held:                   # received before it was lost: delivered first, all of
            c._user_paused = False  # it (a pause now would hold it past connection_lost)
            for kind, arg in held:
                run_handler_event(c, kind, arg)      # nothing once _deaf
        self._deliver(c, LOST, exc)

    def _set_conn(self, slot: int, obj: Any) -> None:
        conns = self._conns
        if slot >= len(conns):
            conns.extend([None] * (slot + 1 - len(conns)))
        conns[slot] = obj

    # ------------------------------------------------------------------ servers
    def _connect_tcp(self, handler_factory: Callable[[], Handler], family: int, proto: int,
                     addr: Any, callback: Optional[Callable[[Op], Any]],
                     timeout: Optional[float]) -> Op:
        sa = _sockaddr(addr, family)
        s = socket.socket(family, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fd = s.detach()
        registered = False          # from then on the connection owns (and closes) fd

        def connected(res: int) -> UringConnection:
            nonlocal registered
            r = self._r
            slot = lib.px_conn_new(r, fd, 1)
            if slot < 0:
                raise os_error(slot, "connect")
            registered = True
            c = UringConnection(self, slot, lib.px_conn_gen(r, slot), fd, None, None)
            self._set_conn(slot, c)
            try:
                h = handler_factory()
            except BaseException as e:
                c._handler = Handler()
                c._fail(e)
                raise
            c._handler = h
            c._data_received = h.data_received
            run_handler_event(c, MADE, None)
            return c

        def finished(op: Op) -> None:
            if not registered:
                os.close(fd)
            if callback is not None:
                callback(op)

        # The op itself is the connect: op.cancel() and timeout= act on it directly.
        op = Op(self, "connect", finished, sa, connected)
        return self._submit(op, lib.px_op_connect, fd, sa, len(sa), self._tmo(timeout))

    # ------------------------------------------------------------------ low-level ops
    def _submit(self, op: Op, prep: Callable[..., int], *args: Any) -> Op:
        if _get_ident() != self._thread_id:
            self._post(self._submit, op, prep, *args)
            return op
        if op._cancel_req or (self._shutdown is not None and "hard" in self._shutdown):
            self._ready.append((self._finish_op, (op, -errno.ECANCELED)))
            return op
        idx = prep(self._r, *args)
        if idx < 0:
            self._ready.append((self._finish_op, (op, idx)))
            return op
        op._index = idx
        self._ops[idx] = op
        return op

    @staticmethod
    def _finish_op(op: Op, res: int) -> None:
        if res == -errno.ETIME and op.name == "timeout":
            res = 0                    # a timeout op that expired did its job
        op._complete(res)

    def _cancel_submitted(self, op: Op) -> None:
        if op._index >= 0 and self._ops.get(op._index) is op:
            lib.px_op_cancel(self._r, op._index)

    @staticmethod
    def _tmo(timeout: Optional[float]) -> int:
        return -1 if timeout is None else max(0, int(timeout * 1e9))

    def read(self, fd: int, nbytes: int, offset: int, callback: Callable[[Op], Any], *,
             timeout: Optional[float] = None) -> Op:
        """Read up to ``nbytes`` at ``offset`` (-1: the file position); result: bytes."""
        buf = bytearray(nbytes)
        cbuf = ffi.from_buffer(buf)
        op = Op(self, "read", callback, (buf, cbuf), lambda n: bytes(memoryview(buf)[:n]))
        return self._submit(op, lib.px_op_read, fd, cbuf, min(nbytes, _RW_MAX),
                            offset & (2**64 - 1), self._tmo(timeout))

    def readinto(self, fd: int, buf: Any, offset: int, callback: Callable[[Op], Any], *,
                 timeout: Optional[float] = None) -> Op:
        """Read into the writable buffer ``buf`` at ``offset``; result: bytes read."""
        cbuf = ffi.from_buffer(buf, require_writable=True)
        op = Op(self, "read", callback, (buf, cbuf), None)
        return self._submit(op, lib.px_op_read, fd, cbuf, min(len(cbuf), _RW_MAX),
                            offset & (2**64 - 1), self._tmo(timeout))

    def write(self, fd: int, data: Any, offset: int, callback: Callable[[Op], Any], *,
              timeout: Optional[float] = None) -> Op:
        """Write ``data`` at ``offset`` (-1: the file position); result: bytes written
        (possibly fewer than asked, as with ``os.pwrite``)."""
        cbuf = ffi.from_buffer(data)
        op = Op(self, "write", callback, (data, cbuf), None)
        return self._submit(op, lib.px_op_write, fd, cbuf, min(len(cbuf), _RW_MAX),
                            offset & (2**64 - 1), self._tmo(timeout))

    def writev(self, fd: int, buffers: list, offset: int, callback: Callable[[Op], Any], *,
               timeout: Optional[float] = None) -> Op:
        """Gathered write of several buffers at ``offset``; result: bytes written."""
        ptrs, lens, keep = self._iov(buffers)
        op = Op(self, "writev", callback, keep, None)
        return self._submit(op, lib.px_op_writev, fd, ptrs, lens, len(buffers),
                            offset & (2**64 - 1), self._tmo(timeout))

    def sendmsg(self, fd: int, buffers: list, callback: Callable[[Op], Any], *, flags: int = 0,
                timeout: Optional[float] = None) -> Op:
        """Gathered send of several buffers on a socket; result: bytes sent."""
        ptrs, lens, keep = self._iov(buffers)
        op = Op(self, "sendmsg", callback, keep, None)
        return self._submit(op, lib.px_op_sendmsg, fd, ptrs, lens, len(buffers), flags,
                            self._tmo(timeout))

    @staticmethod
    def _iov(buffers: list) -> tuple:
        cbufs = [ffi.from_buffer(b) for b in buffers]
        ptrs = ffi.new("char *[]", cbufs)
        lens = ffi.new("size_t[]", [len(c) for c in cbufs])
        return ptrs, lens, (buffers, cbufs, ptrs, lens)

    def send(self, fd: int, data: Any, callback: Callable[[Op], Any], *, flags: int = 0,
             timeout: Optional[float] = None) -> Op:
        """One send on a socket fd; result: bytes sent."""
        cbuf = ffi.from_buffer(data)
        op = Op(self, "send", callback, (data, cbuf), None)
        return self._submit(op, lib.px_op_send, fd, cbuf, min(len(cbuf), _RW_MAX), flags,
                            self._tmo(timeout))

    def recv(self, fd: int, nbytes: int, callback: Callable[[Op], Any], *, flags: int = 0,
             timeout: Optional[float] = None) -> Op:
        """One recv on a socket fd; result: bytes (empty at EOF)."""
        buf = bytearray(nbytes)
        cbuf = ffi.from_buffer(buf)
        op = Op(self, "recv", callback, (buf, cbuf), lambda n: bytes(memoryview(buf)[:n]))
        return self._submit(op, lib.px_op_recv, fd, cbuf, min(nbytes, _RW_MAX), flags,
                            self._tmo(timeout))

    def connect(self, fd: int, address: Any, callback: Callable[[Op], Any], *,
                family: Optional[int] = None, timeout: Optional[float] = None) -> Op:
        """Connect socket ``fd`` to a numeric ``address``; result: None. With ``timeout``
        a linked timeout ends it with ``TimeoutError`` (ETIMEDOUT)."""
        if family is None:
            if isinstance(address, (str, bytes)):
                family = socket.AF_UNIX
            else:
                family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sa = _sockaddr(address, family)
        op = Op(self, "connect", callback, sa, lambda n: None)
        return self._submit(op, lib.px_op_connect, fd, sa, len(sa), self._tmo(timeout))

    def accept(self, fd: int, callback: Callable[[Op], Any], *,
               timeout: Optional[float] = None) -> Op:
        """Accept one connection on listening socket ``fd``; result: the new fd."""
        op = Op(self, "accept", callback, None, None)
        return self._submit(op, lib.px_op_accept, fd, self._tmo(timeout))

    def openat(self, path: Any, flags: int, mode: int, callback: Callable[[Op], Any], *,
               dir_fd: int = -100) -> Op:
        """Open ``path`` (relative to ``dir_fd``, default the cwd); result: the fd."""
        p = os.fsencode(path)
        op = Op(self, "openat", callback, None, None)
        return self._submit(op, lib.px_op_openat, dir_fd, p, flags, mode, -1)

    def close_fd(self, fd: int, callback: Optional[Callable[[Op], Any]] = None) -> Op:
        """Close ``fd`` through the ring; result: None."""
        op = Op(self, "close", callback, None, lambda n: None)
        return self._submit(op, lib.px_op_close, fd)

    def timeout(self, seconds: float, callback: Callable[[Op], Any]) -> Op:
        """A kernel timer (IORING_OP_TIMEOUT); result: None when it expires."""
        op = Op(self, "timeout", callback, None, lambda n: None)
        return self._submit(op, lib.px_op_timeout, max(0, int(seconds * 1e9)))

    def poll(self, fd: int, mask: int, callback: Callable[[Op], Any], *,
             timeout: Optional[float] = None) -> Op:
        """Wait until ``fd`` is ready for ``mask`` (select.POLLIN, ...); result: the events."""
        op = Op(self, "poll", callback, None, None)
        return self._submit(op, lib.px_op_poll, fd, mask, self._tmo(timeout))

    def nop(self, callback: Callable[[Op], Any]) -> Op:
        op = Op(self, "nop", callback, None, None)
        return self._submit(op, lib.px_op_nop)

    def cancel_fd(self, fd: int) -> None:
        """Cancel every low-level op in flight on ``fd`` (each still completes)."""
        self._in_loop(lambda: lib.px_cancel_fd(self._r, fd))

    def register_buffers(self, buffers: list) -> None:
        """Register writable buffers for ``read_fixed``/``write_fixed`` (engine thread).
        They stay referenced until the engine is closed or :meth:`unregister_buffers`."""
        self._check_loop("register_buffers")
        cbufs = [ffi.from_buffer(b, require_writable=True) for b in buffers]
        ptrs = ffi.new("char *[]", cbufs)
        lens = ffi.new("size_t[]", [len(c) for c in cbufs])
        err = lib.px_register_buffers(self._r, ptrs, lens, len(cbufs))
        if err < 0:
            raise os_error(err, "register_buffers")
        self._registered = list(zip(buffers, cbufs))
        self._fixed_lens = [len(c) for c in cbufs]

    def unregister_buffers(self) -> None:
        self._check_loop("unregister_buffers")
        if any(op.name in ("read_fixed", "write_fixed") for op in self._ops.values()):
            raise RuntimeError("fixed-buffer operations are still in flight")
        err = lib.px_unregister_buffers(self._r)
        if err < 0:
            raise os_error(err, "unregister_buffers")
        self._registered = []
        self._fixed_lens = []

    def _read_fixed(self, fd: int, index: int, nbytes: int, offset: int,
                    callback: Callable[[Op], Any], buf_offset: int,
                    timeout: Optional[float]) -> Op:
        op = Op(self, "read_fixed", callback, None, None)  # the engine pins the buffers
        return self._submit(op, lib.px_op_read_fixed, fd, index, buf_offset, nbytes,
                            offset & 0xFFFFFFFFFFFFFFFF, self._tmo(timeout))

    def _write_fixed(self, fd: int, index: int, nbytes: int, offset: int,
                     callback: Callable[[Op], Any], buf_offset: int,
                     timeout: Optional[float]) -> Op:
        op = Op(self, "write_fixed", callback, None, None)
        return self._submit(op, lib.px_op_write_fixed, fd, index, buf_offset, nbytes,
                            offset & 0xFFFFFFFFFFFFFFFF, self._tmo(timeout))

    # ------------------------------------------------------------------ statistics
    def stats(self) -> Stats:
        """Counters, readable from any thread while the engine runs."""
        with self._life_lock:        # the ring is not freed while we read it
            return self._stats_locked()

    def _stats_locked(self) -> Stats:
        r = self._r
        if r is None:
            if self._final_stats is not None:
                return self._final_stats
            return self._stats(ops_submitted=0, ops_completed=0, ops_in_flight=0,
                               buffers_in_use=0, buffers_total=self._nbufs, connections=0,
                               bytes_in=0, bytes_out=0, send_queued=0, cq_overflow=0)
        st = lib.px_get_stats(r)
        return self._stats(
            ops_submitted=st.submitted, ops_completed=st.completed,
            ops_in_flight=st.inflight, buffers_in_use=st.bufs_out, buffers_total=self._nbufs,
            connections=sum(1 for c in self._conns if isinstance(c, UringConnection)),
            bytes_in=st.bytes_in, bytes_out=st.bytes_out,
            send_queued=st.send_queued, cq_overflow=st.cq_overflow,
        )

    # ------------------------------------------------------------------ shutdown
    def _begin_shutdown(self, timeout: float) -> None:
        if self._shutdown is not None:
            return
        self._shutdown = {"deadline": self._set_stop_deadline(timeout), "phase": 1}
        for srv in self._servers:
            srv.close()
        for c in self._conns:
            if isinstance(c, UringConnection) and not c._closing:
                lib.px_pause_reading(self._r, c._slot, c._gen)

    def _shutdown_step(self) -> bool:
        """Advance the shutdown; True when the loop may end."""
        sd = self._shutdown
        now = time.monotonic()
        late = now >= sd["deadline"]
        conns = [c for c in self._conns if isinstance(c, UringConnection)]
        if sd["phase"] == 1:
            if late or all(p.idle() for p in self._pools):
                for c in conns:
                    c.close()            # graceful: queued data goes out first
                sd["phase"] = 2
        if sd["phase"] == 2:
            if late and not sd.get("aborted"):
                sd["aborted"] = True
                sd["give_up"] = now + _GIVE_UP      # from the aborts, if they came late
                for c in conns:
                    self._abort_at_deadline(c)
            listeners = any(isinstance(c, UringServer) for c in self._conns)
            if not conns and not listeners:
                sd["phase"] = 3
        if sd["phase"] == 3:
            if "cancelled" not in sd:
                sd["cancelled"] = True
                sd["give_up"] = max(sd.get("give_up", 0.0),
                                    max(now, sd["deadline"]) + _GIVE_UP)
                for idx, op in list(self._ops.items()):
                    op._cancel_req = True
                    lib.px_op_cancel(self._r, idx)
            if not sd.get("wake_stopped"):
                sd["wake_stopped"] = lib.px_stop_wakeup(self._r) == 0   # again if SQ full
            if (lib.px_inflight(self._r) == 0 and not self._ops
                    and not self._ready and not self._cmds):
                return True
        # Requests cancelled (or connections aborted) complete within microseconds; one
        # that has not by then (a file read stuck in the kernel) is given up on: its
        # memory is kept, never freed (see the module docstring).
        if now >= sd.get("give_up", math.inf):
            logger.error("%d io_uring requests did not complete after cancel; their "
                         "memory is kept, not freed", lib.px_inflight(self._r))
            return True
        return False

    def _teardown(self) -> None:
        self._closed = True
        self._shutdown_pools()
        self._release()

    def _release(self) -> None:
        with self._life_lock:      # no other thread is reading the ring's memory now
            if self._r is not None:
                self._final_stats = self._stats_locked()   # what stats() shows once closed
            r = self._r
            self._r = None
            self._evq = None
            for c in self._conns:  # left open only if the loop died: no C calls on them
                if isinstance(c, UringConnection):
                    c._closing = c._closed = True
            if r is not None:
                if lib.px_inflight(r) == 0:
                    lib.px_destroy(r)
                    ffi.release(self._pool_ptr)
                    self._pool_mem.close()
                else:              # the kernel may still use it: keep it, forever
                    _leaked.append((r, self._pool_mem, self._pool_ptr, self._ops,
                                    self._registered))
        self._registered = []
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

