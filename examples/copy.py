"""Copy a file through io_uring, with QUEUE_DEPTH blocks in flight in registered buffers.

usage: python examples/copy.py SRC DST [--queue-depth N] [--block-size B] [--backend B]

Each of the N registered buffers carries one block at a time: ``read_fixed`` the block
into buffer i, then ``write_fixed`` the bytes read from buffer i at the same offset in DST,
then take the next block. Short reads and short writes continue where they stopped; a
read that returns 0 before the block is complete means SRC shrank while being copied:
the copy stops there (DST ends where SRC's data ended).

DST is created or truncated (mode 0666 & ~umask); nothing else (mode, times, owner) is
preserved. All the I/O is issued on the engine's thread, from completion callbacks.

:func:`copy_file` is the reusable part: it can be started from any thread, on an engine
that runs (``start()``) or is about to (``run()``).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Run as a script, this file's directory comes first on sys.path and the file would
    # shadow the standard library's ``copy`` module for everything imported below.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402
import errno  # noqa: E402
import mmap  # noqa: E402
import stat  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import proactor  # noqa: E402

DEFAULT_QUEUE_DEPTH = 32
DEFAULT_BLOCK_SIZE = 128 * 1024
MAX_BLOCK_SIZE = 1 << 30          # one read/write SQE carries at most an unsigned length
MAX_QUEUE_DEPTH = 16384           # io_uring's limit on registered buffers

#: ``done_callback(exc, nbytes)``: ``exc`` is None on success, else the ``OSError``.
DoneCallback = Callable[[Optional[BaseException], int], Any]


def _error(e: BaseException, what: str, path: Any) -> BaseException:
    """An OSError that says what failed and on which file, keeping the errno."""
    if isinstance(e, OSError) and e.errno:
        return OSError(e.errno, f"{what}: {os.strerror(e.errno)}", os.fsdecode(path))
    return e


class FileCopy:
    """One copy in progress; made and started by :func:`copy_file`.

    After ``done_callback`` has run: ``copied`` (bytes in DST), ``size`` (SRC's size at
    the start), ``shrunk`` (SRC ended early), ``error`` (None or the exception).
    """

    def __init__(self, engine: Any, src: Any, dst: Any, queue_depth: int, block_size: int,
                 done_callback: DoneCallback) -> None:
        if not 1 <= queue_depth <= MAX_QUEUE_DEPTH:
            raise ValueError(f"queue_depth must be in 1..{MAX_QUEUE_DEPTH}")
        if not 1 <= block_size <= MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be in 1..{MAX_BLOCK_SIZE}")
        self.engine = engine
        self.src = src
        self.dst = dst
        self.queue_depth = queue_depth
        self.block_size = block_size
        self._done_cb = done_callback
        self.src_fd = -1
        self.dst_fd = -1
        self.size = 0                 # SRC's size when opened: what we copy
        self.end = 0                  # where the copy ends (lowered if SRC shrinks)
        self.copied = 0
        self.shrunk = False
        self.error: Optional[BaseException] = None
        self.finished = False
        self._next = 0                # file offset of the next block to start
        self._active = 0              # slots with an op in flight
        self._registered = False
        self._dst_regular = False
        self._mem: Any = None
        # per slot: [block offset, block length, bytes read, bytes written]
        self._slots: list[list[int]] = []
        self._read_cbs: list = []
        self._write_cbs: list = []

    # ------------------------------------------------------------------ opening
    def start(self) -> None:
        """Runs on the engine's thread: open SRC, then DST."""
        self.engine.openat(self.src, os.O_RDONLY, 0, self._src_opened)

    def _src_opened(self, op: Any) -> None:
        try:
            self.src_fd = op.result()
        except OSError as e:
            return self._finish(_error(e, "cannot open source", self.src))
        try:
            st = os.fstat(self.src_fd)
        except OSError as e:
            return self._finish(_error(e, "cannot stat source", self.src))
        if stat.S_ISDIR(st.st_mode):
            return self._finish(OSError(errno.EISDIR, "source is a directory",
                                        os.fsdecode(self.src)))
        if not stat.S_ISREG(st.st_mode):
            return self._finish(OSError(errno.EINVAL, "source is not a regular file",
                                        os.fsdecode(self.src)))
        self.size = self.end = st.st_size
        self._src_stat = st
        # No O_TRUNC yet: if DST is SRC (or a link to it), truncating would destroy it.
        self.engine.openat(self.dst, os.O_WRONLY | os.O_CREAT, 0o666, self._dst_opened)

    def _dst_opened(self, op: Any) -> None:
        try:
            self.dst_fd = op.result()
        except OSError as e:
            return self._finish(_error(e, "cannot open destination", self.dst))
        try:
            st = os.fstat(self.dst_fd)
            if (st.st_dev, st.st_ino) == (self._src_stat.st_dev, self._src_stat.st_ino):
                return self._finish(OSError(errno.EINVAL, "source and destination are the "
                                            "same file", os.fsdecode(self.dst)))
            self._dst_regular = stat.S_ISREG(st.st_mode)
            # Truncate only what has data (not /dev/null, not a file we just created):
            # on ext4 a truncate to 0 also makes close() start writeback of the whole
            # file (auto_da_alloc), which would cost a new file ~0.2 s per GiB.
            if self._dst_regular and st.st_size:
                os.ftruncate(self.dst_fd, 0)
        except OSError as e:
            return self._finish(_error(e, "cannot truncate destination", self.dst))
        if self.size == 0:
            return self._finish(None)
        nblocks = -(-self.size // self.block_size)
        n = min(self.queue_depth, nblocks)
        bs = self.block_size
        self._mem = mmap.mmap(-1, n * bs)          # page-aligned, one mapping for all
        view = memoryview(self._mem)
        try:
            self.engine.register_buffers([view[i * bs:(i + 1) * bs] for i in range(n)])
        except OSError as e:
            hint = " (RLIMIT_MEMLOCK? try a smaller --queue-depth/--block-size)" \
                if e.errno in (errno.ENOMEM, errno.EPERM) else ""
            return self._finish(OSError(e.errno, f"cannot register {n} buffers of {bs} "
                                        f"bytes: {os.strerror(e.errno or 0)}{hint}"))
        self._registered = True
        self._slots = [[0, 0, 0, 0] for _ in range(n)]
        self._read_cbs = [self._make_read_cb(i) for i in range(n)]
        self._write_cbs = [self._make_write_cb(i) for i in range(n)]
        for i in range(n):
            self._start_block(i)
        if self._active == 0:
            self._finish(self.error)

    # ------------------------------------------------------------------ the blocks

    def _start_block(self, i: int) -> bool:
        """Give slot ``i`` the next block; False when there is none left."""
        off = self._next
        if self.error is not None or off >= self.end:
            return False
        length = min(self.block_size, self.end - off)
        self._next = off + length
        s = self._slots[i]
        s[0] = off
        s[1] = length
        s[2] = s[3] = 0
        self._active += 1
        self._read(i)
        return True

    def _read(self, i: int) -> None:
        """Read the rest of slot ``i``'s block into its buffer."""
        s = self._slots[i]
        got = s[2]
        self.engine.read_fixed(self.src_fd, i, s[1] - got, s[0] + got, self._read_cbs[i],
                               buf_offset=got)

    def _write(self, i: int) -> None:
        """Write what slot ``i`` has read and not yet written."""
        s = self._slots[i]
        put = s[3]
        self.engine.write_fixed(self.dst_fd, i, s[2] - put, s[0] + put, self._write_cbs[i],
                                buf_offset=put)

    def _make_read_cb(self, i: int) -> Callable[[Any], None]:
        s = self._slots[i]
        read = self._read
        write = self._write

        def on_read(op: Any) -> None:
            try:
                n = op.result()
            except OSError as e:
                return self._slot_failed(_error(e, "read error on", self.src))
            if self.error is not None:
                return self._slot_idle()
            if n == 0:                          # SRC shrank: the copy ends here
                end = s[0] + s[2]
                if end < self.end:
                    self.end = end
                    self.shrunk = True
                if s[2] == 0:
                    return self._slot_idle()
                s[1] = s[2]                     # write what we have, then stop
            else:
                s[2] += n
                if s[2] < s[1]:                 # short read: read the rest
                    return read(i)
            write(i)

        return on_read

    def _make_write_cb(self, i: int) -> Callable[[Any], None]:
        s = self._slots[i]
        write = self._write

        def on_write(op: Any) -> None:
            try:
                n = op.result()
            except OSError as e:
                return self._slot_failed(_error(e, "write error on", self.dst))
            if n == 0:                          # no progress: never loop on it
                return self._slot_failed(OSError(errno.EIO, "write error on: wrote 0 bytes",
                                                 os.fsdecode(self.dst)))
            s[3] += n
            if s[3] < s[2]:                     # short write: write the rest
                if self.error is not None:
                    return self._slot_idle()
                return write(i)
            self.copied += s[3]
            self._active -= 1
            if not self._start_block(i) and self._active == 0:
                self._finish(self.error)

        return on_write

    def _slot_idle(self) -> None:
        self._active -= 1
        if self._active == 0:
            self._finish(self.error)

    def _slot_failed(self, exc: BaseException) -> None:
        if self.error is None:
            self.error = exc                    # no new blocks; in-flight ones drain
        self._slot_idle()

    # ------------------------------------------------------------------ the end
    def _finish(self, exc: Optional[BaseException]) -> None:
        if self.finished:
            return
        self.finished = True
        if exc is None and self.error is not None:
            exc = self.error
        if exc is None and self.shrunk and self._dst_regular:
            # blocks past the new end may have been read before SRC shrank: cut them off
            try:
                os.ftruncate(self.dst_fd, self.end)
            except OSError as e:
                exc = _error(e, "cannot truncate destination", self.dst)
            self.copied = min(self.copied, self.end)
        if self._registered:
            self._registered = False
            try:
                self.engine.unregister_buffers()
            except (OSError, RuntimeError) as e:   # pragma: no cover - nothing in flight
                exc = exc or e
        for attr, path in (("src_fd", self.src), ("dst_fd", self.dst)):
            fd = getattr(self, attr)
            if fd >= 0:
                setattr(self, attr, -1)
                try:
                    os.close(fd)                # after the last op on it has completed
                except OSError as e:
                    if exc is None:             # e.g. a deferred write error on close
                        exc = _error(e, "cannot close", path)
        self.error = exc
        self._done_cb(exc, self.copied)


def copy_file(engine: Any, src: Any, dst: Any, queue_depth: int = DEFAULT_QUEUE_DEPTH,
              block_size: int = DEFAULT_BLOCK_SIZE,
              done_callback: Optional[DoneCallback] = None) -> FileCopy:
    """Copy ``src`` to ``dst`` on ``engine``; ``done_callback(exc, nbytes)`` runs on the
    engine's thread at the end (``exc`` None on success, else an ``OSError`` whose errno
    and filename say what went wrong). Callable from any thread, before or after the
    engine starts running. Uses the engine's registered buffers for the duration of the
    copy, so only one copy may run on an engine at a time (others fail with EBUSY).
    """
    c = FileCopy(engine, src, dst, queue_depth, block_size,
                 done_callback or (lambda exc, n: None))
    engine.call_soon(c.start)
    return c


def _size(text: str) -> int:
    """``131072``, ``128k``, ``1M``..."""
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = 1
    if t and t[-1] in "kmg":
        mult = 1024 ** ("kmg".index(t[-1]) + 1)
        t = t[:-1]
    try:
        return int(t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from None


def main(argv: Optional[list] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--queue-depth", type=int, default=DEFAULT_QUEUE_DEPTH,
                   help=f"blocks in flight (default {DEFAULT_QUEUE_DEPTH})")
    p.add_argument("--block-size", type=_size, default=DEFAULT_BLOCK_SIZE,
                   help=f"bytes per block, e.g. 128k (default {DEFAULT_BLOCK_SIZE})")
    p.add_argument("--backend", default=None, choices=["auto", "uring", "trio"],
                   help="engine backend (default: $PROACTOR_BACKEND or auto)")
    a = p.parse_args(argv)
    if not 1 <= a.queue_depth <= MAX_QUEUE_DEPTH:
        p.error(f"--queue-depth must be in 1..{MAX_QUEUE_DEPTH}")
    if not 1 <= a.block_size <= MAX_BLOCK_SIZE:
        p.error(f"--block-size must be in 1..{MAX_BLOCK_SIZE}")
    prog = os.path.basename(sys.argv[0]) if argv is None else "copy.py"
    try:
        engine = proactor.Engine(backend=a.backend)
    except (OSError, ValueError) as e:
        print(f"{prog}: cannot start the engine: {e}", file=sys.stderr)
        return 1
    outcome: dict = {}

    def done(exc: Optional[BaseException], nbytes: int) -> None:
        outcome["t1"] = time.perf_counter()
        outcome["exc"] = exc
        outcome["n"] = nbytes
        engine.stop()

    t0 = time.perf_counter()
    copy_file(engine, a.src, a.dst, a.queue_depth, a.block_size, done)
    engine.run()
    if "exc" not in outcome:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    exc = outcome["exc"]
    if exc is not None:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    n = outcome["n"]
    dt = max(outcome["t1"] - t0, 1e-9)
    print(f"copied {n} bytes in {dt:.2f} s ({n / dt / 1e6:.1f} MB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
