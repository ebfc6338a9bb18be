"""Fixtures of the event-loop suite (uvloop ``_testbase`` style, adapted to pytest).

* ``loop``: parametrized over :data:`LOOP_FACTORIES`. ``"asyncio"`` is the standard loop,
  the reference every test must pass on; ``"proactor"`` is ``proactor.new_event_loop()``,
  skipped (with the reason) where it does not exist yet, where io_uring is unavailable,
  or where it falls back to asyncio's loop. The loop is set as the current loop for the
  test. At teardown: leftover tasks are cancelled, ``shutdown_asyncgens()`` and
  ``shutdown_default_executor()`` run, the loop is closed, then the test fails if the
  loop's exception handler was called unexpectedly or if fds leaked.
* ``loop_errors``: the exception handler installed on ``loop``; a test that expects
  calls declares them with ``loop_errors.expect(...)`` (they must then happen).
* ``PROACTOR_AIO_DEBUG=1`` in the environment runs every loop in debug mode.

Helpers for the tests (``run``, ``requires``, ...) are in ``utils.py`` beside this file.
"""
from __future__ import annotations

import asyncio
import gc
import os
import re
import threading
import time
from typing import Any, Callable, Optional

import pytest

from .utils import describe_fds, open_fds


def _new_asyncio_loop() -> asyncio.AbstractEventLoop:
    return asyncio.new_event_loop()


def _new_proactor_loop() -> asyncio.AbstractEventLoop:
    try:
        import proactor
    except ImportError as e:
        pytest.skip(f"proactor is not importable: {e}")
    factory = getattr(proactor, "new_event_loop", None)
    if factory is None:
        pytest.skip("proactor.new_event_loop does not exist yet")
    try:
        loop = factory()
    except proactor.UringUnavailable as e:
        pytest.skip(f"proactor's loop is unavailable here: {getattr(e, 'reason', e)}")
    except ModuleNotFoundError as e:
        if (e.name or "").startswith("proactor._aio"):
            pytest.skip(f"proactor's loop module is missing: {e}")
        raise
    if type(loop).__module__.split(".")[0] != "proactor":
        # new_event_loop() falls back to asyncio's loop where io_uring does not work:
        # that would run the asyncio case a second time under the proactor name.
        loop.close()
        pytest.skip(f"proactor.new_event_loop() fell back to {type(loop).__name__} "
                    "(io_uring unavailable here)")
    return loop


#: Every loop the tests run on. Adding a loop is adding its factory here.
LOOP_FACTORIES: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": _new_asyncio_loop,
    "proactor": _new_proactor_loop,
}

#: Bound of each teardown step (seconds).
TEARDOWN_TIMEOUT = 10.0


class LoopErrors:
    """The loop's exception handler: records every call (from any thread)."""

    def __init__(self) -> None:
        self.calls: list[dict] = []
        self._expected: list[tuple[Optional[re.Pattern], Optional[type], int]] = []
        self._lock = threading.Lock()

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        with self._lock:
            self.calls.append(context)

    def expect(self, message: Optional[str] = None, exception: Optional[type] = None,
               min_count: int = 1) -> None:
        """Declare expected calls: those whose ``message`` matches the regex ``message``
        (re.search) and whose ``exception`` is an instance of ``exception`` (each None
        matches anything). At least ``min_count`` of them must happen."""
        self._expected.append((re.compile(message) if message is not None else None,
                               exception, min_count))

    @staticmethod
    def _matches(ctx: dict, rx: Optional[re.Pattern], exc_type: Optional[type]) -> bool:
        if rx is not None and not rx.search(str(ctx.get("message", ""))):
            return False
        if exc_type is not None and not isinstance(ctx.get("exception"), exc_type):
            return False
        return True

    def matching(self, message: Optional[str] = None,
                 exception: Optional[type] = None) -> list[dict]:
        rx = re.compile(message) if message is not None else None
        with self._lock:
            return [c for c in self.calls if self._matches(c, rx, exception)]

    def problems(self) -> list[str]:
        with self._lock:
            calls = list(self.calls)
        out = []
        unexpected: dict[str, int] = {}          # the same call many times: one line
        for ctx in calls:
            if not any(self._matches(ctx, rx, t) for rx, t, _ in self._expected):
                exc = ctx.get("exception")
                text = str(ctx.get("message"))
                if exc is not None:
                    text += f" [{type(exc).__name__}: {exc}]"
                text += f"; context keys {sorted(ctx)}"
                unexpected[text] = unexpected.get(text, 0) + 1
        for text, n in unexpected.items():
            times = f" ({n} times)" if n > 1 else ""
            out.append(f"unexpected call of the loop's exception handler{times}: {text}")
        for rx, t, n in self._expected:
            got = sum(1 for c in calls if self._matches(c, rx, t))
            if got < n:
                what = " and ".join(x for x in (
                    f"message ~ {rx.pattern!r}" if rx is not None else "",
                    f"exception {t.__name__}" if t is not None else "") if x) or "any"
                out.append(f"expected at least {n} exception handler call(s) with {what}, "
                           f"got {got}")
        return out


@pytest.fixture
def loop_errors() -> LoopErrors:
    return LoopErrors()


def _cancel_leftover_tasks(loop: asyncio.AbstractEventLoop) -> None:
    """What ``asyncio.run`` does at its end: cancel the tasks still pending, let them
    finish (a test that fails half-way leaves some)."""
    tasks = [t for t in asyncio.all_tasks(loop) if not t.done()]
    if not tasks:
        return
    for t in tasks:
        t.cancel()
    loop.run_until_complete(asyncio.wait_for(
        asyncio.gather(*tasks, return_exceptions=True), TEARDOWN_TIMEOUT))


@pytest.fixture(params=list(LOOP_FACTORIES))
def loop(request: pytest.FixtureRequest, loop_errors: LoopErrors) -> Any:
    fds_before = open_fds()
    lp = LOOP_FACTORIES[request.param]()
    lp.set_exception_handler(loop_errors)
    if os.environ.get("PROACTOR_AIO_DEBUG") == "1":
        lp.set_debug(True)
    asyncio.set_event_loop(lp)
    try:
        yield lp
    finally:
        problems: list[str] = []
        if not lp.is_closed():
            steps = [
                ("cancel leftover tasks", lambda: _cancel_leftover_tasks(lp)),
                ("shutdown_asyncgens", lambda: lp.run_until_complete(
                    asyncio.wait_for(lp.shutdown_asyncgens(), TEARDOWN_TIMEOUT))),
                ("shutdown_default_executor", lambda: lp.run_until_complete(
                    asyncio.wait_for(lp.shutdown_default_executor(), TEARDOWN_TIMEOUT))),
                ("close", lp.close),
            ]
            for name, step in steps:
                try:
                    step()
                except Exception as e:  # noqa: BLE001 - reported below
                    problems.append(f"teardown step {name} failed: {type(e).__name__}: {e}")
            if not lp.is_closed():
                problems.append("the loop is not closed after close()")
        asyncio.set_event_loop(None)
        gc.collect()
        problems += loop_errors.problems()
        deadline = time.monotonic() + 2.0
        while len(open_fds()) > len(fds_before) and time.monotonic() < deadline:
            gc.collect()
            time.sleep(0.01)
        now = open_fds()
        if len(now) > len(fds_before):
            problems.append(f"fd leak: {len(now)} open fds, {len(fds_before)} before the "
                            f"loop was made; new: {describe_fds(now - fds_before)}")
        if problems:
            pytest.fail(f"loop teardown checks failed ({request.param}):\n  "
                        + "\n  ".join(problems), pytrace=False)
