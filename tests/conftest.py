"""Fixtures of the engine tests (uvloop ``_testbase`` style, adapted to pytest).

* ``backend``: parametrized over :data:`BACKENDS`; skips, with the reason, where a backend
  cannot run here. Adding a backend is adding its name to :data:`BACKENDS`.
* ``make_engine(**options)``: makes and ``start()``s an engine (its loop runs on a
  background thread). At teardown every engine it made must come back to the idle
  baseline (see :func:`idle_problems`), then it is closed, and the process must have no
  more open fds than before the first engine was made.
* ``engine``: one started engine; options through indirect parametrization::

      @pytest.mark.parametrize("engine", [{"buffers": 8}], indirect=True)

* ``sysctl(value)``: writes a fake ``kernel.io_uring_disabled`` file, returns its path
  (for ``proactor._diagnose.probe(disabled_path=...)``).
* ``PROACTOR_TEST_HIDE_EXTENSION=1`` in the environment hides ``proactor._uring_cffi``
  (as on a system where it is not built): the uring cases skip, the rest run on trio.
* ``log_errors``: ERROR records of the ``proactor`` logger fail the test unless declared
  with ``log_errors.expect(regex)`` (an expected error must then actually be logged).
"""
from __future__ import annotations

import os
import sys

# PROACTOR_TEST_HIDE_EXTENSION=1: run as on a system without the compiled extension (not
# Linux, or not built). It must be hidden before anything imports proactor: with None in
# sys.modules, `import proactor._uring_cffi` raises ImportError. The uring cases then skip
# (Engine(backend="uring") raises UringUnavailable) and every behavioural test runs on trio.
HIDE_EXTENSION_ENV = "PROACTOR_TEST_HIDE_EXTENSION"
EXTENSION_MODULE = "proactor._uring_cffi"
if os.environ.get(HIDE_EXTENSION_ENV) == "1":
    if sys.modules.get(EXTENSION_MODULE) is not None:
        raise RuntimeError(f"{HIDE_EXTENSION_ENV}=1: {EXTENSION_MODULE} was imported before "
                           "tests/conftest.py; it cannot be hidden any more")
    sys.modules[EXTENSION_MODULE] = None  # type: ignore[assignment]

import logging  # noqa: E402
import re  # noqa: E402
import threading  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import pytest  # noqa: E402
from support import describe_fds, open_fds, wait_until  # noqa: E402

import proactor  # noqa: E402

#: Every backend the behavioural tests run on.
BACKENDS = ["uring", "trio"]

_unavailable: dict[str, Optional[str]] = {}


def backend_unavailable(name: str) -> Optional[str]:
    """None when an engine of backend ``name`` can start here, else why not (cached)."""
    if name not in _unavailable:
        reason = None
        try:
            eng = proactor.Engine(backend=name)
        except (proactor.UringUnavailable, ImportError) as e:
            reason = f"backend {name!r} unavailable: {e}"
        else:
            try:
                eng.start()
            except proactor.UringUnavailable as e:
                reason = f"backend {name!r} unavailable: {e.reason}"
            finally:
                eng.close()
        _unavailable[name] = reason
    return _unavailable[name]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    reason = backend_unavailable(request.param)
    if reason:
        pytest.skip(reason)
    return request.param


@pytest.fixture
def sysctl(tmp_path: Path) -> Callable[[int], Path]:
    """Write a fake kernel.io_uring_disabled file; returns its path."""

    def write(value: int) -> Path:
        path = tmp_path / "io_uring_disabled"
        path.write_text(f"{value}\n")
        return path

    return write


# ---------------------------------------------------------------------------- error log
class ErrorLog(logging.Handler):
    """Collects ERROR (and worse) records of the ``proactor`` logger, from any thread."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []
        self._expected: list[tuple[re.Pattern, int]] = []
        self._lock2 = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        with self._lock2:
            self.records.append(record)

    def expect(self, pattern: str, *, min_count: int = 1) -> None:
        """Declare that ERROR records whose message matches ``pattern`` (re.search) are
        expected; at least ``min_count`` of them must be logged by the end of the test."""
        self._expected.append((re.compile(pattern), min_count))

    def matching(self, pattern: str) -> list[logging.LogRecord]:
        rx = re.compile(pattern)
        with self._lock2:
            return [r for r in self.records if rx.search(r.getMessage())]

    def problems(self) -> list[str]:
        with self._lock2:
            records = list(self.records)
        out = []
        for r in records:
            if not any(rx.search(r.getMessage()) for rx, _ in self._expected):
                text = r.getMessage()
                if r.exc_info and r.exc_info[1] is not None:
                    text += f" [{type(r.exc_info[1]).__name__}: {r.exc_info[1]}]"
                out.append(f"unexpected ERROR logged by {r.name!r} on thread "
                           f"{r.threadName}: {text}")
        for rx, n in self._expected:
            got = sum(1 for r in records if rx.search(r.getMessage()))
            if got < n:
                out.append(f"expected at least {n} ERROR record(s) matching {rx.pattern!r}, "
                           f"got {got}")
        return out


@pytest.fixture
def log_errors() -> Any:
    handler = ErrorLog()
    logger = logging.getLogger("proactor")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


# ---------------------------------------------------------------------------- engines
def idle_problems(engine: Any, servers: list) -> dict:
    """How ``engine`` differs from an idle one: exactly one request in flight (the wakeup
    pipe read) plus one per open listening socket (its multishot accept), nothing
    pinned, no receive buffer out, no connection, nothing queued for workers or sending."""
    st = engine.stats()
    listeners = sum(len(s.addresses) for s in servers if not s.closed)
    want = {"ops_in_flight": 1 + listeners, "pinned_objects": 0, "buffers_in_use": 0,
            "connections": 0, "queue_depth": 0, "send_queued": 0}
    return {k: (getattr(st, k), v) for k, v in want.items() if getattr(st, k) != v}


class Engines:
    """The engines a test made, and what they serve (to know the idle baseline)."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.engines: list[Any] = []
        self.servers: dict[int, list] = {}

    def make(self, **options: Any) -> Any:
        eng = proactor.Engine(backend=self.backend, **options)
        try:
            eng.start()
        except proactor.UringUnavailable as e:
            eng.close()
            pytest.skip(f"backend {self.backend!r} unavailable: {e.reason}")
        servers: list = []
        self.servers[id(eng)] = servers
        serve_tcp = eng.serve_tcp

        def tracked_serve_tcp(*args: Any, **kwargs: Any) -> Any:
            srv = serve_tcp(*args, **kwargs)
            servers.append(srv)
            return srv

        eng.serve_tcp = tracked_serve_tcp
        self.engines.append(eng)
        return eng

    def idle_problems(self, engine: Any) -> dict:
        return idle_problems(engine, self.servers[id(engine)])

    def wait_idle(self, engine: Any, timeout: float = 10.0) -> None:
        """Wait until ``engine`` is back at the idle baseline; fail with the difference."""
        try:
            wait_until(lambda: not self.idle_problems(engine), timeout=timeout)
        except AssertionError:
            raise AssertionError(f"engine not idle after {timeout} s: (actual, wanted) = "
                                 f"{self.idle_problems(engine)}; {engine.stats()}") from None


@pytest.fixture
def engines(backend: str, log_errors: ErrorLog) -> Any:
    """The factory behind ``make_engine``, with ``wait_idle(engine)`` for tests."""
    fds_before = open_fds()
    reg = Engines(backend)
    yield reg
    problems: list[str] = []
    for eng in reg.engines:
        if eng.running:
            try:
                reg.wait_idle(eng)
            except AssertionError as e:
                problems.append(str(e))
        eng.stop()
        if not eng.join(20):
            problems.append(f"engine {eng!r} did not stop within 20 s")
        eng.close()
    try:
        wait_until(lambda: len(open_fds()) <= len(fds_before), timeout=5)
    except AssertionError:
        extra = open_fds() - fds_before
        problems.append(f"fd leak: {len(open_fds())} open fds, {len(fds_before)} before the "
                        f"engine; new: {describe_fds(extra)}")
    problems += log_errors.problems()
    if problems:
        pytest.fail("engine teardown checks failed:\n  " + "\n  ".join(problems),
                    pytrace=False)


@pytest.fixture
def make_engine(engines: Engines) -> Callable[..., Any]:
    return engines.make


@pytest.fixture
def engine(request: pytest.FixtureRequest, engines: Engines) -> Any:
    options = getattr(request, "param", None) or {}
    return engines.make(**options)
