"""proactor: Linux io_uring for high-throughput servers in Python.

The I/O thread and the kernel do all the I/O (the Proactor pattern); your handlers see
completed operations, on the I/O thread or on a worker pool::

    import proactor

    class Echo(proactor.Handler):
        def data_received(self, conn, data):
            conn.send(data)

    engine = proactor.Engine()
    engine.serve_tcp(Echo, "127.0.0.1", 8000)
    engine.run()          # until Ctrl-C / SIGTERM / engine.stop()
"""
from __future__ import annotations

import sys
from typing import Any

if not getattr(sys, "_is_gil_enabled", lambda: True)():
    # A free-threaded build (3.13t) running without the GIL. The C layer and the engines
    # rely on the GIL as their lock (the ring's state, counters, a connection's queues
    # are shared by the I/O thread and the workers without one of their own): without it
    # they would race. Refuse rather than corrupt a stream.
    raise ImportError(
        "proactor needs the GIL, and this free-threaded Python runs without it; run it "
        "with the GIL enabled (PYTHON_GIL=1 or python -X gil=1)")

from ._aio import EventLoopPolicy, ProactorEventLoop, install, new_event_loop, run
from ._common import Handler, Op, Stats, TimerHandle, WorkerPool
from ._errors import EngineClosed, ProactorError, UringUnavailable, os_error
from ._select import Choice
from ._select import choose as choose_backend

__version__ = "0.1.0"

__all__ = [
    "Engine", "choose_backend", "Choice", "Handler", "Op", "Stats", "TimerHandle", "WorkerPool",
    "EngineClosed", "ProactorError", "UringUnavailable", "os_error",
    "new_event_loop", "install", "run", "EventLoopPolicy", "ProactorEventLoop",
]


def Engine(*, backend: str | None = None, **options: Any) -> Any:
    """Make an engine on the backend :func:`choose_backend` picks.

    ``backend``: ``"auto"`` (default: io_uring where it works, else trio), ``"uring"`` or
    ``"trio"``; ``$PROACTOR_BACKEND`` sets the default. Asking for ``"uring"`` where it
    cannot run raises :class:`UringUnavailable` with the reason. Options of the io_uring
    engine: ``entries``, ``cq_entries``, ``buffers``, ``buffer_size`` (the trio engine
    accepts them; it uses ``buffer_size`` as its read size).
    """
    choice = choose_backend(backend)
    if choice.backend == "uring":
        from ._io_uring import UringEngine

        return UringEngine(**options)
    from ._trio import TrioEngine

    return TrioEngine(**options)
