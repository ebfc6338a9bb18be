"""A drop-in asyncio event loop on proactor's io_uring engine.

How it fits together
====================
* :class:`ProactorEventLoop` is an :class:`asyncio.BaseEventLoop`: asyncio's own code
  keeps the ready queue, the timer heap, executors, ``getaddrinfo``, the happy-eyeballs
  logic of ``create_connection``, ``Server`` objects, TLS (``sslproto``) and ``start_tls``.
  What a selector loop does with ``epoll``, this loop does with the engine's ring: the
  "selector" whose ``select(timeout)`` ``BaseEventLoop._run_once`` calls is one turn of
  the ring (submit, wait, harvest, dispatch). Completions are dispatched inside that
  call, straight to protocols and futures, as uvloop does from libuv callbacks.
* One ring per loop, set up on first use (usually ``run_forever``) on the thread that
  will run the loop; it must keep running there (the ring is ``SINGLE_ISSUER``).
* TCP transports are the engine's connections: multishot recv into the provided-buffer
  ring and the C send queue, so ``data_received``/``write`` cost what they cost in the
  handler API. A transport is the engine-level handler of its connection.
* The engine's memory rule holds: a buffer handed to the kernel (``sock_recv_into``'s
  target, ``sock_sendall``'s data) stays referenced by its op until the op's final
  completion, also when the awaiting task is cancelled (the op is cancelled, its
  completion still awaited by the engine).
* ``add_reader``/``add_writer`` live in one epoll set whose fd has a poll request in the
  ring, re-armed each turn after the callbacks ran (level-triggered, as a selector).

* Pipes use asyncio's Unix pipe transports over those readers/writers; a subprocess's exit
  is a poll completion on its pidfd (a thread waiting in ``waitpid`` where pidfds are
  missing); signal handlers run from the ring's wakeup, which ``set_wakeup_fd`` feeds.

* Unix sockets reuse asyncio's ``create_unix_*`` code on these transports; datagram
  endpoints use asyncio's readiness-based datagram transport on poll requests.

* ``sendfile``: ``os.sendfile`` (the kernel copies), with the ring waiting for
  writability when the socket is full.
"""
from __future__ import annotations

import asyncio
import errno
import inspect
import logging
import os
import select
import selectors
import signal
import socket
import threading
import time
import warnings
import weakref
from asyncio import base_events, constants, exceptions, sslproto, transports
from typing import Any, Callable, Optional

from ._common import ABORT
from ._errors import os_error

logger = logging.getLogger("proactor")

__all__ = ["ProactorEventLoop", "new_event_loop", "EventLoopPolicy", "install", "run"]

#: What this loop implements, for tests and callers that want to know.
FEATURES = frozenset({"tcp", "tls", "sock", "readers", "executor", "streams", "pipes",
                      "subprocess", "signals", "unix", "udp", "sendfile"})

_MAX_WRITE_WARNINGS = 5

#: Python 3.13's ``Server`` keeps its transports (for ``close_clients``/``abort_clients``):
#: ``_attach``/``_detach`` take the transport. Before, they only counted.
_SERVER_KEEPS_TRANSPORTS = len(inspect.signature(base_events.Server._attach).parameters) > 1


#: ``ssl_shutdown_timeout`` came with 3.11's new ``sslproto``; 3.10's SSLProtocol (and its
#: create_connection, create_server, start_tls) have no such argument.
_SSL_SHUTDOWN_TIMEOUT = "ssl_shutdown_timeout" in inspect.signature(
    sslproto.SSLProtocol).parameters


def _ssl_protocol(loop: Any, protocol: Any, sslcontext: Any, waiter: Any, server_side: bool,
                  server_hostname: Optional[str], ssl_handshake_timeout: Optional[float],
                  ssl_shutdown_timeout: Optional[float],
                  call_connection_made: bool = True) -> Any:
    """The running Python's ``sslproto.SSLProtocol``, given only what it accepts."""
    kwargs: dict[str, Any] = {}
    if _SSL_SHUTDOWN_TIMEOUT:
        kwargs["ssl_shutdown_timeout"] = ssl_shutdown_timeout
    elif ssl_shutdown_timeout is not None:
        # asyncio's own methods refuse the keyword on 3.10 before getting here
        raise TypeError("ssl_shutdown_timeout is not supported before Python 3.11")
    return sslproto.SSLProtocol(loop, protocol, sslcontext, waiter, server_side,
                                server_hostname, ssl_handshake_timeout=ssl_handshake_timeout,
                                call_connection_made=call_connection_made, **kwargs)


def _server_attach(server: Any, transport: Any) -> None:
    if _SERVER_KEEPS_TRANSPORTS:
        server._attach(transport)
    else:
        server._attach()


def _server_detach(server: Any, transport: Any) -> None:
    if _SERVER_KEEPS_TRANSPORTS:
        server._detach(transport)
    else:
        server._detach()


class _RingSelector:
    """What ``BaseEventLoop._run_once`` calls the selector: one turn of the ring."""

    def __init__(self, engine: Any, loop: ProactorEventLoop) -> None:
        self._engine = engine
        self._loop = loop

    def select(self, timeout: Optional[float] = None) -> list:
        eng = self._engine
        if eng._pending_vals:                  # cut short by an exception last time
            eng._flush_pending()
            timeout = 0
        if self._loop._watches and self._loop._epoll_op is None:
            self._loop._arm_epoll()
        if eng._cmds:
            eng._run_cmds()
            timeout = 0
        if eng._ready:
            eng._run_ready()
            timeout = 0
        heap = eng._timers._heap
        if heap:
            now = time.monotonic()
            eng._timers.run_due(now)
            t = eng._timers.timeout(now)
            if t is not None and (timeout is None or t < timeout):
                timeout = t
        if timeout is None:
            n = eng._reap(eng._r, 1, -1)
        elif timeout <= 0:
            n = eng._reap(eng._r, 0, -1)
        else:
            n = eng._reap(eng._r, 1, int(timeout * 1e9))
        if n > 0:
            eng._dispatch(n)
        elif n < 0:
            raise os_error(n, "io_uring_enter")
        checks = self._loop._write_checks
        if checks:
            self._loop._write_checks = []
            for tr in checks:
                tr._check_write_buffer()
        return []

    def close(self) -> None:
        pass

    def get_key(self, fd: int) -> selectors.SelectorKey:
        """What is watched on ``fd`` by add_reader/add_writer (asyncio's pipe transports
        ask, for their repr)."""
        ent = self._loop._watches.get(fd)
        if ent is None:
            raise KeyError(fd)
        events = ((selectors.EVENT_READ if ent[0] is not None else 0)
                  | (selectors.EVENT_WRITE if ent[1] is not None else 0))
        return selectors.SelectorKey(fd, fd, events, None)


class _UringTransport(transports._FlowControlMixin, transports.Transport):
    """A TCP transport over one engine connection; also that connection's handler."""

    _start_tls_compatible = True
    _sendfile_compatible = constants._SendfileMode.TRY_NATIVE

    def __init__(self, loop: ProactorEventLoop, sock: Optional[socket.socket], protocol: Any,
                 waiter: Optional[asyncio.Future] = None, extra: Optional[dict] = None,
                 server: Any = None) -> None:
        super().__init__(extra, loop)
        self._loop = loop
        self._sock = sock
        self._conn: Any = None
        self._server = server
        self._waiter = waiter
        self._closing = False              # is_closing(): closed by either side
        self._deaf = False                 # closed by the user: nothing more delivered
        self._lost = False                 # connection_lost is scheduled
        self._loss: Optional[tuple] = None   # (exc,): lost while data was still held
        self._eof = False
        self._paused = False
        self._made = False                 # connection_made has run, data may follow
        self._hold = True                  # not made yet, or paused: keep what is read
        self._held: list = []              # ... here, delivered in order later
        self._held_eof = False
        self._write_warnings = 0
        self.set_protocol(protocol)
        if server is not None:
            _server_attach(server, self)

    # -- the engine-level handler
    def connection_made(self, conn: Any) -> None:
        self._conn = conn
        conn._abort_how = ABORT                # abort() ends with a FIN, as asyncio's loops do
        conn._data_received = self._on
        if self._sock is None:                 # accepted by the engine: a view of its fd
            self._sock = socket.socket(fileno=conn._fd)
        sock = self._sock
        self._extra["socket"] = asyncio.trsock.TransportSocket(sock)
        try:
            self._extra["sockname"] = sock.getsockname()
        except OSError:
            self._extra["sockname"] = None
        try:
            self._extra["peername"] = sock.getpeername()
        except OSError:
            self._extra["peername"] = None
        self._loop.call_soon(self._call_connection_made)
        if self._waiter is not None:
            self._loop.call_soon(_set_result_unless_cancelled, self._waiter, None)

    def _call_connection_made(self) -> None:
        try:
            self._protocol.connection_made(self)
        finally:
            # A selector loop's first read comes a turn after connection_made, behind
            # what was scheduled until then: the tasks connection_made started, and
            # create_connection's caller, resumed by the waiter (so it has the transport
            # before data_received). What the ring read meanwhile is held until then.
            waiter = self._waiter
            self._waiter = None
            if waiter is not None and not waiter.done():
                waiter.add_done_callback(self._start_delivering)
            else:
                self._loop.call_soon(self._start_delivering, None)

    def _start_delivering(self, waiter: Optional[asyncio.Future]) -> None:
        self._made = True
        if not self._paused:
            self._deliver_held()

    def _on_data(self, conn: Any, data: bytes) -> None:
        if self._hold:
            # read before connection_made ran, or before the pause took effect in the
            # ring: kept, and handed over in order when the protocol may have it
            self._held.append(data)
            return
        try:
            self._data_cb(data)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.data_received() call failed.")

    def _on_data_buffered(self, conn: Any, data: bytes) -> None:
        if self._hold:
            self._held.append(data)
            return
        proto = self._protocol
        try:
            view = memoryview(data)
            while view:
                buf = proto.get_buffer(len(view))
                n = min(len(buf), len(view))
                if not n:
                    raise RuntimeError("get_buffer() returned an empty buffer")
                buf[:n] = view[:n]
                proto.buffer_updated(n)
                view = view[n:]
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.buffer_updated() call failed.")

    def data_received(self, conn: Any, data: bytes) -> None:   # not used: see _on
        self._on(conn, data)

    def eof_received(self, conn: Any) -> None:
        if self._deaf:
            return                             # closed by the user: reading has stopped
        if self._hold:
            self._held_eof = True
            return
        self._eof = True
        try:
            keep_open = self._protocol.eof_received()
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._fatal_error(exc, "Fatal error: protocol.eof_received() call failed.")
            return
        if not keep_open:
            self.close()

    def connection_lost(self, conn: Any, exc: Optional[BaseException]) -> None:
        """The engine closed the fd (after every request on it completed)."""
        self._closing = True
        if self._sock is not None:
            self._sock.detach()                # the fd is closed already
        if (self._held or self._held_eof) and not self._deaf:
            # Received before it was lost, and held (the protocol was paused, or not
            # ready yet): nothing received is lost, so connection_lost comes after it,
            # once it is delivered (as a paused selector transport learns of a reset
            # only when it reads again).
            self._loss = (exc,)
            return
        self._lose_soon(exc)

    def _lose_soon(self, exc: Optional[BaseException]) -> None:
        """Schedule the protocol's connection_lost (once). Also called by close() with
        nothing left to send, abort() and _force_close(), as a selector loop does: the
        protocol is told at once, while the engine still owns the fd and every buffer of
        the connection until its final completions."""
        if not self._lost:
            self._lost = True
            self._loop.call_soon(self._call_connection_lost, exc)

    def _call_connection_lost(self, exc: Optional[BaseException]) -> None:
        try:
            self._protocol.connection_lost(exc)
        finally:
            self._protocol = None
            server = self._server
            if server is not None:
                _server_detach(server, self)
                self._server = None

    # -- asyncio.Transport
    def set_protocol(self, protocol: Any) -> None:
        self._protocol = protocol
        if isinstance(protocol, asyncio.BufferedProtocol):
            self._data_cb = None
            self._on = self._on_data_buffered
        else:
            self._data_cb = protocol.data_received
            self._on = self._on_data
        if self._conn is not None:
            self._conn._data_received = self._on

    def get_protocol(self) -> Any:
        return self._protocol

    def is_closing(self) -> bool:
        return self._closing

    def is_reading(self) -> bool:
        return not (self._paused or self._closing)

    def pause_reading(self) -> None:
        if self._deaf or self._lost or self._paused:
            return
        self._paused = True
        self._hold = True
        if not self._conn._closed:
            self._conn.pause_reading()

    def resume_reading(self) -> None:
        if self._deaf or self._lost or not self._paused:
            return
        self._paused = False
        if self._made:
            if self._held or self._held_eof or self._loss is not None:
                self._loop.call_soon(self._deliver_held)   # still holding until then
            else:
                self._hold = False
        if not self._conn._closed:
            self._conn.resume_reading()

    def _deliver_held(self) -> None:
        """Hand over what was held, in order; new data queues behind it until the held
        queue is empty. Stops if the protocol pauses again."""
        while self._held and not self._paused and not self._deaf:
            data = self._held.pop(0)
            self._hold = False
            try:
                self._on(self._conn, data)
            finally:
                self._hold = True
        self._hold = self._paused or not self._made
        if self._held_eof and not self._held and not self._hold and not self._deaf:
            self._held_eof = False
            self.eof_received(self._conn)
        if self._loss is not None and not self._hold and not self._held:
            exc, = self._loss                  # the engine lost it meanwhile: now say so
            self._loss = None
            self._lose_soon(exc)

    def write(self, data: Any) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data argument must be a bytes-like object, "
                            f"not {type(data).__name__!r}")
        if self._eof_written:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._sendfile_active:
            raise RuntimeError("unable to write; sendfile is in progress")
        if self._closing or self._conn is None:
            if self._write_warnings >= _MAX_WRITE_WARNINGS:
                logger.warning("socket.send() raised exception.")
            self._write_warnings += 1
            return
        if type(data) is not bytes:
            data = bytes(data)
        if not data:
            return
        conn = self._conn
        queued = _px_send(conn._r, conn._slot, conn._gen, data, len(data))
        if queued < 0:
            # Not queued. No memory for the copy: what is written after it must not go
            # out without it, so the connection fails (connection_lost gets ENOMEM of
            # "send"). Else it is failing already (the peer has gone, a send failed)
            # and connection_lost will say why. Either way the bytes are dropped and
            # counted, and what was received before still comes.
            self._closing = True
            conn._not_queued(queued, len(data))
            return
        if queued > self._high_water and not self._protocol_paused:
            # Judge after the ring's next turn: the kernel may take it all at once (a
            # selector loop's write() tries the socket first, too).
            self._loop._write_checks.append(self)

    _eof_written = False
    _sendfile_active = False

    def _check_write_buffer(self) -> None:
        """After a ring turn: still above the high-water mark? Then pause the protocol
        until everything has gone out."""
        if self._protocol_paused or self._lost or self._conn is None:
            return
        self._maybe_pause_protocol()
        if self._protocol_paused:
            self._conn.when_drained(self._drained)

    def _drained(self) -> None:
        """Everything written has gone out: resume a paused protocol (if it is still
        there: the connection may have been lost meanwhile)."""
        if self._protocol is not None and not self._lost:
            self._maybe_resume_protocol()
            if self._protocol_paused and self._conn is not None:
                self._conn.when_drained(self._drained)   # written more since: wait again

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if self._closing or self._eof_written:
            return
        self._eof_written = True
        conn = self._conn
        conn.when_drained(self._shutdown_write)

    def _shutdown_write(self) -> None:
        if self._sock is not None and not self._conn._closed:
            try:
                self._sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def get_write_buffer_size(self) -> int:
        return self._conn.get_write_buffer_size() if self._conn is not None else 0

    def _go_deaf(self) -> bool:
        """The user closes: nothing more is delivered. True if the engine had closed
        the connection already (then connection_lost is scheduled here)."""
        self._deaf = self._closing = True
        self._held.clear()                     # no data_received after close()
        self._held_eof = False
        if self._loss is not None:             # lost while data was held: tell it now
            exc, = self._loss
            self._loss = None
            self._lose_soon(exc)
        return self._lost

    # close(), abort(), _force_close(): connection_lost comes at the next turn, as with a
    # selector loop; but on a connection that is failing already (a write was refused),
    # the engine's connection_lost tells why, once it has closed.
    def close(self) -> None:
        if self._deaf:
            return
        failing = self._closing
        if self._go_deaf():
            return
        conn = self._conn
        if conn is not None:
            conn.close()                       # queued data goes out first
            if not failing and not conn.get_write_buffer_size():
                self._lose_soon(None)

    def abort(self) -> None:
        failing = self._closing and not self._deaf
        if self._go_deaf():
            return
        if self._conn is not None:
            self._conn.abort()
            if not failing:
                self._lose_soon(None)

    def _force_close(self, exc: Optional[BaseException]) -> None:
        """Used by sslproto: close now; ``exc`` goes to connection_lost."""
        failing = self._closing and not self._deaf
        if self._go_deaf():
            return
        if self._conn is not None:
            if exc is not None:
                self._conn._fail(exc)
            else:
                self._conn.abort()
            if not failing:
                self._lose_soon(exc)

    def _fatal_error(self, exc: BaseException, message: str) -> None:
        if isinstance(exc, OSError) and exc.errno in (errno.EPIPE, errno.ECONNRESET,
                                                       errno.ECONNABORTED):
            if self._loop.get_debug():
                logger.debug("%r: %s", self, message, exc_info=True)
        else:
            self._loop.call_exception_handler({
                "message": message, "exception": exc, "transport": self,
                "protocol": self._protocol,
            })
        self._force_close(exc)

    def __del__(self, _warn: Any = warnings.warn) -> None:
        if self._conn is not None and not self._closing:
            _warn(f"unclosed transport {self!r}", ResourceWarning, source=self)

    def __repr__(self) -> str:
        state = "closed" if self._lost else "closing" if self._closing else "open"
        fd = self._conn._fd if self._conn is not None else -1
        return f"<_UringTransport fd={fd} {state}>"


def _set_result_unless_cancelled(fut: asyncio.Future, result: Any) -> None:
    if not fut.cancelled():
        fut.set_result(result)


def _future_from_op(loop: ProactorEventLoop, start: Callable[[Callable[[Any], None]], Any]
                    ) -> tuple[asyncio.Future, Any]:
    """Start an engine op whose completion resolves a new future."""
    fut = loop.create_future()

    def done(op: Any) -> None:
        if fut.done():
            return
        exc = op.exception()
        if exc is not None:
            if isinstance(exc, OSError) and exc.errno == errno.ECANCELED:
                fut.cancel()
            else:
                fut.set_exception(exc)
        else:
            fut.set_result(op.result())

    return fut, start(done)


class ProactorEventLoop(base_events.BaseEventLoop):
    """An asyncio event loop whose I/O goes through an io_uring engine (see the module
    docstring)."""

    _proactor_features = FEATURES

    def __init__(self, **engine_options: Any) -> None:
        from ._io_uring import UringEngine, lib
        from ._io_uring import _px_send as px_send

        global _px_send
        _px_send = px_send
        super().__init__()
        eng = UringEngine(**engine_options)
        eng._reap = lib.px_reap
        self._engine = eng
        self._lib = lib
        self._selector = _RingSelector(eng, self)
        self._write_checks: list = []      # transports that wrote past their high mark
        self._listeners: dict[int, Any] = {}
        # Unix server sockets whose path is removed when they stop serving: socket ->
        # inode of the path (filled by 3.13's create_unix_server, cleanup_socket=True).
        self._unix_server_sockets: dict[socket.socket, int] = {}
        self._signal_handlers: dict[int, asyncio.Handle] = {}
        self._transports: Any = weakref.WeakValueDictionary()   # asyncio's datagram transport
        self._watches: dict[int, list] = {}    # fd -> [reader handle, writer handle]
        self._epoll: Any = None
        self._epoll_op: Any = None

    def _ring(self) -> Any:
        """The engine, its ring set up on first use, on the calling thread: the thread
        that will run the loop (the ring accepts submissions from that thread only)."""
        eng = self._engine
        if eng._r is None:
            self._check_closed()
            eng._thread_id = threading.get_ident()
            eng._setup()
        return eng

    # -- BaseEventLoop hooks
    def _process_events(self, event_list: list) -> None:
        pass                                   # dispatched inside select()

    def _write_to_self(self) -> None:
        self._engine._wakeup()

    def run_forever(self) -> None:
        eng = self._ring()
        if eng._thread_id != threading.get_ident():
            raise RuntimeError("a proactor loop runs on the thread that first used it")
        restore = None
        if threading.current_thread() is threading.main_thread():
            try:
                old = signal.set_wakeup_fd(eng._wake_w, warn_on_full_buffer=False)
                restore = old
            except ValueError:
                restore = None
        try:
            super().run_forever()
        finally:
            if restore is not None:
                signal.set_wakeup_fd(restore)

    def close(self) -> None:
        if self.is_running():
            raise RuntimeError("Cannot close a running event loop")
        if self.is_closed():
            return
        if threading.current_thread() is threading.main_thread():
            for sig in list(self._signal_handlers):
                self.remove_signal_handler(sig)
        self._close_engine()
        if self._epoll is not None:
            self._epoll.close()
            self._epoll = None
        self._watches.clear()
        self._selector = None                  # as a selector loop: reprs say 'open'
        super().close()

    def _close_engine(self) -> None:
        """Close what is still open and wait for every request's final completion."""
        from ._io_uring import UringConnection, UringServer

        eng = self._engine
        lib = self._lib
        if eng._r is None:                      # never used: no ring to drain
            eng._closed = True
            eng._release()
            return
        if eng._pending_vals:
            eng._flush_pending()
        for lst in list(self._listeners.values()):
            lst.close()
        self._listeners.clear()
        for c in list(eng._conns):
            if isinstance(c, UringConnection) and not c._closed:
                c.abort()
            elif isinstance(c, UringServer):
                c.close()
        for idx, op in list(eng._ops.items()):
            op._cancel_req = True
            lib.px_op_cancel(eng._r, idx)
        wake_stopped = False
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            if not wake_stopped:
                wake_stopped = lib.px_stop_wakeup(eng._r) == 0
            eng._run_cmds()
            eng._run_ready()
            if eng._pending_vals:
                eng._flush_pending()
            if lib.px_inflight(eng._r) == 0 and not eng._ops:
                break
            n = eng._reap(eng._r, 1, 20_000_000)
            if n > 0:
                eng._dispatch(n)
        eng._closed = True
        eng._release()

    # -- transports
    def _make_socket_transport(self, sock: socket.socket, protocol: Any,
                               waiter: Optional[asyncio.Future] = None, *,
                               extra: Optional[dict] = None, server: Any = None) -> Any:
        from ._io_uring import UringConnection

        eng = self._ring()
        lib = self._lib
        if sock.type == socket.SOCK_STREAM and sock.family in (socket.AF_INET,
                                                              socket.AF_INET6):
            base_events._set_nodelay(sock)
        fd = sock.fileno()
        slot = lib.px_conn_new(eng._r, fd, 1)
        if slot < 0:
            raise os_error(slot, "register socket")
        conn = UringConnection(eng, slot, lib.px_conn_gen(eng._r, slot), fd, None, None)
        eng._set_conn(slot, conn)
        tr = _UringTransport(self, sock, protocol, waiter, extra, server)
        conn._handler = tr
        conn._data_received = tr._on
        tr.connection_made(conn)
        return tr

    def _make_ssl_transport(self, rawsock: socket.socket, protocol: Any, sslcontext: Any,
                            waiter: Optional[asyncio.Future] = None, *,
                            server_side: bool = False, server_hostname: Optional[str] = None,
                            extra: Optional[dict] = None, server: Any = None,
                            ssl_handshake_timeout: Optional[float] = None,
                            ssl_shutdown_timeout: Optional[float] = None,
                            call_connection_made: bool = True) -> Any:
        ssl_protocol = _ssl_protocol(self, protocol, sslcontext, waiter, server_side,
                                     server_hostname, ssl_handshake_timeout,
                                     ssl_shutdown_timeout, call_connection_made)
        self._make_socket_transport(rawsock, ssl_protocol, extra=extra, server=server)
        return ssl_protocol._app_transport

    # -- servers
    def _start_serving(self, protocol_factory: Callable[[], Any], sock: socket.socket,
                       sslcontext: Any = None, server: Any = None, backlog: int = 100,
                       ssl_handshake_timeout: Optional[float] = None,
                       ssl_shutdown_timeout: Optional[float] = None) -> None:
        from ._io_uring import UringServer

        def factory() -> _UringTransport:
            protocol = protocol_factory()
            if sslcontext is not None:
                protocol = _ssl_protocol(self, protocol, sslcontext, None, True, None,
                                         ssl_handshake_timeout, ssl_shutdown_timeout)
            return _UringTransport(self, None, protocol, server=server)

        # The ring listens on a duplicate of the socket: the Server keeps its socket
        # object (server.sockets, getsockname); _stop_serving closes both.
        listener = UringServer(self._ring(), [sock.dup()], factory, None)
        listener._start()
        self._listeners[sock.fileno()] = listener

    def _stop_serving(self, sock: socket.socket) -> None:
        path = sock.getsockname() if sock in self._unix_server_sockets else None
        listener = self._listeners.pop(sock.fileno(), None)
        if listener is not None:
            listener.close()                   # the ring's duplicate
        sock.close()                           # the caller's socket (as selector loops do)
        if path is not None:                   # as 3.13's unix loop: remove the socket's
            ino = self._unix_server_sockets.pop(sock)    # path if it is still ours
            try:
                if os.stat(path).st_ino == ino:
                    os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as err:
                logger.error("Unable to clean up listening UNIX socket %r: %r", path, err)

    # -- socket operations
    def _check_sock(self, sock: socket.socket) -> None:
        if self._debug and sock.gettimeout() != 0:
            raise ValueError("the socket must be non-blocking")

    # sock_recv/recv_into/accept are readiness-based (try, else wait for a poll
    # completion, retry): a cancelled wait takes nothing from the socket, as with a
    # selector loop. A completion-based recv cancelled after it took the bytes would
    # lose them.
    async def sock_recv(self, sock: socket.socket, n: int) -> bytes:
        self._check_sock(sock)
        while True:
            try:
                return sock.recv(n)
            except (BlockingIOError, InterruptedError):
                await self._wait_fd(sock.fileno(), select.POLLIN)

    async def sock_recv_into(self, sock: socket.socket, buf: Any) -> int:
        self._check_sock(sock)
        while True:
            try:
                return sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                await self._wait_fd(sock.fileno(), select.POLLIN)

    async def sock_sendall(self, sock: socket.socket, data: Any) -> None:
        self._check_sock(sock)
        view = memoryview(data).cast("B")
        while view:
            chunk = view
            fut, op = _future_from_op(
                self, lambda cb: self._ring().send(sock.fileno(), chunk, cb))
            n = await _await_op(fut, op)
            view = view[n:]

    async def sock_connect(self, sock: socket.socket, address: Any) -> None:
        self._check_sock(sock)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            resolved = await self._ensure_resolved(address, family=sock.family,
                                                   type=sock.type, proto=sock.proto, loop=self)
            address = resolved[0][4]
        # connect() here, in the task's first step, as a selector loop does: the SYN is
        # out before the caller's next step (a connect request would wait for the ring's
        # next turn). Then wait for writability, and read the outcome in SO_ERROR.
        try:
            sock.connect(address)
            return
        except (BlockingIOError, InterruptedError):
            pass
        while True:
            await self._wait_fd(sock.fileno(), select.POLLOUT)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err == 0:
                return
            if err not in (errno.EINPROGRESS, errno.EALREADY, errno.EINTR):
                raise OSError(err, f"Connect call failed {address}")

    async def sock_accept(self, sock: socket.socket) -> tuple:
        self._check_sock(sock)
        while True:
            try:
                conn, address = sock.accept()
            except (BlockingIOError, InterruptedError):
                await self._wait_fd(sock.fileno(), select.POLLIN)
                continue
            conn.setblocking(False)
            return conn, address

    # -- Unix sockets: asyncio's own code, on this loop's sock_connect/_start_serving
    from asyncio.unix_events import _UnixSelectorEventLoop as _unix_loop

    create_unix_connection = _unix_loop.create_unix_connection
    create_unix_server = _unix_loop.create_unix_server
    del _unix_loop

    # -- datagrams: asyncio's readiness-based transport, on poll requests
    def _make_datagram_transport(self, sock: socket.socket, protocol: Any,
                                 address: Any = None, waiter: Optional[asyncio.Future] = None,
                                 extra: Optional[dict] = None) -> Any:
        from asyncio import selector_events

        return selector_events._SelectorDatagramTransport(self, sock, protocol, address,
                                                          waiter, extra)

    async def _wait_fd(self, fd: int, mask: int) -> None:
        eng = self._ring()
        fut, op = _future_from_op(self, lambda cb: eng.poll(fd, mask, cb))
        await _await_op(fut, op)

    async def sock_recvfrom(self, sock: socket.socket, bufsize: int) -> tuple:
        self._check_sock(sock)
        while True:
            try:
                return sock.recvfrom(bufsize)
            except (BlockingIOError, InterruptedError):
                await self._wait_fd(sock.fileno(), select.POLLIN)

    async def sock_recvfrom_into(self, sock: socket.socket, buf: Any, nbytes: int = 0) -> tuple:
        self._check_sock(sock)
        while True:
            try:
                return sock.recvfrom_into(buf, nbytes)
            except (BlockingIOError, InterruptedError):
                await self._wait_fd(sock.fileno(), select.POLLIN)

    async def sock_sendto(self, sock: socket.socket, data: Any, address: Any) -> int:
        self._check_sock(sock)
        while True:
            try:
                return sock.sendto(data, address)
            except (BlockingIOError, InterruptedError):
                await self._wait_fd(sock.fileno(), select.POLLOUT)

    # -- sendfile: the kernel copies (sendfile(2)); the ring waits for writability
    async def _sock_sendfile_native(self, sock: socket.socket, file: Any, offset: int,
                                    count: Optional[int]) -> int:
        try:
            fileno = file.fileno()
            fsize = os.fstat(fileno).st_size
        except (AttributeError, OSError, ValueError) as err:
            raise exceptions.SendfileNotAvailableError("not a regular file") from err
        end = offset + count if count else fsize
        total = 0
        try:
            while offset + total < end:
                n = min(end - offset - total, 1 << 30)
                try:
                    sent = os.sendfile(sock.fileno(), fileno, offset + total, n)
                except (BlockingIOError, InterruptedError):
                    await self._wait_fd(sock.fileno(), select.POLLOUT)
                    continue
                except OSError as exc:
                    if total == 0 and exc.errno in (errno.EINVAL, errno.ENOSYS,
                                                    errno.ENOTSOCK, errno.EOPNOTSUPP):
                        raise exceptions.SendfileNotAvailableError(
                            f"os.sendfile() failed: {exc}") from exc
                    raise
                if sent == 0:
                    break                       # end of file
                total += sent
            return total
        finally:
            if total > 0:
                file.seek(offset + total)

    async def _sendfile_native(self, transp: Any, file: Any, offset: int,
                               count: Optional[int]) -> int:
        if not isinstance(transp, _UringTransport) or transp._conn is None:
            raise exceptions.SendfileNotAvailableError("not a proactor TCP transport")
        drained = self.create_future()
        transp._conn.when_drained(lambda: drained.done() or drained.set_result(None))
        transp._sendfile_active = True          # write() refuses until we are done
        try:
            await drained                       # what write() queued goes out first
            return await self._sock_sendfile_native(transp._sock, file, offset, count)
        finally:
            transp._sendfile_active = False

    # -- pipes and subprocesses (asyncio's Unix transports, on poll requests)
    def _make_read_pipe_transport(self, pipe: Any, protocol: Any,
                                  waiter: Optional[asyncio.Future] = None,
                                  extra: Optional[dict] = None) -> Any:
        from asyncio import unix_events

        return unix_events._UnixReadPipeTransport(self, pipe, protocol, waiter, extra)

    def _make_write_pipe_transport(self, pipe: Any, protocol: Any,
                                   waiter: Optional[asyncio.Future] = None,
                                   extra: Optional[dict] = None) -> Any:
        from asyncio import unix_events

        return unix_events._UnixWritePipeTransport(self, pipe, protocol, waiter, extra)

    async def _make_subprocess_transport(self, protocol: Any, args: Any, shell: bool,
                                         stdin: Any, stdout: Any, stderr: Any, bufsize: int,
                                         extra: Optional[dict] = None, **kwargs: Any) -> Any:
        from asyncio import unix_events

        waiter = self.create_future()
        transp = unix_events._UnixSubprocessTransport(
            self, protocol, args, shell, stdin, stdout, stderr, bufsize,
            waiter=waiter, extra=extra, **kwargs)
        self._watch_child(transp.get_pid(), transp)
        try:
            await waiter
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException:
            transp.close()
            await transp._wait()
            raise
        return transp

    def _watch_child(self, pid: int, transp: Any) -> None:
        """Report the child's exit to ``transp``: a poll completion on its pidfd, or a
        thread blocked in waitpid where pidfds are missing."""
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            threading.Thread(target=self._wait_child_thread, args=(pid, transp),
                             name=f"proactor-waitpid-{pid}", daemon=True).start()
            return

        def exited(op: Any) -> None:
            os.close(pidfd)
            if op.exception() is not None:      # cancelled: the loop is closing
                threading.Thread(target=self._wait_child_thread, args=(pid, transp),
                                 name=f"proactor-waitpid-{pid}", daemon=True).start()
                return
            try:
                _, status = os.waitpid(pid, 0)  # readable pidfd: it has exited
                code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:
                code = 255                      # reaped by someone else
            transp._process_exited(code)

        self._ring().poll(pidfd, select.POLLIN, exited)

    def _wait_child_thread(self, pid: int, transp: Any) -> None:
        try:
            _, status = os.waitpid(pid, 0)
            code = os.waitstatus_to_exitcode(status)
        except ChildProcessError:
            code = 255
        if not self.is_closed():
            self.call_soon_threadsafe(transp._process_exited, code)

    # -- signals: the Python-level handler runs when the ring's wait returns (the
    # wakeup pipe is the set_wakeup_fd target while the loop runs)
    def add_signal_handler(self, sig: int, callback: Callable[..., Any], *args: Any) -> None:
        if asyncio.iscoroutine(callback) or asyncio.iscoroutinefunction(callback):
            raise TypeError("coroutines cannot be used with add_signal_handler()")
        self._check_signal(sig)
        self._check_closed()
        if threading.current_thread() is not threading.main_thread():
            raise ValueError("signal handlers can only be set in the main thread")
        handle = asyncio.Handle(callback, args, self, None)
        self._signal_handlers[sig] = handle
        try:
            signal.signal(sig, self._handle_signal)
            signal.siginterrupt(sig, False)
        except OSError as exc:
            del self._signal_handlers[sig]
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught")
            raise

    def _handle_signal(self, signum: int, frame: Any) -> None:
        handle = self._signal_handlers.get(signum)
        if handle is not None and not handle._cancelled:
            self._add_callback_signalsafe(handle)

    def remove_signal_handler(self, sig: int) -> bool:
        self._check_signal(sig)
        if self._signal_handlers.pop(sig, None) is None:
            return False
        handler = signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL
        try:
            signal.signal(sig, handler)
        except OSError as exc:
            if exc.errno == errno.EINVAL:
                raise RuntimeError(f"sig {sig:d} cannot be caught")
            raise
        return True

    @staticmethod
    def _check_signal(sig: int) -> None:
        if not isinstance(sig, int):
            raise TypeError(f"sig must be an int, not {sig!r}")
        if sig not in signal.valid_signals():
            raise ValueError(f"invalid signal number {sig}")

    # -- readiness callbacks: one epoll set, whose fd the ring polls. An fd closed
    # without remove_reader drops out of the set by itself (as with a selector loop);
    # a poll request of the ring per fd would keep the socket open in the kernel.
    def add_reader(self, fd: Any, callback: Callable[..., Any], *args: Any) -> None:
        self._add_watch(_fileno(fd), 0, callback, args)

    def remove_reader(self, fd: Any) -> bool:
        return self._remove_watch(_fileno(fd), 0)

    def add_writer(self, fd: Any, callback: Callable[..., Any], *args: Any) -> None:
        self._add_watch(_fileno(fd), 1, callback, args)

    def remove_writer(self, fd: Any) -> bool:
        return self._remove_watch(_fileno(fd), 1)

    _add_reader = add_reader
    _remove_reader = remove_reader
    _add_writer = add_writer
    _remove_writer = remove_writer

    @staticmethod
    def _watch_mask(ent: list) -> int:
        return (select.EPOLLIN if ent[0] is not None else 0) | \
               (select.EPOLLOUT if ent[1] is not None else 0)

    def _add_watch(self, fd: int, which: int, callback: Callable[..., Any],
                   args: tuple) -> None:
        self._check_closed()
        if self._epoll is None:
            self._epoll = select.epoll()
        handle = asyncio.Handle(callback, args, self, None)
        ent = self._watches.get(fd)
        new = ent is None
        if new:
            ent = [None, None]
        old = ent[which]
        ent[which] = handle
        mask = self._watch_mask(ent)
        try:
            if new:
                self._epoll.register(fd, mask)
            else:
                try:
                    self._epoll.modify(fd, mask)
                except FileNotFoundError:        # closed and reused since: register anew
                    self._epoll.register(fd, mask)
        except BaseException:
            ent[which] = old
            raise
        self._watches[fd] = ent
        if old is not None:
            old.cancel()
        self._arm_epoll()

    def _remove_watch(self, fd: int, which: int) -> bool:
        ent = self._watches.get(fd)
        if ent is None or ent[which] is None:
            return False
        ent[which].cancel()
        ent[which] = None
        mask = self._watch_mask(ent)
        try:
            if mask:
                self._epoll.modify(fd, mask)
            else:
                del self._watches[fd]
                self._epoll.unregister(fd)
        except (OSError, ValueError):
            pass                                 # already gone with the fd
        return True

    def _arm_epoll(self) -> None:
        """Keep one poll request on the epoll fd while anything is watched (re-armed at
        each turn, after the callbacks of the last readiness have run)."""
        if self._epoll_op is None and self._watches and self._epoll is not None:
            self._epoll_op = self._ring().poll(self._epoll.fileno(), select.POLLIN,
                                               self._epoll_ready)

    def _epoll_ready(self, op: Any) -> None:
        self._epoll_op = None
        if op.exception() is not None:
            return                               # cancelled: the loop is closing
        watches = self._watches
        for fd, ev in self._epoll.poll(0):       # level-triggered, like a selector
            ent = watches.get(fd)
            if ent is None:
                continue
            if ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR) and ent[0] is not None:
                self._add_callback(ent[0])
            if ev & (select.EPOLLOUT | select.EPOLLHUP | select.EPOLLERR) and ent[1] is not None:
                self._add_callback(ent[1])


async def _await_op(fut: asyncio.Future, op: Any) -> Any:
    """Await an op's future; if the awaiting task is cancelled, cancel the op too (its
    buffers stay with the op until the kernel's final completion)."""
    try:
        return await fut
    except asyncio.CancelledError:
        op.cancel()
        raise


def _fileno(fd: Any) -> int:
    if isinstance(fd, int):
        return fd
    return int(fd.fileno())


_px_send: Any = None


def new_event_loop(**engine_options: Any) -> asyncio.AbstractEventLoop:
    """A :class:`ProactorEventLoop` where io_uring works, else asyncio's own loop (the
    reason is logged once, as for engines)."""
    from ._select import choose

    if choose(instead="asyncio's own event loop").backend == "uring":
        return ProactorEventLoop(**engine_options)
    return asyncio.new_event_loop()


class EventLoopPolicy(asyncio.DefaultEventLoopPolicy):
    """``asyncio.set_event_loop_policy(proactor.EventLoopPolicy())``."""

    def _loop_factory(self) -> asyncio.AbstractEventLoop:  # type: ignore[override]
        return new_event_loop()


def install() -> None:
    """Make proactor's loop asyncio's default (like ``uvloop.install()``)."""
    asyncio.set_event_loop_policy(EventLoopPolicy())


def run(main: Any, *, debug: Optional[bool] = None) -> Any:
    """``asyncio.run(main)`` on proactor's loop."""
    if hasattr(asyncio, "Runner"):
        with asyncio.Runner(loop_factory=new_event_loop, debug=debug) as runner:
            return runner.run(main)
    old = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(EventLoopPolicy())
    try:
        return asyncio.run(main, debug=debug)
    finally:
        asyncio.set_event_loop_policy(old)

