"""Errors: every failure of an operation reaches the user as an ``OSError``.

The errno-specific subclass is chosen by ``OSError`` itself (``ConnectionResetError`` for
``ECONNRESET`` and so on); the message and the ``operation`` attribute say which
operation failed, e.g. ``[Errno 104] Connection reset by peer (recv)``.
"""
from __future__ import annotations

import os


class ProactorError(Exception):
    """Base class of errors raised by proactor itself (not by the kernel)."""


class UringUnavailable(ProactorError, OSError):
    """io_uring cannot be used here; ``reason`` says why (EPERM from seccomp, ...)."""

    def __init__(self, errno: int, reason: str) -> None:
        OSError.__init__(self, errno, reason)
        self.reason = reason


class EngineClosed(ProactorError, RuntimeError):
    """The engine has been shut down (or is shutting down)."""


def os_error(errno: int, operation: str) -> OSError:
    """An ``OSError`` (errno-specific subclass) for a failed ``operation``.

    ``errno`` may be given negated, as io_uring reports it in ``cqe->res``.
    """
    errno = abs(errno)
    exc = OSError(errno, f"{os.strerror(errno)} ({operation})")
    exc.operation = operation  # type: ignore[attr-defined]
    return exc
