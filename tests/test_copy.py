"""examples/copy.py: byte-exact copies through read_fixed/write_fixed, short reads and
writes, a source that shrinks mid-copy, errors, and the script itself."""
from __future__ import annotations

import errno
import importlib.util
import os
import random
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Optional

import pytest

pytestmark = [pytest.mark.linux, pytest.mark.timeout(120)]

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "examples" / "copy.py"

# Imported under another name: as "copy" it would shadow the standard library's module.
_spec = importlib.util.spec_from_file_location("proactor_example_copy", SCRIPT)
copy_example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(copy_example)

SMALL = (4096, 8)                                     # block size, queue depth
DEFAULT = (copy_example.DEFAULT_BLOCK_SIZE, copy_example.DEFAULT_QUEUE_DEPTH)


def run_copy(engine: Any, src: Any, dst: Any, block_size: int, queue_depth: int,
             timeout: float = 60.0) -> tuple[Optional[BaseException], int, Any]:
    """Run copy_file on a started engine; (exception or None, bytes copied, the copy)."""
    done = threading.Event()
    out: dict = {}

    def on_done(exc: Optional[BaseException], n: int) -> None:
        out["exc"], out["n"] = exc, n
        out["thread"] = threading.get_ident()
        done.set()

    c = copy_example.copy_file(engine, src, dst, queue_depth, block_size, on_done)
    assert done.wait(timeout), f"copy did not finish in {timeout} s: {engine.stats()}"
    assert out["thread"] != threading.get_ident()     # ran on the engine's thread
    return out["exc"], out["n"], c


def make_file(path: Path, size: int, seed: int = 0) -> bytes:
    data = random.Random(seed * 7919 + size).randbytes(size)
    path.write_bytes(data)
    return data


def size_cases(block_size: int) -> list[int]:
    return [0, 1, block_size - 1, block_size, block_size + 1, (5 << 20) + 4321]


CASES = [pytest.param(bs, qd, n, id=f"{label}-{n}")
         for label, (bs, qd) in (("4k-x8", SMALL), ("default", DEFAULT))
         for n in size_cases(bs)]


@pytest.mark.parametrize("block_size,queue_depth,size", CASES)
def test_copy_is_byte_identical(engine, tmp_path, block_size, queue_depth, size):
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = make_file(src, size)
    exc, n, c = run_copy(engine, src, dst, block_size, queue_depth)
    assert exc is None
    assert n == size and c.copied == size and not c.shrunk
    assert dst.read_bytes() == data


def test_existing_destination_is_truncated(engine, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = make_file(src, 10000)
    dst.write_bytes(b"x" * 100000)
    exc, n, _ = run_copy(engine, src, dst, *SMALL)
    assert exc is None and n == 10000
    assert dst.read_bytes() == data


def test_copy_to_dev_null(engine, tmp_path):
    src = tmp_path / "src"
    make_file(src, 200000)
    exc, n, _ = run_copy(engine, src, os.devnull, *SMALL)
    assert exc is None and n == 200000


def test_two_copies_in_a_row_on_one_engine(engine, tmp_path):
    """The registered buffers are given back at the end, so the engine can copy again."""
    for i, size in enumerate((100000, 3 << 20)):
        src, dst = tmp_path / f"src{i}", tmp_path / f"dst{i}"
        data = make_file(src, size, seed=i)
        exc, n, _ = run_copy(engine, src, dst, *SMALL)
        assert exc is None and n == size
        assert dst.read_bytes() == data


class Chopping:
    """An engine that hands read_fixed/write_fixed fewer bytes than asked (random), so the
    copy sees short reads and short writes from the real kernel, all the time."""

    def __init__(self, engine: Any, seed: int) -> None:
        self._engine = engine
        self._rng = random.Random(seed)
        self.short_reads = self.short_writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def _cut(self, nbytes: int) -> int:
        if nbytes > 1 and self._rng.random() < 0.5:
            return self._rng.randint(1, nbytes - 1)
        return nbytes

    def read_fixed(self, fd, index, nbytes, offset, callback, **kw):
        n = self._cut(nbytes)
        self.short_reads += n < nbytes
        return self._engine.read_fixed(fd, index, n, offset, callback, **kw)

    def write_fixed(self, fd, index, nbytes, offset, callback, **kw):
        n = self._cut(nbytes)
        self.short_writes += n < nbytes
        return self._engine.write_fixed(fd, index, n, offset, callback, **kw)


@pytest.mark.parametrize("queue_depth", [1, 8])
def test_short_reads_and_writes_lose_and_duplicate_nothing(engine, tmp_path, queue_depth):
    src, dst = tmp_path / "src", tmp_path / "dst"
    size = (1 << 20) + 777
    data = make_file(src, size)
    chop = Chopping(engine, seed=queue_depth)
    exc, n, _ = run_copy(chop, src, dst, 16384, queue_depth)
    assert exc is None and n == size
    assert chop.short_reads > 10 and chop.short_writes > 10
    assert dst.read_bytes() == data


class Shrinking:
    """An engine whose first read completion truncates the source file to ``new_size``
    before the copy sees it."""

    def __init__(self, engine: Any, path: Path, new_size: int) -> None:
        self._engine = engine
        self._path = path
        self._new_size = new_size
        self._done = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def read_fixed(self, fd, index, nbytes, offset, callback, **kw):
        def cb(op):
            if not self._done:
                self._done = True
                os.truncate(self._path, self._new_size)
            callback(op)
        return self._engine.read_fixed(fd, index, nbytes, offset, cb, **kw)


def test_source_shrinking_mid_copy_stops_there(engine, tmp_path):
    bs = 4096
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = make_file(src, 10 * bs)
    new_size = bs + bs // 2               # block 1 becomes a short read, then EOF
    exc, n, c = run_copy(Shrinking(engine, src, new_size), src, dst, bs, 1)
    assert exc is None
    assert c.shrunk and n == new_size and c.size == 10 * bs
    assert dst.read_bytes() == data[:new_size]


def test_source_shrinking_with_blocks_in_flight(engine, tmp_path):
    """Blocks past the new end may have been read before the source shrank; the copy
    still ends at a point where the source ended, holding the source's bytes."""
    bs = 4096
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = make_file(src, 64 * bs)
    exc, n, c = run_copy(Shrinking(engine, src, 5 * bs + 100), src, dst, bs, 8)
    assert exc is None and c.shrunk
    out = dst.read_bytes()
    assert len(out) == n and 5 * bs + 100 <= n < 64 * bs
    assert out == data[:n]


def test_missing_source(engine, tmp_path):
    exc, n, _ = run_copy(engine, tmp_path / "nope", tmp_path / "dst", *SMALL)
    assert isinstance(exc, OSError) and exc.errno == errno.ENOENT
    assert "source" in str(exc) and "nope" in str(exc)
    assert n == 0
    assert not (tmp_path / "dst").exists()


def test_unwritable_destination(engine, tmp_path):
    src = tmp_path / "src"
    make_file(src, 1000)
    (tmp_path / "adir").mkdir()
    for dst, code in ((tmp_path / "adir", errno.EISDIR),
                      (tmp_path / "missing-dir" / "dst", errno.ENOENT)):
        exc, n, _ = run_copy(engine, src, dst, *SMALL)
        assert isinstance(exc, OSError) and exc.errno == code, exc
        assert "destination" in str(exc)


def test_destination_is_the_source(engine, tmp_path):
    src = tmp_path / "src"
    data = make_file(src, 50000)
    os.link(src, tmp_path / "hardlink")
    for dst in (src, tmp_path / "hardlink"):
        exc, _, _ = run_copy(engine, src, dst, *SMALL)
        assert isinstance(exc, OSError) and exc.errno == errno.EINVAL
        assert src.read_bytes() == data               # not truncated


def test_copy_file_before_run_and_stop_from_callback(backend, tmp_path):
    """The script's way: copy_file before run(), engine.stop() from the done callback."""
    import proactor
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = make_file(src, 300000)
    engine = proactor.Engine(backend=backend)
    out: dict = {}

    def done(exc, n):
        out["exc"], out["n"] = exc, n
        engine.stop()

    copy_example.copy_file(engine, src, dst, 4, 65536, done)
    t = threading.Thread(target=engine.run, kwargs={"handle_signals": False})
    t.start()
    t.join(60)
    assert not t.is_alive()
    assert out == {"exc": None, "n": 300000}
    assert dst.read_bytes() == data


def test_bad_arguments():
    with pytest.raises(ValueError):
        copy_example.FileCopy(None, "a", "b", 0, 4096, lambda e, n: None)
    with pytest.raises(ValueError):
        copy_example.FileCopy(None, "a", "b", 4, 0, lambda e, n: None)


def _script(*args: Any) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PROACTOR_BACKEND", None)
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True,
                          text=True, timeout=60, env=env, cwd=REPO_ROOT)


def test_script_copies(backend, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    data = make_file(src, (3 << 20) + 5)
    p = _script(src, dst, "--queue-depth", 4, "--block-size", "64k", "--backend", backend)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"copied {len(data)} bytes in ") and "MB/s" in p.stdout
    assert dst.read_bytes() == data


def test_script_missing_source_fails_with_a_message(tmp_path):
    p = _script(tmp_path / "nope", tmp_path / "dst")
    assert p.returncode != 0
    assert "No such file or directory" in p.stderr and "Errno 2" in p.stderr
    assert "nope" in p.stderr
    assert "Traceback" not in p.stderr
