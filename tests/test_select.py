"""Backend choice (``proactor._select``): auto falls back to trio with a logged reason,
``uring`` is never a silent fallback, ``trio`` is always honoured (issue "trio front-end").

Kernels and policies are simulated by replacing the probe ``_select`` runs with the real
:func:`proactor._diagnose.probe` given a stand-in ``io_uring_setup`` / ``register`` /
opcode list (see ``tests/support.py``), so every reason checked is the real text. The
process-wide probe cache and "logged once" flag of ``_select`` are reset around each test.
"""
from __future__ import annotations

import errno
import functools
import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Callable

import pytest
from support import (
    Echo,
    all_but,
    devnull_setup,
    echo_once,
    einval_register,
    failing_setup,
    ok_register,
    open_fds,
    wait_until,
)

import proactor
from proactor import _diagnose, _select

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parent.parent
HIDE_ENV = "PROACTOR_TEST_HIDE_EXTENSION"

#: Each simulated host where io_uring cannot run: probe() arguments (besides the sysctl
#: value), the reason the engine must give, and the errno of a forced ``uring``.
UNAVAILABLE = {
    "eperm-seccomp": (dict(setup=failing_setup(errno.EPERM)), 0,
                      "io_uring blocked by seccomp or a security policy (EPERM)", errno.EPERM),
    "eperm-sysctl2": (dict(setup=failing_setup(errno.EPERM)), 2,
                      "io_uring disabled by sysctl kernel.io_uring_disabled=2 (EPERM)",
                      errno.EPERM),
    "enosys": (dict(setup=failing_setup(errno.ENOSYS)), 0,
               "kernel has no io_uring (ENOSYS)", errno.ENOSYS),
    "missing-recv": (dict(setup=devnull_setup, register=ok_register,
                          read_opcodes=all_but("RECV")), 0,
                     "missing opcodes: RECV", errno.ENOSYS),
    "no-buf-ring": (dict(setup=devnull_setup, register=einval_register,
                         read_opcodes=all_but()), 0,
                    "the kernel has no provided-buffer rings (IORING_REGISTER_PBUF_RING, "
                    "Linux 5.19)", errno.ENOSYS),
}
#: A simulated host where everything io_uring needs works.
WORKING = dict(setup=devnull_setup, register=ok_register, read_opcodes=all_but())


@pytest.fixture
def fresh_select(monkeypatch: pytest.MonkeyPatch) -> None:
    """No cached probe, nothing logged yet, no $PROACTOR_BACKEND; all restored afterwards."""
    monkeypatch.setattr(_select, "_cached", None)
    monkeypatch.setattr(_select, "_logged", False)
    monkeypatch.delenv("PROACTOR_BACKEND", raising=False)


@pytest.fixture
def simulate(fresh_select: None, monkeypatch: pytest.MonkeyPatch,
             sysctl: Callable[[int], Path]) -> Callable[..., list]:
    """``simulate(sysctl_value, setup=..., register=..., read_opcodes=...)``: from now on
    ``_select`` probes through the real ``_diagnose.probe`` with those stand-ins, with the
    extension reported as built (so the kernel's reason is the one given, also when the
    suite runs with the extension hidden). Returns the list of probes made."""
    real_probe = _diagnose.probe
    calls: list = []

    def install(sysctl_value: int = 0, **kwargs: Any) -> list:
        path = sysctl(sysctl_value)

        def probe() -> _diagnose.UringSupport:
            calls.append(kwargs)
            return real_probe(disabled_path=path, **kwargs)

        monkeypatch.setattr(_select._diagnose, "probe", probe)
        monkeypatch.setattr(_select._diagnose, "_extension_status", lambda: ("built", ""))
        return calls

    return install


def simulate_case(simulate: Callable[..., list], case: str) -> tuple[str, int]:
    kwargs, sysctl_value, reason, err = UNAVAILABLE[case]
    simulate(sysctl_value, **kwargs)
    return reason, err


def fallback_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records
            if r.name == "proactor" and r.getMessage().endswith("; using trio")]


def serve_one_echo(engine: Any) -> None:
    """Start ``engine``, echo one message on 127.0.0.1, stop and close it; no fd left."""
    fds_before = open_fds()
    try:
        engine.start()
        srv = engine.serve_tcp(Echo, "127.0.0.1", 0)
        echo_once(("127.0.0.1", srv.port), b"fallback echo")
        engine.stop()
        assert engine.join(20), "the engine did not stop"
    finally:
        engine.close()
    wait_until(lambda: len(open_fds()) <= len(fds_before), timeout=5,
               message="the engine's fds to be closed")


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PROACTOR_BACKEND", HIDE_ENV, "PYTEST_ADDOPTS"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env.update(extra)
    return env


#: Prefix of the ``python -c`` snippets that run as without the compiled extension.
HIDE_SNIPPET = 'import sys\nsys.modules["proactor._uring_cffi"] = None\n'


# ---------------------------------------------------------------------------- auto fallback
@pytest.mark.parametrize("case", list(UNAVAILABLE))
def test_auto_falls_back_to_trio_with_the_reason(case, simulate, caplog):
    reason, _ = simulate_case(simulate, case)
    caplog.set_level(logging.WARNING, logger="proactor")

    assert _select.choose() == proactor.Choice("trio", reason)
    assert proactor.choose_backend("auto") == proactor.Choice("trio", reason)
    engine = proactor.Engine()
    assert engine.backend == "trio"
    serve_one_echo(engine)

    records = fallback_records(caplog)
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, f"{reason}; using trio")], "the fallback is logged exactly once"
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_probe_runs_once_per_process(simulate):
    calls = simulate(0, setup=failing_setup(errno.EPERM))
    for _ in range(3):
        assert _select.choose().backend == "trio"
    with pytest.raises(proactor.UringUnavailable):
        _select.choose("uring")
    assert len(calls) == 1


def test_reason_text_is_the_diagnosis(simulate):
    """The fallback reason is what ``python -m proactor`` reports for the same host."""
    simulate(2, setup=failing_setup(errno.EPERM))
    choice = _select.choose()
    assert _diagnose.report(_diagnose.probe()).splitlines()[-1] == (
        f"will use: trio ({choice.reason})")


# ---------------------------------------------------------------------------- forced uring
@pytest.mark.parametrize("via", ["argument", "environment"])
@pytest.mark.parametrize("case", list(UNAVAILABLE))
def test_forced_uring_raises_never_falls_back(case, via, simulate, monkeypatch, caplog):
    reason, err = simulate_case(simulate, case)
    caplog.set_level(logging.DEBUG, logger="proactor")
    if via == "argument":
        make = functools.partial(proactor.Engine, backend="uring")
    else:
        monkeypatch.setenv("PROACTOR_BACKEND", "uring")
        make = proactor.Engine

    for _ in range(2):  # the cached probe does not turn the error into a fallback
        with pytest.raises(proactor.UringUnavailable) as info:
            make()
        exc = info.value
        assert isinstance(exc, OSError)
        assert exc.errno == err
        assert reason in str(exc)
        assert reason in exc.reason
    assert not fallback_records(caplog)


# ---------------------------------------------------------------------------- forced trio
def test_trio_requested_where_uring_works(simulate, monkeypatch):
    simulate(0, **WORKING)
    assert _select.choose() == proactor.Choice("uring", "io_uring available")
    assert _select.choose("uring") == proactor.Choice("uring", "requested")
    assert _select.choose("trio") == proactor.Choice("trio", "requested")
    engine = proactor.Engine(backend="trio")
    try:
        assert engine.backend == "trio"
    finally:
        engine.close()
    monkeypatch.setenv("PROACTOR_BACKEND", "trio")
    assert _select.choose() == proactor.Choice("trio", "requested")
    serve_one_echo(proactor.Engine())


def test_trio_requested_never_probes_io_uring(fresh_select, monkeypatch):
    """A host whose seccomp filter kills on io_uring_setup can still run with trio."""
    def no_probe(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("io_uring was probed although trio was requested")

    monkeypatch.setattr(_select._diagnose, "probe", no_probe)
    assert _select.choose("trio").backend == "trio"
    monkeypatch.setenv("PROACTOR_BACKEND", "trio")
    assert _select.choose().backend == "trio"
    proactor.Engine().close()


@pytest.mark.parametrize("name, backend", [("auto", "uring"), ("AUTO", "uring"),
                                           ("uring", "uring"), ("io_uring", "uring"),
                                           (" Trio ", "trio"), ("", "uring")])
def test_backend_names(name, backend, simulate, monkeypatch):
    simulate(0, **WORKING)
    assert _select.choose(name or None).backend == backend
    monkeypatch.setenv("PROACTOR_BACKEND", name)
    assert _select.choose().backend == backend


@pytest.mark.parametrize("via", ["argument", "environment"])
def test_unknown_backend_name(via, simulate, monkeypatch):
    simulate(0, **WORKING)
    if via == "argument":
        make = functools.partial(proactor.Engine, backend="epoll")
    else:
        monkeypatch.setenv("PROACTOR_BACKEND", "epoll")
        make = proactor.Engine
    with pytest.raises(ValueError) as info:
        make()
    message = str(info.value)
    assert "'epoll'" in message
    for choice in ("uring", "trio", "auto"):
        assert re.search(rf"\b{choice}\b", message), message


def test_argument_wins_over_environment(simulate, monkeypatch):
    simulate(0, setup=failing_setup(errno.EPERM))
    monkeypatch.setenv("PROACTOR_BACKEND", "uring")  # would raise here
    engine = proactor.Engine(backend="trio")
    engine.close()
    assert engine.backend == "trio"
    monkeypatch.setenv("PROACTOR_BACKEND", "no-such-backend")  # would be a ValueError
    assert _select.choose("trio") == proactor.Choice("trio", "requested")
    assert _select.choose("auto").backend == "trio"

    monkeypatch.setattr(_select, "_cached", None)
    simulate(0, **WORKING)
    monkeypatch.setenv("PROACTOR_BACKEND", "trio")
    assert _select.choose("uring") == proactor.Choice("uring", "requested")
    assert _select.choose("auto") == proactor.Choice("uring", "io_uring available")


# ---------------------------------------------------------------------------- this machine
def test_auto_picks_uring_on_this_machine(fresh_select):
    problem = _select.uring_problem(_diagnose.probe(), _diagnose._extension_status())
    if problem is not None:
        pytest.skip(f"io_uring is unavailable here: {problem}")
    assert _select.choose() == proactor.Choice("uring", "io_uring available")
    engine = proactor.Engine()
    try:
        assert engine.backend == "io_uring"
    finally:
        engine.close()


# ---------------------------------------------------------------------------- python -m proactor
def test_main_reports_trio_when_requested():
    proc = subprocess.run([sys.executable, "-m", "proactor"], capture_output=True, text=True,
                          env=subprocess_env(PROACTOR_BACKEND="trio"), cwd=str(REPO_ROOT),
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "will use: trio (PROACTOR_BACKEND=trio)"


def test_main_reports_trio_without_extension():
    code = HIDE_SNIPPET + 'import runpy\nrunpy.run_module("proactor", run_name="__main__")\n'
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=subprocess_env(), cwd=str(REPO_ROOT), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\s+extension:\s+missing", proc.stdout, flags=re.M), proc.stdout
    assert proc.stdout.splitlines()[-1] == (
        "will use: trio (extension proactor._uring_cffi not built)")


# ---------------------------------------------------------------------------- hidden extension
ENGINE_WITHOUT_EXTENSION = HIDE_SNIPPET + textwrap.dedent('''
    import errno, logging, socket
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format="%(levelname)s:%(name)s:%(message)s")
    import proactor

    class Echo(proactor.Handler):
        def data_received(self, conn, data):
            conn.send(data)

    engine = proactor.Engine()
    print("backend", engine.backend)
    engine.start()
    srv = engine.serve_tcp(Echo, "127.0.0.1", 0)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=20) as s:
        s.sendall(b"no extension")
        got = b""
        while len(got) < 12:
            chunk = s.recv(64)
            if not chunk:
                break
            got += chunk
    print("echo", got.decode())
    engine.stop()
    assert engine.join(20)
    engine.close()
    try:
        proactor.Engine(backend="uring")
    except proactor.UringUnavailable as e:
        print("forced uring:", e.errno == errno.ENOSYS, e.reason)
''')


def test_engine_without_extension_subprocess():
    proc = subprocess.run([sys.executable, "-c", ENGINE_WITHOUT_EXTENSION],
                          capture_output=True, text=True, env=subprocess_env(),
                          cwd=str(REPO_ROOT), timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "backend trio",
        "echo no extension",
        "forced uring: True the io_uring backend cannot run here: "
        "extension proactor._uring_cffi not built",
    ], proc.stdout + proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING:")]
    assert warnings == [
        "WARNING:proactor:extension proactor._uring_cffi not built; using trio"], proc.stderr


#: The behavioural test files (every test there runs on each backend of conftest.BACKENDS).
BEHAVIOURAL = ["test_echo.py", "test_workers.py", "test_close.py", "test_ops.py",
               "test_engine.py", "test_memory_safety.py", "test_copy.py"]


@pytest.mark.slow
@pytest.mark.timeout(360)
def test_behavioural_suite_without_extension():
    """As on a system without the extension: uring cases skip with the reason, everything
    else passes on trio. Only the listed files run (not this one: no recursion)."""
    if os.environ.get(HIDE_ENV) == "1":
        pytest.skip(f"this run already has {HIDE_ENV}=1")
    assert "test_select.py" not in BEHAVIOURAL
    files = [f"tests/{name}" for name in BEHAVIOURAL]
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", "-rs", *files],
        capture_output=True, text=True, env=subprocess_env(**{HIDE_ENV: "1"}),
        cwd=str(REPO_ROOT), timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-6000:]
    summary = out.strip().splitlines()[-1]
    counts = {k: int(n) for n, k in re.findall(r"(\d+) (passed|skipped|failed|errors?)",
                                                  summary)}
    assert counts.get("passed", 0) > 0 and counts.get("skipped", 0) > 0, summary
    assert not counts.get("failed") and not counts.get("error") and not counts.get("errors")
    skips = re.findall(r"^SKIPPED \[(\d+)\] (.*)$", out, flags=re.M)
    assert sum(int(n) for n, _ in skips) == counts["skipped"], out[-6000:]
    for _, line in skips:
        assert (f"backend 'uring' unavailable: [Errno {errno.ENOSYS}] the io_uring backend "
                "cannot run here: extension proactor._uring_cffi not built") in line, line
    # every uring case skipped, so there are as many trio passes as uring skips at least
    assert counts["passed"] >= counts["skipped"], summary
