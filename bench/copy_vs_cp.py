"""examples/copy.py vs cp on a big file in the page cache, destination on the same filesystem.

usage: python bench/copy_vs_cp.py [--path P] [--size 1G] [--runs 3] [--warmup 1]
                                  [--queue-depth N] [--block-size B] [--cpus 0]

Makes the source once (random data; reused while it has the right size), reads it through
so it is in the page cache, then runs ``cp SRC DST`` and ``examples/copy.py SRC DST``
alternately ``--runs`` times each, after ``--warmup`` untimed rounds. Before every run DST
is deleted and ``sync`` flushes the previous run's dirty pages, so each run starts from the
same state (neither is timed). The time is the wall time of the whole command (process
start included: ~0.1 s of Python start-up and imports for copy.py, ~1 ms for cp);
copy.py's own figure (open to last write, as it prints) is shown too, and the CPU seconds
of each process (all its threads, io_uring's io-wq workers included), steadier than wall
time on this machine. Every copy is checked against the source's size, and the last one
of each byte for byte.

Note: GNU cp (coreutils >= 9) copies with copy_file_range(2), in the kernel, page cache
to page cache; copy.py reads into user-space buffers and writes them out (2 copies).
"""
from __future__ import annotations

import argparse
import filecmp
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from file_read import parse_size, prepare  # noqa: E402


def timed(cmd: list) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of the process and its threads, stdout)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}): {p.stderr.strip()}")
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return dt, cpu, p.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--path", default="/tmp/proactor-bench-file")
    p.add_argument("--dst", default=None, help="default: PATH.copy (same filesystem)")
    p.add_argument("--size", type=parse_size, default=1 << 30)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1,
                   help="untimed rounds first (default 1: the first write after a pause is "
                        "often several times slower here)")
    p.add_argument("--queue-depth", type=int, default=None)
    p.add_argument("--block-size", default=None)
    p.add_argument("--cpus", default="0",
                   help="taskset CPU list for both commands (default 0, as compare.py); "
                        "'all': no pinning")
    a = p.parse_args()
    dst = a.dst or a.path + ".copy"
    prepare(a.path, a.size)
    pin = [] if a.cpus == "all" else ["taskset", "-c", a.cpus]
    copy_cmd = [*pin, sys.executable, os.path.join(ROOT, "examples", "copy.py"), a.path, dst]
    if a.queue_depth:
        copy_cmd += ["--queue-depth", str(a.queue_depth)]
    if a.block_size:
        copy_cmd += ["--block-size", a.block_size]
    cp_cmd = [*pin, shutil.which("cp") or "cp", a.path, dst]
    walls: dict[str, list] = {"cp": [], "copy.py": []}
    cpus: dict[str, list] = {"cp": [], "copy.py": []}
    own: list[float] = []
    for r in range(-a.warmup, a.runs):
        for name, cmd in (("cp", cp_cmd), ("copy.py", copy_cmd)):
            if os.path.exists(dst):
                os.unlink(dst)
            os.sync()
            dt, cpu, out = timed(cmd)
            if r < 0:
                continue                      # warm-up round, not counted
            if os.path.getsize(dst) != a.size:
                raise SystemExit(f"{name}: {dst} has {os.path.getsize(dst)} bytes, "
                                 f"expected {a.size}")
            walls[name].append(dt)
            cpus[name].append(cpu)
            if name == "copy.py":
                m = re.search(r"in ([0-9.]+) s", out)
                own.append(float(m.group(1)) if m else float("nan"))
    same = filecmp.cmp(a.path, dst, shallow=False)
    os.unlink(dst)
    mb = a.size / 1e6
    print(f"# {a.size} B file in the page cache -> same filesystem, {a.runs} runs each "
          f"interleaved, cpus={a.cpus}; last copy identical: {same}")
    print(f"{'command':<34}{'median s':>10}{'MB/s':>8}{'CPU s':>8}{'runs (wall s)':>24}")
    for name in ("cp", "copy.py"):
        med = statistics.median(walls[name])
        runs = " ".join(f"{x:.3f}" for x in walls[name])
        print(f"{name + ' (wall, whole process)':<34}{med:>10.3f}{mb / med:>8.0f}"
              f"{statistics.median(cpus[name]):>8.3f}{runs:>24}")
    med_own = statistics.median(own)
    print(f"{'copy.py (own figure: open..done)':<34}{med_own:>10.3f}{mb / med_own:>8.0f}"
          f"{'':>8}{' '.join(f'{x:.3f}' for x in own):>24}")
    ratio = statistics.median(walls["cp"]) / statistics.median(walls["copy.py"])
    print(f"ratio copy.py/cp throughput={ratio:.3f} (wall, medians; >1: copy.py faster)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
