"""proactor's own entry points: run(), install(), EventLoopPolicy (not parametrized:
they make proactor loops themselves). Skipped while they do not exist yet."""
from __future__ import annotations

import asyncio
import logging

import pytest

from .utils import describe_fds, open_fds

pytestmark = pytest.mark.timeout(60)


def _proactor_attr(name):
    try:
        import proactor
    except ImportError as e:
        pytest.skip(f"proactor is not importable: {e}")
    obj = getattr(proactor, name, None)
    if obj is None:
        pytest.skip(f"proactor.{name} does not exist yet")
    return proactor, obj


def _is_proactor_loop(lp):
    return type(lp).__module__.split(".")[0] == "proactor"


@pytest.fixture
def uring_loop_available():
    proactor, factory = _proactor_attr("new_event_loop")
    try:
        lp = factory()
    except proactor.UringUnavailable as e:
        pytest.skip(f"proactor's loop is unavailable here: {getattr(e, 'reason', e)}")
    try:
        if not _is_proactor_loop(lp):
            pytest.skip("proactor.new_event_loop() falls back to asyncio's loop here")
    finally:
        lp.close()


@pytest.fixture
def no_leaks():
    fds = open_fds()
    policy = asyncio.get_event_loop_policy()
    yield
    asyncio.set_event_loop_policy(None)
    assert type(asyncio.get_event_loop_policy()) is type(policy)
    extra = open_fds() - fds
    assert len(open_fds()) <= len(fds), f"fd leak: {describe_fds(extra)}"


def test_run(uring_loop_available, no_leaks):
    _, run = _proactor_attr("run")

    async def main(x):
        lp = asyncio.get_running_loop()
        await asyncio.sleep(0.01)
        return x * 2, _is_proactor_loop(lp), lp

    result, is_proactor, lp = run(main(21))
    assert result == 42
    assert is_proactor
    assert lp.is_closed()

    async def fails():
        raise KeyError("from main")

    with pytest.raises(KeyError):
        run(fails())


def test_event_loop_policy(uring_loop_available, no_leaks):
    _, policy_cls = _proactor_attr("EventLoopPolicy")
    asyncio.set_event_loop_policy(policy_cls())
    lp = asyncio.new_event_loop()
    try:
        assert _is_proactor_loop(lp)
        assert lp.run_until_complete(asyncio.sleep(0, "ok")) == "ok"
    finally:
        lp.close()
    # asyncio.run() goes through the policy
    assert asyncio.run(_running_loop_is_proactor())


async def _running_loop_is_proactor():
    return _is_proactor_loop(asyncio.get_running_loop())


def test_install(uring_loop_available, no_leaks):
    proactor, install = _proactor_attr("install")
    install()
    assert isinstance(asyncio.get_event_loop_policy(), proactor.EventLoopPolicy)
    assert asyncio.run(_running_loop_is_proactor())


def test_new_event_loop_falls_back_where_io_uring_cannot_run(monkeypatch, caplog):
    """Where io_uring is unavailable, new_event_loop() gives asyncio's own loop and the
    reason is logged (once)."""
    import proactor
    from proactor import _select

    monkeypatch.setattr(_select, "_cached", ("io_uring blocked by seccomp or a security "
                                             "policy (EPERM)", 1))
    monkeypatch.setattr(_select, "_logged", False)
    monkeypatch.delenv("PROACTOR_BACKEND", raising=False)
    with caplog.at_level(logging.WARNING, logger="proactor"):
        loop = proactor.new_event_loop()
        loop2 = proactor.new_event_loop()
    try:
        assert not isinstance(loop, proactor.ProactorEventLoop)
        assert isinstance(loop, asyncio.AbstractEventLoop)
        assert loop.run_until_complete(asyncio.sleep(0, "ok")) == "ok"
    finally:
        loop.close()
        loop2.close()
    msgs = [r.getMessage() for r in caplog.records if r.name == "proactor"]
    assert msgs == ["io_uring blocked by seccomp or a security policy (EPERM); "
                    "using asyncio's own event loop"]
