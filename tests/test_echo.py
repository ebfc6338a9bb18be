"""Echo correctness: many clients, big payloads, half-close, a starved buffer pool."""
from __future__ import annotations

import random
import socket

import pytest
from support import (
    Echo,
    Recorder,
    connect,
    factory_collecting,
    has_feature,
    ipv6_loopback_available,
    recv_exactly,
    recv_until_eof,
    run_echo_clients,
    wait_until,
)

pytestmark = [pytest.mark.linux, pytest.mark.timeout(60)]

WORKERS = [pytest.param(0, id="workers0"), pytest.param(4, id="workers4")]


@pytest.mark.parametrize("workers", WORKERS)
def test_simple_echo(engine, workers):
    srv = engine.serve_tcp(Echo, "127.0.0.1", 0, workers=workers)
    with connect(("127.0.0.1", srv.port)) as s:
        for msg in (b"x", b"hello world", bytes(range(256)) * 10):
            s.sendall(msg)
            assert recv_exactly(s, len(msg)) == msg


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
@pytest.mark.parametrize("workers", WORKERS)
def test_echo_ipv6(engine, workers):
    srv = engine.serve_tcp(Echo, "::1", 0, workers=workers)
    assert srv.addresses[0][0] == "::1"
    with connect(("::1", srv.port)) as s:
        s.sendall(b"over v6")
        assert recv_exactly(s, 7) == b"over v6"


@pytest.mark.parametrize("workers", WORKERS)
def test_many_concurrent_clients(engine, workers):
    """300 clients at once, random payloads from 1 byte to 64 KiB, echoed byte-exactly."""
    rng = random.Random(1234 + workers)
    srv = engine.serve_tcp(Echo, "127.0.0.1", 0, workers=workers)
    payloads = [rng.randbytes(rng.choice((1, 7, 100, 1500, rng.randint(1, 65536))))
                for _ in range(300)]
    run_echo_clients(("127.0.0.1", srv.port), payloads, timeout=50, send_chunk=4096)
    total = sum(map(len, payloads))
    # the last send completions may be reaped just after the clients got their bytes
    wait_until(lambda: engine.stats().bytes_out >= total, message="bytes_out to count all")
    assert engine.stats().bytes_in >= total


@pytest.mark.parametrize("workers", WORKERS)
def test_multi_megabyte_payloads(engine, workers):
    """Several MiB per client, sent while the echo comes back (short sends happen)."""
    rng = random.Random(99 + workers)
    srv = engine.serve_tcp(Echo, "127.0.0.1", 0, workers=workers)
    payloads = [rng.randbytes(n) for n in (6 << 20, 5 << 20, (4 << 20) + 12345)]
    run_echo_clients(("127.0.0.1", srv.port), payloads, timeout=50)


@pytest.mark.parametrize("workers", WORKERS)
def test_half_close_gets_everything_back(engine, workers):
    """A client that shuts down its write side still gets the whole echo, then EOF
    (the default eof_received closes after flushing)."""
    rng = random.Random(7)
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(Echo, handlers), "127.0.0.1", 0,
                           workers=workers)
    payloads = [rng.randbytes(n) for n in (1, 1000, 300_000, 3 << 20)]
    run_echo_clients(("127.0.0.1", srv.port), payloads, half_close=True, timeout=50)


@pytest.mark.parametrize("workers", WORKERS)
def test_half_close_blocking_client(engine, workers):
    """Sequential version: send everything, SHUT_WR, then read to EOF."""
    handlers: list = []
    srv = engine.serve_tcp(factory_collecting(Recorder, handlers), "127.0.0.1", 0,
                           workers=workers)
    payload = random.Random(3).randbytes(200_000)   # fits in the socket buffers
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        assert recv_until_eof(s) == payload
    h = handlers[0]
    assert h.lost.wait(10)
    assert h.eof
    assert h.lost_calls == [None]
    assert bytes(h.received) == payload


@pytest.mark.parametrize("engine", [{"buffers": 8, "buffer_size": 1024}], indirect=True)
@pytest.mark.parametrize("workers", WORKERS)
def test_more_senders_than_buffers(engine, backend, workers):
    """64 clients each sending 256 KiB at once into a pool of 8 × 1 KiB buffers: the pool
    runs dry over and over (ENOBUFS, re-arm), yet every byte comes back, in order."""
    if has_feature(backend, "buffer_pool"):
        assert engine.stats().buffers_total == 8
    rng = random.Random(64)
    srv = engine.serve_tcp(Echo, "127.0.0.1", 0, workers=workers)
    payloads = [rng.randbytes(256 * 1024) for _ in range(64)]
    run_echo_clients(("127.0.0.1", srv.port), payloads, timeout=55, send_chunk=65536)
    wait_until(lambda: engine.stats().connections == 0, timeout=10)
