"""Reverse proxy with a pool of persistent upstream connections.

usage: python examples/proxy.py --upstream HOST:PORT [--host H] [--backend B]
           [--max-connections N] [--pool-size N | --no-pool] [--max-upstream N]
           [--max-idle S] [--connect-timeout S] [--response-timeout S]
           [--client-timeout S] [--header-timeout S] [--forwarded-for]
           [--stats-interval S] [--stats-path PATH] PORT

Every request from a client goes to the one upstream server over HTTP/1.1, on a
connection from the pool when one is idle, and the response comes back to the client.
``GET /_proxy/stats`` answers the pool's statistics as JSON instead of going upstream.

How it works
------------
Everything runs inline on the engine's I/O thread (``workers=0``): no locks, and no
handler may block. The pieces, from the client inwards:

* :class:`RequestReader` (sans-IO) parses a client's bytes with httptools'
  ``HttpRequestParser`` into :class:`Request` objects: the head to send upstream (rebuilt
  from the parsed parts: hop-by-hop headers removed, an offered Upgrade with them,
  ``X-Forwarded-For`` optionally added) and then the body as it arrives.
  ``Content-Length`` bodies are forwarded as the bytes that came; chunked ones re-chunked
  as their data comes (the parser hands over the data without the framing; the last
  chunk and any trailers go at the end). The parser says where each message ends, so
  pipelined requests need no byte offsets.
* :class:`ClientConnection` (one per client) queues its requests and serves them one at
  a time, in order. While a request is outstanding and another one is queued behind it,
  it stops reading from the client. It keeps the timeouts of its side (a request head
  must be complete within ``header_timeout`` of its first byte) and sends the errors the
  proxy answers itself (400, 408, 414, 431, 501, 502, 503, 504). Beyond
  ``max_connections`` clients a new one is answered 503 and closed at once.
* :class:`ResponseReader` (sans-IO) parses the upstream's response with httptools'
  ``HttpResponseParser`` and turns it into the bytes for the client: the head rebuilt
  without hop-by-hop headers (identical to the upstream's when it has none), the body
  forwarded as it arrives. It knows when the response is complete: Content-Length,
  chunked, no body (HEAD, 1xx, 204, 304) or, for a body delimited by the upstream closing,
  the upstream's EOF. Interim 1xx responses go to HTTP/1.1 clients and the final one
  follows.
* :class:`UpstreamPool` holds the upstream connections (:class:`UpstreamConnection`):
  idle ones are reused last-in first-out, so the ones that stay idle are the ones that
  expire; at most ``pool_size`` are kept idle and none longer than ``max_idle``; beyond
  ``max_upstream`` connections (by default ``max_connections``: one per client) the
  requests wait for one to be released (503 after ``connect_timeout``). A connection
  goes back to the pool only after a complete response that did not ask to close
  (``Connection: close`` or HTTP/1.0 without keep-alive) and a request that was complete
  before the response began. An idle connection the upstream closes, resets or sends
  bytes on is dropped on the spot.
* :class:`Proxy` ties them together: one timer tick checks every deadline (so a request
  costs no timer of its own), statistics (:class:`ProxyStats`) and shutdown.

Failures: a connect refused gives 502, a connect timeout 504; a connect that finds no fd
(clients being turned away hold some for a moment) waits for one to come free, 503 after
``connect_timeout``; no complete response head within ``response_timeout`` of the
request being sent gives 504, and so does an upstream that takes none of the request
body for that long; an upstream that closes, resets or sends an invalid response (or a
head or trailers over ``max_head``) gives 502 if the client has not had the response
head yet, else the client connection is aborted (it cannot tell a cut body from a whole
one otherwise). A GET or HEAD that fails on a reused connection before any byte of the
response arrived is retried once on a fresh connection (the upstream may have closed the
idle connection just as the request went out); this is logged and counted (``retried``).

Flow control: above ``HIGH_WATER`` bytes queued towards the upstream the client is not
read; above it towards the client the upstream is not read, until the queue has drained.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":
    # Run as a script, this folder comes first on sys.path, and examples/copy.py would
    # shadow the standard library's ``copy`` module (which trio imports).
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import email.utils  # noqa: E402
import errno  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from collections import deque  # noqa: E402
from http import HTTPStatus  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import httptools  # noqa: E402

import proactor  # noqa: E402

logger = logging.getLogger("proxy")

#: Bytes queued towards one side above which the other side is no longer read.
HIGH_WATER = 256 * 1024
#: Bytes sent to a client between two looks at how much of it is still queued.
CHECK_EVERY = 64 * 1024
#: A GET/HEAD is kept for a retry only while what was sent of it stays under this size.
REPLAY_LIMIT = 64 * 1024
#: Clients refused at max_connections are logged at most this often (seconds).
REFUSALS_LOGGED_EVERY = 60.0

#: Hop-by-hop headers (RFC 9110 section 7.6.1): they concern one connection and are not
#: forwarded. Transfer-Encoding is hop-by-hop too; it is handled where the body is.
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"proxy-connection", b"te",
                        b"trailer", b"upgrade", b"proxy-authenticate", b"proxy-authorization"))
#: What a Host value may hold (RFC 3986: reg-name or IP literal, then a port).
_HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                        b"-._~!$&'()*+,;=:%[]")
#: This proxy's entry in the Via field of the requests it forwards.
VIA = b"Via: 1.1 proactor\r\n"
#: Never dropped because a peer named them in ``Connection``: they frame or route messages.
PROTECTED = frozenset((b"host", b"content-length", b"transfer-encoding"))
#: Methods retried once on a fresh connection when a reused one failed before answering.
IDEMPOTENT = frozenset((b"GET", b"HEAD"))


# ---------------------------------------------------------------------------- configuration
@dataclasses.dataclass(frozen=True)
class ProxyConfig:
    """What the proxy is told; the defaults are those of the command line."""

    upstream_host: str
    upstream_port: int
    #: Client connections open at once; one more is answered 503 and closed.
    max_connections: int = 5000
    #: Idle upstream connections kept for reuse; 0: a fresh connection per request.
    pool_size: int = 128
    #: Upstream connections open at once (connecting, in use or idle); 0: as many as
    #: ``max_connections`` (one per client: a client has one request upstream at a time).
    max_upstream: int = 0
    #: Seconds an idle upstream connection is kept.
    max_idle: float = 30.0
    #: Seconds to connect (504 after), and to wait for a connection when at max_upstream.
    connect_timeout: float = 5.0
    #: Seconds from the request sent to the complete response head (504 after), the
    #: longest time the upstream may take none of the request body (504), and the longest
    #: pause of the upstream while it sends the response body (the client is aborted).
    response_timeout: float = 30.0
    #: Seconds a client may stay idle between requests, pause while sending one, or not
    #: read what the proxy has to send it.
    client_timeout: float = 60.0
    #: Seconds a client has to send a whole request head, from its first byte (the first
    #: head: from the connection); 408 and closed after (slowloris). A new connection that
    #: sent nothing in that time is closed.
    header_timeout: float = 10.0
    #: Add the client's address to X-Forwarded-For.
    forwarded_for: bool = False
    #: Path answered with the statistics as JSON (b"": none).
    stats_path: bytes = b"/_proxy/stats"
    #: Longest request target (414 beyond) and request head (431 beyond), in bytes;
    #: max_head also bounds the fields of chunked trailers (431) and the upstream's
    #: response head and trailers (502).
    max_url: int = 8192
    max_head: int = 65536

    @property
    def upstream_limit(self) -> int:
        """The cap on upstream connections: ``max_upstream``, else ``max_connections``."""
        return self.max_upstream or self.max_connections

    @property
    def default_host(self) -> bytes:
        """The Host header for requests that came without one (HTTP/1.0)."""
        host = self.upstream_host
        if ":" in host:
            host = f"[{host}]"
        return f"{host}:{self.upstream_port}".encode("ascii")


@dataclasses.dataclass(frozen=True)
class ProxyStats:
    """A snapshot of the proxy's counters (``/_proxy/stats`` answers it as JSON).

    Upstream connections: ``created`` opened; ``reused`` requests sent on a connection that
    had served one before; ``dropped`` idle pooled connections found dead (closed, reset
    or talking while idle) and removed; ``expired`` idle ones the proxy closed (after
    ``max_idle``, or the oldest to make room at ``max_upstream`` for a retry's fresh
    connection); ``discarded`` closed instead of pooled, not for a fault of the upstream:
    after a response (the upstream asked to close, the pool was full, the response began
    before the request was complete), or mid-exchange for the client's sake (it left,
    stalled, sent an invalid request or did not finish its request in time);
    ``failed`` broken during an exchange by the upstream (reset, closed early, invalid or
    too large response, timeout); ``connect_errors`` connects that failed or timed out.
    Now: ``idle``, ``in_use``, ``connecting``, ``waiting`` (requests waiting for a
    connection at ``max_upstream``, or for an fd at the fd limit).

    Requests: ``requests`` received for the upstream (not those for ``stats_path``, which
    the proxy answers, nor those refused for their head, counted in ``client_errors``
    only); ``retried`` retried on a fresh connection;
    ``bad_gateway`` (502), ``unavailable`` (503), ``gateway_timeout`` (504) and
    ``client_errors`` (requests refused: 400, 405, 408, 414, 431, 501) answered by the
    proxy itself; ``aborted`` client connections
    aborted mid-response; ``refused`` client connections turned away at
    ``max_connections`` (answered 503 before any request was read; not in
    ``unavailable``, which counts requests); ``clients`` open now.
    """

    created: int
    reused: int
    dropped: int
    expired: int
    discarded: int
    failed: int
    connect_errors: int
    idle: int
    in_use: int
    connecting: int
    waiting: int
    requests: int
    retried: int
    bad_gateway: int
    unavailable: int
    gateway_timeout: int
    client_errors: int
    aborted: int
    refused: int
    clients: int

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        return " ".join(f"{k}={v}" for k, v in self.as_dict().items())


class Counters:
    """The running counters behind :class:`ProxyStats` (engine thread only)."""

    __slots__ = ("created", "reused", "dropped", "expired", "discarded", "failed",
                 "connect_errors", "requests", "retried", "bad_gateway", "unavailable",
                 "gateway_timeout", "client_errors", "aborted", "refused")

    def __init__(self) -> None:
        for name in self.__slots__:
            setattr(self, name, 0)

    def count_error(self, status: int) -> None:
        if status == 502:
            self.bad_gateway += 1
        elif status == 503:
            self.unavailable += 1
        elif status == 504:
            self.gateway_timeout += 1
        elif status >= 400:            # the client's request refused: 4xx, 501
            self.client_errors += 1


# ---------------------------------------------------------------------------- messages
def forwarded_headers(headers: list) -> list:
    """``headers`` without the hop-by-hop ones: the fixed list and those named in
    ``Connection`` (except the framing and routing ones, whatever a peer says).
    Each item is ``(name, lowercased name, value)``."""
    named = [(n, n.lower(), v) for n, v in headers]
    listed: set = set()
    for _, low, value in named:
        if low == b"connection":
            listed.update(t.strip().lower() for t in value.split(b","))
    listed -= PROTECTED
    return [h for h in named if h[1] not in HOP_BY_HOP and h[1] not in listed]


def combined(fields: list, low: bytes) -> Optional[bytes]:
    """The values of every ``low`` field of ``fields`` (items ``(name, lowercased name,
    value)``) as one comma-separated list, as RFC 9110 section 5.3 reads several field
    lines of a list; None if there is none. Empty values add nothing."""
    values = [v.strip() for _, n, v in fields if n == low]
    if not values:
        return None
    return b", ".join(v for v in values if v)


def merge_fields(fields: list, low: bytes, value: bytes) -> list:
    """``fields`` with the ``low`` fields replaced by one line of ``value``, where the
    first of them was (so a peer reading only the first or the last line reads all)."""
    out = []
    merged = False
    for name, n, v in fields:
        if n == low:
            if merged:
                continue
            merged = True
            v = value
        out.append((name, n, v))
    return out


def is_chunked(transfer_encoding: bytes) -> bool:
    """True if ``chunked`` is the last coding of a Transfer-Encoding value."""
    return transfer_encoding.rsplit(b",", 1)[-1].strip().lower() == b"chunked"


def only_chunked(transfer_encoding: bytes) -> bool:
    """True if a Transfer-Encoding value is the chunked coding alone."""
    codings = [c.strip().lower() for c in transfer_encoding.split(b",") if c.strip()]
    return codings == [b"chunked"]


def chunk(data: bytes) -> bytes:
    """``data`` as one chunk of a chunked body."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def last_chunk(trailers: Optional[list]) -> bytes:
    """The end of a chunked body, with the trailer fields if there are any."""
    if not trailers:
        return b"0\r\n\r\n"
    return b"".join([b"0\r\n"] + [n + b": " + v + b"\r\n" for n, v in trailers] + [b"\r\n"])


_date_cache: list = [0, b""]


def date_field() -> bytes:
    """``Date: ...`` for now, made once a second (RFC 9110 section 6.6.1)."""
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[:] = [now, b"Date: " + email.utils.formatdate(now, usegmt=True).encode()]
    return _date_cache[1]


def simple_response(status: int, body: bytes = b"", *, close: bool = False,
                    head_only: bool = False, content_type: bytes = b"text/plain; charset=utf-8",
                    extra: tuple = ()) -> bytes:
    """A complete response the proxy answers itself."""
    phrase = HTTPStatus(status).phrase.encode("ascii")
    lines = [b"HTTP/1.1 %d %s" % (status, phrase), date_field(),
             b"Content-Type: " + content_type,
             b"Content-Length: %d" % len(body), *extra]
    if close:
        lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (b"" if head_only else body)


def error_response(status: int, detail: str, *, close: bool, head_only: bool = False) -> bytes:
    body = f"{status} {HTTPStatus(status).phrase}: {detail}\n".encode("utf-8", "replace")
    return simple_response(status, body, close=close, head_only=head_only)


class RequestError(Exception):
    """The client sent something this proxy does not forward: answered with ``status``
    (400, 414, 431, 501), then the client connection is closed."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


class Request:
    """One client request, from its head on."""

    __slots__ = ("method", "url", "http10", "keep_alive", "head", "chunked", "complete",
                 "done", "pending", "pending_size", "replay", "replay_size", "local")

    def __init__(self, method: bytes, url: bytes, http10: bool, keep_alive: bool,
                 head: bytes, chunked: bool) -> None:
        self.method = method
        self.url = url
        self.http10 = http10
        self.keep_alive = keep_alive   # the client wants its connection kept after this
        self.head = head               # the request head to send upstream
        self.chunked = chunked
        self.complete = False          # the whole request has been received
        self.done = False              # answered: the rest of its body is dropped
        self.pending: list = []        # body bytes (framed) not sent upstream yet
        self.pending_size = 0
        # everything sent upstream, for a retry (GET/HEAD, up to REPLAY_LIMIT bytes)
        self.replay: Optional[list] = [] if method in IDEMPOTENT else None
        self.replay_size = 0
        self.local: Optional[Callable[[Request], bytes]] = None   # answered by the proxy

    def __repr__(self) -> str:
        return f"<Request {self.method.decode()} {self.url.decode('latin-1')}>"


class _Reader:
    """What both readers do alike. httptools keeps a field line's bytes until the line is
    complete, so they bound the bytes fed while the parser gets nowhere (in a head, or in
    a body's framing and trailers): they feed it pieces of at most ``max_head`` bytes
    (the count is then right to within one piece, wherever the data was in a read) and
    count each piece without progress; body data or a chunk's end in it is progress.
    The subclass has ``in_head``, ``max_head``, ``_fed`` and ``_moved``."""

    __slots__ = ()

    def _feed_pieces(self, data: bytes) -> None:
        """Feed ``data`` to ``_feed`` (the subclass's) a piece at a time."""
        step = max(1, self.max_head)
        if len(data) <= step:              # the common case: one piece, as it is
            self._moved = False
            self._feed(data)
            return
        view = memoryview(data)
        for start in range(0, len(view), step):
            self._moved = False
            self._feed(view[start:start + step])

    def _stalled(self, size: int, framing: bool) -> bool:
        """Count a piece of ``size`` bytes if the parser is in a head, or in the body's
        ``framing`` without progress; True once over twice ``max_head`` since the last
        progress."""
        if self.in_head or (framing and not self._moved):
            self._fed += size
            return self._fed > 2 * self.max_head
        return False

    def _progress(self) -> None:
        self._moved = True
        self._fed = 0

    def on_chunk_complete(self) -> None:
        self._progress()


class RequestReader(_Reader):
    """Client side, sans-IO: feed it the client's bytes; it parses them with httptools and
    calls ``sink.on_request(req)`` (head complete), ``sink.on_request_body(req, data)``
    (``data`` already framed for upstream) and ``sink.on_request_end(req, tail)`` (``tail``:
    the last chunk of a chunked body, else ``b""``). ``feed`` raises
    :class:`RequestError` for what cannot be forwarded; the reader is then finished.

    What a client can make it hold is bounded by ``max_head``: the fields of a head, and
    those of a chunked body's trailers, each up to ``max_head`` bytes (431 beyond); and
    since httptools keeps the bytes of a field line until the line is complete, the bytes
    fed without the parser getting anywhere (within a head, or within a chunked body's
    framing and trailers) up to twice that."""

    def __init__(self, sink: Any, config: ProxyConfig, client_ip: Optional[bytes] = None,
                 upstream_close: bool = False) -> None:
        self.parser = httptools.HttpRequestParser(self)
        self.sink = sink
        self.max_url = config.max_url
        self.max_head = config.max_head
        self.default_host = config.default_host
        self.forwarded_for = client_ip if config.forwarded_for else None
        self.upstream_close = upstream_close   # ask the upstream to close after each request
        self.in_message = False    # between the first byte of a request and its end
        self.in_head = False
        self.error: Optional[RequestError] = None
        self._fed = 0              # bytes fed since the parser last got somewhere
        self._moved = False        # body data or a chunk's end came in this piece
        self._url = b""
        self._headers: list = []
        self._head_size = 0
        self._trailer_size = 0
        self._req: Optional[Request] = None
        self._trailers: Optional[list] = None

    def feed(self, data: bytes) -> None:
        self._feed_pieces(data)

    def _feed(self, data: memoryview) -> None:
        size = len(data)
        while data:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as e:
                # A request that offered an upgrade ended at its head (see
                # on_headers_complete). The offer was dropped, so what follows is still
                # HTTP/1.1: httptools has resumed the parser; go on after the request.
                data = data[e.args[0]:]
                continue
            except httptools.HttpParserCallbackError:
                if self.error is not None:
                    raise self.error from None
                raise              # a sink callback failed: a bug, not the client's fault
            except httptools.HttpParserError as e:
                self.error = RequestError(400, f"invalid request: {e}")
                raise self.error from None
            break
        # a chunked body's framing and trailers last until the message ends
        req = self._req
        if self._stalled(size, req is not None and req.chunked):
            raise self._fail(431, "request head too large" if self.in_head
                             else "request trailers too large")

    def _fail(self, status: int, detail: str) -> RequestError:
        self.error = RequestError(status, detail)
        return self.error

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self.in_message = self.in_head = True
        self._fed = 0
        self._url = b""
        self._headers = []
        self._head_size = 0
        self._trailer_size = 0
        self._req = None
        self._trailers = None

    def on_url(self, url: bytes) -> None:
        self._url += url
        if len(self._url) > self.max_url:
            raise self._fail(414, "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._req is not None:          # after the head: a trailer of a chunked body
            self._trailer_size += len(name) + len(value) + 4
            if self._trailer_size > self.max_head:
                raise self._fail(431, "request trailers too large")
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))
            return
        self._head_size += len(name) + len(value) + 4
        if self._head_size > self.max_head:
            raise self._fail(431, "request head too large")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        p = self.parser
        method = p.get_method()
        fields = forwarded_headers(self._headers)
        if p.should_upgrade():
            # CONNECT asks for a tunnel: not this proxy's business. Other methods merely
            # offer to switch protocols (h2c, websocket), which a server may ignore (RFC
            # 9110 section 7.8): Upgrade and the options Connection names are hop-by-hop,
            # already gone from ``fields``, and the request goes on as plain HTTP/1.1,
            # as does what follows it (the client waits for a 101 before switching).
            # Not with a body though: httptools makes llhttp skip the body of any
            # upgrade request and hands its bytes over as the other protocol, so where
            # the body ends (and the next request begins) could not be told.
            if method == b"CONNECT":
                raise self._fail(501, "CONNECT is not supported")
            if any(low == b"transfer-encoding"
                   or (low == b"content-length" and v.strip(b" \t0"))   # not 0
                   for _, low, v in fields):
                raise self._fail(501, "an Upgrade offer with a request body is not supported")
        url = self._url
        version = p.get_http_version()
        if version not in ("1.0", "1.1"):
            raise self._fail(505, f"HTTP/{version} is not supported")
        if url[:1] == b"*":
            # The asterisk form asks about the server as a whole, and only OPTIONS can
            # (RFC 9112 section 3.2.4); llhttp also lets "*..." through.
            if url != b"*":
                raise self._fail(400, "invalid request target")
            if method != b"OPTIONS":
                raise self._fail(400, "the target * is only for OPTIONS")
        elif url[:1] != b"/" and b"://" in url[:8]:
            url, fields = self._origin_form(method, url, fields)
        http10 = version == "1.0"
        keep_alive = p.should_keep_alive()
        # Several Transfer-Encoding lines are one list (the parser reads them so). Only
        # "chunked" is understood (RFC 9112 section 6.1: 501 for other codings), and
        # one "chunked" line goes upstream: no upstream can read the framing otherwise.
        te = combined(fields, b"transfer-encoding")
        chunked = te is not None
        if chunked:
            if not only_chunked(te):
                raise self._fail(501, "only the chunked transfer coding is supported")
            fields = merge_fields(fields, b"transfer-encoding", b"chunked")
            if http10:
                keep_alive = False       # RFC 9112 section 6.1: faulty framing, close after
        xff = self.forwarded_for
        if xff is not None:
            # One line, the client's address last, whatever lines the client sent: with
            # the address added to the first of two, the last entry of the last line,
            # which upstreams take for the client's, would be the client's own word.
            chain = combined(fields, b"x-forwarded-for")
            if chain is not None:
                fields = merge_fields(fields, b"x-forwarded-for",
                                      chain + b", " + xff if chain else xff)
                xff = None
        hosts = 0
        lines = [method + b" " + url + b" HTTP/1.1\r\n"]
        for name, low, value in fields:
            if low == b"host":
                hosts += 1
                if not _HOST_CHARS.issuperset(value):
                    raise self._fail(400, "invalid Host header")
            lines.append(name + b": " + value + b"\r\n")
        if hosts > 1 or (hosts == 0 and not http10):     # RFC 9112 section 3.2
            raise self._fail(400, "an HTTP/1.1 request needs exactly one Host header")
        if not hosts:
            lines.append(b"Host: " + self.default_host + b"\r\n")
        lines.append(VIA)                    # RFC 9110 section 7.6.3
        if xff is not None:
            lines.append(b"X-Forwarded-For: " + xff + b"\r\n")
        if self.upstream_close:
            lines.append(b"Connection: close\r\n")
        lines.append(b"\r\n")
        req = Request(method, url, http10, keep_alive, b"".join(lines), chunked)
        self._req = req
        self.sink.on_request(req)

    def _origin_form(self, method: bytes, url: bytes, fields: list) -> tuple:
        """An absolute-form target (``http://host/path``): its authority is the Host,
        whatever the Host field says (RFC 9112 section 3.2.2), and the upstream gets the
        origin form; or ``*`` for an OPTIONS with neither path nor query, which asks
        about the server as a whole (RFC 9112 section 3.2.4)."""
        scheme, _, rest = url.partition(b"://")
        if scheme.lower() not in (b"http", b"https"):
            raise self._fail(400, "invalid request target")
        end = len(rest)
        for sep in (b"/", b"?"):
            i = rest.find(sep)
            if 0 <= i < end:
                end = i
        authority, path = rest[:end], rest[end:]
        if not authority or b"@" in authority or not _HOST_CHARS.issuperset(authority):
            raise self._fail(400, "invalid request target")
        if not path and method == b"OPTIONS":
            path = b"*"
        elif path[:1] != b"/":
            path = b"/" + path
        return path, [(b"Host", b"host", authority)] + [f for f in fields if f[1] != b"host"]

    def on_body(self, data: bytes) -> None:
        self._progress()
        req = self._req
        self.sink.on_request_body(req, chunk(data) if req.chunked else data)

    def on_message_complete(self) -> None:
        self.in_message = False
        req, self._req = self._req, None
        self.sink.on_request_end(req, last_chunk(self._trailers) if req.chunked else b"")


class ResponseError(Exception):
    """The upstream's response cannot be forwarded (a 101 we never asked for, a head or
    trailers over ``max_head``)."""


class _ExtraBytes(Exception):
    """Bytes after the end of the response: the connection is not reused."""


class ResponseReader(_Reader):
    """Upstream side, sans-IO: parses one exchange's response with httptools and turns it
    into the bytes for the client. :meth:`feed` returns them; then ``done`` says whether
    the response is complete and ``reusable`` whether its connection may serve another
    request. :meth:`feed` raises ``httptools.HttpParserError`` (or :class:`ResponseError`)
    for an invalid response.

    What an upstream can make it hold is bounded as for requests (see
    :class:`RequestReader`): the fields of each head and of the trailers up to
    ``max_head`` bytes, the bytes fed without the parser getting anywhere up to twice
    that; beyond, :class:`ResponseError`."""

    __slots__ = ("parser", "out", "head_request", "client_http10", "client_close",
                 "started", "head_sent", "done", "reusable", "chunked", "until_close",
                 "interim", "in_head", "in_body", "status", "max_head", "error", "_fed",
                 "_moved", "_field_size", "_reason", "_headers", "_trailers")

    def __init__(self, head_request: bool = False, client_http10: bool = False,
                 client_keep_alive: bool = True, max_head: int = 65536) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.out: list = []
        self.head_request = head_request
        self.client_http10 = client_http10
        self.client_close = not client_keep_alive   # close the client after this response
        self.started = False       # a byte of the response has arrived
        self.head_sent = False     # the final head has gone to the client
        self.done = False          # the response is complete
        self.reusable = False      # its connection may serve another request
        self.chunked = False       # the body is re-chunked for the client
        self.until_close = False   # the body ends when the upstream closes
        self.interim = False       # parsing a 1xx response
        self.in_head = False       # between the first byte of a head and its end
        self.in_body = False       # after the final head
        self.status = 0
        self.max_head = max_head
        self.error: Optional[ResponseError] = None
        self._fed = 0              # bytes fed since the parser last got somewhere
        self._moved = False        # body data or a chunk's end came in this piece
        self._field_size = 0       # of the current head's fields, or of the trailers
        self._reason = b""
        self._headers: list = []
        self._trailers: Optional[list] = None

    def feed(self, data: bytes) -> list:
        self.started = True
        self._feed_pieces(data)
        out, self.out = self.out, []
        return out

    def _feed(self, data: memoryview) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.error is not None:
                raise self.error from None
            if not self.done:
                raise
            self.reusable = False  # something after the response's end: not to be reused
        if self._stalled(len(data), self.in_body and not self.done):
            raise self._fail("response head too large" if self.in_head
                             else "response trailers too large")

    def _fail(self, why: str) -> ResponseError:
        self.error = ResponseError(why)
        return self.error

    def eof(self) -> bool:
        """The upstream closed: True if that completes the response (a body delimited by
        the close); then ``done`` is set and the connection is not reusable."""
        if self.until_close and not self.done:
            self.done = True
            self.reusable = False
            return True
        return False

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        if self.done:
            raise _ExtraBytes
        self.in_head = True
        self._fed = 0
        self._field_size = 0
        self._reason = b""
        self._headers = []

    def on_status(self, reason: bytes) -> None:
        self._reason += reason
        if len(self._reason) > self.max_head:
            raise self._fail("response head too large")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._field_size += len(name) + len(value) + 4
        if self._field_size > self.max_head:
            raise self._fail("response trailers too large" if self.in_body
                             else "response head too large")
        if self.in_body:
            if self._trailers is None:
                self._trailers = []
            self._trailers.append((name, value))
        else:
            self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.in_head = False
        p = self.parser
        status = self.status = p.get_status_code()
        if not 100 <= status <= 599:          # RFC 9110 section 15
            raise self._fail(f"invalid status code {status}")
        if status < 200:
            if status == 101:
                raise self._fail("101 Switching Protocols without an Upgrade request")
            self.interim = True        # 100 Continue, 103 Early Hints: a final one follows
            if not self.client_http10:
                self.out.append(self._head(status, None))
            return
        no_body = self.head_request or status == 204 or status == 304
        connection = None
        fields = forwarded_headers(self._headers)
        te = combined(fields, b"transfer-encoding")
        if te is not None and self.client_http10 and not no_body and not only_chunked(te):
            # An HTTP/1.0 client knows no transfer coding: the chunked one is undone
            # here, any other would reach it still applied, its header dropped.
            raise self._fail("a transfer coding an HTTP/1.0 client cannot read")
        if status == 204 or status == 304:
            # No body: framing fields are not for the client (RFC 9110 section 8.6,
            # RFC 9112 section 6.1); a 304's Content-Length may describe the resource.
            fields = [f for f in fields if f[1] != b"transfer-encoding"
                      and (status == 304 or f[1] != b"content-length")]
            te = None
        if not no_body:
            framing = self._framing(fields, te)
            if framing == b"chunked" and self.client_http10:
                self.client_close = True      # the body goes out as it is, ended by close
            elif framing == b"chunked":
                self.chunked = True
            elif framing is None:
                self.until_close = True
                self.client_close = True
        if self.client_close:
            connection = b"close"
        elif self.client_http10:
            connection = b"keep-alive"
        self.out.append(self._head(status, connection, fields, te))
        self.head_sent = True
        self.in_body = True
        self._fed = self._field_size = 0      # from here on: the trailers' budget
        if self.head_request:
            # No body follows a response to HEAD, whatever its Content-Length says; the
            # parser cannot be told, so the response ends here and the parser is dropped.
            self.done = True
            self.reusable = p.should_keep_alive()

    @staticmethod
    def _framing(fields: list, te: Optional[bytes]) -> Optional[bytes]:
        """b"chunked", b"length", or None (the body ends when the upstream closes), from
        the ``fields`` of :func:`forwarded_headers` (which keeps the framing ones) and
        their Transfer-Encoding list ``te``.

        Several Transfer-Encoding lines are one list, whose last coding decides, as for
        the parser (llhttp), which is what frames the body forwarded; :meth:`_head` sends
        the client that list in one line, so it reads the same framing."""
        if te is not None:
            return b"chunked" if is_chunked(te) else None
        if any(low == b"content-length" for _, low, _ in fields):
            return b"length"
        return None

    def _head(self, status: int, connection: Optional[bytes], fields: Optional[list] = None,
              te: Optional[bytes] = None) -> bytes:
        """The head for the client: the upstream's ``fields`` (from
        :func:`forwarded_headers`; computed if not given) with ``te`` their
        Transfer-Encoding list in one line, and ``connection``."""
        lines = [b"HTTP/1.1 %d %s\r\n" % (status, self._reason)]
        if fields is None:
            fields = forwarded_headers(self._headers)
            te = combined(fields, b"transfer-encoding")
        if te is not None:
            fields = merge_fields(fields, b"transfer-encoding", te)
        drop_te = self.client_http10
        for name, low, value in fields:
            if drop_te and low == b"transfer-encoding":
                continue
            lines.append(name + b": " + value + b"\r\n")
        if connection is not None:
            lines.append(b"Connection: " + connection + b"\r\n")
        lines.append(b"\r\n")
        return b"".join(lines)

    def on_body(self, data: bytes) -> None:
        self._progress()
        if self.done:                  # a body after a response to HEAD
            self.reusable = False
            return
        self.out.append(chunk(data) if self.chunked else data)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.done:                  # HEAD: complete since its head
            return
        self.done = True
        self.reusable = self.parser.should_keep_alive()    # only valid in this callback
        if self.chunked:
            self.out.append(last_chunk(self._trailers))


# ---------------------------------------------------------------------------- upstream
# States of an upstream connection.
CONNECTING, ACTIVE, IDLE, CLOSING, CLOSED = range(5)


class UpstreamConnection(proactor.Handler):
    """One connection to the upstream. Events go to the client it serves; while idle in
    the pool, anything but silence makes the pool drop it."""

    def __init__(self, pool: UpstreamPool) -> None:
        self.pool = pool
        self.conn: Any = None
        self.client: Optional[ClientConnection] = None
        self.state = CONNECTING
        self.uses = 0              # requests it was given
        self.idle_since = 0.0
        self.paused = False        # reading paused because the client is not draining

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.conn.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self.conn.resume_reading()

    def connection_made(self, conn: Any) -> None:
        self.conn = conn

    def data_received(self, conn: Any, data: bytes) -> None:
        client = self.client
        if client is not None:
            client.upstream_data(self, data)
        else:
            self.pool.unexpected(self)

    def eof_received(self, conn: Any) -> None:
        client = self.client
        if client is not None:
            client.upstream_eof(self)
        else:
            self.pool.idle_eof(self)

    def connection_lost(self, conn: Any, exc: Optional[BaseException]) -> None:
        client, self.client = self.client, None
        self.pool.lost(self)
        if client is not None:
            client.upstream_broken(self, f"connection lost ({exc or 'closed by upstream'})")

    def __repr__(self) -> str:
        state = ("connecting", "active", "idle", "closing", "closed")[self.state]
        return f"<UpstreamConnection {state} uses={self.uses}>"


class UpstreamPool:
    """The upstream connections: idle ones (LIFO), connects, waiters at the limit."""

    def __init__(self, engine: Any, config: ProxyConfig, counters: Counters) -> None:
        self.engine = engine
        self.config = config
        self.counters = counters
        self.idle: deque = deque()         # oldest on the left, reused from the right
        self.waiters: deque = deque()      # clients waiting for a connection (FIFO)
        self.count = [0] * 5               # connections per state
        #: a connect found no fd (EMFILE): requests wait until one may have come free
        self.fds_short = False
        self.closed = False

    @property
    def open(self) -> int:
        """Connections not closed yet (all that count against ``max_upstream``)."""
        c = self.count
        return c[CONNECTING] + c[ACTIVE] + c[IDLE] + c[CLOSING]

    def _set(self, uc: UpstreamConnection, state: int) -> None:
        self.count[uc.state] -= 1
        self.count[state] += 1
        uc.state = state

    # -- handing out
    def acquire(self, client: ClientConnection, fresh: bool = False) -> None:
        """Give ``client`` a connection: ``client.attach(uc, reused)`` now or later, or
        ``client.no_upstream(status, why)``. ``fresh``: not one from the pool."""
        if self.closed:
            client.no_upstream(503, "the proxy is shutting down")
            return
        if not fresh and self.idle:
            self._give(self.idle.pop(), client)
            return
        limit = self.config.upstream_limit
        if self.open >= limit or self.fds_short:
            if fresh and self.idle:        # make room: the oldest idle connection goes
                self.counters.expired += 1
                self._close(self.idle.popleft())
            self._wait(client, fresh)
            return
        self._connect(client, fresh)

    def _wait(self, client: ClientConnection, fresh: bool, again: bool = False) -> None:
        """``client`` waits for a connection, up to ``connect_timeout`` (503 after);
        ``again``: it was the first waiter, and stays first, with its deadline."""
        client.waiting = True
        client.wait_fresh = fresh
        if again:
            self.waiters.appendleft(client)
        else:
            client.wait_deadline = time.monotonic() + self.config.connect_timeout
            self.waiters.append(client)

    def _give(self, uc: UpstreamConnection, client: ClientConnection) -> None:
        reused = uc.uses > 0
        uc.uses += 1
        if reused:
            self.counters.reused += 1
        self._set(uc, ACTIVE)
        uc.client = client
        client.attach(uc, reused)

    def _connect(self, client: ClientConnection, fresh: bool, again: bool = False) -> None:
        """Open a connection for ``client``. At the fd limit it waits instead, for a
        connection to be released or an fd to come free (see ``fds_short``); ``again``:
        it was the first waiter."""
        cfg = self.config
        uc = UpstreamConnection(self)
        self.count[CONNECTING] += 1
        client.connecting = uc

        def connected(op: Any) -> None:
            self._connected(op, uc, client)

        try:
            self.engine.connect_tcp(lambda: uc, cfg.upstream_host, cfg.upstream_port,
                                    connected, timeout=cfg.connect_timeout)
        except Exception as e:        # no socket (EMFILE...), engine shutting down
            self._set(uc, CLOSED)
            if isinstance(e, OSError) and e.errno in (errno.EMFILE, errno.ENFILE):
                # The clients being turned away at max_connections hold an fd each for
                # a moment: they can take the fds the budget meant for upstream
                # connections. The request waits for one to come free.
                client.connecting = None
                self.fds_short = True
                self._wait(client, fresh, again)
                return
            self.counters.connect_errors += 1
            # reported on the next turn: the caller may be deep in a parser callback
            self.engine.call_soon(self._connect_failed, uc, client, 502,
                                  f"cannot connect to the upstream: {e}")

    def _connected(self, op: Any, uc: UpstreamConnection, client: ClientConnection) -> None:
        exc = op.exception()
        if exc is None and uc.state == CLOSED:     # lost before we heard it connected
            exc = ConnectionResetError("connection lost right after connecting")
        if exc is not None:
            if uc.state != CLOSED:
                self._set(uc, CLOSED)
            self.counters.connect_errors += 1
            if isinstance(exc, TimeoutError):
                status, why = 504, f"connecting to the upstream timed out " \
                                   f"({self.config.connect_timeout:g} s)"
            else:
                status, why = 502, f"cannot connect to the upstream: {exc}"
            self._connect_failed(uc, client, status, why)
            self._serve_waiters()
            return
        self.counters.created += 1
        if client.connecting is uc and not client.closing:
            client.connecting = None
            self._give(uc, client)
        else:                          # the client is gone: the connection can serve others
            self._set(uc, ACTIVE)
            self.release(uc)

    def _connect_failed(self, uc: UpstreamConnection, client: ClientConnection, status: int,
                        why: str) -> None:
        if client.connecting is uc:
            client.connecting = None
            client.no_upstream(status, why)

    def cancel(self, client: ClientConnection) -> None:
        """``client`` no longer wants a connection (it went away)."""
        if client.waiting:
            client.waiting = False
            try:
                self.waiters.remove(client)
            except ValueError:
                pass
        client.connecting = None       # the connect's callback then pools the connection

    # -- taking back
    def release(self, uc: UpstreamConnection) -> None:
        """A complete exchange on a connection that may be reused."""
        uc.client = None
        uc.resume()
        if self.closed or uc.state != ACTIVE or self.config.pool_size == 0:
            # (without a pool every request asked the upstream to close: RFC 9112
            # section 9.6, no request may follow on that connection)
            self.discard(uc)
            return
        for i, client in enumerate(self.waiters):
            if not client.wait_fresh:
                del self.waiters[i]
                client.waiting = False
                self._give(uc, client)
                return
        if len(self.idle) < self.config.pool_size:
            uc.idle_since = time.monotonic()
            self._set(uc, IDLE)
            self.idle.append(uc)
            return
        self.discard(uc)

    def discard(self, uc: UpstreamConnection) -> None:
        """Close a connection after its exchange instead of pooling it."""
        uc.client = None
        if uc.state == ACTIVE:
            self.counters.discarded += 1
        self._close(uc)

    def fail(self, uc: UpstreamConnection) -> None:
        """A connection broke during an exchange, the upstream's fault: abort it."""
        uc.client = None
        self.counters.failed += 1
        self._close(uc, abort=True)

    def abandon(self, uc: UpstreamConnection) -> None:
        """The client gave up the exchange (see ``ClientConnection._drop_exchange``): the
        connection, mid-exchange, is aborted; counted as discarded, not failed."""
        uc.client = None
        if uc.state == ACTIVE:
            self.counters.discarded += 1
        self._close(uc, abort=True)

    def _close(self, uc: UpstreamConnection, abort: bool = False) -> None:
        if uc.state >= CLOSING:
            return
        self._set(uc, CLOSING)
        if abort:
            uc.conn.abort()
        else:
            uc.conn.close()

    def idle_eof(self, uc: UpstreamConnection) -> None:
        """The upstream closed a connection no exchange is using. An idle one leaves the
        pool at once: closing, it must not be handed out before ``connection_lost``."""
        if uc.state == IDLE:
            self.idle.remove(uc)
            self.counters.dropped += 1
            self._close(uc)
        else:                          # connecting, or being closed: connection_lost ends it
            uc.conn.close()

    def unexpected(self, uc: UpstreamConnection) -> None:
        """Bytes on a connection nobody asked anything: it cannot be trusted any more."""
        if uc.state == IDLE:
            self.idle.remove(uc)
            self.counters.dropped += 1
        self._close(uc, abort=True)

    def lost(self, uc: UpstreamConnection) -> None:
        """The connection is closed (``connection_lost``)."""
        if uc.state == IDLE:           # closed or reset by the upstream while pooled
            self.idle.remove(uc)
            self.counters.dropped += 1
        if uc.state != CLOSED:
            self._set(uc, CLOSED)
        self._serve_waiters()

    def _serve_waiters(self) -> None:
        self.fds_short = False         # called when one may have come free: try
        limit = self.config.upstream_limit
        while self.waiters and not self.closed and self.open < limit and not self.fds_short:
            client = self.waiters.popleft()
            client.waiting = False
            self._connect(client, client.wait_fresh, again=True)

    def fd_freed(self) -> None:
        """One of the proxy's connections has closed: if requests wait for an fd, there
        is one."""
        if self.fds_short:
            self._serve_waiters()

    # -- time
    def check(self, now: float) -> None:
        """Expire idle connections and waiters (called by the proxy's tick)."""
        idle = self.idle
        max_idle = self.config.max_idle
        while idle and now - idle[0].idle_since >= max_idle:
            self.counters.expired += 1
            self._close(idle.popleft())
        if self.fds_short:             # fds may have come free some other way
            self._serve_waiters()
        waiters = self.waiters
        while waiters and waiters[0].wait_deadline <= now:
            client = waiters.popleft()
            client.waiting = False
            what = ("no fd came free for an upstream connection" if self.fds_short
                    else "no upstream connection became free")
            client.no_upstream(503, f"{what} within {self.config.connect_timeout:g} s")

    def close(self) -> None:
        """Close the idle connections; no more connects. Those in use close after use."""
        self.closed = True
        while self.idle:
            self._close(self.idle.pop())
        while self.waiters:
            client = self.waiters.popleft()
            client.waiting = False
            client.no_upstream(503, "the proxy is shutting down")


# ---------------------------------------------------------------------------- clients
class ClientConnection(proactor.Handler):
    """One client connection: its requests, queued and answered one at a time, in order."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.pool = proxy.pool
        self.config = proxy.config
        self.conn: Any = None
        self.reader: Optional[RequestReader] = None
        self.queue: deque = deque()    # received and not answered; [0] is being served
        # the exchange of queue[0]
        self.upstream: Optional[UpstreamConnection] = None
        self.response: Optional[ResponseReader] = None
        self.sending: Optional[Request] = None     # queue[0] while it has an upstream
        self.reused = False
        self.retried = False
        self.early = False             # the response began before the request was complete
        self.connecting: Optional[UpstreamConnection] = None
        self.waiting = False           # in the pool's waiters
        self.wait_fresh = False
        self.wait_deadline = 0.0
        # flow control and time
        self.paused = False            # reading from the client paused
        self.up_draining = False       # waiting for the upstream to take what was sent
        self.stalled = False           # the client is not taking what is sent to it
        self.unchecked = 0             # bytes sent to it since its queue was looked at
        self.last = time.monotonic()   # last progress on the client's side
        self.up_deadline = float("inf")
        # when the request head being received began (None: none is); header_timeout
        self.head_since: Optional[float] = None
        self.closing = False

    # -- the client connection
    def connection_made(self, conn: Any) -> None:
        self.conn = conn
        if not self.proxy.client_opened(self):
            return                     # turned away: closing, nothing of it is read
        self.head_since = time.monotonic()
        ip = None
        if self.config.forwarded_for:
            try:
                ip = str(conn.peername[0]).encode("ascii")
            except OSError:
                ip = b"unknown"
        self.reader = RequestReader(self, self.config, ip,
                                    upstream_close=self.config.pool_size == 0)

    def data_received(self, conn: Any, data: bytes) -> None:
        if self.closing or self.reader is None:
            return                     # refused already: what was in flight is dropped
        now = self.last = time.monotonic()
        try:
            self.reader.feed(data)
        except RequestError as e:
            self._refuse(e)
            return
        if self.head_since is None and self.reader.in_head:
            self.head_since = now      # a request head began
        if not self.paused and len(self.queue) > 1:
            self._update_reading()

    def eof_received(self, conn: Any) -> None:
        # The client has gone (or half-closed, which HTTP clients do not do): what it
        # asked and is not answered yet is abandoned, as a server cancels the requests of
        # a client that went away. What was already sent to it still goes out.
        self._drop_exchange()
        self.close()

    def connection_lost(self, conn: Any, exc: Optional[BaseException]) -> None:
        self.closing = True
        self.proxy.client_closed(self)
        self._drop_exchange()
        for req in self.queue:
            req.done = True
        self.queue.clear()

    def close(self) -> None:
        """Close after what is queued has been sent."""
        if not self.closing:
            self.closing = True
            self.conn.close()

    def turn_away(self, status: int, detail: str) -> None:
        """Answer ``status`` before reading anything, and close."""
        if self._send(error_response(status, detail, close=True)):
            self.close()

    def _send(self, data: bytes) -> bool:
        """Send to the client; False if it is gone (reset, or closing), and then its
        exchange is dropped: ``connection_lost`` follows."""
        try:
            self.conn.send(data)
            return True
        except OSError:
            self.closing = True
            self._drop_exchange()
            return False

    def _abort(self) -> None:
        """Abort the client: it must not take a cut response for a whole one."""
        if not self.closing:
            self._drop_exchange()
            self.proxy.counters.aborted += 1
            self.closing = True
            self.conn.abort()

    # -- RequestReader's sink
    def on_request(self, req: Request) -> None:
        self.head_since = None
        if self.closing:
            return
        path = self.config.stats_path
        if path and (req.url == path or req.url.startswith(path + b"?")):
            req.local = self.proxy.stats_response
        else:
            self.proxy.counters.requests += 1
        self.queue.append(req)
        if len(self.queue) == 1:
            self._next()

    def on_request_body(self, req: Request, data: bytes) -> None:
        if req.done or req.local is not None or self.closing:
            return                     # answered already (or by the proxy): dropped
        if req is self.sending:
            self._to_upstream(req, data)
        else:                          # no upstream yet, or queued behind another request
            req.pending.append(data)
            req.pending_size += len(data)
            if req.pending_size > HIGH_WATER and not self.paused:
                self._update_reading()

    def on_request_end(self, req: Request, tail: bytes) -> None:
        req.complete = True
        if req.done or req.local is not None or self.closing:
            return
        if tail:
            self.on_request_body(req, tail)
        if req is self.sending:
            self.up_deadline = time.monotonic() + self.config.response_timeout

    # -- serving the queue
    def _next(self) -> None:
        """Serve the first queued request: the proxy's own answers at once, the rest
        through an upstream connection."""
        while self.queue and not self.closing:
            req = self.queue[0]
            if req.local is None:
                self._update_reading()
                self.pool.acquire(self)
                return
            if not self._send(req.local(req)):
                return
            self._finish(close=not req.keep_alive)
        if not self.closing:
            self._update_reading()

    def _finish(self, close: bool) -> None:
        """queue[0] has been answered."""
        req = self.queue.popleft()
        req.done = True
        self.retried = False
        self.last = time.monotonic()
        if close:
            self.close()

    def _answer(self, status: int, detail: str) -> None:
        """Answer queue[0] with an error of the proxy's own, then go on."""
        req = self.queue[0]
        logger.warning("%s %s -> %d: %s", req.method.decode(), req.url.decode("latin-1"),
                       status, detail)
        self.proxy.counters.count_error(status)
        close = not req.keep_alive or not req.complete
        if not self._send(error_response(status, detail, close=close,
                                         head_only=req.method == b"HEAD")):
            return
        self._finish(close)
        self._next()

    def _refuse(self, e: RequestError) -> None:
        """The client sent something unusable: answer it after the requests before it, and
        read no more."""
        self.reader = None
        self.head_since = None
        if self.queue and not self.queue[-1].complete:
            # The request being received is the culprit.
            req = self.queue.pop()
            req.done = True
            if not self.queue:         # it was being served
                if self.response is not None and self.response.head_sent:
                    self._abort()
                    return
                self._drop_exchange()
        bad = Request(b"-", b"-", False, False, b"", False)
        bad.complete = True
        status, detail = e.status, e.detail
        self.proxy.counters.count_error(status)
        bad.local = lambda _req: error_response(status, detail, close=True)
        self.queue.append(bad)
        self._update_reading()
        if len(self.queue) == 1:
            self._next()

    def _update_reading(self) -> None:
        if self.closing:
            return
        queue = self.queue
        want_pause = (self.reader is None or len(queue) > 1 or self.up_draining
                      or (len(queue) == 1 and queue[0].pending_size > HIGH_WATER))
        if want_pause != self.paused:
            self.paused = want_pause
            if want_pause:
                self.conn.pause_reading()
            else:
                self.conn.resume_reading()
                if self.head_since is not None:
                    # the rest of a head waited for the proxy, not for the client
                    self.head_since = time.monotonic()

    # -- the exchange with the upstream
    def attach(self, uc: UpstreamConnection, reused: bool) -> None:
        """The pool gives queue[0] a connection (``reused``: it served requests before)."""
        if self.closing or not self.queue:
            self.pool.release(uc)      # not wanted any more: it can serve someone else
            return
        req = self.queue[0]
        self.upstream = uc
        self.sending = req
        self.reused = reused
        self.early = False
        self.response = ResponseReader(req.method == b"HEAD", req.http10, req.keep_alive,
                                       self.config.max_head)
        if self.retried:
            out = req.replay
        else:
            out = [req.head]
            if req.pending:
                out += req.pending
            if req.replay is not None:
                req.replay = list(out)
                req.replay_size = sum(map(len, out))
        req.pending = []
        req.pending_size = 0
        if self.stalled:
            uc.pause()
        try:
            uc.conn.writelines(out)
        except OSError as e:
            self.upstream_broken(uc, f"cannot send: {e}")
            return
        if req.complete:
            self.up_deadline = time.monotonic() + self.config.response_timeout
        if self.paused:
            self._update_reading()

    def _to_upstream(self, req: Request, data: bytes) -> None:
        uc = self.upstream
        try:
            uc.conn.send(data)
        except OSError as e:
            self.upstream_broken(uc, f"cannot send: {e}")
            return
        if req.replay is not None:
            req.replay.append(data)
            req.replay_size += len(data)
            if req.replay_size > REPLAY_LIMIT:
                req.replay = None
        if not self.up_draining and uc.conn.get_write_buffer_size() > HIGH_WATER:
            # The client is not read until the upstream has taken what is queued: a
            # wait on the upstream, bounded by response_timeout (see check).
            self.up_draining = True
            self.up_deadline = time.monotonic() + self.config.response_timeout
            uc.conn.when_drained(lambda: self._upstream_drained(uc))
            self._update_reading()

    def _upstream_drained(self, uc: UpstreamConnection) -> None:
        if uc is self.upstream and not self.closing:
            self.up_draining = False
            now = time.monotonic()
            self.last = now            # the client was not read meanwhile: its time anew
            if self.sending.complete and not self.response.head_sent:
                # the whole request has now been taken: the time to the head starts
                self.up_deadline = now + self.config.response_timeout
            self._update_reading()

    def upstream_data(self, uc: UpstreamConnection, data: bytes) -> None:
        resp = self.response
        try:
            out = resp.feed(data)
        except (httptools.HttpParserError, ResponseError) as e:
            # No head parsed on a reused connection: bytes left there by the exchange
            # before (after a 204, say), not an answer; the request may be retried.
            self.upstream_broken(uc, f"invalid response: {e}", unanswered=resp.status == 0)
            return
        if resp.head_sent and not self.sending.complete:
            # The final response began before the whole request was sent: the upstream
            # may not read the rest. (Not after an interim 100 Continue: that one asks
            # for the rest.)
            self.early = True
        if out and not self._to_client(uc, out):
            return
        if resp.done:
            self._exchange_done()
        elif resp.head_sent:
            # Within the body, response_timeout bounds each pause of the upstream; before
            # the head is complete it bounds the whole head (a byte now and then does
            # not keep the exchange going).
            self.up_deadline = time.monotonic() + self.config.response_timeout

    def _to_client(self, uc: UpstreamConnection, out: list) -> bool:
        """Send ``out`` to the client; False if the client is gone."""
        data = out[0] if len(out) == 1 else b"".join(out)
        if not self._send(data):
            return False
        # Ask how much is queued only every CHECK_EVERY bytes: small responses skip it.
        self.unchecked += len(data)
        if self.unchecked < CHECK_EVERY or self.stalled:
            return True
        self.unchecked = 0
        conn = self.conn
        if conn.get_write_buffer_size() > HIGH_WATER:
            self.stalled = True
            self.last = time.monotonic()
            uc.pause()
            conn.when_drained(self._client_drained)
        return True

    def _client_drained(self) -> None:
        self.stalled = False
        self.last = time.monotonic()
        uc = self.upstream
        if uc is not None:
            uc.resume()

    def upstream_eof(self, uc: UpstreamConnection) -> None:
        if self.response.eof():
            self._exchange_done()
        else:
            self.upstream_broken(uc, "upstream closed the connection before the response ended")

    def _detach(self) -> tuple:
        """End queue[0]'s exchange with its upstream connection: (connection, request,
        response reader)."""
        uc, req, resp = self.upstream, self.sending, self.response
        self.upstream = self.response = self.sending = None
        self.up_draining = False
        self.up_deadline = float("inf")
        return uc, req, resp

    def _exchange_done(self) -> None:
        """The response is complete: the connection goes back to the pool (or is closed)."""
        uc, req, resp = self._detach()
        if resp.reusable and not self.early and not self.closing:
            self.pool.release(uc)
        else:
            self.pool.discard(uc)
        self._finish(close=resp.client_close or not req.keep_alive)
        self._next()

    def upstream_broken(self, uc: UpstreamConnection, why: str,
                        unanswered: bool = False) -> None:
        """The upstream connection failed before the response was complete
        (``unanswered``: before a response head came, even if bytes did)."""
        if uc is not self.upstream:
            return
        _, req, resp = self._detach()
        self.pool.fail(uc)
        if self.closing:
            return
        if (self.reused and (unanswered or not resp.started) and not self.retried
                and req.complete and req.replay is not None):
            self.retried = True
            self.proxy.counters.retried += 1
            logger.info("%s %s: the reused upstream connection failed before answering "
                        "(%s); retrying once on a fresh connection", req.method.decode(),
                        req.url.decode("latin-1"), why)
            self.pool.acquire(self, fresh=True)
            return
        if not resp.head_sent:
            self._answer(502, why)
        else:
            logger.warning("%s %s: %s after the response head was sent; aborting the client",
                           req.method.decode(), req.url.decode("latin-1"), why)
            self._abort()

    def no_upstream(self, status: int, why: str) -> None:
        """The pool could not give queue[0] a connection (502, 503, 504)."""
        if not self.closing and self.queue:
            self._answer(status, why)

    def _drop_exchange(self) -> None:
        """Give up queue[0]'s exchange for the client's sake (it is gone, stalled, broke or
        did not finish its request; or the proxy stops): the upstream connection,
        mid-exchange, cannot be reused. (The upstream's failures detach it first.)"""
        self.pool.cancel(self)
        if self.upstream is not None:
            uc, _, _ = self._detach()
            self.pool.abandon(uc)

    def _upstream_timeout(self, why: str) -> None:
        """The upstream let response_timeout pass: 504 if the client has not had the
        response head yet, else the client is aborted."""
        uc, req, resp = self._detach()
        self.pool.fail(uc)
        if not resp.head_sent:
            self._answer(504, why)
        else:
            logger.warning("%s %s: %s; aborting the client", req.method.decode(),
                           req.url.decode("latin-1"), why)
            self._abort()

    # -- time
    def _head_timeout(self) -> None:
        """A request head not complete within header_timeout: 408 (after the answers to
        the requests before it) and closed; a new connection that sent nothing is just
        closed."""
        self.head_since = None
        if self.reader.in_message or self.queue:
            self._refuse(RequestError(408, "request head not received within "
                                           f"{self.config.header_timeout:g} s"))
        else:
            self.close()

    def check(self, now: float) -> None:
        """Called by the proxy's tick: act on expired deadlines."""
        if self.closing:
            return
        cfg = self.config
        since = self.head_since
        if since is not None and not self.paused and now - since >= cfg.header_timeout:
            self._head_timeout()
            return
        if self.waiting or self.connecting is not None:
            return                     # the pool watches those
        if self.upstream is None:      # between requests, or a request head arriving
            if now - self.last >= cfg.client_timeout:
                if self.reader is not None and self.reader.in_message:
                    self.proxy.counters.client_errors += 1
                    if not self._send(error_response(408, "request not received in time",
                                                     close=True)):
                        return
                self.close()
            return
        if self.up_draining and not self.stalled:
            # The upstream is not taking the request body (and the client, not read
            # meanwhile, is waiting for it): the upstream's delay, not the client's. (If
            # the client is not reading either, the upstream may just be blocked sending
            # to it: the client's rule below applies.)
            if now >= self.up_deadline:
                self._upstream_timeout("the upstream took no request body for "
                                       f"{cfg.response_timeout:g} s")
            return
        if self.stalled or not self.sending.complete:
            if now - self.last < cfg.client_timeout:
                return
            if self.response.head_sent:
                logger.warning("client stalled for %g s; aborting it", cfg.client_timeout)
                self._abort()
            else:                      # the request stopped coming
                self._drop_exchange()
                self._answer(408, "request not received in time")
            return
        if now >= self.up_deadline:
            if not self.response.head_sent:
                self._upstream_timeout(f"no response head within {cfg.response_timeout:g} s")
            else:
                self._upstream_timeout(f"upstream paused the response body for "
                                       f"{cfg.response_timeout:g} s")


# ---------------------------------------------------------------------------- the proxy
class Proxy:
    """The reverse proxy: serve it with ``engine.serve_tcp(proxy.handler, ...)`` or
    :meth:`serve`. Lives on the engine's thread: call :meth:`stats` and :meth:`close`
    there (``engine.call_soon``)."""

    def __init__(self, engine: Any, config: ProxyConfig, stats_interval: float = 0.0) -> None:
        self.engine = engine
        self.config = config
        self.counters = Counters()
        self.pool = UpstreamPool(engine, config, self.counters)
        self.clients: set = set()
        self.servers: list = []
        self._refusals_logged = 0      # counters.refused at the last log line about them
        self._refusals_log_at = 0.0    # when the next refusal may be logged
        self.stats_interval = stats_interval
        timeouts = (config.connect_timeout, config.response_timeout, config.client_timeout,
                    config.header_timeout, config.max_idle)
        #: How often deadlines are checked: a timeout fires up to this much late.
        self.tick = min(1.0, max(0.02, min(timeouts) / 4))
        self._tick_handle: Any = None
        self._stats_handle: Any = None
        self.closed = False
        engine.call_soon(self._start_timers)

    def handler(self) -> ClientConnection:
        return ClientConnection(self)

    def serve(self, host: str, port: int, **kwargs: Any) -> Any:
        """Listen on ``host:port``; ``kwargs`` go to ``engine.serve_tcp``. The handlers
        and the pool share state without locks: they must run on the engine's thread, so
        ``workers`` can only be 0."""
        if kwargs.get("workers", 0) != 0:
            raise ValueError("the proxy runs on the engine's thread only: workers must be "
                             f"0, not {kwargs['workers']!r}")
        srv = self.engine.serve_tcp(self.handler, host, port, **kwargs)
        self.servers.append(srv)
        return srv

    def client_opened(self, client: ClientConnection) -> bool:
        """Count a new client in; False if it is turned away (and closed): the proxy is
        closed, or ``max_connections`` clients are open (503)."""
        if self.closed:
            client.close()
            return False
        if len(self.clients) >= self.config.max_connections:
            self._refuse(client)
            return False
        self.clients.add(client)
        return True

    def _refuse(self, client: ClientConnection) -> None:
        """A client over ``max_connections``: 503 and closed. Logged at the first one and
        then at most every ``REFUSALS_LOGGED_EVERY`` seconds, with how many there were:
        at the limit new clients come all the time."""
        c = self.counters
        c.refused += 1
        now = time.monotonic()
        if now >= self._refusals_log_at:
            n = c.refused - self._refusals_logged
            logger.warning("at max_connections (%d clients): %d new client%s refused with "
                           "503 since the last such line (logged at most every %g s)",
                           len(self.clients), n, "" if n == 1 else "s", REFUSALS_LOGGED_EVERY)
            self._refusals_logged = c.refused
            self._refusals_log_at = now + REFUSALS_LOGGED_EVERY
        client.turn_away(503, "too many clients")

    def client_closed(self, client: ClientConnection) -> None:
        self.clients.discard(client)
        self.pool.fd_freed()

    def _start_timers(self) -> None:
        if self.closed:
            return
        self._tick_handle = self.engine.call_later(self.tick, self._on_tick)
        if self.stats_interval > 0:
            self._stats_handle = self.engine.call_later(self.stats_interval, self._log_stats)

    def _on_tick(self) -> None:
        now = time.monotonic()
        for client in list(self.clients):
            client.check(now)
        self.pool.check(now)
        self._tick_handle = self.engine.call_later(self.tick, self._on_tick)

    def _log_stats(self) -> None:
        logger.info("pool: %s", self.stats())
        self._stats_handle = self.engine.call_later(self.stats_interval, self._log_stats)

    def stats(self) -> ProxyStats:
        c = self.counters
        pool = self.pool
        return ProxyStats(
            created=c.created, reused=c.reused, dropped=c.dropped, expired=c.expired,
            discarded=c.discarded, failed=c.failed, connect_errors=c.connect_errors,
            idle=len(pool.idle), in_use=pool.count[ACTIVE], connecting=pool.count[CONNECTING],
            waiting=len(pool.waiters), requests=c.requests, retried=c.retried,
            bad_gateway=c.bad_gateway, unavailable=c.unavailable,
            gateway_timeout=c.gateway_timeout, client_errors=c.client_errors,
            aborted=c.aborted, refused=c.refused, clients=len(self.clients))

    def stats_response(self, req: Request) -> bytes:
        """The answer to a request for ``config.stats_path``."""
        close = not req.keep_alive
        if req.method not in (b"GET", b"HEAD"):
            self.counters.client_errors += 1
            return simple_response(405, b"405 Method Not Allowed\n", close=close,
                                   extra=(b"Allow: GET, HEAD",))
        body = json.dumps(self.stats().as_dict(), indent=1).encode() + b"\n"
        return simple_response(200, body, close=close, head_only=req.method == b"HEAD",
                               content_type=b"application/json",
                               extra=(b"Cache-Control: no-store",))

    def close(self) -> None:
        """Stop: no more accepting, close the clients (after what they are owed has been
        sent; the exchanges in progress are abandoned) and the pooled connections."""
        if self.closed:
            return
        self.closed = True
        for h in (self._tick_handle, self._stats_handle):
            if h is not None:
                h.cancel()
        for srv in self.servers:
            srv.close()
        for client in list(self.clients):
            client._drop_exchange()
            client.close()
        self.pool.close()


# ---------------------------------------------------------------------------- command line
#: File descriptors kept for what is not a client or an upstream connection: the engine's
#: own, the listening sockets, clients being turned away (503) and closed.
SPARE_FDS = 64


def fd_budget(max_connections: int, max_upstream: int) -> tuple[int, int]:
    """``(max_connections, max_upstream)`` if the fd limit allows them, after raising the
    soft limit toward the hard one; else lowered to what it allows, with a warning.

    A client holds its socket and uses one upstream connection at a time; the upstream
    connections, the pool's idle ones among them, are capped at ``max_upstream`` (0:
    ``max_connections``). So the proxy needs ``max_connections`` + ``max_upstream`` (or
    twice ``max_connections``) + :data:`SPARE_FDS` fds. When they do not fit, clients keep
    at least half the room, the upstream connections get the rest up to their cap (more
    than there are clients would only serve the moments a connection is being replaced).
    (0, 0) if the limit leaves no room for a single client."""
    try:
        import resource
    except ImportError:                      # not on Windows
        return max_connections, max_upstream
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = max_connections + (max_upstream or max_connections) + SPARE_FDS
    if soft == resource.RLIM_INFINITY or soft >= want:
        return max_connections, max_upstream
    new = want if hard == resource.RLIM_INFINITY else min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
        soft = new
    except (ValueError, OSError):
        pass
    if soft >= want:
        return max_connections, max_upstream
    room = soft - SPARE_FDS
    if room < 2:
        return 0, 0
    if max_upstream:
        clients = min(max_connections, max(room - max_upstream, room // 2))
        upstream = min(max_upstream, room - clients)
    else:
        clients, upstream = min(max_connections, room // 2), 0
    lowered = []
    if clients < max_connections:
        lowered.append(f"--max-connections {clients}, not {max_connections}")
    if upstream < max_upstream:
        lowered.append(f"--max-upstream {upstream}, not {max_upstream}")
    logger.warning("the fd limit (%d) allows %s; using %s", soft, " and ".join(lowered),
                   "them" if len(lowered) > 1 else "it")
    return clients, upstream


def parse_hostport(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {value!r}")
    return host.strip("[]") or "127.0.0.1", int(port)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default %(default)s)")
    p.add_argument("--upstream", required=True, type=parse_hostport, metavar="HOST:PORT",
                   help="the server requests go to (resolved once, at start)")
    p.add_argument("--backend", default=None, choices=["auto", "uring", "trio"],
                   help="engine backend (default: $PROACTOR_BACKEND or auto)")
    d = ProxyConfig("", 0)
    p.add_argument("--max-connections", metavar="N", type=int, default=d.max_connections,
                   help="clients at once; one more is answered 503 and closed (lowered, "
                        "with a warning, to what the fd limit allows: each client counts "
                        "2 fds with its upstream connection) (default %(default)s)")
    p.add_argument("--pool-size", metavar="N", type=int, default=d.pool_size,
                   help="idle upstream connections kept for reuse; 0: a fresh upstream "
                        "connection per request (default %(default)s)")
    p.add_argument("--no-pool", dest="pool_size", action="store_const", const=0,
                   help="the same as --pool-size 0")
    p.add_argument("--max-upstream", metavar="N", type=int, default=d.max_upstream,
                   help="upstream connections open at once, 0: as many as --max-connections; "
                        "requests beyond it wait up to --connect-timeout, then get 503 "
                        "(lowered, with a warning, to what the fd limit allows) "
                        "(default %(default)s)")
    p.add_argument("--max-idle", metavar="S", type=float, default=d.max_idle,
                   help="seconds an idle upstream connection is kept (default %(default)s)")
    p.add_argument("--connect-timeout", metavar="S", type=float, default=d.connect_timeout,
                   help="seconds to connect upstream, 504 after (default %(default)s)")
    p.add_argument("--response-timeout", metavar="S", type=float, default=d.response_timeout,
                   help="seconds from the request sent to the response head, 504 after; "
                        "also the longest time the upstream may take none of the request "
                        "body (504), and the longest pause within a response body "
                        "(default %(default)s)")
    p.add_argument("--client-timeout", metavar="S", type=float, default=d.client_timeout,
                   help="seconds a client may idle between requests or stall "
                        "(default %(default)s)")
    p.add_argument("--header-timeout", metavar="S", type=float, default=d.header_timeout,
                   help="seconds a client has to send a request head, from its first byte "
                        "(the first one: from the connection); 408 and closed after "
                        "(default %(default)s)")
    p.add_argument("--forwarded-for", action="store_true",
                   help="add the client's address to X-Forwarded-For")
    p.add_argument("--stats-interval", metavar="S", type=float, default=0.0,
                   help="log the pool statistics every S seconds (default: never)")
    p.add_argument("--stats-path", metavar="PATH", default=d.stats_path.decode(),
                   help="path answered with the statistics as JSON, '' for none "
                        "(default %(default)s)")
    a = p.parse_args()
    if a.max_connections < 1:
        p.error("--max-connections must be >= 1")
    if a.pool_size < 0 or a.max_upstream < 0:
        p.error("--pool-size and --max-upstream must be >= 0")
    if not a.header_timeout > 0:
        p.error("--header-timeout must be > 0")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    max_connections, max_upstream = fd_budget(a.max_connections, a.max_upstream)
    if not max_connections:
        p.error(f"the fd limit (ulimit -n) leaves no room for a client: the proxy needs "
                f"at least {SPARE_FDS + 2} fds")

    host, port = a.upstream
    try:                               # once, here: never a DNS lookup on the I/O thread
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as e:
        p.error(f"cannot resolve {host}: {e}")
    config = ProxyConfig(
        upstream_host=info[4][0], upstream_port=port, max_connections=max_connections,
        pool_size=a.pool_size, max_upstream=max_upstream, max_idle=a.max_idle,
        connect_timeout=a.connect_timeout, response_timeout=a.response_timeout,
        client_timeout=a.client_timeout, header_timeout=a.header_timeout,
        forwarded_for=a.forwarded_for,
        stats_path=a.stats_path.encode())
    engine = proactor.Engine(backend=a.backend)
    proxy = Proxy(engine, config, stats_interval=a.stats_interval)
    server = proxy.serve(a.host, a.port)
    print(f"listening on {a.host}:{server.port}", flush=True)
    engine.run()


if __name__ == "__main__":
    main()
