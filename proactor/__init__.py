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

from typing import Any

from ._common import Handler, Op, Stats, TimerHandle, WorkerPool
from ._errors import EngineClosed, ProactorError, UringUnavailable, os_error

__version__ = "0.1.0"

__all__ = [
    "Engine", "Handler", "Op", "Stats", "TimerHandle", "WorkerPool",
    "EngineClosed", "ProactorError", "UringUnavailable", "os_error",
]


def Engine(*, backend: str | None = None, **options: Any) -> Any:
    """Make an engine. ``backend``: ``"uring"`` (the default; the only one so far).

    Options of the io_uring engine: ``entries``, ``cq_entries``, ``buffers``,
    ``buffer_size`` (see :class:`proactor._io_uring.UringEngine`). Raises
    :class:`UringUnavailable` with the reason when io_uring cannot be used here.
    """
    import os

    backend = backend or os.environ.get("PROACTOR_BACKEND") or "uring"
    if backend not in ("uring", "io_uring"):
        raise ValueError(f"unknown backend {backend!r} (available: 'uring')")
    from ._io_uring import UringEngine

    return UringEngine(**options)
