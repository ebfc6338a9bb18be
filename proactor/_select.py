"""Which backend an engine runs on - decided here and nowhere else.

``auto`` (the default) takes io_uring when the extension is built, a ring can be set up
and the kernel has what the engine needs (the required opcodes, provided-buffer rings);
otherwise trio, logged once with the reason. ``PROACTOR_BACKEND=uring|trio|auto`` or the
``backend=`` argument override it; asking for ``uring`` where it cannot work raises
:class:`~proactor.UringUnavailable` instead of falling back.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import threading
from typing import Optional

from . import _diagnose
from ._errors import UringUnavailable

logger = logging.getLogger("proactor")

__all__ = ["Choice", "choose", "uring_problem"]

_NAMES = {"auto": "auto", "uring": "uring", "io_uring": "uring", "trio": "trio"}


@dataclasses.dataclass(frozen=True)
class Choice:
    """The backend chosen (``"uring"`` or ``"trio"``) and why."""

    backend: str
    reason: str


def uring_problem(support: _diagnose.UringSupport,
                  extension: tuple[str, str]) -> Optional[str]:
    """Why the io_uring backend cannot run here, or None when it can."""
    status, detail = extension
    if status == "missing":
        if not support.platform.startswith("linux"):
            return support.reason if not support.available else "extension not built"
        return "extension proactor._uring_cffi not built"
    if status != "built":
        return f"extension proactor._uring_cffi failed to import: {detail}"
    if not support.available:
        return support.reason
    if not support.buf_ring:
        return "the kernel has no provided-buffer rings (IORING_REGISTER_PBUF_RING, Linux 5.19)"
    return None


_lock = threading.Lock()
_cached: Optional[tuple[Optional[str], int]] = None
_logged = False


def _uring_problem_here() -> tuple[Optional[str], int]:
    """(problem or None, errno) for this process; probed once, then cached."""
    global _cached
    with _lock:
        if _cached is None:
            support = _diagnose.probe()
            problem = uring_problem(support, _diagnose._extension_status())
            _cached = (problem, support.setup_errno or errno.ENOSYS)
        return _cached


def choose(requested: Optional[str] = None, *, instead: str = "trio") -> Choice:
    """The backend for a new engine: ``requested``, else ``$PROACTOR_BACKEND``, else auto.
    ``instead`` names what the caller falls back to, for the log line."""
    global _logged
    name = requested or os.environ.get("PROACTOR_BACKEND") or "auto"
    backend = _NAMES.get(name.strip().lower())
    if backend is None:
        raise ValueError(f"unknown backend {name!r}: choose 'uring', 'trio' or 'auto'")
    if backend == "trio":
        return Choice("trio", "requested")
    problem, err = _uring_problem_here()
    if backend == "uring":
        if problem is not None:
            raise UringUnavailable(err, f"the io_uring backend cannot run here: {problem}")
        return Choice("uring", "requested")
    if problem is None:
        return Choice("uring", "io_uring available")
    with _lock:
        first = not _logged
        _logged = True
    if first:
        logger.warning("%s; using %s", problem, instead)
    return Choice("trio", problem)
