"""examples/proxy.py: requests and responses through the proxy byte-exact (Content-Length,
chunked, no body, close-delimited, pipelined), the upstream pool (reuse, size limits,
dead and expired connections, a retry), and an upstream that refuses, stalls, closes and
resets; client errors and timeouts. Each socket test runs on every backend.

The upstream is a small threaded server in this file that parses requests with h11 (not
the proxy's parser) and answers each with raw bytes, a close, a reset or a stall. The
clients are blocking sockets that read responses with h11.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import h11
import pytest
from support import (
    closed_port,
    connect,
    fill_fd_table,
    on_engine_thread,
    open_fds,
    recv_until_eof,
    wait_until,
)

pytestmark = [pytest.mark.linux, pytest.mark.timeout(60)]

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "examples" / "proxy.py"

# Loaded from its path: examples/ must never come first on sys.path (examples/copy.py).
_spec = importlib.util.spec_from_file_location("proactor_example_proxy", SCRIPT)
proxy_mod = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = proxy_mod      # dataclasses look their module up there
_spec.loader.exec_module(proxy_mod)


# ---------------------------------------------------------------------------- upstream
CLOSE = "close"        # close the connection (orderly: FIN)
RESET = "reset"        # close it with a RST (SO_LINGER 0)


@dataclasses.dataclass
class Received:
    """A request as the upstream saw it (h11's reading)."""

    conn: int              # which upstream connection (0, 1, ... in accept order)
    index: int             # which request on that connection (0, 1, ...)
    method: bytes
    target: bytes
    http_version: bytes
    headers: list          # (name as sent, value)
    body: bytes
    trailers: list

    def header(self, name: bytes) -> Optional[bytes]:
        values = [v for n, v in self.headers if n.lower() == name.lower()]
        return b", ".join(values) if values else None

    @property
    def names(self) -> set:
        return {n.lower() for n, _ in self.headers}


class Upstream:
    """A threaded HTTP/1.1 server on 127.0.0.1. ``respond(req)`` returns what to do with
    each request, in steps: bytes to send, CLOSE, RESET, or a number of seconds to wait
    (cut short by :meth:`close`). After the steps the connection waits for the next one."""

    def __init__(self, respond: Callable[[Received], list],
                 early: Optional[Callable[[h11.Request], Optional[list]]] = None,
                 rcvbuf: Optional[int] = None) -> None:
        self.respond = respond
        self.early = early          # steps to run as soon as a request head is in
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        if rcvbuf is not None:      # inherited by the accepted connections
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.port = self.sock.getsockname()[1]
        self.lock = threading.Lock()
        self.requests: list[Received] = []
        self.errors: list[BaseException] = []
        self.accepted = 0
        self.open = 0
        self.max_open = 0
        self.stop = threading.Event()
        self.conns: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                s, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                if self.stop.is_set():
                    s.close()
                    return
                n = self.accepted
                self.accepted += 1
                self.open += 1
                self.max_open = max(self.max_open, self.open)
                self.conns.append(s)
                t = threading.Thread(target=self._serve, args=(s, n), daemon=True)
                self.threads.append(t)
            t.start()

    def _serve(self, s: socket.socket, conn_no: int) -> None:
        leftover = b""
        eof = False
        try:
            for index in range(1 << 30):
                h = h11.Connection(h11.SERVER)
                if leftover:                    # (b"" would tell h11 the peer closed)
                    h.receive_data(leftover)
                req = None
                body = bytearray()
                while True:
                    ev = h.next_event()
                    if ev is h11.NEED_DATA:
                        data = s.recv(1 << 16)
                        eof = not data
                        h.receive_data(data)
                    elif isinstance(ev, h11.ConnectionClosed):
                        return
                    elif isinstance(ev, h11.Request):
                        req = ev
                        steps = self.early(ev) if self.early is not None else None
                        if steps is not None and self._run(s, steps):
                            return
                    elif isinstance(ev, h11.Data):
                        body += ev.data
                    elif isinstance(ev, h11.EndOfMessage):
                        trailers = list(ev.headers.raw_items())
                        break
                leftover = h.trailing_data[0]
                rec = Received(conn_no, index, req.method, req.target, req.http_version,
                               list(req.headers.raw_items()), bytes(body), trailers)
                with self.lock:
                    self.requests.append(rec)
                if self._run(s, self.respond(rec)):
                    return
        except OSError:
            pass
        except h11.RemoteProtocolError as e:
            if not eof:                     # not a request cut short: one h11 refuses
                with self.lock:
                    self.errors.append(e)
        finally:
            s.close()
            with self.lock:
                self.open -= 1

    def _run(self, s: socket.socket, steps: list) -> bool:
        """Carry out ``steps``; True if the connection is to end."""
        for step in steps:
            if isinstance(step, bytes):
                s.sendall(step)
            elif step == CLOSE:
                return True
            elif step == RESET:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                return True
            elif self.stop.wait(step):
                return True
        return False

    def close(self) -> None:
        self.stop.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)       # wakes the blocked accept()
        except OSError:
            pass
        self.sock.close()
        with self.lock:
            for s in self.conns:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in self.threads:
            t.join(10)
        assert not self.errors, f"the upstream could not parse what the proxy sent: {self.errors}"


def ok(body: bytes = b"", *, status: int = 200, reason: bytes = b"OK", headers: tuple = (),
       length: bool = True) -> bytes:
    """A response as the upstream sends it."""
    lines = [b"HTTP/1.1 %d %s" % (status, reason), *headers]
    if length:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def chunked(body: bytes, sizes: tuple = (1, 7, 1000), trailers: tuple = ()) -> bytes:
    """A chunked response: ``body`` cut into chunks of the ``sizes``, cycled."""
    out = [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"]
    pos = i = 0
    while pos < len(body):
        n = sizes[i % len(sizes)]
        out.append(b"%x;ext=1\r\n%s\r\n" % (len(body[pos:pos + n]), body[pos:pos + n]))
        pos += n
        i += 1
    out.append(b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n")
    return b"".join(out)


def echo_target(req: Received) -> list:
    return [ok(req.target)]


# ---------------------------------------------------------------------------- clients
@dataclasses.dataclass
class Response:
    status: int
    headers: list          # (lowercased name, value)
    body: bytes
    interim: list          # statuses of 1xx responses before it
    trailers: list

    def header(self, name: bytes) -> Optional[bytes]:
        values = [v for n, v in self.headers if n == name.lower()]
        return b", ".join(values) if values else None


class Client:
    """A blocking client connection to the proxy; responses are read with h11."""

    def __init__(self, port: int, timeout: float = 20.0) -> None:
        self.sock = connect(("127.0.0.1", port), timeout=timeout)
        self.buf = b""

    def send(self, raw: bytes) -> None:
        self.sock.sendall(raw)

    def response(self, method: bytes = b"GET") -> Response:
        h = h11.Connection(h11.CLIENT)
        h.send(h11.Request(method=method, target="/", headers=[("Host", "t")]))
        h.send(h11.EndOfMessage())
        if self.buf:
            h.receive_data(self.buf)
        interim: list = []
        status = 0
        headers: list = []
        body = bytearray()
        while True:
            ev = h.next_event()
            if ev is h11.NEED_DATA:
                h.receive_data(self.sock.recv(1 << 16))
            elif isinstance(ev, h11.InformationalResponse):
                interim.append(ev.status_code)
            elif isinstance(ev, h11.Response):
                status = ev.status_code
                headers = list(ev.headers)
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                self.buf = h.trailing_data[0]
                return Response(status, headers, bytes(body), interim, list(ev.headers))
            else:
                raise AssertionError(f"unexpected {ev!r}")

    def request(self, raw: bytes, method: bytes = b"GET") -> Response:
        self.send(raw)
        return self.response(method)

    def get(self, path: str = "/", extra: bytes = b"") -> Response:
        return self.request(b"GET %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (path.encode(), extra))

    def recv_exactly(self, n: int) -> bytes:
        out = bytearray(self.buf[:n])
        self.buf = self.buf[n:]
        while len(out) < n:
            b = self.sock.recv(min(n - len(out), 1 << 20))
            assert b, f"EOF after {len(out)} of {n} bytes"
            out += b
        return bytes(out)

    def assert_closed(self, timeout: float = 10.0) -> None:
        """The proxy closes this connection (nothing more than EOF arrives)."""
        self.sock.settimeout(timeout)
        assert self.buf + recv_until_eof(self.sock) == b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def get_req(path: str = "/", extra: bytes = b"", method: bytes = b"GET") -> bytes:
    return b"%s %s HTTP/1.1\r\nHost: t\r\n%s\r\n" % (method, path.encode(), extra)


# ---------------------------------------------------------------------------- fixtures
class Harness:
    """A proxy on a running engine, with helpers for the test thread."""

    def __init__(self, engine: Any, proxy: Any, port: int) -> None:
        self.engine = engine
        self.proxy = proxy
        self.port = port

    def stats(self) -> Any:
        return on_engine_thread(self.engine, self.proxy.stats)

    def wait_stats(self, timeout: float = 10.0, **want: int) -> Any:
        """Wait until the given stats have the given values; return the stats."""
        def match() -> Any:
            st = self.stats()
            return st if all(getattr(st, k) == v for k, v in want.items()) else None
        try:
            return wait_until(match, timeout=timeout, message=f"stats {want}")
        except AssertionError:
            raise AssertionError(f"wanted {want}, have {self.stats()}") from None

    def client(self, **kw: Any) -> Client:
        return Client(self.port, **kw)


@pytest.fixture
def make_upstream() -> Any:
    made: list[Upstream] = []

    def make(respond: Callable[[Received], list] = echo_target, **kw: Any) -> Upstream:
        up = Upstream(respond, **kw)
        made.append(up)
        return up

    yield make
    for up in made:
        up.close()


@pytest.fixture
def make_proxy(engine: Any, make_upstream: Any) -> Any:
    """make_proxy(port, **ProxyConfig options) -> Harness; closed before the upstreams."""
    made: list = []

    def make(upstream_port: int, **options: Any) -> Harness:
        config = proxy_mod.ProxyConfig("127.0.0.1", upstream_port, **options)
        px = proxy_mod.Proxy(engine, config)
        made.append(px)
        srv = px.serve("127.0.0.1", 0)
        return Harness(engine, px, srv.port)

    yield make
    for px in made:
        on_engine_thread(engine, px.close)


# ---------------------------------------------------------------------------- sans-IO
class Sink:
    def __init__(self) -> None:
        self.events: list = []

    def on_request(self, req: Any) -> None:
        self.events.append(("request", req))

    def on_request_body(self, req: Any, data: bytes) -> None:
        self.events.append(("body", data))

    def on_request_end(self, req: Any, tail: bytes) -> None:
        self.events.append(("end", tail))


def test_request_reader_rebuilds_heads_and_frames_bodies():
    """Hop-by-hop headers go, X-Forwarded-For is appended, pipelined requests come out one
    by one with their bodies, a chunked body is re-chunked with its trailers."""
    sink = Sink()
    config = proxy_mod.ProxyConfig("10.1.2.3", 8080, forwarded_for=True)
    reader = proxy_mod.RequestReader(sink, config, b"192.0.2.7")
    reader.feed(b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\nConnection: keep-alive, X-Hop\r\n"
                b"X-Hop: 1\r\nKeep-Alive: 5\r\nTE: trailers\r\nX-Forwarded-For: 10.0.0.1\r\n"
                b"X-End: e\r\n\r\n"
                b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhel")
    reader.feed(b"lo"
                b"PUT /c HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"
                b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n")
    kinds = [k for k, _ in sink.events]
    assert kinds == ["request", "end", "request", "body", "body", "end",
                     "request", "body", "end"]
    get, post, put = (r for k, r in sink.events if k == "request")
    assert get.head == (b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n"
                        b"X-Forwarded-For: 10.0.0.1, 192.0.2.7\r\nX-End: e\r\n"
                        b"Via: 1.1 proactor\r\n\r\n")
    assert get.keep_alive and not get.http10 and get.replay is not None
    assert post.head == (b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n"
                         b"Via: 1.1 proactor\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n")
    assert post.replay is None                  # not retried: not idempotent
    assert [d for k, d in sink.events[3:5]] == [b"hel", b"lo"]
    assert put.http10 and not put.keep_alive and put.chunked
    assert put.head == (b"PUT /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\nHost: 10.1.2.3:8080\r\n"
                        b"Via: 1.1 proactor\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n")
    assert sink.events[7] == ("body", b"3\r\nabc\r\n")
    assert sink.events[8] == ("end", b"0\r\nX-T: 1\r\n\r\n")


#: A chunked request up to its trailers.
CHUNKED_POST = b"POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n"


@pytest.mark.parametrize("raw, status", [
    (b"NOT HTTP\r\n\r\n", 400),
    (b"GET /" + b"a" * 200 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 600 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 5000, 431),      # never ends: bounded anyway
    (CHUNKED_POST + (b"X-T: " + b"t" * 100 + b"\r\n") * 8, 431),  # trailers over max_head
    (CHUNKED_POST + b"X-T: " + b"t" * 5000, 431),           # a trailer that never ends
    (b"POST / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
     b"Content-Length: 2\r\n\r\nab", 501),                  # an Upgrade offer with a body
    (b"CONNECT example.test:443 HTTP/1.1\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\n\r\n", 400),                          # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),        # * only with OPTIONS
    (b"HEAD * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
    (b"POST * HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n", 400),
    (b"OPTIONS *x HTTP/1.1\r\nHost: a\r\n\r\n", 400),
])
def test_request_reader_refuses(raw, status):
    config = proxy_mod.ProxyConfig("127.0.0.1", 1, max_url=100, max_head=500)
    reader = proxy_mod.RequestReader(Sink(), config)
    with pytest.raises(proxy_mod.RequestError) as info:
        for i in range(0, len(raw), 64):
            reader.feed(raw[i:i + 64])
    assert info.value.status == status


def test_request_reader_merges_list_headers():
    """Two X-Forwarded-For lines become one, the client's address last (appended to the
    first, the last entry seen upstream would be the client's own word); the
    Transfer-Encoding goes upstream as exactly "chunked"."""
    sink = Sink()
    config = proxy_mod.ProxyConfig("127.0.0.1", 1, forwarded_for=True)
    reader = proxy_mod.RequestReader(sink, config, b"192.0.2.7")
    reader.feed(b"GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.0.0.1\r\nX-A: a\r\n"
                b"X-Forwarded-For: 6.6.6.6\r\n\r\n"
                b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:  Chunked \r\n\r\n"
                b"2\r\nab\r\n0\r\n\r\n")
    get, post = (r for k, r in sink.events if k == "request")
    assert get.head == (b"GET / HTTP/1.1\r\nHost: h\r\n"
                        b"X-Forwarded-For: 10.0.0.1, 6.6.6.6, 192.0.2.7\r\nX-A: a\r\n"
                        b"Via: 1.1 proactor\r\n\r\n")
    assert post.chunked and post.head == (
        b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n"
        b"Via: 1.1 proactor\r\nX-Forwarded-For: 192.0.2.7\r\n\r\n")


@pytest.mark.parametrize("raw, status", [
    # codings other than chunked are not understood (RFC 9112 section 6.1), whatever an
    # upstream would make of them
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: gzip\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", 501),
    (b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: identity, chunked\r\n\r\n", 501),
    (b"GET / HTTP/2.0\r\nHost: h\r\n\r\n", 505),
    (b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\"b\r\n\r\n", 400),
])
def test_request_reader_refuses_framing_it_cannot_vouch_for(raw, status):
    reader = proxy_mod.RequestReader(Sink(), proxy_mod.ProxyConfig("127.0.0.1", 1))
    with pytest.raises(proxy_mod.RequestError) as e:
        reader.feed(raw)
    assert e.value.status == status


def test_request_reader_absolute_form_target():
    """An absolute-form target names the host: it replaces the Host field (RFC 9112
    section 3.2.2) and the upstream gets the origin form."""
    sink = Sink()
    reader = proxy_mod.RequestReader(sink, proxy_mod.ProxyConfig("127.0.0.1", 1))
    reader.feed(b"GET http://Admin.Internal:8080/secret?x=1 HTTP/1.1\r\nHost: public.example\r\n"
                b"Accept: */*\r\n\r\n"
                b"GET http://a.test?q HTTP/1.1\r\nHost: a.test\r\n\r\n")
    first, second = (r for k, r in sink.events if k == "request")
    assert first.url == b"/secret?x=1" and first.head == (
        b"GET /secret?x=1 HTTP/1.1\r\nHost: Admin.Internal:8080\r\nAccept: */*\r\n"
        b"Via: 1.1 proactor\r\n\r\n")
    assert second.head == b"GET /?q HTTP/1.1\r\nHost: a.test\r\nVia: 1.1 proactor\r\n\r\n"
    for bad in (b"GET http://user@h/ HTTP/1.1\r\nHost: h\r\n\r\n",
                b"GET ftp://h/ HTTP/1.1\r\nHost: h\r\n\r\n"):
        r = proxy_mod.RequestReader(Sink(), proxy_mod.ProxyConfig("127.0.0.1", 1))
        with pytest.raises(proxy_mod.RequestError) as e:
            r.feed(bad)
        assert e.value.status == 400


def test_request_reader_asterisk_form_only_for_options():
    """RFC 9112 section 3.2.4: ``*`` is the target of an OPTIONS about the server as a
    whole, forwarded as it is; an absolute-form OPTIONS with neither path nor query asks
    the same and goes upstream as ``*``; with a path or a query it is not."""
    sink = Sink()
    reader = proxy_mod.RequestReader(sink, proxy_mod.ProxyConfig("127.0.0.1", 1))
    reader.feed(b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\n\r\n"
                b"OPTIONS http://b.test HTTP/1.1\r\nHost: a.test\r\n\r\n"
                b"OPTIONS http://b.test/ HTTP/1.1\r\nHost: a.test\r\n\r\n"
                b"OPTIONS http://b.test?q HTTP/1.1\r\nHost: a.test\r\n\r\n")
    heads = [r.head for k, r in sink.events if k == "request"]
    assert heads == [b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\nVia: 1.1 proactor\r\n\r\n",
                     b"OPTIONS * HTTP/1.1\r\nHost: b.test\r\nVia: 1.1 proactor\r\n\r\n",
                     b"OPTIONS / HTTP/1.1\r\nHost: b.test\r\nVia: 1.1 proactor\r\n\r\n",
                     b"OPTIONS /?q HTTP/1.1\r\nHost: b.test\r\nVia: 1.1 proactor\r\n\r\n"]


def test_request_reader_http10_with_transfer_encoding_closes_after():
    """RFC 9112 section 6.1: an HTTP/1.0 request with Transfer-Encoding has faulty
    framing: it is answered, then the client's connection closes."""
    sink = Sink()
    reader = proxy_mod.RequestReader(sink, proxy_mod.ProxyConfig("127.0.0.1", 1))
    reader.feed(b"POST / HTTP/1.0\r\nConnection: keep-alive\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\n\r\n")
    (req,) = (r for k, r in sink.events if k == "request")
    assert req.http10 and req.chunked and not req.keep_alive


def test_request_reader_drops_upgrade_offers():
    """A request offering an upgrade (curl --http2's h2c, a websocket handshake) goes on
    as plain HTTP/1.1, without the offer; what follows it is parsed as HTTP/1.1."""
    sink = Sink()
    reader = proxy_mod.RequestReader(sink, proxy_mod.ProxyConfig("127.0.0.1", 1))
    h2c = (b"GET /a HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\n"
           b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\nAccept: */*\r\n\r\n")
    ws = (b"GET /ws HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: a2V5\r\nSec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n")
    post = b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n\r\nok"
    reader.feed(h2c + post + ws + h2c[:30])
    reader.feed(h2c[30:])
    heads = [r.head for k, r in sink.events if k == "request"]
    via = b"Via: 1.1 proactor\r\n\r\n"
    assert heads == [b"GET /a HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n" + via,
                     b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\n" + via,
                     b"GET /ws HTTP/1.1\r\nHost: h\r\nSec-WebSocket-Key: a2V5\r\n"
                     b"Sec-WebSocket-Version: 13\r\nContent-Length: 0\r\n" + via,
                     b"GET /a HTTP/1.1\r\nHost: h\r\nAccept: */*\r\n" + via]
    assert [k for k, _ in sink.events] == ["request", "end", "request", "body", "end",
                                           "request", "end", "request", "end"]
    assert not reader.in_message


def test_response_reader_limits():
    """The upstream's head and trailers are bounded by max_head, as a client's: fields over
    it, or a line that never ends."""
    def feed(raw: bytes, **kw: Any) -> None:
        r = proxy_mod.ResponseReader(max_head=500, **kw)
        for i in range(0, len(raw), 64):
            r.feed(raw[i:i + 64])

    line = b"X-H: " + b"h" * 100 + b"\r\n"
    feed(b"HTTP/1.1 200 OK\r\n" + line * 4 + b"Content-Length: 0\r\n\r\n")   # fits
    feed(chunked(b"abc", trailers=(line[:-2],) * 4))
    for raw, kw in [(b"HTTP/1.1 200 OK\r\n" + line * 5 + b"Content-Length: 0\r\n\r\n", {}),
                    (b"HTTP/1.1 200 OK\r\nX-H: " + b"h" * 5000, {}),
                    (b"HTTP/1.1 100 Continue\r\n" + line * 6 + b"\r\n", {}),
                    (chunked(b"abc", trailers=(line[:-2],) * 5), {}),
                    (chunked(b"abc")[:-2] + b"X-T: " + b"t" * 5000, {}),
                    (chunked(b"abc")[:-2] + b"X-T: " + b"t" * 5000, {"client_http10": True})]:
        with pytest.raises(proxy_mod.ResponseError, match="too large"):
            feed(raw, **kw)


@pytest.mark.parametrize("codings, out_te, chunked_out", [
    ((b"chunked", b"gzip"), b"chunked, gzip", False),
    ((b"gzip", b"chunked"), b"gzip, chunked", True),
    ((b"chunked", b"identity"), b"chunked, identity", False),
])
def test_response_reader_several_transfer_encodings(codings, out_te, chunked_out):
    """Several Transfer-Encoding lines are one list, framed by its last coding as llhttp
    does; the client gets the list in one line, framing and headers agreeing."""
    body = b"3\r\nabc\r\n0\r\n\r\n"
    raw = (b"HTTP/1.1 200 OK\r\n" + b"".join(b"Transfer-Encoding: %s\r\n" % c for c in codings)
           + b"X-A: a\r\n\r\n" + body)
    r = proxy_mod.ResponseReader()
    out = b"".join(r.feed(raw))
    if chunked_out:                     # decoded by the parser, chunked again
        assert out == b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\nX-A: a\r\n\r\n" % out_te + (
            b"3\r\nabc\r\n0\r\n\r\n")
        assert r.done and r.reusable
    else:                               # not chunked: the body lasts until the close
        assert out == (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: %s\r\nX-A: a\r\n"
                       b"Connection: close\r\n\r\n" % out_te + body)
        assert not r.done and r.eof() and not r.reusable


@pytest.mark.parametrize("raw, kw", [
    (b"HTTP/1.1 099 Odd\r\nContent-Length: 4\r\n\r\nJUNK", {}),       # RFC 9110 section 15
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nzz", {"client_http10": True}),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nzz\r\n0\r\n\r\n",
     {"client_http10": True}),
])
def test_response_reader_refuses_what_the_client_cannot_read(raw, kw):
    r = proxy_mod.ResponseReader(**kw)
    with pytest.raises(proxy_mod.ResponseError):
        r.feed(raw)


def test_response_reader_204_and_304_lose_framing_fields():
    for framing in (b"Content-Length: 0", b"Transfer-Encoding: chunked"):
        r = proxy_mod.ResponseReader()
        out = b"".join(r.feed(b"HTTP/1.1 204 No Content\r\n%s\r\nX-A: a\r\n\r\n" % framing))
        assert out == b"HTTP/1.1 204 No Content\r\nX-A: a\r\n\r\n" and r.done
    r = proxy_mod.ResponseReader()
    out = b"".join(r.feed(b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n"))
    assert out == b"HTTP/1.1 304 Not Modified\r\nContent-Length: 7\r\n\r\n" and r.done


def test_response_reader_framing():
    """A clean head comes out unchanged; hop-by-hop headers go; HEAD ends at the head;
    Connection: close and bytes after the end make the connection not reusable; a chunked
    body is re-chunked with its trailers; 1xx responses pass before the final one."""
    raw = ok(b"hello", headers=(b"Content-Type: text/plain",))
    r = proxy_mod.ResponseReader()
    assert b"".join(r.feed(raw)) == raw
    assert r.done and r.reusable and r.head_sent

    r = proxy_mod.ResponseReader()
    out = r.feed(ok(b"x", headers=(b"Connection: close, X-Hop", b"X-Hop: 1", b"Keep-Alive: 1",
                                   b"X-Kept: 2")))
    assert b"".join(out) == b"HTTP/1.1 200 OK\r\nX-Kept: 2\r\nContent-Length: 1\r\n\r\nx"
    assert r.done and not r.reusable

    r = proxy_mod.ResponseReader(head_request=True)
    assert b"".join(r.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")).endswith(b"\r\n\r\n")
    assert r.done and r.reusable

    r = proxy_mod.ResponseReader()
    assert r.feed(ok(b"ab") + b"HTTP/1.1 200 OK\r\n")[-1] == b"ab"
    assert r.done and not r.reusable

    r = proxy_mod.ResponseReader()
    out = r.feed(b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n" + chunked(
        b"0123456789", sizes=(4,), trailers=(b"X-Sum: 45",)))
    assert b"".join(out) == (b"HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n"
                             b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                             b"4\r\n0123\r\n4\r\n4567\r\n2\r\n89\r\n0\r\nX-Sum: 45\r\n\r\n")
    assert r.done and r.reusable

    r = proxy_mod.ResponseReader(client_http10=True, client_keep_alive=True)
    out = b"".join(r.feed(chunked(b"abc", sizes=(2,))))
    assert out == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nabc"
    assert r.client_close

    r = proxy_mod.ResponseReader()
    out = b"".join(r.feed(b"HTTP/1.1 200 OK\r\n\r\nuntil"))
    assert out == b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil"
    assert not r.done and r.eof() and r.done and not r.reusable


# ---------------------------------------------------------------------------- through sockets
def test_get_byte_exact_and_one_upstream_connection(engine, make_upstream, make_proxy):
    """Responses of many sizes come back byte for byte; 12 requests from 3 clients one
    after another use a single upstream connection."""
    rng = random.Random(5)
    bodies = {f"/{n}": rng.randbytes(n) for n in (0, 1, 1000, 65536, 1_000_003, 4 << 20)}
    replies = {p: ok(b, headers=(b"Content-Type: application/octet-stream", b"X-N: 1"))
               for p, b in bodies.items()}
    up = make_upstream(lambda req: [replies[req.target.decode()]])
    h = make_proxy(up.port)
    n = 0
    for _ in range(2):
        with h.client() as c:
            for path, reply in replies.items():
                c.send(get_req(path))
                assert c.recv_exactly(len(reply)) == reply
                n += 1
    st = h.wait_stats(idle=1)
    assert (st.created, st.reused, st.requests) == (1, n - 1, n)
    assert up.accepted == 1
    # nothing added but the proxy's Via entry
    assert all(r.headers == [(b"Host", b"t"), (b"Via", b"1.1 proactor")] for r in up.requests)


def test_request_bodies_byte_exact(engine, make_upstream, make_proxy):
    """POST bodies with Content-Length and chunked, up to 3 MiB, reach the upstream byte
    for byte; the upstream echoes them back, with Content-Length or chunked."""
    def respond(req: Received) -> list:
        if req.target == b"/chunked":
            return [chunked(req.body, sizes=(3, 5000, 65536))]
        return [ok(req.body)]

    up = make_upstream(respond)
    h = make_proxy(up.port)
    rng = random.Random(6)
    with h.client() as c:
        for size in (0, 1, 70_000, 3 << 20):
            body = rng.randbytes(size)
            for target in ("/length", "/chunked"):
                r = c.request(b"POST %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                              % (target.encode(), size, body))
                assert r.status == 200 and r.body == body
                assert up.requests[-1].body == body
        for sizes in ((1,), (10, 300), (65536, 100_000)):
            body = rng.randbytes(250_000 if sizes != (1,) else 100)
            raw = chunked(body, sizes=sizes, trailers=(b"X-Check: 7",)).split(b"\r\n\r\n", 1)[1]
            r = c.request(b"POST /length HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
                          b"\r\n" + raw)
            assert r.status == 200 and r.body == body
            got = up.requests[-1]
            assert got.body == body and got.trailers == [(b"X-Check", b"7")]
            assert got.header(b"content-length") is None
    assert h.stats().created == 1


def test_chunked_response_with_trailers(engine, make_upstream, make_proxy):
    body = bytes(range(256)) * 400
    up = make_upstream(lambda req: [chunked(body, sizes=(1, 4096, 33333),
                                            trailers=(b"X-Digest: abc",))])
    h = make_proxy(up.port)
    with h.client() as c:
        for _ in range(3):
            r = c.get("/")
            assert r.status == 200 and r.body == body
            assert r.header(b"transfer-encoding") == b"chunked"
            assert r.trailers == [(b"x-digest", b"abc")]
    assert h.wait_stats(idle=1).created == 1


def test_responses_without_body(engine, make_upstream, make_proxy):
    """HEAD (with a Content-Length), 204 and 304 have no body; the upstream connection
    and the client connection both go on."""
    def respond(req: Received) -> list:
        if req.method == b"HEAD" and req.target == b"/unsized":
            return [b"HTTP/1.1 200 OK\r\nETag: \"u\"\r\n\r\n"]  # no length: not reused
        if req.method == b"HEAD":
            return [b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\nETag: \"e\"\r\n\r\n"]
        if req.target == b"/204":
            return [b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n"]
        if req.target == b"/304":
            return [b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n"]
        return [ok(b"full")]

    up = make_upstream(respond)
    h = make_proxy(up.port)
    with h.client() as c:
        for _ in range(2):
            r = c.request(get_req("/", method=b"HEAD"), method=b"HEAD")
            assert (r.status, r.body, r.header(b"content-length")) == (200, b"", b"1234")
            assert c.get("/204").status == 204
            assert c.get("/304").status == 304
            assert c.get("/").body == b"full"
        st = h.wait_stats(idle=1)
        assert (st.created, st.reused) == (1, 7)
        r = c.request(get_req("/unsized", method=b"HEAD"), method=b"HEAD")
        assert r.status == 200 and r.header(b"etag") == b'"u"' and r.header(b"connection") is None
        assert c.get("/").body == b"full"                  # the client connection goes on
    st = h.wait_stats(idle=1, clients=0)
    assert (st.created, st.discarded) == (2, 1)


def test_interim_responses_pass_through(engine, make_upstream, make_proxy):
    up = make_upstream(lambda req: [b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n",
                                    ok(b"final")])
    h = make_proxy(up.port)
    with h.client() as c:
        r = c.get("/")
        assert (r.interim, r.status, r.body) == ([103], 200, b"final")
        assert c.get("/").body == b"final"
    assert h.wait_stats(idle=1).created == 1


def test_close_delimited_response(engine, make_upstream, make_proxy):
    """A body without Content-Length or chunking ends when the upstream closes: the client
    gets all of it, with Connection: close, then EOF."""
    body = random.Random(3).randbytes(300_000)
    up = make_upstream(lambda req: [b"HTTP/1.1 200 OK\r\nContent-Type: x/y\r\n\r\n", body,
                                    CLOSE])
    h = make_proxy(up.port)
    with h.client() as c:
        r = c.get("/")
        assert r.body == body and r.header(b"connection") == b"close"
        c.assert_closed()
    st = h.wait_stats(clients=0, idle=0)
    assert (st.created, st.failed, st.aborted, st.bad_gateway) == (1, 0, 0, 0)


def test_early_response_connection_not_reused(engine, make_upstream, make_proxy):
    """The upstream answers (413) before the request body has come: the client gets the
    answer, the rest of its body is dropped, its connection goes on; the upstream
    connection, left in the middle of a request, is not reused."""
    up = make_upstream(echo_target, early=lambda ev: [
        b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n"]
        if ev.target == b"/upload" else None)
    h = make_proxy(up.port)
    body = b"z" * 200_000
    with h.client() as c:
        c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % len(body)
               + body[:10])
        assert c.response().status == 413
        c.send(body[10:])
        assert c.get("/after").body == b"/after"
        assert c.get("/again").body == b"/again"
    st = h.wait_stats(clients=0, idle=1)
    assert (st.created, st.discarded, st.reused) == (2, 1, 1)
    assert [(r.conn, r.target) for r in up.requests[-2:]] == [(1, b"/after"), (1, b"/again")]


def test_hop_by_hop_headers(engine, make_upstream, make_proxy):
    """Connection, the headers it names, Keep-Alive, Proxy-*, TE go neither way; Host is
    kept, X-Forwarded-For appended; the client's Connection: close closes only it."""
    up = make_upstream(lambda req: [ok(b"r", headers=(b"Connection: keep-alive, X-Secret",
                                                      b"X-Secret: s", b"Keep-Alive: timeout=5",
                                                      b"X-Kept: 1"))])
    h = make_proxy(up.port, forwarded_for=True)
    with h.client() as c:
        r = c.request(b"GET /h HTTP/1.1\r\nHost: example.test\r\n"
                      b"Connection: keep-alive, X-Private\r\nX-Private: p\r\n"
                      b"Keep-Alive: timeout=5\r\nProxy-Connection: keep-alive\r\nTE: trailers\r\n"
                      b"Proxy-Authorization: Basic eHk=\r\nX-Forwarded-For: 10.0.0.1\r\n"
                      b"X-Other: o\r\n\r\n")
        assert r.status == 200 and r.header(b"x-kept") == b"1"
        assert {n for n, _ in r.headers} == {b"x-kept", b"content-length"}
        got = up.requests[-1]
        assert got.names == {b"host", b"x-forwarded-for", b"x-other", b"via"}
        assert got.header(b"host") == b"example.test"
        assert got.header(b"x-forwarded-for") == b"10.0.0.1, 127.0.0.1"
        assert got.http_version == b"1.1"
        r = c.get("/last", extra=b"Connection: close\r\n")
        assert r.header(b"connection") == b"close"
        c.assert_closed()
    assert up.requests[-1].header(b"connection") is None
    st = h.wait_stats(idle=1, clients=0)
    assert (st.created, st.reused) == (1, 1)


def test_upstream_connection_close_is_not_pooled(engine, make_upstream, make_proxy):
    """Connection: close from the upstream: that connection is closed, not pooled; the
    client's connection stays open and the next request opens a new upstream one."""
    up = make_upstream(lambda req: [ok(b"bye", headers=(b"Connection: close",)), CLOSE])
    h = make_proxy(up.port)
    with h.client() as c:
        for _ in range(3):
            r = c.get("/")
            assert r.body == b"bye" and r.header(b"connection") is None
    st = h.wait_stats(clients=0, idle=0)
    assert (st.created, st.reused, st.discarded, st.failed) == (3, 0, 3, 0)
    assert up.accepted == 3


def test_http10_client(engine, make_upstream, make_proxy):
    """An HTTP/1.0 client without Host: the upstream gets HTTP/1.1 with a Host; a chunked
    response reaches the client unchunked, ended by the close."""
    up = make_upstream(lambda req: [chunked(b"0123456789" * 100, sizes=(7,))])
    h = make_proxy(up.port)
    with h.client() as c:
        c.send(b"GET /old HTTP/1.0\r\n\r\n")
        raw = recv_until_eof(c.sock)
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close" in head and b"Transfer-Encoding" not in head
    assert body == b"0123456789" * 100
    got = up.requests[-1]
    assert got.http_version == b"1.1" and got.header(b"host") == b"127.0.0.1:%d" % up.port


def test_pipelined_requests_answered_in_order(engine, make_upstream, make_proxy):
    """Requests sent back to back in one write are answered one at a time, in order, the
    slow ones and the proxy's own answers included."""
    def respond(req: Received) -> list:
        steps: list = [0.05] if req.target.startswith(b"/slow") else []
        reply = ok(req.method + b" " + req.target + b" " + req.body)
        if req.method == b"HEAD":          # the head alone: a body would be a protocol error
            reply = reply.partition(b"\r\n\r\n")[0] + b"\r\n\r\n"
        return steps + [reply]

    up = make_upstream(respond)
    h = make_proxy(up.port)
    reqs = [(b"GET", "/slow1", b""), (b"GET", "/2", b""), (b"POST", "/3", b"body3"),
            (b"GET", "/_proxy/stats", b""), (b"HEAD", "/5", b""), (b"GET", "/slow6", b""),
            (b"POST", "/7", b"x" * 100_000)]
    raw = b"".join(b"%s %s HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n%s"
                   % (m, p.encode(), len(b), b) for m, p, b in reqs)
    with h.client() as c:
        for rounds in range(2):
            c.send(raw * 3)
            for _ in range(3):
                for m, p, b in reqs:
                    r = c.response(method=m)
                    assert r.status == 200, (p, r)
                    if p == "/_proxy/stats":
                        assert json.loads(r.body)["requests"] >= 3
                    elif m != b"HEAD":
                        assert r.body == m + b" " + p.encode() + b" " + b
    targets = [r.target.decode() for r in up.requests]
    want = [p for m, p, b in reqs if p != "/_proxy/stats"] * 6
    assert targets == want
    assert h.stats().created == 1


def test_pool_reuses_the_last_released_connection(engine, make_upstream, make_proxy):
    """LIFO: of two idle connections, the one released last serves the next request (so
    the other can expire)."""
    both = threading.Barrier(2, timeout=10)

    def respond(req: Received) -> list:
        if req.target in (b"/fast", b"/slow"):
            both.wait()                     # both connections are open at once
        if req.target == b"/slow":
            return [0.1, ok(req.target)]    # released last
        return [ok(req.target)]

    up = make_upstream(respond)
    h = make_proxy(up.port)
    with h.client() as a, h.client() as b:
        a.send(get_req("/fast"))
        b.send(get_req("/slow"))
        assert a.response().body == b"/fast" and b.response().body == b"/slow"
        h.wait_stats(idle=2)
        slow_conn = next(r.conn for r in up.requests if r.target == b"/slow")
        for path in ("/1", "/2", "/3"):
            assert a.get(path).body == path.encode()
            assert up.requests[-1].conn == slow_conn
    assert h.stats().created == 2


def test_pipelined_flood_pauses_reading(engine, make_upstream, make_proxy):
    """While a request is outstanding and another waits behind it, the client is not read:
    1.5 MB of pipelined requests sent then stay in the kernel; once the slow request is
    answered, all are, in order.

    (The flood goes out after the pause: a read already in progress, such as io_uring's
    multishot receive before its cancellation lands, delivers what it has received.)"""
    gate = threading.Event()

    def respond(req: Received) -> list:
        if req.target == b"/0":
            gate.wait(10)
        return [ok(req.target)]

    up = make_upstream(respond)
    h = make_proxy(up.port)
    n = 1500
    pad = b"X-Pad: " + b"p" * 1000 + b"\r\n"

    def queued() -> list:
        return on_engine_thread(engine, lambda: [len(x.queue) for x in h.proxy.clients])

    with h.client() as c:
        try:
            c.send(get_req("/0"))
            wait_until(lambda: len(up.requests) == 1)
            c.send(get_req("/1", extra=pad))
            wait_until(lambda: queued() == [2])       # the second one: reading pauses
            time.sleep(0.05)
            flood = b"".join(get_req(f"/{i}", extra=pad) for i in range(2, n))
            sender = threading.Thread(target=c.send, args=(flood,))   # may block
            sender.start()
            time.sleep(0.2)
            assert queued() == [2]
        finally:
            gate.set()
        for i in range(n):
            assert c.response().body == f"/{i}".encode()
        sender.join(10)
    assert [r.target for r in up.requests] == [f"/{i}".encode() for i in range(n)]


def test_without_a_pool_no_connection_serves_two_requests(engine, make_upstream,
                                                          make_proxy):
    """pool_size=0 asks the upstream to close after each request, so no request may
    follow on that connection (RFC 9112 section 9.6), not even one waiting for a
    connection under max_upstream, and whatever the response said: POSTs (never
    retried) all succeed, none reuses a connection."""
    up = make_upstream(lambda req: [0.2, ok(b"done"), 0.05, CLOSE])   # close not echoed
    h = make_proxy(up.port, pool_size=0, max_upstream=1)
    results = []

    def post() -> None:
        with h.client() as c:
            results.append(c.request(b"POST /p HTTP/1.1\r\nHost: t\r\n"
                                     b"Content-Length: 2\r\n\r\nhi").status)

    threads = [threading.Thread(target=post) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.03)
    for t in threads:
        t.join(20)
    assert results == [200, 200, 200]
    st = h.wait_stats(clients=0)
    assert (st.created, st.reused) == (3, 0)


def test_pool_size_limits_idle_connections(engine, make_upstream, make_proxy):
    """6 requests at once need 6 upstream connections; afterwards at most pool_size=2 of
    them stay idle, the rest are closed."""
    barrier = threading.Barrier(6, timeout=10)

    def respond(req: Received) -> list:
        if req.target == b"/together":
            barrier.wait()
        return [ok(b"ok")]

    up = make_upstream(respond)
    h = make_proxy(up.port, pool_size=2)
    clients = [h.client() for _ in range(6)]
    try:
        for c in clients:
            c.send(get_req("/together"))
        assert all(c.response().body == b"ok" for c in clients)
        st = h.wait_stats(idle=2, in_use=0)
        assert (st.created, st.discarded) == (6, 4)
        assert up.accepted == 6
        for c in clients:
            assert c.get("/").body == b"ok"
        st = h.wait_stats(idle=2, in_use=0)
        assert st.created <= 10 and st.reused >= 2
    finally:
        for c in clients:
            c.close()


def test_max_upstream_under_concurrency(engine, make_upstream, make_proxy):
    """8 clients × 5 requests at once through max_upstream=2: all answered, never more
    than 2 upstream connections open, the same 2 serving every request."""
    up = make_upstream(lambda req: [0.005, ok(req.target)])
    h = make_proxy(up.port, pool_size=2, max_upstream=2)
    errors: list = []

    def run(i: int) -> None:
        try:
            with h.client() as c:
                for j in range(5):
                    assert c.get(f"/{i}/{j}").body == f"/{i}/{j}".encode()
        except BaseException as e:  # noqa: BLE001 - reported on the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    assert up.max_open <= 2 and up.accepted == 2
    st = h.wait_stats(idle=2, in_use=0, waiting=0)
    assert (st.created, st.reused, st.requests) == (2, 38, 40)


def test_max_upstream_wait_times_out_503(engine, make_upstream, make_proxy):
    up = make_upstream(lambda req: [30.0] if req.target == b"/stall" else [ok(b"ok")])
    h = make_proxy(up.port, max_upstream=1, connect_timeout=0.3)
    with h.client() as a, h.client() as b:
        a.send(get_req("/stall"))
        wait_until(lambda: len(up.requests) == 1)
        t0 = time.monotonic()
        r = b.get("/x")
        assert r.status == 503 and 0.25 < time.monotonic() - t0 < 5
        assert h.stats().unavailable == 1
    h.wait_stats(clients=0, in_use=0)


def test_max_connections_turns_clients_away(engine, make_upstream, make_proxy, caplog):
    """Over max_connections a new client is answered 503 and closed before anything of it
    is read; the clients in are served, and once one has left a new one gets in. The
    refusals are logged once, then at most once a minute (with their count)."""
    caplog.set_level(logging.WARNING, logger="proxy")
    up = make_upstream()
    h = make_proxy(up.port, max_connections=2)
    with h.client() as a, h.client() as b:
        h.wait_stats(clients=2)
        for _ in range(2):
            with h.client() as extra:
                r = extra.response()
                assert r.status == 503 and r.header(b"connection") == b"close"
                extra.assert_closed()
        assert a.get("/a").body == b"/a" and b.get("/b").body == b"/b"
    h.wait_stats(clients=0)
    with h.client() as c:
        assert c.get("/c").body == b"/c"
    st = h.stats()
    assert (st.refused, st.unavailable, st.requests) == (2, 0, 3)
    assert [r.target for r in up.requests] == [b"/a", b"/b", b"/c"]
    logged = [r.getMessage() for r in caplog.records if "refused with 503" in r.getMessage()]
    assert logged == ["at max_connections (2 clients): 1 new client refused with 503 since "
                      "the last such line (logged at most every 60 s)"]


def test_upstream_connections_are_capped_at_max_connections_by_default(engine, make_proxy):
    """Without max_upstream, the upstream connections are capped at max_connections: a
    client that leaves while its connect hangs leaves the connect behind (it would serve
    the pool), and the next client's request waits for it instead of opening one more
    (which could go on until the fds run out)."""
    lst = socket.socket()
    fill: list = []
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        for _ in range(3):              # a full accept queue: SYNs dropped, connects hang
            s = socket.socket()
            fill.append(s)
            s.setblocking(False)
            s.connect_ex(lst.getsockname())
        h = make_proxy(lst.getsockname()[1], max_connections=1, connect_timeout=2.0)
        with h.client() as a:
            a.send(get_req("/a"))
            h.wait_stats(connecting=1)
        h.wait_stats(clients=0)
        with h.client() as b:
            b.send(get_req("/b"))
            st = h.wait_stats(requests=2)
            assert (st.connecting, st.waiting, st.connect_errors) == (1, 1, 0), st
            # a's connect times out, then b's (or b's wait ends first: 503)
            assert b.response().status in (503, 504)
        h.wait_stats(connecting=0, waiting=0, clients=0, timeout=10)
    finally:
        for s in fill:
            s.close()
        lst.close()


def test_no_fd_for_an_upstream_connection_waits_for_one(engine, make_upstream, make_proxy):
    """At the fd limit (clients being turned away take the fds for a moment) a request
    finds no fd for its upstream connection: it waits for one to come free, as at
    max_upstream, instead of failing: served when one does, else 503 after
    connect_timeout. (The fds of this process run out for a while: everything the test
    needs is open before, and they are given back in any case.)"""
    import resource

    up = make_upstream()
    h = make_proxy(up.port, connect_timeout=1.0)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    held: list = []
    with h.client() as late, h.client() as served:
        h.wait_stats(clients=2)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(open_fds()) + 16, hard))
            fill_fd_table(held)
            late.send(get_req("/late"))
            r = late.response()
            assert r.status == 503 and b"no fd came free" in r.body, r
            served.send(get_req("/served"))
            h.wait_stats(waiting=1)
            for fd in held:
                os.close(fd)
            held = []
            assert served.response().body == b"/served"
        finally:
            for fd in held:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    st = h.wait_stats(clients=0)
    assert (st.unavailable, st.bad_gateway, st.connect_errors) == (1, 0, 0), st
    assert [r.target for r in up.requests] == [b"/served"]


def test_dead_idle_connection_is_dropped(engine, make_upstream, make_proxy):
    """The upstream closes (then resets) an idle pooled connection: it leaves the pool at
    once, and the next request is served on a fresh connection."""
    def respond(req: Received) -> list:
        return [ok(b"one"), 0.05, CLOSE if req.conn == 0 else RESET]

    up = make_upstream(respond)
    h = make_proxy(up.port)
    with h.client() as c:
        assert c.get("/").body == b"one"
        h.wait_stats(dropped=1, idle=0)
        assert c.get("/").body == b"one"
        h.wait_stats(dropped=2, idle=0)
        assert c.get("/").body == b"one"
    st = h.stats()
    assert (st.created, st.reused, st.retried, st.failed) == (3, 0, 0, 0)


def test_reused_connection_failing_is_retried_for_get_only(engine, make_upstream, make_proxy):
    """The second request on each upstream connection is closed without an answer: a GET
    is retried once on a fresh connection; a POST gets 502."""
    up = make_upstream(lambda req: [CLOSE] if req.index == 1 else [ok(req.target)])
    h = make_proxy(up.port)
    with h.client() as c:
        assert c.get("/1").body == b"/1"
        assert c.get("/2").body == b"/2"          # failed on conn 0, retried on conn 1
        st = h.stats()
        assert (st.created, st.retried, st.failed, st.bad_gateway) == (2, 1, 1, 0)
        r = c.request(b"POST /3 HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\n\r\nx")
        assert r.status == 502
        assert c.get("/4").body == b"/4"          # the client connection goes on
    st = h.wait_stats(clients=0)
    assert (st.created, st.retried, st.bad_gateway) == (3, 1, 1)
    assert [(r.conn, r.index, r.target) for r in up.requests] == [
        (0, 0, b"/1"), (0, 1, b"/2"), (1, 0, b"/2"), (1, 1, b"/3"), (2, 0, b"/4")]


def test_retry_making_room_counts_the_closed_idle_connection(engine, make_upstream,
                                                             make_proxy):
    """At max_upstream, a retry's fresh connection needs room: the oldest idle one is
    closed for it, and counted (as expired: closed idle by the proxy)."""
    both = threading.Barrier(2, timeout=10)

    def respond(req: Received) -> list:
        if req.target in (b"/a", b"/b"):
            both.wait()                     # two connections open at once, both pooled
            return [0.1, ok(req.target)] if req.target == b"/b" else [ok(req.target)]
        return [CLOSE] if req.index == 1 else [ok(req.target)]

    up = make_upstream(respond)
    h = make_proxy(up.port, max_upstream=2)
    with h.client() as a, h.client() as b:
        a.send(get_req("/a"))
        b.send(get_req("/b"))
        assert a.response().body == b"/a" and b.response().body == b"/b"
        h.wait_stats(idle=2)
        assert a.get("/c").body == b"/c"    # closed on /b's connection, retried
    st = h.wait_stats(clients=0, idle=1)
    assert (st.created, st.retried, st.failed, st.expired) == (3, 1, 1, 1)


def test_idle_connection_closed_by_upstream_leaves_pool_at_once(engine, make_upstream,
                                                                make_proxy):
    """The upstream's EOF on an idle connection takes it out of the pool at once: closing,
    it must not be handed out before connection_lost. (The event is given to the handler
    on the engine thread, so that nothing can come between.)"""
    up = make_upstream()
    h = make_proxy(up.port)
    with h.client() as c:
        assert c.get("/").status == 200
        h.wait_stats(idle=1)

        def eof_on_idle() -> tuple:
            pool = h.proxy.pool
            uc = pool.idle[-1]
            uc.eof_received(uc.conn)
            return len(pool.idle), h.proxy.stats().dropped

        assert on_engine_thread(engine, eof_on_idle) == (0, 1)
        assert c.get("/").status == 200
    st = h.wait_stats(clients=0, idle=1)
    assert (st.created, st.reused, st.dropped, st.failed) == (2, 0, 1, 0)


def test_serve_refuses_workers(engine):
    """The proxy's state has no locks: its handlers must run on the engine's thread."""
    px = proxy_mod.Proxy(engine, proxy_mod.ProxyConfig("127.0.0.1", 1))
    try:
        with pytest.raises(ValueError, match="workers"):
            px.serve("127.0.0.1", 0, workers=2)
        assert px.servers == []
    finally:
        on_engine_thread(engine, px.close)


def test_upstream_stall_gives_504(engine, make_upstream, make_proxy):
    up = make_upstream(lambda req: [30.0] if req.target == b"/stall" else [ok(b"fine")])
    h = make_proxy(up.port, response_timeout=0.4)
    with h.client() as c:
        t0 = time.monotonic()
        r = c.get("/stall")
        elapsed = time.monotonic() - t0
        assert r.status == 504 and 0.35 < elapsed < 3, elapsed
        assert c.get("/").body == b"fine"
    st = h.wait_stats(clients=0)
    assert (st.gateway_timeout, st.failed, st.created) == (1, 1, 2)


def test_upstream_dribbling_head_gives_504(engine, make_upstream, make_proxy):
    """An upstream sending its head a byte now and then gets no more time for it: 504
    once response_timeout has passed since the request went out."""
    head = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"s" * 30 + b"\r\nContent-Length: 2\r\n\r\n"
    steps: list = []
    for i in range(len(head)):
        steps += [head[i:i + 1], 0.05]          # 3 s in all
    up = make_upstream(lambda req: steps + [b"ok"] if req.target == b"/slow" else [ok(b"fine")])
    h = make_proxy(up.port, response_timeout=0.5)
    with h.client() as c:
        t0 = time.monotonic()
        r = c.get("/slow")
        elapsed = time.monotonic() - t0
        assert r.status == 504 and 0.45 < elapsed < 2, (r.status, elapsed)
        assert c.get("/").body == b"fine"
    st = h.wait_stats(clients=0)
    assert (st.gateway_timeout, st.failed, st.created) == (1, 1, 2)


@pytest.mark.parametrize("head", [
    ok(b"ok", headers=(b"X-H: " + b"h" * 100,) * 30),
    b"HTTP/1.1 200 OK\r\nX-H: " + b"h" * 5000,        # a line that never ends
], ids=["fields", "endless"])
def test_upstream_head_too_large_gives_502(engine, make_upstream, make_proxy, head):
    """The upstream's response head is bounded by max_head, as a client's request head:
    502, and that upstream connection is closed."""
    up = make_upstream(lambda req: [head, 30.0] if req.target == b"/big" else [ok(b"fine")])
    h = make_proxy(up.port, max_head=1000, response_timeout=5)
    with h.client() as c:
        r = c.get("/big")
        assert r.status == 502 and b"too large" in r.body
        assert c.get("/").body == b"fine"
    st = h.wait_stats(clients=0)
    assert (st.bad_gateway, st.failed, st.created) == (1, 1, 2)


def test_upstream_not_reading_body_gives_504(engine, make_upstream, make_proxy):
    """An upstream that takes none of the request body: the proxy stops reading the client
    (so the client cannot send either), and answers 504 after response_timeout; not 408
    after client_timeout, the client is not the one holding things up."""
    up = make_upstream(early=lambda ev: [30.0] if ev.target == b"/upload" else None,
                       rcvbuf=65536)
    h = make_proxy(up.port, client_timeout=0.3, response_timeout=1.0)
    stop = threading.Event()
    c = h.client()

    def send_body() -> None:
        block = b"u" * (1 << 20)
        try:
            while not stop.is_set():
                c.sock.sendall(block)
        except OSError:
            pass                        # the proxy closed the connection

    try:
        c.send(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: %d\r\n\r\n" % (1 << 30))
        sender = threading.Thread(target=send_body)
        sender.start()
        try:
            st = h.wait_stats(gateway_timeout=1)
        finally:
            stop.set()
        assert st.client_errors == 0
        try:                            # unread body in the proxy's socket may reset it
            assert c.response().status == 504
        except (ConnectionResetError, h11.RemoteProtocolError):
            pass
        sender.join(10)
    finally:
        c.close()
    st = h.wait_stats(clients=0)
    assert (st.gateway_timeout, st.client_errors, st.failed) == (1, 0, 1)


def test_expect_100_continue_reuses_connection(engine, make_upstream, make_proxy):
    """The upstream's 100 Continue reaches the client; the body follows, then the final
    response: a complete exchange, whose upstream connection is pooled and reused."""
    up = make_upstream(lambda req: [ok(req.body)], early=lambda ev: [
        b"HTTP/1.1 100 Continue\r\n\r\n"] if (b"expect", b"100-continue") in ev.headers else None)
    h = make_proxy(up.port)
    with h.client() as c:
        for i in range(3):
            c.send(b"PUT /u HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n"
                   b"Content-Length: 5\r\n\r\n")
            assert c.recv_exactly(25) == b"HTTP/1.1 100 Continue\r\n\r\n"
            c.send(b"body%d" % i)
            r = c.response()
            assert r.status == 200 and r.body == b"body%d" % i
    st = h.wait_stats(clients=0, idle=1)
    assert (st.created, st.reused, st.discarded) == (1, 2, 0)


def test_upgrade_offer_is_dropped(engine, make_upstream, make_proxy):
    """An h2c offer (curl --http2) and a websocket handshake go upstream as plain requests
    without the offer (the upstream answers them as such); the requests after them on
    the connection are HTTP/1.1 as before."""
    up = make_upstream()
    h = make_proxy(up.port)
    h2c = (b"GET /h2c HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n"
           b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n")
    ws = (b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
          b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    with h.client() as c:
        c.send(h2c + get_req("/next") + ws)
        assert [c.response().body for _ in range(3)] == [b"/h2c", b"/next", b"/ws"]
        assert c.get("/last").body == b"/last"
    h2c_got, _, ws_got, _ = up.requests
    assert h2c_got.names == {b"host", b"via"}
    assert ws_got.names == {b"host", b"sec-websocket-key", b"sec-websocket-version", b"via"}
    assert h.wait_stats(clients=0).created == 1


def test_upstream_refused_gives_502(engine, make_proxy):
    h = make_proxy(closed_port())
    with h.client() as c:
        for _ in range(2):
            r = c.get("/")
            assert r.status == 502 and b"connect" in r.body
    st = h.stats()
    assert (st.bad_gateway, st.connect_errors, st.created) == (2, 2, 0)


def test_connect_timeout_gives_504(engine, make_proxy):
    """A listener whose accept queue is full drops SYNs: the connect hangs."""
    lst = socket.socket()
    fill: list = []
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(0)
        for _ in range(3):
            s = socket.socket()
            fill.append(s)
            s.setblocking(False)
            s.connect_ex(lst.getsockname())
        h = make_proxy(lst.getsockname()[1], connect_timeout=0.4)
        with h.client() as c:
            t0 = time.monotonic()
            r = c.get("/")
            assert r.status == 504 and 0.35 < time.monotonic() - t0 < 5
        st = h.stats()
        assert (st.gateway_timeout, st.connect_errors, st.created) == (1, 1, 0)
    finally:
        for s in fill:
            s.close()
        lst.close()


@pytest.mark.parametrize("end", [CLOSE, RESET])
def test_upstream_fails_before_response_gives_502(engine, make_upstream, make_proxy, end):
    up = make_upstream(lambda req: [b"HTTP/1.1 200 OK\r\nContent-Le", end]
                       if req.target == b"/half" else [end])
    h = make_proxy(up.port)
    with h.client() as c:
        assert c.get("/").status == 502               # nothing came back
        assert c.get("/half").status == 502           # half a head: still nothing sent
    st = h.wait_stats(clients=0)
    assert (st.bad_gateway, st.failed, st.retried, st.aborted) == (2, 2, 0, 0)


@pytest.mark.parametrize("end", [CLOSE, RESET])
def test_upstream_fails_mid_body_aborts_client(engine, make_upstream, make_proxy, end):
    """Head and part of the body sent, then the upstream closes or resets: the client's
    connection is aborted, so it cannot take the cut body for a whole one."""
    up = make_upstream(lambda req: [ok(b"x" * 1000)[:-500], 0.05, end])
    h = make_proxy(up.port)
    with h.client() as c:
        c.send(get_req("/"))
        with pytest.raises((ConnectionResetError, h11.RemoteProtocolError)):
            c.response()
    st = h.wait_stats(clients=0)
    assert (st.aborted, st.failed, st.bad_gateway) == (1, 1, 0)


@pytest.mark.parametrize("end", [CLOSE, RESET])
def test_a_cut_body_that_ends_at_the_close_ends_with_a_reset(engine, make_upstream,
                                                             make_proxy, end):
    """An HTTP/1.0 client reads the body until the close: when the upstream's chunked
    body is cut short, its connection ends with a reset, not the FIN that would end a
    whole body."""
    up = make_upstream(lambda req: [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                    b"5\r\nhello\r\n100\r\npartial", 0.05, end])
    h = make_proxy(up.port)
    with connect(("127.0.0.1", h.port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        with pytest.raises(ConnectionResetError):
            while s.recv(1 << 16):
                pass
    assert h.wait_stats(clients=0).aborted == 1


def test_bytes_left_after_a_bodiless_response_do_not_answer_the_next(engine, make_upstream,
                                                                      make_proxy):
    """An upstream sends bytes after a 204, in a write of their own, once the next request
    (pipelined) is already on that connection: they come where its response should, and
    the GET is retried on a fresh connection rather than answered 502. (On an idle
    pooled connection such bytes get it dropped.)"""
    def answer(req: Any) -> list:
        if req.target == b"/204":
            return [b"HTTP/1.1 204 No Content\r\n\r\n", 0.1, b"JUNK"]
        return [0.2, ok(b"fine")]
    up = make_upstream(answer)
    h = make_proxy(up.port)
    with h.client() as c:
        c.send(get_req("/204") + get_req("/next"))
        assert c.response().status == 204
        r = c.response()
        assert (r.status, r.body) == (200, b"fine")
    st = h.wait_stats(clients=0)
    # (retried; or, on a machine so slow that the junk came while the connection was
    # idle in the pool, dropped there: either way no 502)
    assert (st.retried + st.dropped, st.bad_gateway, st.created) == (1, 0, 2)


def test_invalid_response_gives_502(engine, make_upstream, make_proxy):
    up = make_upstream(lambda req: [b"SPLAT 200 OK\r\n\r\n"])
    h = make_proxy(up.port)
    with h.client() as c:
        r = c.get("/")
        assert r.status == 502 and b"invalid response" in r.body
        assert r.header(b"date") is not None        # the proxy's own answers are dated
    assert h.wait_stats(clients=0).failed == 1


def test_idle_connections_expire(engine, make_upstream, make_proxy):
    up = make_upstream()
    h = make_proxy(up.port, max_idle=0.3)
    with h.client() as c:
        assert c.get("/").status == 200
        h.wait_stats(idle=1)
        st = h.wait_stats(expired=1, idle=0)
        assert st.dropped == 0
        assert c.get("/").status == 200
    assert h.stats().created == 2


@pytest.mark.parametrize("raw, status", [
    (b"NOT HTTP\r\n\r\n", 400),
    (b"GET /" + b"a" * 200 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"b" * 2000 + b"\r\n\r\n", 431),
    (CHUNKED_POST + (b"X-T: " + b"t" * 100 + b"\r\n") * 30, 431),
    (CHUNKED_POST + b"X-T: " + b"t" * 5000, 431),
    (b"CONNECT t:443 HTTP/1.1\r\nHost: t:443\r\n\r\n", 501),
    (b"GET * HTTP/1.1\r\nHost: t\r\n\r\n", 400),
])
def test_client_errors(engine, make_upstream, make_proxy, raw, status):
    """A bad request is answered (after the good one before it) and the connection closed;
    nothing of it goes upstream."""
    up = make_upstream()
    h = make_proxy(up.port, max_url=100, max_head=1000)
    with h.client() as c:
        c.send(get_req("/good") + raw)
        assert c.response().body == b"/good"
        r = c.response()
        assert r.status == status and r.header(b"connection") == b"close"
        c.assert_closed()
    assert [r.target for r in up.requests] == [b"/good"]
    assert h.wait_stats(clients=0).client_errors == 1


def test_options_asterisk_is_forwarded(engine, make_upstream, make_proxy):
    """``OPTIONS *`` goes upstream as it came (``GET *`` is refused: test_client_errors)."""
    up = make_upstream(lambda req: [ok(headers=(b"Allow: GET, HEAD, OPTIONS",))])
    h = make_proxy(up.port)
    with h.client() as c:
        r = c.request(get_req("*", method=b"OPTIONS"), method=b"OPTIONS")
        assert r.status == 200 and r.header(b"allow") == b"GET, HEAD, OPTIONS"
        assert c.get("/after").status == 200
    assert [(r.method, r.target) for r in up.requests] == [(b"OPTIONS", b"*"),
                                                           (b"GET", b"/after")]


def test_stats_endpoint(engine, make_upstream, make_proxy):
    up = make_upstream()
    h = make_proxy(up.port)
    with h.client() as c:
        c.get("/a")
        c.get("/b")
        r = c.get("/_proxy/stats")
        assert r.status == 200 and r.header(b"content-type") == b"application/json"
        st = json.loads(r.body)
        assert set(st) == {f.name for f in dataclasses.fields(proxy_mod.ProxyStats)}
        assert (st["created"], st["reused"], st["idle"], st["requests"]) == (1, 1, 1, 2)
        r = c.request(b"POST /_proxy/stats HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nxx")
        assert r.status == 405
        assert c.get("/_proxy/stats?x").status == 200
    assert [r.target for r in up.requests] == [b"/a", b"/b"]
    st = h.stats()                      # the proxy's own answers are not upstream requests
    assert (st.requests, st.client_errors) == (2, 1)


def test_client_timeouts(engine, make_upstream, make_proxy):
    """An idle client is closed; one that stops halfway through a request head gets 408."""
    up = make_upstream()
    h = make_proxy(up.port, client_timeout=0.3)
    with h.client() as idle, h.client() as slow:
        assert idle.get("/").status == 200
        slow.send(b"GET / HTTP/1.1\r\nHo")
        t0 = time.monotonic()
        idle.assert_closed()
        r = slow.response()
        assert r.status == 408
        slow.assert_closed()
        assert time.monotonic() - t0 < 5
    h.wait_stats(clients=0)


def test_slowloris_head_gets_408(engine, make_upstream, make_proxy):
    """A request head dribbled a byte at a time (each byte keeps client_timeout away) gets
    408 once header_timeout has passed since its first byte, and the connection closes;
    nothing goes upstream."""
    up = make_upstream()
    h = make_proxy(up.port, header_timeout=0.5)
    with h.client() as c:
        c.send(b"GET / HTTP/1.1\r\nHost: t\r\n")
        t0 = time.monotonic()
        while (not select.select([c.sock], [], [], 0.1)[0]
               and time.monotonic() - t0 < 10):
            c.send(b"X")                # a field name that never ends
        r = c.response()
        assert r.status == 408 and r.header(b"connection") == b"close"
        assert 0.4 < time.monotonic() - t0 < 5
        c.assert_closed()
    assert up.requests == []
    assert h.wait_stats(clients=0).client_errors == 1


def test_silent_new_connection_closed_after_header_timeout(engine, make_upstream,
                                                           make_proxy):
    """A new connection that sends nothing within header_timeout is closed (there is no
    request to answer); one whose heads come in time stays, however long it waits between
    them (that is client_timeout's business)."""
    up = make_upstream()
    h = make_proxy(up.port, header_timeout=0.3)
    with h.client() as silent, h.client() as kept:
        assert kept.get("/1").status == 200
        t0 = time.monotonic()
        silent.assert_closed()
        assert 0.25 < time.monotonic() - t0 < 5
        time.sleep(0.6)                 # idle for twice header_timeout
        assert kept.get("/2").status == 200
    assert h.wait_stats(clients=0).client_errors == 0


def test_late_head_behind_a_request_gets_408_after_its_answer(engine, make_upstream,
                                                              make_proxy):
    """A pipelined request whose head does not come in time: the request before it is
    answered first, then the 408, then the connection closes."""
    up = make_upstream(lambda req: [0.3, ok(req.target)])
    h = make_proxy(up.port, header_timeout=0.5)
    with h.client() as c:
        c.send(get_req("/first") + b"GET /second HTTP/1.1\r\nHo")
        assert c.response().body == b"/first"
        r = c.response()
        assert r.status == 408 and r.header(b"connection") == b"close"
        c.assert_closed()
    assert [r.target for r in up.requests] == [b"/first"]


def test_head_time_does_not_run_while_the_proxy_is_not_reading(engine, make_upstream,
                                                               make_proxy):
    """Reading pauses while two requests are queued: the start of a third head, read
    before the pause, is not timed while the proxy reads nothing more of it; its time
    starts anew when reading resumes."""
    up = make_upstream(lambda req: [2.0, ok(req.target)] if req.target == b"/1"
                       else [ok(req.target)])
    h = make_proxy(up.port, header_timeout=1.0)
    with h.client() as c:
        c.send(get_req("/1") + get_req("/2") + b"GET /3 HTTP/1.1\r\nHo")
        assert c.response().body == b"/1"          # after 2 s, twice header_timeout
        time.sleep(0.5)                 # half of header_timeout since reading resumed
        c.send(b"st: t\r\n\r\n")
        assert c.response().body == b"/2"
        assert c.response().body == b"/3"
    assert [r.target for r in up.requests] == [b"/1", b"/2", b"/3"]


def test_slow_reader_gets_everything(engine, make_upstream, make_proxy):
    """A client that reads slowly: the proxy stops reading the upstream while too much is
    queued for the client (what it holds stays far below the body's size), and still
    delivers every byte."""
    body = random.Random(9).randbytes(16 << 20)
    reply = ok(body)
    up = make_upstream(lambda req: [reply])
    h = make_proxy(up.port)

    def queued() -> int:
        return on_engine_thread(engine, lambda: max(
            c.conn.get_write_buffer_size() for c in h.proxy.clients))

    s = connect(("127.0.0.1", h.port), rcvbuf=32768)
    with s:
        s.sendall(get_req("/"))
        raw = bytearray()
        most = 0
        while len(raw) < len(reply):
            raw += s.recv(65536)
            if len(raw) < 4 << 20:
                time.sleep(0.002)
                most = max(most, queued())
        assert bytes(raw) == reply
    assert 0 < most < 2 << 20, most
    h.wait_stats(clients=0, idle=1)


def test_client_leaving_mid_response(engine, make_upstream, make_proxy):
    """The client disconnects while its request is outstanding or its response is being
    sent: the upstream connection is closed (it is mid-exchange), nothing leaks. It is
    counted as discarded: not a failure of the upstream."""
    up = make_upstream(lambda req: [30.0] if req.target == b"/stall" else
                       [ok(b"y" * (8 << 20))])
    h = make_proxy(up.port)
    for path in ("/stall", "/big"):
        c = h.client()
        c.send(get_req(path))
        wait_until(lambda: up.requests and up.requests[-1].target == path.encode())
        c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        c.close()
    st = h.wait_stats(clients=0, in_use=0, idle=0)
    assert (st.discarded, st.failed, st.aborted) == (2, 0, 0)


def _interrupt(p: subprocess.Popen) -> str:
    """Stop the program as Ctrl-C does; its stderr (killed if it does not end)."""
    p.send_signal(signal.SIGINT)
    try:
        return p.communicate(timeout=20)[1]
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        raise


def test_script(backend, make_upstream):
    """The example as a program: prints 'listening on', proxies, serves its stats, answers
    a head that does not come in --header-timeout with 408, stops on SIGINT."""
    up = make_upstream()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    p = subprocess.Popen([sys.executable, str(SCRIPT), "--upstream", f"127.0.0.1:{up.port}",
                          "--backend", backend, "--stats-interval", "0.2",
                          "--header-timeout", "0.3", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = p.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line + p.stderr.read()
        port = int(line.rsplit(":", 1)[1])
        with Client(port) as c:
            assert c.get("/hello").body == b"/hello"
            assert json.loads(c.get("/_proxy/stats").body)["created"] == 1
        with Client(port) as c:
            t0 = time.monotonic()
            c.send(b"GET / HTTP/1.1\r\nHo")
            assert c.response().status == 408
            assert time.monotonic() - t0 < 5          # not the default 10 s
        time.sleep(0.3)
    finally:
        err = _interrupt(p)
    assert p.returncode == 0, err
    assert "pool: created=1 reused=0" in err


def test_max_connections_fit_the_fd_limit(backend, make_upstream):
    """With a low fd limit the program lowers --max-connections to what it allows (two fds
    a client: its socket and its upstream connection) and says so. That many clients, each
    with a request upstream at the same time, are all answered; the next ones get 503:
    no fd runs out, nothing hangs."""
    import resource

    limit = 200
    fit = (limit - proxy_mod.SPARE_FDS) // 2
    lock = threading.Lock()
    arrived = [0]
    all_in = threading.Event()

    def respond(req: Received) -> list:
        with lock:
            arrived[0] += 1
            if arrived[0] == fit:
                all_in.set()
        all_in.wait(30)                 # every exchange open at once
        return [ok(req.target)]

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    up = make_upstream(respond)
    p = subprocess.Popen([sys.executable, str(SCRIPT), "--upstream", f"127.0.0.1:{up.port}",
                          "--backend", backend, "--max-connections", "10000", "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=dict(os.environ, PYTHONUNBUFFERED="1"), preexec_fn=low_limit)
    try:
        line = p.stdout.readline()
        assert line.startswith("listening on 127.0.0.1:"), line + p.stderr.read()
        port = int(line.rsplit(":", 1)[1])
        clients = [Client(port) for _ in range(fit)]
        try:
            for i, c in enumerate(clients):
                c.send(get_req(f"/{i}"))
            assert all_in.wait(30), f"{arrived[0]} of {fit} requests reached the upstream"
            extras = [Client(port) for _ in range(10)]
            try:
                for extra in extras:
                    assert extra.response().status == 503
                    extra.assert_closed()
            finally:
                for extra in extras:
                    extra.close()
            for i, c in enumerate(clients):
                assert c.response().body == f"/{i}".encode()
        finally:
            for c in clients:
                c.close()
    finally:
        err = _interrupt(p)
    assert p.returncode == 0, err
    assert f"the fd limit ({limit}) allows --max-connections {fit}, not 10000" in err, err
    assert "Too many open files" not in err and "accept on" not in err, err


def test_fd_budget_shares_the_fd_limit():
    """What fd_budget makes of a limit of 200 fds (136 after the spare ones): unchanged if
    it fits; else clients keep at least half, upstream connections get the rest up to their
    cap. (A child process: it lowers its own fd limit.)"""
    code = f"""
import importlib.util, logging, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))
logging.disable(logging.WARNING)
spec = importlib.util.spec_from_file_location("proxy_example", {str(SCRIPT)!r})
mod = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = mod
spec.loader.exec_module(mod)
print([mod.fd_budget(*a) for a in [(10, 0), (40, 90), (10000, 0), (10000, 100), (50, 1000),
                                   (1000, 30)]])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[(10, 0), (40, 90), (68, 0), (68, 68), (50, 86), (106, 30)]"
