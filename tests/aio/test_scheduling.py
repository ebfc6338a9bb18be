"""Callbacks, timers, threads, executors, the exception handler, debug mode, async
generators: the loop's scheduling core."""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import gc
import threading
import time

import pytest

from .utils import run

pytestmark = pytest.mark.timeout(60)


def test_run_until_complete_result_and_exception(loop):
    async def ok():
        await asyncio.sleep(0)
        return 42

    async def bad():
        await asyncio.sleep(0)
        raise KeyError("x")

    assert loop.run_until_complete(ok()) == 42
    with pytest.raises(KeyError):
        loop.run_until_complete(bad())
    fut = loop.create_future()
    fut.set_result("done")
    assert loop.run_until_complete(fut) == "done"
    assert not loop.is_running()
    assert not loop.is_closed()


def test_running_loop_state(loop):
    async def main():
        assert asyncio.get_running_loop() is loop
        assert loop.is_running()
        coro = asyncio.sleep(0)
        with pytest.raises(RuntimeError):
            loop.run_until_complete(coro)               # already running
        coro.close()
        with pytest.raises(RuntimeError):
            loop.close()                                # cannot close a running loop
        return True

    assert run(loop, main())
    assert not loop.is_running()


def test_call_soon_order(loop):
    order = []
    for i in range(100):
        loop.call_soon(order.append, i)
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert order == list(range(100))


def test_call_soon_scheduled_from_callbacks_run_next_iteration(loop):
    order = []

    def first():
        order.append("first")
        loop.call_soon(order.append, "nested")

    loop.call_soon(first)
    loop.call_soon(order.append, "second")
    loop.call_soon(loop.stop)
    loop.run_forever()
    # 'nested' was scheduled after stop: it runs on the next run
    assert order == ["first", "second"]
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert order == ["first", "second", "nested"]


def test_call_soon_args_context_and_cancel(loop):
    var = contextvars.ContextVar("var", default="default")
    ctx = contextvars.copy_context()
    ctx.run(var.set, "in ctx")
    seen = []

    def cb(a, b):
        seen.append((a, b, var.get()))

    loop.call_soon(cb, 1, 2)
    loop.call_soon(cb, 3, 4, context=ctx)
    h = loop.call_soon(cb, 5, 6)
    assert isinstance(h, asyncio.Handle)
    h.cancel()
    assert h.cancelled()
    loop.call_soon(loop.stop)
    loop.run_forever()
    assert seen == [(1, 2, "default"), (3, 4, "in ctx")]


def test_call_later_order_and_cancel(loop):
    got = []
    t0 = loop.time()

    def cb(tag):
        got.append((tag, loop.time() - t0))

    loop.call_later(0.06, cb, "d")
    loop.call_later(0.0, cb, "a")
    loop.call_later(0.02, cb, "b")
    h = loop.call_later(0.03, cb, "cancelled")
    loop.call_later(0.04, cb, "c")
    loop.call_later(-1, cb, "negative")     # in the past: as soon as possible
    h.cancel()
    assert h.cancelled()
    assert isinstance(h, asyncio.TimerHandle)
    loop.call_later(0.1, loop.stop)
    loop.run_forever()
    tags = [t for t, _ in got]
    assert sorted(tags[:2]) == ["a", "negative"]
    assert tags[2:] == ["b", "c", "d"]
    delays = dict(got)
    for tag, delay in (("b", 0.02), ("c", 0.04), ("d", 0.06)):
        assert delays[tag] >= delay - 0.002, (tag, delays[tag])
        assert delays[tag] < delay + 2.0, (tag, delays[tag])


def test_call_at(loop):
    got = []
    when = loop.time() + 0.05
    h = loop.call_at(when, lambda: got.append(loop.time()))
    assert h.when() == when
    loop.call_at(when + 0.01, loop.stop)
    loop.run_forever()
    assert len(got) == 1
    assert got[0] >= when - 0.002


def test_cancel_timer_from_earlier_timer(loop):
    got = []
    later = loop.call_later(0.05, got.append, "later")

    def cancel_it():
        got.append("canceller")
        later.cancel()

    loop.call_later(0.01, cancel_it)
    loop.call_later(0.1, loop.stop)
    loop.run_forever()
    assert got == ["canceller"]


def test_many_timers(loop):
    import random

    rnd = random.Random(1)
    delays = [rnd.uniform(0, 0.1) for _ in range(2000)]
    fired = []
    handles = []
    for i, d in enumerate(delays):
        handles.append(loop.call_later(d, fired.append, i))
    cancelled = set(range(0, 2000, 3))
    for i in cancelled:
        handles[i].cancel()
    loop.call_later(0.15, loop.stop)
    loop.run_forever()
    assert set(fired) == set(range(2000)) - cancelled
    # fired in order of their deadlines
    whens = [handles[i].when() for i in fired]
    assert whens == sorted(whens)


def test_sleep_and_time_monotonic(loop):
    async def main():
        samples = []
        for _ in range(50):
            samples.append(loop.time())
            await asyncio.sleep(0)
        assert samples == sorted(samples)
        t0, m0 = loop.time(), time.monotonic()
        await asyncio.sleep(0.05)
        t1, m1 = loop.time(), time.monotonic()
        assert t1 - t0 >= 0.05 - 0.002
        assert abs((t1 - t0) - (m1 - m0)) < 0.05      # the loop's clock runs at real speed

    run(loop, main())


def test_call_soon_threadsafe_from_threads(loop):
    n_threads, per_thread = 4, 250
    got = []
    done = loop.create_future()

    def cb(tid, i):
        got.append((tid, i))
        if len(got) == n_threads * per_thread and not done.done():
            done.set_result(None)

    def worker(tid, barrier):
        barrier.wait()
        for i in range(per_thread):
            loop.call_soon_threadsafe(cb, tid, i)

    async def main():
        barrier = threading.Barrier(n_threads)
        threads = [threading.Thread(target=worker, args=(t, barrier)) for t in range(n_threads)]
        for t in threads:
            t.start()
        try:
            await done
        finally:
            for t in threads:
                t.join(10)

    run(loop, main())
    assert len(got) == n_threads * per_thread
    for tid in range(n_threads):
        assert [i for t, i in got if t == tid] == list(range(per_thread))


def test_call_soon_threadsafe_wakes_idle_loop(loop):
    """The loop sleeps with nothing to do (no timer); a call from another thread must
    wake it up promptly."""
    async def main():
        fut = loop.create_future()

        def poke():
            time.sleep(0.1)
            loop.call_soon_threadsafe(fut.set_result, time.monotonic())

        t = threading.Thread(target=poke)
        t.start()
        try:
            sent = await fut
        finally:
            t.join()
        return time.monotonic() - sent

    latency = run(loop, main(), timeout=10)
    assert latency < 1.0


def test_run_coroutine_threadsafe(loop):
    async def add(a, b):
        await asyncio.sleep(0.01)
        return a + b

    async def main():
        def in_thread():
            return asyncio.run_coroutine_threadsafe(add(2, 3), loop).result(10)

        return await loop.run_in_executor(None, in_thread)

    assert run(loop, main()) == 5


def test_run_in_executor_default(loop):
    main_thread = threading.get_ident()

    def work(x):
        return x * 2, threading.get_ident()

    def fail():
        raise ValueError("in executor")

    async def main():
        results = await asyncio.gather(*(loop.run_in_executor(None, work, i) for i in range(20)))
        assert [r for r, _ in results] == [i * 2 for i in range(20)]
        assert all(tid != main_thread for _, tid in results)
        with pytest.raises(ValueError, match="in executor"):
            await loop.run_in_executor(None, fail)

    run(loop, main())


def test_run_in_executor_given_executor(loop):
    with concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="given") as ex:
        async def main():
            name = await loop.run_in_executor(ex, lambda: threading.current_thread().name)
            assert name.startswith("given")

        run(loop, main())


def test_set_default_executor(loop):
    ex = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mydefault")
    loop.set_default_executor(ex)

    async def main():
        return await loop.run_in_executor(None, lambda: threading.current_thread().name)

    assert run(loop, main()).startswith("mydefault")
    run(loop, loop.shutdown_default_executor())
    # shutdown_default_executor() shut our executor down
    with pytest.raises(RuntimeError):
        ex.submit(print)


def test_shutdown_default_executor(loop):
    threads = []

    def work():
        threads.append(threading.current_thread())
        return 1

    async def main():
        assert await loop.run_in_executor(None, work) == 1
        await loop.shutdown_default_executor()
        assert threads and not any(t.is_alive() for t in threads)
        with pytest.raises(RuntimeError):
            await loop.run_in_executor(None, work)

    run(loop, main())


def test_exception_in_callbacks_reaches_handler(loop, loop_errors):
    loop_errors.expect(exception=ZeroDivisionError, min_count=3)
    after = []

    def boom():
        1 / 0

    async def main():
        loop.call_soon(boom)
        loop.call_later(0.01, boom)
        await loop.run_in_executor(None, loop.call_soon_threadsafe, boom)
        await asyncio.sleep(0.05)
        after.append("still running")

    run(loop, main())
    assert after == ["still running"]
    calls = loop_errors.matching(exception=ZeroDivisionError)
    assert len(calls) == 3
    for ctx in calls:
        assert "message" in ctx
        assert isinstance(ctx.get("handle"), asyncio.Handle)
    assert loop.get_exception_handler() is loop_errors


def test_call_exception_handler_and_default(loop, loop_errors):
    loop_errors.expect(message="custom context")
    loop.call_exception_handler({"message": "custom context", "extra": 1})
    assert loop_errors.matching("custom context")[0]["extra"] == 1
    # set_exception_handler(None) restores the default handler (it logs, to 'asyncio')
    loop.set_exception_handler(None)
    assert loop.get_exception_handler() is None
    import logging

    records = []

    class H(logging.Handler):
        def emit(self, record):
            records.append(record)

    h = H()
    logging.getLogger("asyncio").addHandler(h)
    try:
        loop.call_exception_handler({"message": "to the default handler"})
    finally:
        logging.getLogger("asyncio").removeHandler(h)
    assert any("to the default handler" in r.getMessage() for r in records)
    loop.set_exception_handler(loop_errors)


def test_unretrieved_task_exception_reported(loop, loop_errors):
    loop_errors.expect(message="exception was never retrieved", exception=OSError)

    async def fails():
        raise OSError("lost")

    async def main():
        t = loop.create_task(fails())
        await asyncio.sleep(0.01)
        assert t.done()

    run(loop, main())
    gc.collect()


def test_debug_mode(loop):
    assert loop.get_debug() in (False, True)
    loop.set_debug(True)
    assert loop.get_debug() is True

    async def main():
        await asyncio.sleep(0)
        assert loop.get_debug()

        # in debug mode, a non-threadsafe call from another thread is refused
        def other_thread():
            with pytest.raises(RuntimeError):
                loop.call_soon(print)

        await loop.run_in_executor(None, other_thread)

    run(loop, main())
    loop.set_debug(False)
    assert loop.get_debug() is False


def test_tasks_names_and_factory(loop):
    async def child(i):
        await asyncio.sleep(0)
        return i

    async def main():
        t = loop.create_task(child(1), name="my-task")
        assert t.get_name() == "my-task"
        assert await t == 1
        made = []

        def factory(lp, coro, **kwargs):
            task = asyncio.Task(coro, loop=lp, **kwargs)
            made.append(task)
            return task

        loop.set_task_factory(factory)
        try:
            assert loop.get_task_factory() is factory
            assert await loop.create_task(child(2)) == 2
        finally:
            loop.set_task_factory(None)
        assert len(made) == 1
        results = await asyncio.gather(*(child(i) for i in range(1000)))
        assert results == list(range(1000))

    run(loop, main())


def test_shutdown_asyncgens(loop):
    closed = []

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            closed.append(asyncio.get_running_loop())

    async def start():
        g = agen()
        assert await g.__anext__() == 1
        return g

    g = run(loop, start())
    assert closed == []
    run(loop, loop.shutdown_asyncgens())
    assert closed == [loop]
    del g


def test_asyncgen_finalized_on_gc(loop):
    closed = []

    async def agen():
        try:
            yield 1
            yield 2
        finally:
            await asyncio.sleep(0)           # aclose() runs on the loop
            closed.append(True)

    async def main():
        g = agen()
        assert await g.__anext__() == 1
        del g
        gc.collect()
        for _ in range(10):
            await asyncio.sleep(0)
            if closed:
                break

    run(loop, main())
    assert closed == [True]


def test_wait_for_timeout_and_cancel(loop):
    async def main():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.sleep(10), 0.02)
        t = loop.create_task(asyncio.sleep(10))
        await asyncio.sleep(0)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert t.cancelled()

    run(loop, main())


def test_getaddrinfo_getnameinfo(loop):
    import socket

    async def main():
        infos = await loop.getaddrinfo("127.0.0.1", 80, type=socket.SOCK_STREAM)
        assert infos and infos[0][4] == ("127.0.0.1", 80)
        host, port = await loop.getnameinfo(("127.0.0.1", 80),
                                            socket.NI_NUMERICHOST | socket.NI_NUMERICSERV)
        assert (host, port) == ("127.0.0.1", "80")

    run(loop, main())
