"""Subprocesses (feature "subprocess")."""
from __future__ import annotations

import asyncio
import shutil
import sys

import pytest

from .utils import MiB, payload, requires, run

pytestmark = pytest.mark.timeout(60)


def test_subprocess_exec_cat(loop):
    requires(loop, "subprocess")
    cat = shutil.which("cat")
    if cat is None:
        pytest.skip("no cat")
    data = payload(2 * MiB + 3)

    async def main():
        proc = await asyncio.create_subprocess_exec(
            cat, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        out, err = await proc.communicate(data)
        assert err is None
        assert proc.returncode == 0
        assert out == data

    run(loop, main())


def test_subprocess_shell_pipeline(loop):
    requires(loop, "subprocess")

    async def main():
        proc = await asyncio.create_subprocess_shell(
            "printf 'pear\\napple\\nfig\\n' | sort | tr a-z A-Z; echo err >&2; exit 3",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await proc.communicate()
        assert out == b"APPLE\nFIG\nPEAR\n"
        assert err == b"err\n"
        assert proc.returncode == 3

    run(loop, main())


def test_subprocess_streaming_and_kill(loop):
    requires(loop, "subprocess")

    async def main():
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-u", "-c",
            "import sys\nfor line in sys.stdin:\n    print(line.strip().upper(), flush=True)",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        for word in (b"one", b"two", b"three"):
            proc.stdin.write(word + b"\n")
            await proc.stdin.drain()
            assert await proc.stdout.readline() == word.upper() + b"\n"
        proc.kill()
        assert await proc.wait() == -9
        proc.stdin.close()          # the pipe transports are closed with the process

    run(loop, main())


def test_subprocess_protocol(loop):
    requires(loop, "subprocess")

    class Proto(asyncio.SubprocessProtocol):
        def __init__(self):
            self.out = bytearray()
            self.exited = loop.create_future()
            self.closed = loop.create_future()

        def pipe_data_received(self, fd, data):
            assert fd == 1
            self.out += data

        def process_exited(self):
            self.exited.set_result(None)

        def connection_lost(self, exc):
            self.closed.set_result(exc)

    async def main():
        tr, proto = await loop.subprocess_exec(Proto, sys.executable, "-c", "print('hi')",
                                               stdin=None, stderr=None)
        assert tr.get_pid() > 0
        await proto.exited
        await proto.closed
        assert tr.get_returncode() == 0
        assert proto.out == b"hi\n"
        tr.close()

    run(loop, main())
