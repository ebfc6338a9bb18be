"""Diagnose whether this process can use io_uring, and why not.

This module talks to the kernel with raw system calls through :mod:`ctypes`
(``io_uring_setup``, ``io_uring_register``, ``close``) so that it works
without the compiled cffi extension, and it imports on any operating system
(only the standard library is used; nothing touches the kernel at import
time).

The probe sets up a tiny ring (8 entries), asks the kernel which opcodes it
supports (``IORING_REGISTER_PROBE``), tries to register a ring-mapped
provided-buffer group (``IORING_REGISTER_PBUF_RING``), then closes the ring.
The ring's SQ/CQ areas are never mmap'd. Each optional setup flag is probed
by setting up (and closing) one more ring with that flag.

Nothing is cached: every :func:`probe` call asks the kernel again.

Caveat: a seccomp filter that *kills* the process on ``io_uring_setup``
(rather than returning an errno) cannot be diagnosed from inside the process.

``python -m proactor`` prints :func:`report`; ``python -m proactor --json``
prints :func:`to_json`.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import importlib
import json
import mmap
import os
import platform
import sys
from collections.abc import Callable, Iterable
from typing import Any

__all__ = [
    "IO_URING_DISABLED_PATH",
    "OPCODES",
    "REQUIRED",
    "SETUP_FLAGS",
    "UringSupport",
    "probe",
    "report",
    "to_json",
]

# --------------------------------------------------------------------------
# Kernel ABI constants (from <linux/io_uring.h>, as shipped by liburing).
# --------------------------------------------------------------------------

#: sysctl controlling io_uring (Linux >= 6.6): 0 = allowed, 1 = only
#: CAP_SYS_ADMIN or members of kernel.io_uring_group, 2 = disabled.
#: Module-level so tests (or callers) can point it somewhere else; it is read
#: at call time.  ``kernel.io_uring_group`` is read from the sibling file.
IO_URING_DISABLED_PATH = "/proc/sys/kernel/io_uring_disabled"

#: (io_uring_setup, io_uring_register) syscall numbers by platform.machine().
#: io_uring arrived after the syscall tables were unified, so every listed
#: architecture uses the generic numbers.  Anything else is "unknown".
_SYSCALLS: dict[str, tuple[int, int]] = {
    "x86_64": (425, 427),
    "amd64": (425, 427),
    "aarch64": (425, 427),
    "arm64": (425, 427),
    "armv7l": (425, 427),
    "armv6l": (425, 427),
    "i386": (425, 427),
    "i686": (425, 427),
    "riscv64": (425, 427),
    "ppc64le": (425, 427),
    "s390x": (425, 427),
    "loongarch64": (425, 427),
}

#: enum io_uring_op values for the opcodes the library uses.
OPCODES: dict[str, int] = {
    "NOP": 0,
    "READV": 1,
    "WRITEV": 2,
    "READ_FIXED": 4,
    "WRITE_FIXED": 5,
    "POLL_ADD": 6,
    "SENDMSG": 9,
    "RECVMSG": 10,
    "TIMEOUT": 11,
    "TIMEOUT_REMOVE": 12,
    "ACCEPT": 13,
    "ASYNC_CANCEL": 14,
    "LINK_TIMEOUT": 15,
    "CONNECT": 16,
    "OPENAT": 18,
    "CLOSE": 19,
    "READ": 22,
    "WRITE": 23,
    "SEND": 26,
    "RECV": 27,
    "SPLICE": 30,
    "PROVIDE_BUFFERS": 31,
    "SHUTDOWN": 34,
}

#: Opcodes without which the io_uring backend is not used.
REQUIRED: tuple[str, ...] = (
    "ACCEPT",
    "CONNECT",
    "RECV",
    "SEND",
    "SENDMSG",
    "READ",
    "WRITE",
    "READ_FIXED",
    "WRITE_FIXED",
    "OPENAT",
    "CLOSE",
    "TIMEOUT",
    "LINK_TIMEOUT",
    "ASYNC_CANCEL",
    "POLL_ADD",
)

#: Optional io_uring_setup flags that are probed (IORING_SETUP_*).
SETUP_FLAGS: dict[str, int] = {
    "SINGLE_ISSUER": 1 << 12,
    "DEFER_TASKRUN": 1 << 13,  # only valid together with SINGLE_ISSUER
    "COOP_TASKRUN": 1 << 8,
    "CQSIZE": 1 << 3,
    "SUBMIT_ALL": 1 << 7,
}

_IORING_REGISTER_PROBE = 8
_IORING_REGISTER_PBUF_RING = 22
_IORING_UNREGISTER_PBUF_RING = 23
_IO_URING_OP_SUPPORTED = 1

_PROBE_ENTRIES = 8  # SQ size of the throw-away probe rings
_PROBE_OPS = 256  # room in struct io_uring_probe.ops[]
_BUF_RING_ENTRIES = 8

_EXTENSION_MODULE = "proactor._uring_cffi"

_u8 = ctypes.c_uint8
_u16 = ctypes.c_uint16
_u32 = ctypes.c_uint32
_u64 = ctypes.c_uint64


class _SQRingOffsets(ctypes.Structure):
    _fields_ = [
        ("head", _u32),
        ("tail", _u32),
        ("ring_mask", _u32),
        ("ring_entries", _u32),
        ("flags", _u32),
        ("dropped", _u32),
        ("array", _u32),
        ("resv1", _u32),
        ("user_addr", _u64),
    ]


class _CQRingOffsets(ctypes.Structure):
    _fields_ = [
        ("head", _u32),
        ("tail", _u32),
        ("ring_mask", _u32),
        ("ring_entries", _u32),
        ("overflow", _u32),
        ("cqes", _u32),
        ("flags", _u32),
        ("resv1", _u32),
        ("user_addr", _u64),
    ]


class _Params(ctypes.Structure):
    """struct io_uring_params (120 bytes)."""

    _fields_ = [
        ("sq_entries", _u32),
        ("cq_entries", _u32),
        ("flags", _u32),
        ("sq_thread_cpu", _u32),
        ("sq_thread_idle", _u32),
        ("features", _u32),
        ("wq_fd", _u32),
        ("resv", _u32 * 3),
        ("sq_off", _SQRingOffsets),
        ("cq_off", _CQRingOffsets),
    ]


class _ProbeOp(ctypes.Structure):
    _fields_ = [("op", _u8), ("resv", _u8), ("flags", _u16), ("resv2", _u32)]


class _Probe(ctypes.Structure):
    """struct io_uring_probe with a fixed-size ops[] tail."""

    _fields_ = [
        ("last_op", _u8),
        ("ops_len", _u8),
        ("resv", _u16),
        ("resv2", _u32 * 3),
        ("ops", _ProbeOp * _PROBE_OPS),
    ]


class _BufReg(ctypes.Structure):
    """struct io_uring_buf_reg (40 bytes)."""

    _fields_ = [
        ("ring_addr", _u64),
        ("ring_entries", _u32),
        ("bgid", _u16),
        ("flags", _u16),
        ("resv", _u64 * 3),
    ]


# --------------------------------------------------------------------------
# Result type
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class UringSupport:
    """What the running kernel/process allows regarding io_uring.

    ``available`` is True only when a ring could be set up *and* every opcode
    in :data:`REQUIRED` is supported.  ``missing`` lists the required opcodes
    the kernel lacks; it is empty when no ring could be set up at all (then
    ``reason`` explains why, and ``setup_errno`` is set unless the platform
    itself rules io_uring out).
    """

    platform: str
    kernel: str
    io_uring_disabled: int | None
    setup_errno: int | None
    reason: str
    setup_flags: dict[str, bool]
    features: int
    opcodes: dict[str, bool]
    buf_ring: bool
    available: bool
    missing: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly dict of all fields."""
        d = dataclasses.asdict(self)
        d["missing"] = list(self.missing)
        return d


# --------------------------------------------------------------------------
# Raw system calls
# --------------------------------------------------------------------------

SetupFn = Callable[[int, int], int]
RegisterFn = Callable[[int, int, int, int], int]
ReadOpcodesFn = Callable[[int], Iterable[int]]

_syscall_fn: Any = None


def _libc_syscall() -> Any:
    global _syscall_fn
    if _syscall_fn is None:
        fn = ctypes.CDLL(None, use_errno=True).syscall
        fn.restype = ctypes.c_long
        _syscall_fn = fn
    return _syscall_fn


def _numbers() -> tuple[int, int]:
    return _SYSCALLS[platform.machine().lower()]


def _raw_setup(entries: int, params_address: int) -> int:
    """io_uring_setup(2): fd, or -1 with the ctypes errno set."""
    nr = _numbers()[0]
    return int(
        _libc_syscall()(
            ctypes.c_long(nr), ctypes.c_long(entries), ctypes.c_void_p(params_address)
        )
    )


def _raw_register(fd: int, opcode: int, arg_address: int, nr_args: int) -> int:
    """io_uring_register(2): >= 0, or -1 with the ctypes errno set."""
    nr = _numbers()[1]
    return int(
        _libc_syscall()(
            ctypes.c_long(nr),
            ctypes.c_long(fd),
            ctypes.c_long(opcode),
            ctypes.c_void_p(arg_address),
            ctypes.c_long(nr_args),
        )
    )


def _no_register(fd: int, opcode: int, arg_address: int, nr_args: int) -> int:
    """Stand-in used off Linux when only ``setup`` is injected."""
    ctypes.set_errno(errno.ENOSYS)
    return -1


def _call(fn: Callable[..., int], *args: int) -> tuple[int, int]:
    """Call a raw-syscall-like function; return (result, errno).

    Failure is a negative result: -1 means "look at the ctypes errno"; any
    other negative value is taken as ``-errno``.  An ``OSError`` raised by an
    injected function is accepted too.
    """
    ctypes.set_errno(0)
    try:
        res = fn(*args)
    except OSError as exc:
        return -1, exc.errno or 0
    if res < 0:
        return -1, (ctypes.get_errno() if res == -1 else -res)
    return res, 0


def _errname(err: int) -> str:
    return errno.errorcode.get(err, f"errno {err}")


# --------------------------------------------------------------------------
# Probing pieces
# --------------------------------------------------------------------------


def _read_int(path: str | os.PathLike[str]) -> int | None:
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _read_opcodes(fd: int, register: RegisterFn) -> set[int]:
    """Supported opcode numbers via IORING_REGISTER_PROBE (raises OSError)."""
    p = _Probe()  # zero-filled, as the kernel requires
    res, err = _call(register, fd, _IORING_REGISTER_PROBE, ctypes.addressof(p), _PROBE_OPS)
    if res < 0:
        raise OSError(err, os.strerror(err) if err else "IORING_REGISTER_PROBE failed")
    n = min(int(p.ops_len), _PROBE_OPS)
    return {int(p.ops[i].op) for i in range(n) if p.ops[i].flags & _IO_URING_OP_SUPPORTED}


def _probe_buf_ring(fd: int, register: RegisterFn) -> bool:
    """Can a ring-mapped provided-buffer group be registered (Linux >= 5.19)?"""
    try:
        area = mmap.mmap(-1, max(mmap.PAGESIZE, 4096))  # page aligned
    except (OSError, ValueError):
        return False
    try:
        view = ctypes.c_char.from_buffer(area)
        try:
            reg = _BufReg(
                ring_addr=ctypes.addressof(view),
                ring_entries=_BUF_RING_ENTRIES,
                bgid=0,
            )
            res, _err = _call(
                register, fd, _IORING_REGISTER_PBUF_RING, ctypes.addressof(reg), 1
            )
            if res < 0:  # -EINVAL: kernel too old; anything else: not usable
                return False
            _call(register, fd, _IORING_UNREGISTER_PBUF_RING, ctypes.addressof(reg), 1)
            return True
        finally:
            del view  # drop the buffer export before closing the mmap
    finally:
        area.close()


def _probe_flag(setup: SetupFn, flags: int) -> bool:
    params = _Params()
    params.flags = flags
    if flags & SETUP_FLAGS["CQSIZE"]:
        params.cq_entries = 2 * _PROBE_ENTRIES
    fd, _err = _call(setup, _PROBE_ENTRIES, ctypes.addressof(params))
    if fd < 0:
        return False
    os.close(fd)
    return True


def _group_detail(disabled_path: str | os.PathLike[str]) -> str:
    gid = _read_int(os.path.join(os.path.dirname(os.fspath(disabled_path)), "io_uring_group"))
    if gid is None:
        return ""
    if gid < 0:
        return f" (kernel.io_uring_group={gid}: only CAP_SYS_ADMIN may use io_uring)"
    return f" (kernel.io_uring_group={gid})"


def _setup_failure_reason(
    err: int, disabled: int | None, disabled_path: str | os.PathLike[str]
) -> str:
    if err == errno.EPERM:
        if disabled == 2:
            return "io_uring disabled by sysctl kernel.io_uring_disabled=2 (EPERM)"
        if disabled == 1:
            return (
                "io_uring_disabled=1 and this process is not in the io_uring group"
                f"{_group_detail(disabled_path)} (EPERM)"
            )
        return "io_uring blocked by seccomp or a security policy (EPERM)"
    if err == errno.ENOSYS:
        return "kernel has no io_uring (ENOSYS)"
    if err == errno.EACCES:
        return "io_uring denied by a security module (EACCES)"
    if err == errno.ENOMEM:
        return "io_uring_setup: out of (locked) memory (ENOMEM; check ulimit -l)"
    if err in (errno.EMFILE, errno.ENFILE):
        return f"io_uring_setup: too many open files ({_errname(err)})"
    text = os.strerror(err) if err else "unknown error"
    return f"io_uring_setup failed: {text} ({_errname(err)})"


def _unavailable(
    base: dict[str, Any], reason: str, setup_errno: int | None = None
) -> UringSupport:
    return UringSupport(
        **base,
        setup_errno=setup_errno,
        reason=reason,
        setup_flags={name: False for name in SETUP_FLAGS},
        features=0,
        opcodes={name: False for name in OPCODES},
        buf_ring=False,
        available=False,
        missing=(),
    )


# --------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------


def probe(
    setup: SetupFn | None = None,
    *,
    register: RegisterFn | None = None,
    read_opcodes: ReadOpcodesFn | None = None,
    disabled_path: str | os.PathLike[str] | None = None,
) -> UringSupport:
    """Ask the kernel what io_uring support this process has.

    All parameters exist for tests/simulation:

    ``setup(entries, params_address) -> fd``
        Stand-in for the raw ``io_uring_setup`` syscall: return a file
        descriptor (which :func:`probe` closes with :func:`os.close`, so it
        must be a real one) or ``-1`` with :func:`ctypes.set_errno` set (a
        negative ``-errno`` or raising :class:`OSError` also work).  When
        given, the Linux/architecture check is skipped.
    ``register(fd, opcode, arg_address, nr_args) -> int``
        Stand-in for the raw ``io_uring_register`` syscall.
    ``read_opcodes(fd) -> iterable of int``
        Returns the supported opcode numbers for the ring ``fd`` (raise
        :class:`OSError` if they cannot be listed).  Defaults to
        ``IORING_REGISTER_PROBE`` through ``register``.
    ``disabled_path``
        File holding ``kernel.io_uring_disabled``; defaults to
        :data:`IO_URING_DISABLED_PATH` (read at call time).
    """
    plat = sys.platform
    if disabled_path is None:
        disabled_path = IO_URING_DISABLED_PATH
    base: dict[str, Any] = {
        "platform": plat,
        "kernel": platform.release(),
        "io_uring_disabled": _read_int(disabled_path),
    }
    native = plat.startswith("linux") and platform.machine().lower() in _SYSCALLS
    if setup is None:
        if not plat.startswith("linux"):
            return _unavailable(base, f"not Linux ({plat})")
        if not native:
            machine = platform.machine() or "?"
            return _unavailable(
                base, f"unknown architecture ({machine}): io_uring syscall numbers not known"
            )
        setup = _raw_setup
    if register is None:
        register = _raw_register if native else _no_register
    if read_opcodes is None:
        reg = register

        def read_opcodes(fd: int) -> Iterable[int]:
            return _read_opcodes(fd, reg)

    params = _Params()
    fd, err = _call(setup, _PROBE_ENTRIES, ctypes.addressof(params))
    if fd < 0:
        reason = _setup_failure_reason(err, base["io_uring_disabled"], disabled_path)
        return _unavailable(base, reason, setup_errno=err)

    probe_error: int | None = None
    try:
        features = int(params.features)
        try:
            supported = {int(op) for op in read_opcodes(fd)}
        except OSError as exc:
            supported = set()
            probe_error = exc.errno or 0
        buf_ring = _probe_buf_ring(fd, register)
    finally:
        os.close(fd)

    setup_flags: dict[str, bool] = {}
    for name, bits in SETUP_FLAGS.items():
        if name == "DEFER_TASKRUN":
            bits |= SETUP_FLAGS["SINGLE_ISSUER"]
        setup_flags[name] = _probe_flag(setup, bits)

    opcodes = {name: num in supported for name, num in OPCODES.items()}
    missing = tuple(name for name in REQUIRED if not opcodes[name])
    if probe_error is not None:
        reason = (
            f"cannot list opcodes: IORING_REGISTER_PROBE failed ({_errname(probe_error)})"
            + ("; kernel older than 5.6?" if probe_error == errno.EINVAL else "")
        )
    elif missing:
        reason = "missing opcodes: " + ", ".join(missing)
    else:
        reason = "ok"
    return UringSupport(
        **base,
        setup_errno=None,
        reason=reason,
        setup_flags=setup_flags,
        features=features,
        opcodes=opcodes,
        buf_ring=buf_ring,
        available=not missing and probe_error is None,
        missing=missing,
    )


def _extension_status() -> tuple[str, str]:
    """("built" | "missing" | "broken", detail) for proactor._uring_cffi."""
    try:
        importlib.import_module(_EXTENSION_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name in (_EXTENSION_MODULE, "proactor"):
            return "missing", "pip install from source on Linux builds it"
        return "broken", f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # ImportError, OSError, a warning-as-error, ...
        return "broken", f"{type(exc).__name__}: {exc}"
    return "built", ""


def _will_use(support: UringSupport, extension: tuple[str, str]) -> str:
    """What ``proactor.Engine()`` picks, by the rule in ``proactor._select``."""
    requested = os.environ.get("PROACTOR_BACKEND", "").strip().lower()
    if requested == "trio":
        return "trio (PROACTOR_BACKEND=trio)"
    from ._select import uring_problem

    problem = uring_problem(support, extension)
    if requested in ("uring", "io_uring"):
        if problem:
            return f"nothing: PROACTOR_BACKEND={requested} but io_uring cannot run ({problem})"
        return "io_uring (PROACTOR_BACKEND=uring)"
    return f"trio ({problem})" if problem else "io_uring"


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def report(support: UringSupport | None = None) -> str:
    """Multi-line human-readable diagnosis (probes now if not given)."""
    if support is None:
        support = probe()
    extension = _extension_status()
    width = 22
    lines = ["proactor io_uring diagnosis"]

    def row(label: str, value: object, indent: int = 2) -> None:
        lines.append(f"{' ' * indent}{label + ':':<{width - indent + 2}} {value}")

    row("platform", f"{support.platform} ({platform.machine() or '?'})")
    row("kernel", support.kernel)
    row(
        "io_uring_disabled",
        "n/a" if support.io_uring_disabled is None else support.io_uring_disabled,
    )
    if support.setup_errno is None and support.reason.startswith(("not Linux", "unknown arch")):
        row("ring setup", f"not attempted: {support.reason}")
    elif support.setup_errno is not None:
        row("ring setup", f"failed: {support.reason}")
        if support.setup_errno == errno.ENOSYS:
            lines.append(
                "    (CONFIG_IO_URING is off, or a seccomp filter answers ENOSYS)"
            )
    else:
        row("ring setup", "ok")
        row("features", f"0x{support.features:08x}")
    lines.append("  setup flags:")
    for name, ok in support.setup_flags.items():
        row(name, _yes(ok), indent=4)
    lines.append("  required opcodes:")
    for name in REQUIRED:
        row(name, _yes(support.opcodes.get(name, False)), indent=4)
    lines.append("  other opcodes:")
    for name in OPCODES:
        if name not in REQUIRED:
            row(name, _yes(support.opcodes.get(name, False)), indent=4)
    row("buffer ring", f"{_yes(support.buf_ring)} (IORING_REGISTER_PBUF_RING, Linux >= 5.19)")
    status, detail = extension
    row("extension", f"{status} ({detail})" if detail else status)
    lines.append(f"will use: {_will_use(support, extension)}")
    return "\n".join(lines)


def to_json(support: UringSupport | None = None) -> str:
    """The :class:`UringSupport` fields as JSON, plus "extension" and "will_use"."""
    if support is None:
        support = probe()
    extension = _extension_status()
    d = support.as_dict()
    d["extension"] = extension[0]
    d["will_use"] = _will_use(support, extension)
    return json.dumps(d, indent=2)


if __name__ == "__main__":  # running the file directly; normally: python -m proactor
    print(report())
