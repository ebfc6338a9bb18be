"""CPython's own event-loop tests, run on asyncio's loop and on proactor's.

The tests are ``test.test_asyncio.test_events`` of the Python running this script (the
``test`` package of its install). Its Unix selector loop class (``EPollEventLoopTests``:
every test of ``EventLoopTestsMixin``, ``UnixEventLoopTestsMixin`` and
``SubprocessTestsMixin``) runs twice, each time in a child process of its own (with
``--module``, the same class of other modules too, e.g. ``test_sock_lowlevel``,
``test_sendfile``):

* ``asyncio``: as CPython runs it, on ``SelectorEventLoop(EpollSelector())``;
* ``proactor``: the same class with ``create_event_loop`` returning
  ``proactor.ProactorEventLoop()``. Nothing else changes: the same test bodies, setUp and
  tearDown, on our loop.

It prints the counts of each run and the tests that pass on asyncio's loop but not on
ours. Exit status: 0 if ours passes everything asyncio's passes (or ``--allow N`` of
them), 1 otherwise, 0 with a message when the ``test`` package or io_uring is missing.

    python tools/cpython_asyncio.py [--allow N] [--show] [-k SUBSTRING] [--module NAME]...
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import unittest
from typing import Any

#: module of test.test_asyncio -> (its class for a selector loop on Linux, the method
#: of that class that makes the loop)
SUITES = {
    "test_events": ("EPollEventLoopTests", "create_event_loop"),
    "test_sock_lowlevel": ("EPollEventLoopTests", "create_event_loop"),
    "test_sendfile": ("EPollEventLoopTests", "create_event_loop"),
    "test_buffered_proto": ("BufferedProtocolSelectorTests", "new_loop"),
    "test_server": ("SelectorStartServerTests", "new_loop"),
    "test_sslproto": ("SelectorStartTLSTests", "new_loop"),
    "test_ssl": ("TestSSL", "new_loop"),
}
#: A test that takes longer than this fails (a hang is a failure, not a wait) ...
TEST_TIMEOUT = 60
#: ... and a whole run that takes longer than this is stopped.
RUN_TIMEOUT = 1800


#: proactor loops the tests asked for (printed: the proof that they ran on ours).
LOOPS_MADE = 0


class TestTimeout(Exception):
    pass


def _timed_out(signum: int, frame: Any) -> None:
    raise TestTimeout(f"timed out after {TEST_TIMEOUT} s")


def load(loop: str, modules: list[str], pattern: str | None
         ) -> tuple[unittest.TestSuite | None, str]:
    """The suite of each module's selector-loop class on ``loop``, or None and the
    reason it cannot run."""
    import importlib

    suite = unittest.TestSuite()
    for name in modules:
        clsname, factory = SUITES[name]
        try:
            mod = importlib.import_module(f"test.test_asyncio.{name}")
        except ImportError as e:
            return None, f"this Python has no test.test_asyncio.{name} ({e})"
        base = getattr(mod, clsname, None)
        if base is None:
            return None, f"{name} has no {clsname} here"
        cls = base
        if loop == "proactor":
            import proactor
            from proactor._select import choose

            choice = choose(instead="asyncio's loop")
            if choice.backend != "uring":
                return None, f"io_uring is unavailable here: {choice}"

            def make_loop(self: Any) -> Any:
                global LOOPS_MADE
                LOOPS_MADE += 1
                return proactor.ProactorEventLoop()

            cls = type(clsname, (base,), {factory: make_loop, "__module__": base.__module__})
        suite.addTests(unittest.TestLoader().loadTestsFromTestCase(cls))
    if pattern:
        suite = unittest.TestSuite(t for t in suite if pattern in t.id())
    return suite, ""


class Result(unittest.TextTestResult):
    """Keeps each test's outcome by name."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.outcomes: dict[str, str] = {}
        self.details: dict[str, str] = {}

    def _name(self, test: unittest.TestCase) -> str:
        path, _, name = test.id().rsplit(".", 2)     # test....test_events.EPoll...Tests.x
        module = path.rsplit(".", 1)[-1]
        return name if module == "test_events" else f"{module}.{name}"

    def startTest(self, test: unittest.TestCase) -> None:
        super().startTest(test)
        signal.setitimer(signal.ITIMER_REAL, TEST_TIMEOUT)

    def stopTest(self, test: unittest.TestCase) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        super().stopTest(test)

    def addSuccess(self, test: unittest.TestCase) -> None:
        super().addSuccess(test)
        self.outcomes.setdefault(self._name(test), "pass")

    def addFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addFailure(test, err)
        self.outcomes[self._name(test)] = "fail"
        self.details[self._name(test)] = self.failures[-1][1]

    def addError(self, test: unittest.TestCase, err: Any) -> None:
        super().addError(test, err)
        self.outcomes[self._name(test)] = "error"
        self.details[self._name(test)] = self.errors[-1][1]

    def addSkip(self, test: unittest.TestCase, reason: str) -> None:
        super().addSkip(test, reason)
        self.outcomes[self._name(test)] = "skip"

    def addExpectedFailure(self, test: unittest.TestCase, err: Any) -> None:
        super().addExpectedFailure(test, err)
        self.outcomes[self._name(test)] = "xfail"

    def addUnexpectedSuccess(self, test: unittest.TestCase) -> None:
        super().addUnexpectedSuccess(test)
        self.outcomes[self._name(test)] = "fail"
        self.details[self._name(test)] = "unexpected success"


def child(loop: str, modules: list[str], pattern: str | None, out: str) -> int:
    """Run the suite on ``loop``; write {outcomes, details, unavailable} to ``out``."""
    suite, reason = load(loop, modules, pattern)
    report: dict[str, Any] = {"outcomes": {}, "details": {}, "unavailable": reason}
    if suite is not None:
        signal.signal(signal.SIGALRM, _timed_out)
        with open(os.devnull, "w") as devnull:
            runner = unittest.TextTestRunner(stream=devnull, resultclass=Result,
                                             verbosity=0)
            result = runner.run(suite)
        report["outcomes"] = result.outcomes
        report["details"] = result.details
        report["loops_made"] = LOOPS_MADE
    with open(out, "w") as f:
        json.dump(report, f)
    return 0


def run_child(loop: str, modules: list[str], pattern: str | None) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result.json")
        cmd = [sys.executable, __file__, "--child", loop, "--out", out]
        cmd += [a for m in modules for a in ("--module", m)]
        if pattern:
            cmd += ["-k", pattern]
        t0 = time.monotonic()
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            return {"outcomes": {}, "details": {}, "unavailable": "",
                    "crashed": f"still running after {RUN_TIMEOUT} s"}
        elapsed = time.monotonic() - t0
        if not os.path.exists(out):
            return {"outcomes": {}, "details": {}, "unavailable": "",
                    "crashed": f"exit status {proc.returncode}:\n{proc.stderr[-3000:]}"}
        with open(out) as f:
            report = json.load(f)
        report["elapsed"] = elapsed
        return report


def counts(outcomes: dict[str, str]) -> str:
    n = {k: 0 for k in ("pass", "fail", "error", "skip", "xfail")}
    for v in outcomes.values():
        n[v] += 1
    return (f"{n['pass']} passed, {n['fail']} failed, {n['error']} errors, "
            f"{n['skip']} skipped" + (f", {n['xfail']} expected failures" if n["xfail"]
                                      else "") + f" (of {len(outcomes)})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--allow", type=int, default=0,
                    help="tests that may pass on asyncio's loop and not on ours (default 0)")
    ap.add_argument("--show", action="store_true", help="print the tracebacks of those tests")
    ap.add_argument("-k", dest="pattern", help="only tests whose id contains this")
    ap.add_argument("--module", action="append", dest="modules", choices=[*SUITES, "all"],
                    help="a module of test.test_asyncio (repeatable; default: test_events; "
                         "'all': every one listed)")
    ap.add_argument("--child", choices=["asyncio", "proactor"], help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    modules = args.modules or ["test_events"]
    if "all" in modules:
        import importlib.util

        try:
            have = [m for m in SUITES if importlib.util.find_spec(f"test.test_asyncio.{m}")]
        except ImportError:                     # no test package at all: said below
            have = []
        missing = [m for m in SUITES if m not in have]
        if missing and not args.child:
            print(f"(not in this Python's test package: {', '.join(missing)})")
        modules = have or ["test_events"]
    if args.child:
        return child(args.child, modules, args.pattern, args.out)

    names = ", ".join(f"{m}.{SUITES[m][0]}" for m in modules)
    print(f"CPython {sys.version.split()[0]}, test.test_asyncio: {names}")
    reports = {}
    for loop in ("asyncio", "proactor"):
        rep = run_child(loop, modules, args.pattern)
        reports[loop] = rep
        if rep.get("unavailable"):
            print(f"  {loop:9} skipped: {rep['unavailable']}")
            return 0
        if rep.get("crashed"):
            print(f"  {loop:9} the run did not finish: {rep['crashed']}")
            return 1
        made = f", {rep['loops_made']} ProactorEventLoops made" if loop == "proactor" else ""
        print(f"  {loop:9} {counts(rep['outcomes'])} in {rep['elapsed']:.1f} s{made}")
    ours, theirs = reports["proactor"]["outcomes"], reports["asyncio"]["outcomes"]
    worse = sorted(name for name, v in theirs.items()
                   if v in ("pass", "xfail") and ours.get(name) != v)
    better = sorted(name for name, v in ours.items()
                    if v == "pass" and theirs.get(name) not in ("pass", None))
    if worse:
        print(f"  passing on asyncio's loop, not on proactor's ({len(worse)}):")
        for name in worse:
            print(f"    {name}: {ours.get(name, 'not run')}")
            if args.show:
                detail = reports["proactor"]["details"].get(name, "")
                print("      " + detail.rstrip().replace("\n", "\n      "))
    else:
        print("  proactor's loop passes everything asyncio's loop passes")
    if better:
        print(f"  passing on proactor's loop, not on asyncio's: {', '.join(better)}")
    return 0 if len(worse) <= args.allow else 1


if __name__ == "__main__":
    sys.exit(main())
