"""Signal handlers (feature "signals")."""
from __future__ import annotations

import asyncio
import os
import signal

import pytest

from .utils import requires, run

pytestmark = pytest.mark.timeout(60)


def test_add_signal_handler_sigusr1(loop):
    requires(loop, "signals")
    before = signal.getsignal(signal.SIGUSR1)

    async def main():
        got = loop.create_future()
        loop.add_signal_handler(signal.SIGUSR1, lambda arg: got.done() or got.set_result(arg),
                                "usr1")
        try:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert await asyncio.wait_for(got, 5) == "usr1"
            # again, with the loop idle (no timer) when the signal comes
            got2 = loop.create_future()
            loop.add_signal_handler(signal.SIGUSR1, got2.set_result, "again")
            loop.call_soon_threadsafe(lambda: None)
            await asyncio.sleep(0)
            loop.run_in_executor(None, os.kill, os.getpid(), signal.SIGUSR1)
            assert await asyncio.wait_for(got2, 5) == "again"
        finally:
            assert loop.remove_signal_handler(signal.SIGUSR1) is True
        assert loop.remove_signal_handler(signal.SIGUSR1) is False

    run(loop, main())
    assert signal.getsignal(signal.SIGUSR1) == before


def test_signal_handler_errors(loop):
    requires(loop, "signals")
    with pytest.raises((ValueError, RuntimeError)):
        loop.add_signal_handler(signal.SIGKILL, lambda: None)
    with pytest.raises(TypeError):
        loop.add_signal_handler(signal.SIGUSR2, asyncio.sleep)   # a coroutine function


def test_loop_close_removes_signal_handlers(loop):
    requires(loop, "signals")
    before = signal.getsignal(signal.SIGUSR2)
    loop.add_signal_handler(signal.SIGUSR2, lambda: None)
    assert signal.getsignal(signal.SIGUSR2) != before
    loop.close()
    assert signal.getsignal(signal.SIGUSR2) == before
