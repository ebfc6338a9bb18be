"""conn.sendfile: file bytes queued in order with sends, read when the queue reaches them."""
from __future__ import annotations

import errno
import os
import random
import threading

import pytest
from support import connect, factory_collecting, recv_exactly, recv_until_eof, wait_until

import proactor

pytestmark = [pytest.mark.linux, pytest.mark.timeout(60)]

WORKERS = [pytest.param(0, id="workers0"), pytest.param(2, id="workers2")]


@pytest.fixture
def data_file(tmp_path):
    rng = random.Random(7)
    body = rng.randbytes(3 * 1024 * 1024 + 17)
    p = tmp_path / "data.bin"
    p.write_bytes(body)
    return p, body


class FileSender(proactor.Handler):
    """For each line "OFFSET COUNT\\n": sends "<", the file's bytes, ">"."""

    path = ""

    def __init__(self) -> None:
        self.buf = b""
        self.lost = threading.Event()
        self.exc = None

    def data_received(self, conn, data):
        self.buf += data
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            off, count = (int(x) for x in line.split())
            conn.send(b"<")
            with open(self.path, "rb") as f:   # closed at once: the engine has its own fd
                conn.sendfile(f, off, None if count < 0 else count)
            conn.send(b">")

    def connection_lost(self, conn, exc):
        self.exc = exc
        self.lost.set()


@pytest.mark.parametrize("workers", WORKERS)
def test_sendfile_ranges_in_order(engine, data_file, workers):
    path, body = data_file
    FileSender.path = str(path)
    srv = engine.serve_tcp(FileSender, "127.0.0.1", 0, workers=workers)
    cases = [(0, 1), (0, 4096), (5, 4095), (100, 128 * 1024 + 1), (0, -1),
             (len(body) - 3, 3), (12345, 1 << 20), (7, 0)]
    with connect(("127.0.0.1", srv.port)) as s:
        # all requests at once: the replies (bytes and file parts) queue up together
        s.sendall(b"".join(f"{o} {c}\n".encode() for o, c in cases))
        for off, count in cases:
            want = body[off:] if count < 0 else body[off:off + count]
            got = recv_exactly(s, len(want) + 2)
            assert got[:1] == b"<" and got[-1:] == b">", (off, count)
            assert got[1:-1] == want, (off, count)


def test_sendfile_uncached_file(engine, data_file):
    """The file's pages are dropped from the page cache first: the ring reads them."""
    path, body = data_file
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    FileSender.path = str(path)
    srv = engine.serve_tcp(FileSender, "127.0.0.1", 0)
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(b"0 -1\n")
        assert recv_exactly(s, len(body) + 2) == b"<" + body + b">"


def test_sendfile_counts_in_write_buffer_and_drains(engine, data_file):
    path, body = data_file
    seen = {}
    done = threading.Event()

    class H(proactor.Handler):
        def connection_made(self, conn):
            with open(path, "rb") as f:
                conn.sendfile(f.fileno())
            seen["queued"] = conn.get_write_buffer_size()
            conn.when_drained(done.set)

    srv = engine.serve_tcp(H, "127.0.0.1", 0)
    with connect(("127.0.0.1", srv.port), rcvbuf=4096) as s:
        wait_until(lambda: "queued" in seen)
        # the client reads nothing yet: most of the file must still be queued
        assert seen["queued"] >= len(body) - (1 << 20)
        assert not done.is_set()
        assert recv_exactly(s, len(body)) == body
        assert done.wait(10)


def test_sendfile_short_file_fails_connection(engine, tmp_path):
    p = tmp_path / "short.bin"
    p.write_bytes(b"x" * 1000)
    handlers = []

    class H(FileSender):
        path = str(p)

    srv = engine.serve_tcp(factory_collecting(H, handlers), "127.0.0.1", 0)
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(b"0 5000\n")
        got = recv_until_eof(s)
        assert len(got) <= 1001      # "<" and at most the 1000 bytes; never ">"
        assert not got.endswith(b">")
    assert handlers[0].lost.wait(10)
    exc = handlers[0].exc
    assert isinstance(exc, OSError) and exc.errno == errno.ENODATA, exc
    assert "sendfile" in str(exc)


def test_sendfile_refuses_bad_arguments(engine, tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    errors = []
    done = threading.Event()

    class H(proactor.Handler):
        def connection_made(self, conn):
            r, w = os.pipe()
            try:
                for args in ((r,), (str(p),), (os.open(p, os.O_RDONLY), -1)):
                    try:
                        conn.sendfile(*args)
                    except Exception as e:  # noqa: BLE001 - recorded for the test
                        errors.append(e)
                    finally:
                        if isinstance(args[0], int) and args[0] not in (r, w):
                            os.close(args[0])
            finally:
                os.close(r)
                os.close(w)
            conn.close()
            with open(p, "rb") as f:
                try:
                    conn.sendfile(f)
                except OSError as e:
                    errors.append(e)
            done.set()

    srv = engine.serve_tcp(H, "127.0.0.1", 0)
    with connect(("127.0.0.1", srv.port)) as s:
        assert done.wait(10)
        assert recv_until_eof(s) == b""
    assert isinstance(errors[0], OSError) and errors[0].errno == errno.EINVAL
    assert isinstance(errors[1], AttributeError)          # a path is not a file
    assert isinstance(errors[2], ValueError)
    assert len(errors) == 3                  # after close(): dropped, not raised


def test_sendfile_aborted_midway_releases_file(engine, data_file):
    """An abort while a file is queued: its fd is closed (the fixture checks fds)."""
    path, body = data_file
    conns = []

    class H(proactor.Handler):
        def connection_made(self, conn):
            for _ in range(3):
                with open(path, "rb") as f:
                    conn.sendfile(f)
            conns.append(conn)

    srv = engine.serve_tcp(H, "127.0.0.1", 0)
    with connect(("127.0.0.1", srv.port), rcvbuf=4096) as s:
        wait_until(lambda: conns)
        assert len(s.recv(1000)) > 0
        conns[0].abort()
        wait_until(lambda: conns[0].closed)


def test_sendfile_refuses_write_only_fd_and_huge_count(engine, tmp_path):
    p = tmp_path / "f"
    p.write_bytes(b"abc")
    errors = []
    done = threading.Event()

    class H(proactor.Handler):
        def connection_made(self, conn):
            wfd = os.open(p, os.O_WRONLY)
            try:
                try:
                    conn.sendfile(wfd)
                except OSError as e:
                    errors.append(e)
            finally:
                os.close(wfd)
            with open(p, "rb") as f:
                try:
                    conn.sendfile(f, 1, (1 << 63) - 1)
                except ValueError as e:
                    errors.append(e)
            conn.send(b"ok")
            conn.close()
            done.set()

    srv = engine.serve_tcp(H, "127.0.0.1", 0)
    with connect(("127.0.0.1", srv.port)) as s:
        assert done.wait(10)
        assert recv_until_eof(s) == b"ok"
    assert isinstance(errors[0], OSError) and errors[0].errno == errno.EBADF
    assert isinstance(errors[1], ValueError)


EMFILE_SCRIPT = r"""
import errno, os, resource, socket, sys, threading
import proactor
out = {}
done = threading.Event()

class H(proactor.Handler):
    def connection_made(self, conn):
        fds = [os.open(sys.argv[2], os.O_RDONLY)]      # the file, then nothing free
        try:
            while True:
                fds.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        try:
            conn.send(b"<")
            try:
                conn.sendfile(fds[0])
            except OSError as e:
                out["err"] = e.errno
        finally:
            for fd in fds:
                os.close(fd)
        conn.send(b">")
        conn.close()
        done.set()

resource.setrlimit(resource.RLIMIT_NOFILE, (256, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
eng = proactor.Engine(backend=sys.argv[1])
eng.start()
srv = eng.serve_tcp(H, "127.0.0.1", 0)
with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
    done.wait(10)
    data = b""
    while True:
        b = s.recv(4096)
        if not b:
            break
        data += b
eng.close()
print(out.get("err"), data)
"""


def test_sendfile_without_free_fds_raises_and_queues_nothing(backend, tmp_path):
    """EMFILE: sendfile raises, nothing of the file is queued, the stream stays intact."""
    import subprocess
    import sys
    p = tmp_path / "f"
    p.write_bytes(b"x" * 100)
    r = subprocess.run([sys.executable, "-c", EMFILE_SCRIPT, backend, str(p)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(errno.EMFILE), "b'<>'"], (r.stdout, r.stderr)
