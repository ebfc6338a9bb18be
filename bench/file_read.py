"""Random 4 KiB reads at queue depth 64 from a file in the page cache: proactor vs threads.

usage: python bench/file_read.py [--path P] [--size 1G] [--seconds 3] [--rounds 3]
                                 [--depth 64] [--threads 16] [--block 4096] [--cpus 0]

* proactor/read_fixed: 64 registered buffers, one ``read_fixed`` in flight per buffer;
  each completion callback submits the next read.
* proactor/readinto: the same with ``engine.readinto`` into 64 plain ``bytearray``s.
* threads: ``concurrent.futures.ThreadPoolExecutor(16)`` running ``os.pread``, 64 futures
  in flight; each future's done-callback submits the next one.

The file is created once (random data) if it is missing or has another size, then read
through once so that it is in the page cache. All read offsets come from one list of
random block-aligned offsets, the same for every contender. Runs are interleaved round
by round (the machine is noisy) and the medians are printed with the ratio to threads.
By default the process (and so the thread pool and io_uring's workers) is pinned to CPU 0,
as compare.py pins servers; ``--cpus all`` leaves it unpinned.
"""
from __future__ import annotations

import argparse
import itertools
import mmap
import os
import random
import statistics
import sys
import threading
import time
from array import array
from concurrent.futures import ThreadPoolExecutor

import proactor

NOFFSETS = 1 << 20


def parse_size(text: str) -> int:
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    mult = 1
    if t and t[-1] in "kmg":
        mult = 1024 ** ("kmg".index(t[-1]) + 1)
        t = t[:-1]
    return int(t) * mult


def prepare(path: str, size: int) -> None:
    """Create ``path`` with ``size`` random bytes unless it is already that size; then
    read it through once so that it sits in the page cache."""
    try:
        have = os.stat(path).st_size
    except FileNotFoundError:
        have = -1
    if have != size:
        print(f"creating {path} ({size} bytes)...", file=sys.stderr, flush=True)
        chunk = os.urandom(8 << 20)
        with open(path + ".tmp", "wb") as f:
            left = size
            while left:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                left -= n
        os.replace(path + ".tmp", path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        buf = bytearray(8 << 20)
        with open(fd, "rb", buffering=0, closefd=False) as f:
            while f.readinto(buf):
                pass
    finally:
        os.close(fd)


def offsets(size: int, block: int, seed: int = 42) -> array:
    rng = random.Random(seed)
    nblocks = size // block
    return array("q", (rng.randrange(nblocks) * block for _ in range(NOFFSETS)))


def run_proactor(fd: int, offs: array, depth: int, block: int, seconds: float,
                 op: str) -> float:
    """Reads per second with ``depth`` reads in flight on one engine (main thread)."""
    engine = proactor.Engine()
    mask = len(offs) - 1
    st = {"n": 0, "k": 0, "stop": False, "inflight": 0, "t0": 0.0, "t1": 0.0}

    if op == "read_fixed":
        read_fixed = engine.read_fixed

        def submit(i: int) -> None:
            k = st["k"]
            st["k"] = k + 1
            read_fixed(fd, i, block, offs[k & mask], cbs[i])
    else:
        bufs = [bytearray(block) for _ in range(depth)]
        readinto = engine.readinto

        def submit(i: int) -> None:
            k = st["k"]
            st["k"] = k + 1
            readinto(fd, bufs[i], offs[k & mask], cbs[i])

    def make_cb(i: int):
        def cb(o):
            if o.result() != block:
                raise RuntimeError(f"short read: {o.result()}")
            st["n"] += 1
            if not st["stop"]:
                submit(i)
            else:
                st["inflight"] -= 1
                if st["inflight"] == 0:
                    st["t1"] = time.perf_counter()
                    engine.stop()
        return cb

    cbs = [make_cb(i) for i in range(depth)]

    def stop() -> None:
        st["stop"] = True

    def go() -> None:
        if op == "read_fixed":
            mem = mmap.mmap(-1, depth * block)
            view = memoryview(mem)
            engine.register_buffers([view[i * block:(i + 1) * block] for i in range(depth)])
        st["inflight"] = depth
        st["t0"] = time.perf_counter()
        engine.call_later(seconds, stop)
        for i in range(depth):
            submit(i)

    engine.call_soon(go)
    engine.run(handle_signals=False)
    return st["n"] / (st["t1"] - st["t0"])


def run_threads(fd: int, offs: array, depth: int, threads: int, block: int,
                seconds: float) -> float:
    """Reads per second with ``depth`` os.pread futures in flight on a thread pool."""
    mask = len(offs) - 1
    counter = itertools.count()        # next() is atomic under the GIL
    done_count = itertools.count()
    stop = threading.Event()
    finished = threading.Event()
    lock = threading.Lock()
    inflight = [depth]
    pread = os.pread

    with ThreadPoolExecutor(threads) as pool:
        submit = pool.submit

        def fire() -> None:
            submit(pread, fd, block, offs[next(counter) & mask]).add_done_callback(on_done)

        def on_done(f) -> None:
            if len(f.result()) != block:
                raise RuntimeError("short read")
            next(done_count)
            if not stop.is_set():
                fire()
            else:
                with lock:
                    inflight[0] -= 1
                    if inflight[0] == 0:
                        finished.set()

        t0 = time.perf_counter()
        for _ in range(depth):
            fire()
        time.sleep(seconds)
        stop.set()
        finished.wait()
        t1 = time.perf_counter()
    return (next(done_count)) / (t1 - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", default="/tmp/proactor-bench-file")
    p.add_argument("--size", type=parse_size, default=1 << 30)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--depth", type=int, default=64)
    p.add_argument("--threads", type=int, default=16)
    p.add_argument("--block", type=parse_size, default=4096)
    p.add_argument("--cpus", default="0", help="CPUs to pin to, e.g. 0 or 0,1; 'all': no pin")
    p.add_argument("--only", choices=("read_fixed", "readinto", "threads"), action="append",
                   help="run only these contenders (repeatable)")
    a = p.parse_args()
    if a.cpus != "all":
        os.sched_setaffinity(0, {int(c) for c in a.cpus.split(",")})
    prepare(a.path, a.size)
    offs = offsets(a.size, a.block)
    names = a.only or ["read_fixed", "readinto", "threads"]
    rates: dict[str, list] = {n: [] for n in names}
    fd = os.open(a.path, os.O_RDONLY)
    try:
        for _ in range(a.rounds):
            for n in names:
                if n == "threads":
                    r = run_threads(fd, offs, a.depth, a.threads, a.block, a.seconds)
                else:
                    r = run_proactor(fd, offs, a.depth, a.block, a.seconds, n)
                rates[n].append(r)
    finally:
        os.close(fd)
    label = {"read_fixed": "proactor read_fixed", "readinto": "proactor readinto",
             "threads": f"threads({a.threads}) os.pread"}
    print(f"# random {a.block} B reads, depth {a.depth}, file {a.size} B (page cache), "
          f"{a.seconds:g} s x {a.rounds} rounds, cpus={a.cpus}")
    print(f"{'contender':<28}{'median ops/s':>14}{'min':>10}{'max':>10}{'vs threads':>12}")
    base = statistics.median(rates["threads"]) if "threads" in rates else None
    for n in names:
        med = statistics.median(rates[n])
        ratio = f"{med / base:.2f}" if base else "-"
        print(f"{label[n]:<28}{med:>14.0f}{min(rates[n]):>10.0f}{max(rates[n]):>10.0f}"
              f"{ratio:>12}")
    if base and "read_fixed" in rates:
        ratios = [x / y for x, y in zip(rates["read_fixed"], rates["threads"])]
        print(f"ratio read_fixed/threads={statistics.median(ratios):.3f} (median of rounds)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
