"""Judge the sanitizer logs of a ``make sanitize`` run: ``sanitizer_logs.py PREFIX``.

ASan writes one file per process that reported, ``PREFIX.<pid>``. Every process started
by the tests has ASan preloaded (``LD_PRELOAD`` is inherited), so the files also hold what
other programs report at exit: LeakSanitizer finds "leaks" in CPython (objects still
alive at exit are referenced only from pymalloc's arenas, which it does not scan) and in
the tests' child processes (sh, curl, ...). So:

* an AddressSanitizer error, in any process: printed, and the run fails;
* a leak allocated by the extension (the caller of malloc, frame #1, is in
  ``_uring_cffi``: its C code, or liburing.a linked into it): printed, the run fails;
* any other leak is counted and ignored.

(UndefinedBehaviorSanitizer reports do not come here: they go to stderr and abort.)
Exit status 0 when nothing of ours was reported, else 1.
"""
from __future__ import annotations

import glob
import re
import sys

OURS = "_uring_cffi"


def judge(prefix: str) -> int:
    bad = 0
    ignored = 0
    for path in sorted(glob.glob(glob.escape(prefix) + ".*")):
        with open(path, errors="replace") as f:
            text = f.read()
        if "ERROR: AddressSanitizer" in text:
            print(f"==== {path}\n{text}")
            bad += 1
            continue
        for block in re.split(r"\n\s*\n", text):
            if not re.match(r"\s*(Direct|Indirect) leak of", block):
                continue
            caller = re.search(r"^\s*#1 .*$", block, re.M)
            if caller and OURS in caller.group(0):
                print(f"==== {path}\n{block}\n")
                bad += 1
            else:
                ignored += 1
    if ignored:
        print(f"sanitize: {ignored} leak report(s) outside the extension ignored "
              "(CPython's memory at exit, child processes)")
    if bad:
        print(f"sanitize: FAILED: {bad} sanitizer report(s) above")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(judge(sys.argv[1]))
