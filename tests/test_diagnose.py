from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from support import all_but, devnull_setup, einval_register, failing_setup, ok_register

from proactor import _diagnose

REPO_ROOT = Path(__file__).resolve().parent.parent
HEADER = Path("/usr/include/liburing/io_uring.h")


def _io_uring_usable_here() -> str | None:
    """None if the real-kernel tests can run, else the skip reason."""
    if not sys.platform.startswith("linux"):
        return f"not Linux ({sys.platform})"
    try:
        disabled = int(Path(_diagnose.IO_URING_DISABLED_PATH).read_text().strip())
    except (OSError, ValueError):
        disabled = 0  # kernel < 6.6 has no such sysctl
    if disabled != 0:
        return f"kernel.io_uring_disabled={disabled}"
    return None


needs_io_uring = pytest.mark.skipif(
    _io_uring_usable_here() is not None, reason=str(_io_uring_usable_here())
)


def _open_fds() -> int | None:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return None


# --------------------------------------------------------------------------
# Constants
# --------------------------------------------------------------------------


@pytest.mark.skipif(not HEADER.exists(), reason=f"{HEADER} not installed")
def test_opcode_numbers_match_liburing_header() -> None:
    text = HEADER.read_text()
    body = text[text.index("enum io_uring_op {") :]
    body = body[: body.index("};")]
    names = re.findall(r"^\s*IORING_OP_(\w+)\s*,", body, flags=re.M)
    numbers = {name: i for i, name in enumerate(names)}
    for name, num in _diagnose.OPCODES.items():
        assert numbers[name] == num, name


def test_required_is_subset_of_opcodes() -> None:
    assert set(_diagnose.REQUIRED) <= set(_diagnose.OPCODES)
    assert "RECV" in _diagnose.REQUIRED


# --------------------------------------------------------------------------
# The real kernel
# --------------------------------------------------------------------------


@needs_io_uring
def test_probe_on_this_machine() -> None:
    before = _open_fds()
    support = _diagnose.probe()
    assert support.setup_errno is None
    assert support.available, support.reason
    assert support.reason == "ok"
    assert support.missing == ()
    assert support.platform == sys.platform
    for name in ("RECV", "SEND", "ACCEPT", "CONNECT", "READ", "WRITE"):
        assert support.opcodes[name] is True
    assert set(support.opcodes) == set(_diagnose.OPCODES)
    assert set(support.setup_flags) == set(_diagnose.SETUP_FLAGS)
    assert support.features != 0
    assert isinstance(support.buf_ring, bool)
    assert _open_fds() == before  # every probe ring was closed


@needs_io_uring
def test_real_ring_with_simulated_missing_opcode() -> None:
    support = _diagnose.probe(read_opcodes=all_but("SEND"))
    assert support.setup_errno is None
    assert not support.available
    assert support.missing == ("SEND",)
    assert support.reason == "missing opcodes: SEND"


@needs_io_uring
def test_real_ring_opcode_listing_fails() -> None:
    def broken(fd: int) -> set[int]:
        raise OSError(errno.EINVAL, "nope")

    support = _diagnose.probe(read_opcodes=broken)
    assert not support.available
    assert "IORING_REGISTER_PROBE" in support.reason
    assert "EINVAL" in support.reason


# --------------------------------------------------------------------------
# Simulated setup failures (run on any OS)
# --------------------------------------------------------------------------


def test_eperm_with_sysctl_zero_is_seccomp(sysctl) -> None:
    support = _diagnose.probe(failing_setup(errno.EPERM), disabled_path=sysctl(0))
    assert support.io_uring_disabled == 0
    assert support.setup_errno == errno.EPERM
    assert not support.available
    assert support.reason == "io_uring blocked by seccomp or a security policy (EPERM)"
    assert support.missing == ()
    assert not any(support.setup_flags.values())
    assert not any(support.opcodes.values())
    assert support.buf_ring is False


def test_eperm_with_sysctl_two_is_sysctl(sysctl) -> None:
    support = _diagnose.probe(failing_setup(errno.EPERM), disabled_path=sysctl(2))
    assert support.io_uring_disabled == 2
    assert not support.available
    assert support.reason == (
        "io_uring disabled by sysctl kernel.io_uring_disabled=2 (EPERM)"
    )


def test_eperm_with_sysctl_one_is_group(sysctl, tmp_path: Path) -> None:
    path = sysctl(1)
    (tmp_path / "io_uring_group").write_text("1234\n")
    support = _diagnose.probe(failing_setup(errno.EPERM), disabled_path=path)
    assert support.io_uring_disabled == 1
    assert support.reason.startswith(
        "io_uring_disabled=1 and this process is not in the io_uring group"
    )
    assert "kernel.io_uring_group=1234" in support.reason
    assert support.reason.endswith("(EPERM)")


def test_module_level_sysctl_path_is_read_at_call_time(sysctl, monkeypatch) -> None:
    monkeypatch.setattr(_diagnose, "IO_URING_DISABLED_PATH", str(sysctl(2)))
    support = _diagnose.probe(failing_setup(errno.EPERM))
    assert "kernel.io_uring_disabled=2" in support.reason


def test_missing_sysctl_file_reads_as_none(tmp_path: Path) -> None:
    support = _diagnose.probe(
        failing_setup(errno.EPERM), disabled_path=tmp_path / "does-not-exist"
    )
    assert support.io_uring_disabled is None
    assert "seccomp" in support.reason


def test_enosys(sysctl) -> None:
    support = _diagnose.probe(failing_setup(errno.ENOSYS), disabled_path=sysctl(0))
    assert support.setup_errno == errno.ENOSYS
    assert not support.available
    assert support.reason == "kernel has no io_uring (ENOSYS)"


@pytest.mark.parametrize("style", ["negative", "oserror"])
def test_other_failure_styles_of_injected_setup(style: str, sysctl) -> None:
    def setup(entries: int, params_address: int) -> int:
        if style == "negative":
            return -errno.ENOSYS
        raise OSError(errno.ENOSYS, "no")

    support = _diagnose.probe(setup, disabled_path=sysctl(0))
    assert support.setup_errno == errno.ENOSYS
    assert "ENOSYS" in support.reason


def test_other_errno_is_named(sysctl) -> None:
    support = _diagnose.probe(failing_setup(errno.ENOMEM), disabled_path=sysctl(0))
    assert support.setup_errno == errno.ENOMEM
    assert "ENOMEM" in support.reason


# --------------------------------------------------------------------------
# Simulated opcode probe results (run on any OS)
# --------------------------------------------------------------------------


def test_simulated_missing_opcode(sysctl) -> None:
    before = _open_fds()
    support = _diagnose.probe(
        devnull_setup,
        register=einval_register,
        read_opcodes=all_but("RECV"),
        disabled_path=sysctl(0),
    )
    assert support.setup_errno is None
    assert not support.available
    assert support.missing == ("RECV",)
    assert "RECV" in support.reason
    assert support.reason.startswith("missing opcodes:")
    assert support.opcodes["RECV"] is False
    assert support.opcodes["SEND"] is True
    assert support.buf_ring is False  # register said EINVAL
    assert all(support.setup_flags.values())  # the fake setup accepts any flag
    assert _open_fds() == before  # probe closed every fd the fake handed out


def test_simulated_missing_optional_opcode_is_still_available(sysctl) -> None:
    support = _diagnose.probe(
        devnull_setup,
        register=einval_register,
        read_opcodes=all_but("SPLICE"),
        disabled_path=sysctl(0),
    )
    assert support.available
    assert support.reason == "ok"
    assert support.missing == ()
    assert support.opcodes["SPLICE"] is False


def test_simulated_flags_are_probed_individually(sysctl) -> None:
    single = _diagnose.SETUP_FLAGS["SINGLE_ISSUER"]
    defer = _diagnose.SETUP_FLAGS["DEFER_TASKRUN"]
    seen: list[int] = []

    def setup(entries: int, params_address: int) -> int:
        params = _diagnose._Params.from_address(params_address)
        seen.append(params.flags)
        if params.flags & defer:
            assert params.flags & single  # DEFER_TASKRUN is probed with SINGLE_ISSUER
            ctypes.set_errno(errno.EINVAL)
            return -1
        return os.open(os.devnull, os.O_RDONLY)

    support = _diagnose.probe(
        setup, register=einval_register, read_opcodes=all_but(), disabled_path=sysctl(0)
    )
    assert support.setup_flags["DEFER_TASKRUN"] is False
    assert support.setup_flags["SINGLE_ISSUER"] is True
    assert seen[0] == 0  # the base ring has no flags
    assert len(seen) == 1 + len(_diagnose.SETUP_FLAGS)


# --------------------------------------------------------------------------
# Platform gating
# --------------------------------------------------------------------------


def test_not_linux(monkeypatch) -> None:
    monkeypatch.setattr(_diagnose.sys, "platform", "darwin")
    support = _diagnose.probe()
    assert not support.available
    assert support.reason == "not Linux (darwin)"
    assert support.setup_errno is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
def test_unknown_architecture(monkeypatch) -> None:
    monkeypatch.setattr(_diagnose.platform, "machine", lambda: "mips64")
    support = _diagnose.probe()
    assert not support.available
    assert "unknown architecture (mips64)" in support.reason


# --------------------------------------------------------------------------
# Dataclass, report, JSON
# --------------------------------------------------------------------------


def _fake_support(sysctl, *missing: str) -> _diagnose.UringSupport:
    return _diagnose.probe(
        devnull_setup,
        register=einval_register,
        read_opcodes=all_but(*missing),
        disabled_path=sysctl(0),
    )


def test_dataclass_is_frozen_and_json_friendly(sysctl) -> None:
    support = _fake_support(sysctl, "RECV")
    with pytest.raises(dataclasses.FrozenInstanceError):
        support.reason = "x"  # type: ignore[misc]
    d = json.loads(json.dumps(support.as_dict()))
    assert d["missing"] == ["RECV"]
    assert d["available"] is False


def test_report_will_use_io_uring_when_all_good(sysctl, monkeypatch) -> None:
    monkeypatch.setattr(_diagnose, "_extension_status", lambda: ("built", ""))
    monkeypatch.delenv("PROACTOR_BACKEND", raising=False)
    support = _diagnose.probe(devnull_setup, register=ok_register, read_opcodes=all_but(),
                              disabled_path=sysctl(0))
    assert support.buf_ring
    assert _diagnose.report(support).splitlines()[-1] == "will use: io_uring"
    # without provided-buffer rings the engine cannot run: trio, and why
    text = _diagnose.report(_fake_support(sysctl))
    assert text.splitlines()[-1] == ("will use: trio (the kernel has no provided-buffer rings "
                                     "(IORING_REGISTER_PBUF_RING, Linux 5.19))")
    assert "extension:" in text and "built" in text
    for name in _diagnose.REQUIRED:
        assert re.search(rf"^\s+{name}:\s+yes$", text, flags=re.M), name
    for name in _diagnose.SETUP_FLAGS:
        assert re.search(rf"^\s+{name}:\s+yes$", text, flags=re.M), name
    assert re.search(r"^\s+buffer ring:\s+no", text, flags=re.M)
    assert "kernel:" in text and "io_uring_disabled:" in text


def test_report_falls_back_to_trio_without_extension(sysctl, monkeypatch) -> None:
    monkeypatch.setattr(
        _diagnose,
        "_extension_status",
        lambda: ("missing", "pip install from source on Linux builds it"),
    )
    text = _diagnose.report(_fake_support(sysctl))
    assert "extension:" in text
    assert "missing (pip install from source on Linux builds it)" in text
    assert text.splitlines()[-1].startswith("will use: trio (")


def test_report_gives_kernel_reason(sysctl, monkeypatch) -> None:
    monkeypatch.setattr(_diagnose, "_extension_status", lambda: ("built", ""))
    support = _diagnose.probe(failing_setup(errno.EPERM), disabled_path=sysctl(2))
    text = _diagnose.report(support)
    assert "failed: io_uring disabled by sysctl" in text
    assert text.splitlines()[-1] == (
        "will use: trio (io_uring disabled by sysctl kernel.io_uring_disabled=2 (EPERM))"
    )
    missing = _diagnose.report(_fake_support(sysctl, "RECV", "SEND"))
    assert re.search(r"^\s+RECV:\s+no$", missing, flags=re.M)
    assert missing.splitlines()[-1] == "will use: trio (missing opcodes: RECV, SEND)"


def test_extension_status_shape() -> None:
    status, detail = _diagnose._extension_status()
    assert status in ("built", "missing", "broken")
    assert isinstance(detail, str)


# --------------------------------------------------------------------------
# python -m proactor
# --------------------------------------------------------------------------


def _run_main(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    return subprocess.run(
        [sys.executable, "-m", "proactor", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(REPO_ROOT),
        timeout=60,
    )


def test_main_prints_report_and_exits_zero() -> None:
    proc = _run_main()
    assert proc.returncode == 0, proc.stderr
    assert "will use:" in proc.stdout
    assert "kernel:" in proc.stdout


def test_main_json() -> None:
    proc = _run_main("--json")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    for field in dataclasses.fields(_diagnose.UringSupport):
        assert field.name in data
    assert isinstance(data["available"], bool)
    assert data["will_use"].startswith(("io_uring", "trio"))
    assert data["extension"] in ("built", "missing", "broken")
