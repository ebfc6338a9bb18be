"""Helpers shared by the engine tests (imported by conftest.py and the test modules).

Everything here is plain blocking/non-blocking ``socket`` code on loopback addresses:
the engine under test runs on its own thread, the test thread is an ordinary client.
At the end: stand-ins for the raw syscalls of :func:`proactor._diagnose.probe`.
"""
from __future__ import annotations

import ctypes
import errno
import os
import selectors
import socket
import threading
import time
from typing import Any, Callable, Iterable, Optional

import proactor
from proactor import _diagnose

#: Default per-socket timeout of the test clients (seconds).
CLIENT_TIMEOUT = 20.0

#: What a backend has beyond the common API; tests check these only where present (a
#: backend not listed has none of them, so adding a backend needs no entry here).
FEATURES = {"uring": {"buffer_pool", "linked_timeout_requests"}}


def has_feature(backend: str, feature: str) -> bool:
    return feature in FEATURES.get(backend, ())


def wait_until(predicate: Callable[[], Any], timeout: float = 5.0, interval: float = 0.005,
               message: str = "") -> Any:
    """Poll ``predicate()`` until it is truthy; return its value or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for "
                                 f"{message or getattr(predicate, '__name__', predicate)}")
        time.sleep(interval)


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def open_fds() -> set[int]:
    """The process's open file descriptors (the listing's own fd is dropped)."""
    fds = set()
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue          # the directory handle listdir used, already closed
        fds.add(fd)
    return fds


def fill_fd_table(held: list) -> None:
    """Open /dev/null until the fd limit is reached (EMFILE); the fds go into ``held``,
    for the caller to close."""
    while True:
        try:
            held.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as e:
            assert e.errno == errno.EMFILE, e
            return


def describe_fds(fds: Iterable[int]) -> str:
    out = []
    for fd in sorted(fds):
        try:
            out.append(f"{fd} -> {os.readlink(f'/proc/self/fd/{fd}')}")
        except OSError:
            out.append(f"{fd} -> ?")
    return ", ".join(out)


def connect(address: tuple, *, timeout: float = CLIENT_TIMEOUT, rcvbuf: Optional[int] = None,
            nodelay: bool = False) -> socket.socket:
    """A blocking client socket connected to ``address`` (127.0.0.1 or ::1 only)."""
    assert address[0] in ("127.0.0.1", "::1"), address
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if nodelay:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect(address[:2])
    except BaseException:
        s.close()
        raise
    return s


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    got = 0
    while got < n:
        b = sock.recv(min(n - got, 1 << 20))
        if not b:
            raise AssertionError(f"EOF after {got} of {n} bytes")
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


def recv_until_eof(sock: socket.socket, limit: int = 1 << 30) -> bytes:
    """Everything until EOF (a reset also ends it: what arrived before is returned)."""
    chunks = []
    total = 0
    while True:
        try:
            b = sock.recv(1 << 20)
        except ConnectionResetError:
            break
        if not b:
            break
        chunks.append(b)
        total += len(b)
        assert total <= limit, f"more than {limit} bytes"
    return b"".join(chunks)


def echo_once(address: tuple, payload: bytes = b"ping") -> None:
    with connect(address) as s:
        s.sendall(payload)
        assert recv_exactly(s, len(payload)) == payload


class _Client:
    __slots__ = ("sock", "out", "sent", "expect", "got", "half_close", "eof", "done",
                 "chunk")

    def __init__(self, sock: socket.socket, payload: bytes, half_close: bool,
                 chunk: int) -> None:
        self.sock = sock
        self.out = memoryview(payload)
        self.sent = 0
        self.expect = payload
        self.got = 0
        self.half_close = half_close
        self.eof = False
        self.done = False
        self.chunk = chunk


def run_echo_clients(address: tuple, payloads: list[bytes], *, half_close: bool = False,
                     timeout: float = 60.0, send_chunk: int = 1 << 20,
                     nodelay: bool = False) -> None:
    """Drive one client per payload with a selector on this thread: every client sends its
    payload (as fast as the server takes it, while reading at the same time, so both
    directions are busy and short sends happen) and checks that exactly the same bytes come
    back, in order. With ``half_close`` each client shuts down its write side after its last
    byte and must then see EOF after the whole echo."""
    sel = selectors.DefaultSelector()
    clients: list[_Client] = []
    deadline = time.monotonic() + timeout
    try:
        for p in payloads:
            s = connect(address, nodelay=nodelay)
            s.setblocking(False)
            c = _Client(s, p, half_close, send_chunk)
            clients.append(c)
            sel.register(s, selectors.EVENT_READ | selectors.EVENT_WRITE, c)
        remaining = len(clients)
        while remaining:
            left = deadline - time.monotonic()
            if left <= 0:
                pending = [(i, c.sent, c.got, len(c.expect)) for i, c in enumerate(clients)
                           if not c.done]
                raise AssertionError(f"echo clients timed out; (index, sent, received, "
                                     f"size) of unfinished ones: {pending[:10]} "
                                     f"({len(pending)} in all)")
            for key, mask in sel.select(min(left, 1.0)):
                c = key.data
                if mask & selectors.EVENT_WRITE and c.sent < len(c.out):
                    try:
                        n = c.sock.send(c.out[c.sent:c.sent + c.chunk])
                    except BlockingIOError:
                        n = 0
                    c.sent += n
                    if c.sent == len(c.out):
                        if c.half_close:
                            c.sock.shutdown(socket.SHUT_WR)
                        sel.modify(c.sock, selectors.EVENT_READ, c)
                if mask & selectors.EVENT_READ:
                    try:
                        data = c.sock.recv(1 << 18)
                    except BlockingIOError:
                        continue
                    if not data:
                        if c.half_close and c.got == len(c.expect):
                            c.eof = True
                            c.done = True
                            remaining -= 1
                            sel.unregister(c.sock)
                            continue
                        raise AssertionError(
                            f"client {clients.index(c)}: EOF after {c.got} of "
                            f"{len(c.expect)} bytes")
                    end = c.got + len(data)
                    if end > len(c.expect):
                        raise AssertionError(f"client {clients.index(c)}: received more than "
                                             f"it sent ({end} > {len(c.expect)})")
                    if c.expect[c.got:end] != data:
                        raise AssertionError(
                            f"client {clients.index(c)}: wrong bytes at offset {c.got} "
                            f"(+{len(data)})")
                    c.got = end
                    if c.got == len(c.expect) and not c.half_close:
                        c.done = True
                        remaining -= 1
                        sel.unregister(c.sock)
    finally:
        sel.close()
        for c in clients:
            c.sock.close()


class Echo(proactor.Handler):
    def data_received(self, conn: Any, data: bytes) -> None:
        conn.send(data)


class Recorder(proactor.Handler):
    """Echoes and records what happens to its connection (any thread)."""

    instances: list  # set per subclass by make_recorder()

    def __init__(self) -> None:
        self.conn: Any = None
        self.made = threading.Event()
        self.lost = threading.Event()
        self.lost_calls: list = []
        self.received = bytearray()
        self.eof = False

    def connection_made(self, conn: Any) -> None:
        self.conn = conn
        self.made.set()

    def data_received(self, conn: Any, data: bytes) -> None:
        self.received += data
        conn.send(data)

    def eof_received(self, conn: Any) -> None:
        self.eof = True
        conn.close()

    def connection_lost(self, conn: Any, exc: Optional[BaseException]) -> None:
        self.lost_calls.append(exc)
        self.lost.set()


def factory_collecting(cls: type, into: list) -> Callable[[], Any]:
    """A handler factory that keeps every handler it makes in ``into``."""
    def make() -> Any:
        h = cls()
        into.append(h)
        return h
    return make


class OpWaiter:
    """Runs a low-level op from the test thread and waits for its callback."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.calls: list = []
        self.thread: Optional[int] = None

    def __call__(self, op: Any) -> None:
        self.calls.append(op)
        self.thread = threading.get_ident()
        self.event.set()

    def wait(self, timeout: float = 10.0) -> Any:
        assert self.event.wait(timeout), "the op's callback did not run"
        assert len(self.calls) == 1, f"callback ran {len(self.calls)} times"
        return self.calls[0]


def run_op(start: Callable[[Callable[[Any], None]], Any], timeout: float = 10.0) -> Any:
    """``start(callback)`` submits an op; returns the op once its callback has run."""
    w = OpWaiter()
    op = start(w)
    done = w.wait(timeout)
    assert done is op
    return op


def on_engine_thread(engine: Any, fn: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Run ``fn()`` on the engine's thread; return its value or re-raise its exception."""
    box: dict = {}
    ev = threading.Event()

    def call() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test thread
            box["exc"] = e
        finally:
            ev.set()

    engine.call_soon(call)
    assert ev.wait(timeout), "the call on the engine thread did not run"
    if "exc" in box:
        raise box["exc"]
    return box["value"]


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def closed_port(host: str = "127.0.0.1") -> int:
    """A port on ``host`` where nothing listens (bound then released)."""
    return free_port(host)


def fill_pipe(wfd: int) -> int:
    """Write to non-blocking ``wfd`` until the pipe is full; return how much was written."""
    os.set_blocking(wfd, False)
    total = 0
    chunk = b"\xaa" * 65536
    while True:
        try:
            total += os.write(wfd, chunk)
        except BlockingIOError:
            return total



# ---------------------------------------------------------------------------- probe stand-ins
# Injected into proactor._diagnose.probe() to simulate kernels and policies (any OS).

def failing_setup(err: int) -> Callable[[int, int], int]:
    """An io_uring_setup that fails with ``err`` (EPERM, ENOSYS, ...)."""
    def setup(entries: int, params_address: int) -> int:
        ctypes.set_errno(err)
        return -1

    return setup


def devnull_setup(entries: int, params_address: int) -> int:
    """Pretend io_uring_setup succeeded: hand out a real fd for probe() to close."""
    return os.open(os.devnull, os.O_RDONLY)


def einval_register(fd: int, opcode: int, arg_address: int, nr_args: int) -> int:
    """An io_uring_register the kernel does not know (no provided-buffer rings)."""
    ctypes.set_errno(errno.EINVAL)
    return -1


def ok_register(fd: int, opcode: int, arg_address: int, nr_args: int) -> int:
    """An io_uring_register that accepts everything (provided-buffer rings work)."""
    return 0


def all_but(*names: str) -> Callable[[int], set[int]]:
    """A ``read_opcodes`` listing every opcode of proactor._diagnose.OPCODES but ``names``."""
    numbers = {num for name, num in _diagnose.OPCODES.items() if name not in names}

    def read_opcodes(fd: int) -> set[int]:
        return numbers

    return read_opcodes
