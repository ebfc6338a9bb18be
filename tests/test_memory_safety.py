"""A buffer handed to the kernel stays referenced until its op's final completion, whatever
the caller does meanwhile: drop it, cancel the op, or close the engine.

``Buf`` (a bytearray subclass) supports weak references: the tests drop every strong
reference they hold, collect, and watch the weak reference.
"""
from __future__ import annotations

import errno
import gc
import os
import random
import threading
import weakref

import pytest
from support import fill_pipe, wait_until

pytestmark = [pytest.mark.linux, pytest.mark.timeout(60)]


class Buf(bytearray):
    pass


class Watch:
    """The callback of the op under test: records whether the buffer was alive when the
    callback ran, and what it held then."""

    def __init__(self, ref: weakref.ref) -> None:
        self.ref = ref
        self.done = threading.Event()
        self.runs = 0
        self.alive_in_callback = None
        self.content_in_callback = None
        self.exc = None
        self.value = None

    def __call__(self, op) -> None:
        self.runs += 1
        buf = self.ref()
        self.alive_in_callback = buf is not None
        if buf is not None:
            self.content_in_callback = bytes(buf)
        del buf
        self.exc = op.exception()
        if self.exc is None:
            self.value = op.result()
        self.done.set()


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    os.close(r)
    os.close(w)


def start_readinto(engine, fd, size=4096):
    buf = Buf(size)
    ref = weakref.ref(buf)
    watch = Watch(ref)
    engine.readinto(fd, buf, -1, watch)
    return ref, watch           # no strong reference to the buffer or the op leaves


def assert_pinned(ref, engine, n=1):
    wait_until(lambda: engine.stats().pinned_objects == n, message="the op to be pinned")
    gc.collect()
    assert ref() is not None, "the buffer was freed while the kernel may still write to it"


def assert_released(ref):
    def dead():
        gc.collect()
        return ref() is None
    wait_until(dead, timeout=5, message="the buffer to be released after the completion")


def test_readinto_buffer_kept_until_data_arrives(engine, pipe):
    r, w = pipe
    ref, watch = start_readinto(engine, r)
    assert_pinned(ref, engine)
    os.write(w, b"hello kernel")
    assert watch.done.wait(10)
    assert watch.value == 12
    assert_released(ref)
    assert engine.stats().pinned_objects == 0
    assert watch.alive_in_callback, "buffer already gone when the callback ran"
    assert watch.content_in_callback[:12] == b"hello kernel"


def test_readinto_buffer_kept_until_cancel_completes(engine, pipe):
    r, w = pipe
    ref, watch = start_readinto(engine, r)
    assert_pinned(ref, engine)
    engine.cancel_fd(r)                 # the test holds no reference to the op either
    assert watch.done.wait(10)
    assert watch.runs == 1
    assert isinstance(watch.exc, OSError) and watch.exc.errno == errno.ECANCELED
    assert_released(ref)
    assert watch.alive_in_callback, "buffer already gone when the callback ran"


def test_readinto_buffer_kept_after_op_cancel(engine, pipe):
    r, w = pipe
    buf = Buf(1000)
    ref = weakref.ref(buf)
    watch = Watch(ref)
    op = engine.readinto(r, buf, -1, watch)
    del buf
    assert_pinned(ref, engine)
    op.cancel()
    del op
    assert watch.done.wait(10)
    assert watch.exc.errno == errno.ECANCELED
    assert_released(ref)
    assert watch.alive_in_callback, "buffer already gone when the callback ran"


def test_readinto_buffer_kept_across_engine_close(make_engine, pipe):
    engine = make_engine()
    r, w = pipe
    ref, watch = start_readinto(engine, r)
    assert_pinned(ref, engine)
    engine.close()
    assert watch.done.wait(10), "the op's callback did not run at close"
    assert watch.runs == 1
    assert watch.exc.errno == errno.ECANCELED
    assert_released(ref)
    assert engine.stats().pinned_objects == 0
    assert watch.alive_in_callback, "buffer already gone when the callback ran"


def drain(fd: int, want: int, stop: threading.Event) -> bytes:
    """Read from blocking pipe ``fd`` until ``want`` bytes or ``stop`` and nothing left."""
    os.set_blocking(fd, False)
    out = bytearray()
    try:
        while True:
            try:
                b = os.read(fd, 1 << 16)
            except BlockingIOError:
                if stop.is_set() or len(out) >= want:
                    return bytes(out)
                stop.wait(0.001)
                continue
            out += b
    finally:
        os.set_blocking(fd, True)


def test_write_source_kept_until_completion(engine, pipe):
    """A large write into a full pipe: the source buffer stays alive while the write
    waits, and the bytes that reach the pipe are the buffer's."""
    r, w = pipe
    prefill = fill_pipe(w)
    os.set_blocking(w, True)
    data = random.Random(8).randbytes(1 << 20)
    buf = Buf(data)
    ref = weakref.ref(buf)
    watch = Watch(ref)
    engine.write(w, buf, -1, watch)
    del buf
    assert_pinned(ref, engine)
    assert not watch.done.is_set()
    got = drain(r, prefill + 1, watch.done)   # make room: the write goes on
    assert watch.done.wait(10)
    assert watch.exc is None, watch.exc
    n = watch.value
    assert 0 < n <= len(data)
    got += drain(r, 0, watch.done)
    assert len(got) == prefill + n
    assert got[prefill:] == data[:n], "the pipe got other bytes than the buffer's"
    assert_released(ref)
    assert watch.alive_in_callback, "buffer already gone when the callback ran"


def test_write_source_kept_across_engine_close(make_engine, pipe):
    engine = make_engine()
    r, w = pipe
    fill_pipe(w)
    os.set_blocking(w, True)
    buf = Buf(random.Random(9).randbytes(1 << 20))
    ref = weakref.ref(buf)
    watch = Watch(ref)
    engine.write(w, buf, -1, watch)
    del buf
    assert_pinned(ref, engine)
    engine.close()
    assert watch.done.wait(10)
    assert watch.runs == 1
    assert watch.exc is not None and watch.exc.errno == errno.ECANCELED
    assert_released(ref)
    assert watch.alive_in_callback, "buffer already gone when the callback ran"


def test_many_dropped_buffers_survive_gc_pressure(engine, pipe):
    """Many reads in flight on one pipe, every buffer dropped, lots of garbage made; then
    data arrives: each completed read holds exactly the bytes written for it."""
    r, w = pipe
    watches = []
    refs = []
    for _ in range(50):
        ref, watch = start_readinto(engine, r, size=8)
        refs.append(ref)
        watches.append(watch)
    assert_pinned(refs[0], engine, n=50)
    junk = [bytearray(8) for _ in range(100_000)]   # reuse freed memory if it were freed
    del junk
    gc.collect()
    assert all(ref() is not None for ref in refs)
    for i in range(50):
        os.write(w, b"%08d" % i)
        wait_until(lambda: sum(x.done.is_set() for x in watches) == i + 1, timeout=10)
    assert [x.runs for x in watches] == [1] * 50
    assert [x.value for x in watches] == [8] * 50
    for ref in refs:
        assert_released(ref)
    assert all(x.alive_in_callback for x in watches), "buffers gone when the callbacks ran"
    contents = sorted(x.content_in_callback for x in watches)
    assert contents == [b"%08d" % i for i in range(50)]
