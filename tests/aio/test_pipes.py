"""Pipes: connect_read_pipe / connect_write_pipe over os.pipe() (feature "pipes")."""
from __future__ import annotations

import asyncio
import gc
import os
import threading
import warnings

import pytest

from .utils import MiB, payload, requires, run

pytestmark = pytest.mark.timeout(60)


class ReadPipeProto(asyncio.Protocol):
    def __init__(self, loop):
        self.data = bytearray()
        self.eof = False
        self.done = loop.create_future()

    def data_received(self, data):
        self.data += data

    def eof_received(self):
        self.eof = True

    def connection_lost(self, exc):
        self.done.set_result(exc)


def test_read_pipe(loop):
    requires(loop, "pipes")
    data = payload(1 * MiB + 9)

    async def main():
        r, w = os.pipe()
        rfile = os.fdopen(r, "rb", buffering=0)
        try:
            tr, proto = await loop.connect_read_pipe(lambda: ReadPipeProto(loop), rfile)
        except BaseException:
            rfile.close()
            os.close(w)
            raise

        def write_all():
            with os.fdopen(w, "wb", buffering=0) as f:
                f.write(data)

        t = threading.Thread(target=write_all)
        t.start()
        try:
            assert await proto.done is None
        finally:
            await loop.run_in_executor(None, t.join, 10)
        assert proto.eof
        assert proto.data == data
        assert tr.is_closing()
        assert rfile.closed                   # the transport closed the pipe end

    run(loop, main())


def test_write_pipe(loop):
    requires(loop, "pipes")
    data = payload(1 * MiB + 9)

    async def main():
        r, w = os.pipe()
        wfile = os.fdopen(w, "wb", buffering=0)
        lost = loop.create_future()

        class Proto(asyncio.BaseProtocol):
            def connection_lost(self, exc):
                lost.set_result(exc)

        try:
            tr, _ = await loop.connect_write_pipe(Proto, wfile)
        except BaseException:
            wfile.close()
            os.close(r)
            raise

        def read_all():
            with os.fdopen(r, "rb", buffering=0) as f:
                out = bytearray()
                while chunk := f.read(1 << 16):
                    out += chunk
                return bytes(out)

        reader = loop.run_in_executor(None, read_all)
        tr.write(data)
        tr.write(b"tail")
        assert tr.can_write_eof()
        tr.write_eof()
        assert await reader == data + b"tail"
        assert await lost is None

    run(loop, main())


def test_pipe_pair_read_and_write(loop):
    requires(loop, "pipes")

    async def main():
        r, w = os.pipe()
        rfile, wfile = os.fdopen(r, "rb", buffering=0), os.fdopen(w, "wb", buffering=0)
        rtr, rproto = await loop.connect_read_pipe(lambda: ReadPipeProto(loop), rfile)
        wtr, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, wfile)
        for i in range(100):
            wtr.write(b"%d," % i)
        wtr.close()
        await rproto.done
        assert rproto.data == b"".join(b"%d," % i for i in range(100))
        rtr.close()

    run(loop, main())


def test_pipe_transport_repr_while_running_and_after_close(loop):
    """A pipe transport's repr says what the loop does with its fd: 'polling' while its
    reader is registered, 'idle' otherwise, and 'open' (not 'polling') once the loop is
    closed, as with asyncio's loop (CPython's test_unclosed_pipe_transport)."""
    requires(loop, "pipes")
    r, w = os.pipe()
    rfile = os.fdopen(r, "rb", buffering=0)
    wfile = os.fdopen(w, "wb", buffering=0)

    async def main():
        rtr, _ = await loop.connect_read_pipe(lambda: ReadPipeProto(loop), rfile)
        wtr, _ = await loop.connect_write_pipe(asyncio.Protocol, wfile)
        return rtr, wtr

    rtr, wtr = run(loop, main())
    assert "polling" in repr(rtr), repr(rtr)
    assert "idle" in repr(wtr), repr(wtr)
    rtr.pause_reading()
    assert "idle" in repr(rtr), repr(rtr)
    rtr.resume_reading()
    loop.close()
    assert "open" in repr(rtr) and "polling" not in repr(rtr), repr(rtr)
    assert "open" in repr(wtr) and "polling" not in repr(wtr), repr(wtr)
    # unclosed on a closed loop: collecting them warns and closes the pipe ends
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        del rtr, wtr
        gc.collect()
    assert rfile.closed and wfile.closed
