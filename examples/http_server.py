"""HTTP/1.1 static file server: the reference application of the server-model chapter.

usage: python examples/http_server.py [--root DIR] [--host H] [--workers N] [--backend B]
                                      [--access-log] [--listing] [--hello] PORT

Serves the files under ``--root`` (default: the demo site next to this file) with GET
and HEAD: keep-alive and pipelining (answers in request order), ``Last-Modified`` /
``If-Modified-Since``, ``ETag`` / ``If-None-Match``, ``If-Match`` /
``If-Unmodified-Since`` (412), single byte ranges (206/416) with ``If-Range``,
``Expect: 100-continue``, MIME types from :mod:`mimetypes`, ``index.html`` for a
directory and no listing unless ``--listing``. File bodies go out with
``conn.sendfile``: the engine reads them a window at a time and they never pass through
Python objects, so a large file is streamed with bounded memory.

The module has two halves. The protocol (``HTTPSession``, ``StaticSite``, ``Limits``) does
no I/O on sockets: bytes in, ``Response`` objects out, testable without a network. The
handler (``HTTPHandler``) glues a session to an engine connection. With ``--workers N``
the handlers run on N threads (half-sync/half-async): opening and stat-ing files then
happens off the I/O thread.

Hardening, each with its status and a closed connection: request target over
``max_request_line`` (414), header block over ``max_header_bytes`` or ``max_headers``
(431), a request body over ``max_body`` (413; smaller bodies are read and ignored, RFC
9112 frames a request by its headers whatever the method), unparsable requests (400;
also a method the parser does not know), an HTTP/1.1 request without exactly one
valid ``Host`` (400), versions other than 1.0 and 1.1 (505), more than
``max_connections`` clients (503), a request head not complete within
``header_timeout`` (408: slowloris), an idle keep-alive connection past
``keepalive_timeout`` (closed), a client that takes none of its queued response for
``send_timeout`` (aborted). Answered with the connection kept open, as the request
itself was well formed: ``..`` segments, encoded or not, and NUL in the path (400),
files reached through a symlink leading out of the root (403), a path the file system
cannot hold (404), standard methods other than GET and HEAD (405), other methods the
parser knows (501), a file that cannot be opened for want of fds (503). Pipelined
requests wait, reading paused, while more than ``max_buffered_output`` bytes of
responses, or ``max_buffered_files`` file bodies (each holds a file descriptor), are on
their way.

``--hello`` answers every request with the 78-byte reply of the benchmark peer
(``Hello, World!``), to measure the engine and the parser alone.
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
import datetime  # noqa: E402
import email.utils  # noqa: E402
import errno  # noqa: E402
import html  # noqa: E402
import logging  # noqa: E402
import mimetypes  # noqa: E402
import re  # noqa: E402
import stat  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import urllib.parse  # noqa: E402
import weakref  # noqa: E402
from collections import deque  # noqa: E402
from typing import Any, Optional  # noqa: E402

import httptools  # noqa: E402

import proactor  # noqa: E402

DEMO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo_site")
SERVER = b"proactor"
access_log = logging.getLogger("proactor.http.access")
logger = logging.getLogger("proactor.http")


@dataclasses.dataclass
class Limits:
    max_request_line: int = 8192        # bytes of the request target -> 414
    max_header_bytes: int = 16384       # bytes of the header block -> 431
    max_headers: int = 100              # header fields -> 431
    max_body: int = 65536               # request body bytes read and ignored -> else 413
    max_connections: int = 5000         # open client connections -> 503
    header_timeout: float = 10.0        # seconds for a whole request head (and body) -> 408
    keepalive_timeout: float = 15.0     # seconds idle between requests -> closed
    send_timeout: float = 60.0          # seconds queued output may make no progress -> abort
    max_buffered_output: int = 1 << 20  # queued response bytes before pipelining waits
    max_buffered_files: int = 1         # file bodies queued (each holds an fd) -> waits

    def __post_init__(self) -> None:
        if self.max_buffered_files < 1 or self.max_buffered_output < 1:
            raise ValueError("max_buffered_files and max_buffered_output must be >= 1")


# ----------------------------------------------------------------------- the protocol

_REASONS = {100: "Continue", 200: "OK", 206: "Partial Content", 301: "Moved Permanently",
            304: "Not Modified", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
            405: "Method Not Allowed", 408: "Request Timeout", 413: "Content Too Large",
            414: "URI Too Long", 416: "Range Not Satisfiable",
            412: "Precondition Failed", 431: "Request Header Fields Too Large",
            500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
            505: "HTTP Version Not Supported"}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Methods this server knows but does not allow (405); any other is not implemented (501).
KNOWN_METHODS = frozenset((b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"TRACE",
                           b"CONNECT"))
# A Host value: reg-name / IPv4 / IP-literal, with an optional port (RFC 3986 section 3.2.2).
#: The three forms of an HTTP date (RFC 9110 section 5.6.7): IMF-fixdate, RFC 850, asctime.
_HTTP_DATE = re.compile(rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d GMT"
                        rb"|[A-Z][a-z]{5,8}, \d\d-[A-Z][a-z]{2}-\d\d \d\d:\d\d:\d\d GMT"
                        rb"|[A-Z][a-z]{2} [A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d \d{4}")
_HOST_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
                        b"-._~%!$&'()*+,;=:[]")
_good_hosts: set = set()  # values seen valid (a few; a set lookup instead of a scan)

_date_lock = threading.Lock()
_date_cache = (0, b"")


def http_date(t: Optional[float] = None) -> bytes:
    """An IMF-fixdate; the current one is cached for its second."""
    global _date_cache
    if t is not None:
        return email.utils.formatdate(t, usegmt=True).encode()
    now = int(time.time())
    cached = _date_cache
    if cached[0] != now:
        cached = (now, email.utils.formatdate(now, usegmt=True).encode())
        with _date_lock:
            _date_cache = cached
    return cached[1]


_types: dict = {}
_last_modified: dict = {}
mimetypes.init()         # now, not at the first request (it reads files: fds may be short then)


def content_type(path: bytes) -> bytes:
    """The MIME type for a file name (from :mod:`mimetypes`), cached by extension."""
    ext = os.path.splitext(path)[1].lower()
    t = _types.get(ext)
    if t is None:
        guess = mimetypes.guess_type("x" + os.fsdecode(ext), strict=False)[0]
        t = (guess or "application/octet-stream").encode()
        if len(_types) < 1024:
            _types[ext] = t
    return t


def _mtime(st: os.stat_result) -> int:
    """The file's modification time for Last-Modified: never later than now (RFC 9110
    section 8.8.2.1; a file dated in the future gets the time of the response)."""
    return min(int(st.st_mtime), int(time.time()))


def last_modified_date(mtime: int) -> bytes:
    d = _last_modified.get(mtime)
    if d is None:
        if len(_last_modified) > 4096:
            _last_modified.clear()
        d = _last_modified[mtime] = http_date(mtime)
    return d


class Request:
    """One parsed request head."""

    __slots__ = ("method", "target", "version", "headers", "keep_alive")

    def __init__(self, method: bytes, target: bytes, version: str, headers: dict,
                 keep_alive: bool) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers       # lower-case name -> value (repeats joined by ", ")
        self.keep_alive = keep_alive

    def __repr__(self) -> str:
        return f"<Request {self.method.decode()} {self.target!r} HTTP/{self.version}>"


class Response:
    """What to send: ``head`` (status line and headers), then ``body`` bytes or the part
    ``file_offset``/``file_count`` of the open file ``file_fd`` (owned by the response:
    whoever sends it closes it). ``close``: close the connection after it."""

    __slots__ = ("status", "head", "body", "file_fd", "file_offset", "file_count", "close",
                 "request")

    def __init__(self, status: int, head: bytes, body: bytes = b"", file_fd: int = -1,
                 file_offset: int = 0, file_count: int = 0, close: bool = False,
                 request: Optional[Request] = None) -> None:
        self.status = status
        self.head = head
        self.body = body
        self.file_fd = file_fd
        self.file_offset = file_offset
        self.file_count = file_count
        self.close = close
        self.request = request

    @property
    def body_size(self) -> int:
        return self.file_count if self.file_fd >= 0 else len(self.body)

    def discard(self) -> None:
        """Close the file of a response that will not be sent."""
        if self.file_fd >= 0:
            os.close(self.file_fd)
            self.file_fd = -1


def build_head(status: int, headers: list, *, close: bool, keep_alive_10: bool = False) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\nServer: %s\r\nDate: %s\r\n"
             % (status, _REASONS[status].encode(), SERVER, http_date())]
    for name, value in headers:
        lines.append(b"%s: %s\r\n" % (name, value))
    if close:
        lines.append(b"Connection: close\r\n")
    elif keep_alive_10:
        lines.append(b"Connection: keep-alive\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def error_response(status: int, request: Optional[Request] = None, *, close: bool = False,
                   extra: tuple = ()) -> Response:
    """A short HTML error page (no body for HEAD)."""
    body = b"<html><body><h1>%d %s</h1></body></html>\n" % (status, _REASONS[status].encode())
    close = close or request is None or not request.keep_alive
    headers = [(b"Content-Type", b"text/html"), (b"Content-Length", b"%d" % len(body)),
               *extra]
    head = build_head(status, headers, close=close,
                      keep_alive_10=request is not None and request.version == "1.0")
    if request is not None and request.method == b"HEAD":
        body = b""
    return Response(status, head, body, close=close, request=request)


class _Reject(Exception):
    def __init__(self, status: int) -> None:
        self.status = status


# Session states: what the peer is in the middle of sending.
IDLE, HEAD, BODY = 0, 1, 2


class HTTPSession:
    """The HTTP/1.1 protocol of one connection, without I/O: ``feed(data)`` parses what
    arrived and queues requests (and errors); ``next_response()`` gives the responses in
    request order. After a response with ``close`` set, nothing more comes out."""

    def __init__(self, site: Any, limits: Limits) -> None:
        self.site = site
        self.limits = limits
        self.parser = httptools.HttpRequestParser(self)
        self.pending: deque = deque()        # Request or Response (an error), in order
        self.state = IDLE
        self.since = time.monotonic()        # when the current state began
        self.served = 0                      # responses produced
        self.done = False                    # a closing response is queued: parse no more
        self._url: list = []
        self._url_len = 0
        self._headers: dict = {}
        self._nheaders = 0
        self._header_bytes = 0
        self._head_seen = 0                  # bytes fed while in HEAD (the parser buffers)
        self._began = False                  # a message began during the current feed
        self._chunked = False                # the body is chunked
        self._moved = False                  # body data or a chunk's end in this feed
        self._stalled = 0                    # bytes fed in a chunked body without those
        self._hosts = 0
        self._version = "1.1"
        self._body = 0
        self._reject = 0

    # -- input
    def feed(self, data: bytes) -> None:
        if self.done:
            return
        self._began = False
        self._moved = False
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An upgrade is not offered: the request was answered as a plain one; what
            # follows belongs to another protocol, so the connection ends after it.
            self._fail_after_last(None)
        except httptools.HttpParserCallbackError:
            self._fail_after_last(self._reject or 500)
        except httptools.HttpParserError:
            if not self.done:                # data after a "Connection: close" request
                self._fail_after_last(400)
        else:
            if self.state == HEAD:
                # The parser holds a header being received whole: bound it (an over-long
                # target was refused by on_url already). Only bytes fed after the head
                # began count; where in ``data`` it began is unknown, so a head begun in
                # this feed starts counting with the next one (at most one read more).
                if self._began:
                    self._head_seen = 0
                else:
                    self._head_seen += len(data)
                    if (self._head_seen
                            > self.limits.max_request_line + self.limits.max_header_bytes):
                        self._fail_after_last(431)
            elif self.state == BODY and self._chunked:
                # The same for a field of the trailers, or a chunk's size line: bytes
                # the parser keeps while no body data or chunk end comes.
                if self._moved:
                    self._stalled = 0
                else:
                    self._stalled += len(data)
                    if self._stalled > self.limits.max_header_bytes:
                        self._fail_after_last(431)

    def _fail_after_last(self, status: Optional[int]) -> None:
        """Stop parsing: answer ``status`` (if any) after what is queued, then close."""
        if self.done:
            return
        self.done = True
        self.state = IDLE
        if status is None:
            if self.pending and isinstance(self.pending[-1], Request):
                self.pending[-1].keep_alive = False
            return
        self.pending.append(error_response(status, close=True))

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self.state = HEAD
        self.since = time.monotonic()
        self._url = []
        self._url_len = 0
        self._headers = {}
        self._nheaders = 0
        self._header_bytes = 0
        self._head_seen = 0
        self._began = True
        self._hosts = 0
        self._body = 0
        self._chunked = False
        self._stalled = 0

    def on_url(self, part: bytes) -> None:
        self._url_len += len(part)
        if self._url_len > self.limits.max_request_line:
            self._reject = 414
            raise _Reject(414)
        self._url.append(part)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._nheaders += 1
        self._header_bytes += len(name) + len(value) + 4
        if (self._nheaders > self.limits.max_headers
                or self._header_bytes > self.limits.max_header_bytes):
            self._reject = 431
            raise _Reject(431)
        if self.state == BODY:
            return                           # a trailer field: counted, not used
        key = name.lower()
        if key == b"host":
            self._hosts += 1
        old = self._headers.get(key)
        self._headers[key] = value if old is None else old + b", " + value

    def on_headers_complete(self) -> None:
        self.state = BODY
        self._moved = True                   # the body begins in this feed: counted after
        h = self._headers
        self._version = version = self.parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self._reject = 505
            raise _Reject(505)
        hosts = self._hosts
        if hosts != 1:
            if hosts or version == "1.1":
                self._reject = 400           # RFC 9112 section 3.2: exactly one valid Host
                raise _Reject(400)
        elif h[b"host"] not in _good_hosts:
            if not _HOST_CHARS.issuperset(h[b"host"]):
                self._reject = 400
                raise _Reject(400)
            if len(_good_hosts) < 64:
                _good_hosts.add(h[b"host"])
        self._chunked = b"transfer-encoding" in h
        length = h.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_body:
            self._reject = 413
            raise _Reject(413)
        expect = h.get(b"expect")
        if (expect is not None and version == "1.1" and expect.lower() == b"100-continue"
                and (b"transfer-encoding" in h or (length is not None and length != b"0"))):
            # The client waits for this before it sends the body (which is read and
            # ignored): an interim response, in its place among the answers.
            self.pending.append(Response(100, CONTINUE))

    def on_body(self, part: bytes) -> None:
        self._moved = True
        self._body += len(part)              # read and ignored
        if self._body > self.limits.max_body:
            self._reject = 413
            raise _Reject(413)

    def on_chunk_complete(self) -> None:
        self._moved = True

    def on_message_complete(self) -> None:
        p = self.parser
        # HTTP/1.0 with Transfer-Encoding: its framing is faulty (a 1.0 hop in between
        # would not know chunked), RFC 9112 section 6.1: answered, then the connection
        # closes.
        keep_alive = p.should_keep_alive() and not (self._chunked and self._version == "1.0")
        req = Request(p.get_method(), b"".join(self._url), self._version,
                      self._headers, keep_alive)
        self.pending.append(req)
        self.state = IDLE
        self.since = time.monotonic()
        if not req.keep_alive:
            self.done = True                 # the parser refuses more data anyway

    # -- output
    def next_response(self) -> Optional[Response]:
        """The next response in request order, or None if none is ready."""
        if not self.pending:
            return None
        item = self.pending.popleft()
        if type(item) is Request:
            try:
                resp = self.site.respond(item)
            except Exception:
                logger.exception("responding to %r failed", item)
                resp = error_response(500, item, close=True)
        else:
            resp = item
        if resp.close:
            for rest in self.pending:        # nothing after a closing response
                if type(rest) is Response:
                    rest.discard()
            self.pending.clear()
            self.done = True
        self.served += 1
        return resp

    def sending(self, now: float) -> None:
        """A response was still on its way at ``now``: the idle time between requests
        counts from when it has gone out, not from the end of the request."""
        if self.state == IDLE:
            self.since = now

    def timed_out(self, now: float) -> Optional[str]:
        """"header" if a request head (or body) is overdue, "idle" if a keep-alive
        connection has waited too long for its next request, else None."""
        if self.done or self.pending:
            return None
        if self.state != IDLE or not self.served:
            if now - self.since > self.limits.header_timeout:
                return "header"
        elif now - self.since > self.limits.keepalive_timeout:
            return "idle"
        return None

    def close(self) -> None:
        for item in self.pending:
            if type(item) is Response:
                item.discard()
        self.pending.clear()
        self.done = True


class _Openat2:
    """``openat2(2)`` with ``RESOLVE_BENEATH`` (Linux 5.6+), through ctypes: the kernel
    itself refuses a path that leaves the directory, symlinks included, in the same call
    that opens the file."""

    NR = 437                 # in the table shared by the common architectures since 5.1
    MACHINES = ("x86_64", "aarch64", "armv7l", "riscv64", "ppc64le", "s390x")
    RESOLVE_NO_MAGICLINKS, RESOLVE_BENEATH = 0x02, 0x08

    def __init__(self, flags: int) -> None:
        import ctypes
        import platform

        class OpenHow(ctypes.Structure):
            _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                        ("resolve", ctypes.c_uint64)]

        if not sys.platform.startswith("linux") or platform.machine() not in self.MACHINES:
            raise OSError(errno.ENOSYS, "openat2 is Linux-only")
        libc = ctypes.CDLL(None, use_errno=True)
        self._syscall = libc.syscall
        self._syscall.restype = ctypes.c_long
        self._syscall.argtypes = [ctypes.c_long, ctypes.c_int, ctypes.c_char_p,
                                  ctypes.c_void_p, ctypes.c_size_t]
        self._get_errno = ctypes.get_errno
        self._how = OpenHow(flags, 0, self.RESOLVE_BENEATH | self.RESOLVE_NO_MAGICLINKS)
        self._args = (ctypes.addressof(self._how), ctypes.sizeof(self._how))

    def __call__(self, dirfd: int, path: bytes) -> int:
        fd = self._syscall(self.NR, dirfd, path, *self._args)
        if fd < 0:
            e = self._get_errno()
            raise OSError(e, os.strerror(e), path)
        return fd


class StaticSite:
    """Maps requests to files under ``root``. Holds the root directory open: ``close()``
    it when done (or use it as a context manager).

    A file is opened relative to the root's fd with ``openat2(RESOLVE_BENEATH)`` where
    the kernel has it: no symlink or ``..`` can lead out, and absolute symlinks are
    refused even when they point inside (use relative ones). Elsewhere it is opened by
    name and the path the kernel opened (``/proc/self/fd``, or ``realpath``) must be under
    the root. URL paths are decoded and checked once, then cached."""

    OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK   # O_NONBLOCK: a FIFO never blocks

    def __init__(self, root: str, *, index: str = "index.html", listing: bool = False) -> None:
        self.root = os.path.realpath(root)
        self.root_b = os.fsencode(self.root)
        self._root_prefix = self.root_b.rstrip(b"/") + b"/"      # "/" itself too
        self.index = os.fsencode(index)
        self.listing = listing
        self._proc_fd = os.path.isdir("/proc/self/fd")
        self._heads: dict = {}               # (file, its type, connection) -> (date, head)
        self._paths: dict = {}               # URL path -> (status, relative path, type)
        self._root_fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._finalizer = weakref.finalize(self, os.close, self._root_fd)
        try:
            self._openat2: Any = _Openat2(self.OPEN_FLAGS)
            os.close(self._openat2(self._root_fd, b"."))
        except OSError:                      # ENOSYS, or EPERM from a seccomp filter
            self._openat2 = None

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> StaticSite:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def respond(self, req: Request) -> Response:
        if req.method not in (b"GET", b"HEAD"):
            if req.method in KNOWN_METHODS:
                return error_response(405, req, extra=((b"Allow", b"GET, HEAD"),))
            return error_response(501, req)
        try:
            url = httptools.parse_url(req.target)
        except httptools.HttpParserInvalidURLError:
            return error_response(400, req)
        raw = url.path or b"/"
        resolved = self._paths.get(raw)
        if resolved is None:
            resolved = self._resolve(raw)
            if len(raw) <= 256:              # the cache holds only short paths
                if len(self._paths) > 4096:
                    self._paths.clear()
                self._paths[raw] = resolved
        status, rel, ctype = resolved
        if status:
            return error_response(status, req)
        try:
            fd = self._open(rel)
        except OSError as e:
            return error_response(self._status_for(e), req)
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                return self._directory(req, fd, rel, raw, url.query)
            if not stat.S_ISREG(st.st_mode):
                return error_response(403, req)
            resp = self._file(req, fd, st, ctype)
            if resp.file_fd == fd:
                fd = -1                      # the response owns it now
            return resp
        finally:
            if fd >= 0:
                os.close(fd)

    @staticmethod
    def _resolve(raw: bytes) -> tuple:
        """(0, path relative to the root, MIME type), or (error status, b"", b"")."""
        if not raw.startswith(b"/"):
            return 400, b"", b""
        path = urllib.parse.unquote_to_bytes(raw)
        if b"\0" in path:
            return 400, b"", b""
        segments = path.split(b"/")
        if b".." in segments or b"." in segments:
            return 400, b"", b""
        rel = path.lstrip(b"/") or b"."
        return 0, rel, content_type(rel)

    def _open(self, rel: bytes) -> int:
        """Open ``rel`` under the root; OSError(EXDEV) if it would lead out of it."""
        if self._openat2 is not None:
            return self._openat2(self._root_fd, rel)
        fd = os.open(rel, self.OPEN_FLAGS, dir_fd=self._root_fd)
        if self._proc_fd:
            real = os.fsencode(os.readlink(f"/proc/self/fd/{fd}"))
        else:
            real = os.fsencode(os.path.realpath(os.path.join(self.root_b, rel)))
        if real != self.root_b and not real.startswith(self._root_prefix):
            os.close(fd)
            raise OSError(errno.EXDEV, "outside the root", rel)
        return fd

    @staticmethod
    def _status_for(e: OSError) -> int:
        if e.errno in (errno.EACCES, errno.EPERM, errno.EXDEV, errno.ELOOP):
            return 403                       # EXDEV/ELOOP: a way out of the root
        if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
            return 503                       # the server is short of something, not the file
        return 404          # ENOENT, ENOTDIR, ENAMETOOLONG (no such file can exist)...

    def _directory(self, req: Request, fd: int, rel: bytes, raw: bytes,
                   query: Optional[bytes]) -> Response:
        if not raw.endswith(b"/"):
            # Built from the checked path, never echoed: "//evil.example" as a Location
            # would send the client to another host.
            location = (b"/" + urllib.parse.quote_from_bytes(rel).encode("ascii") + b"/"
                        + (b"?" + query if query else b""))
            return error_response(301, req, extra=((b"Location", location),))
        irel = self.index if rel == b"." else rel.rstrip(b"/") + b"/" + self.index
        try:
            ifd = self._open(irel)
        except FileNotFoundError:
            if self.listing:
                return self._listing(req, fd, raw)
            return error_response(404, req)
        except OSError as e:
            return error_response(self._status_for(e), req)
        try:
            st = os.fstat(ifd)
            if not stat.S_ISREG(st.st_mode):
                return error_response(403, req)
            resp = self._file(req, ifd, st, content_type(irel))
            if resp.file_fd == ifd:
                ifd = -1
            return resp
        finally:
            if ifd >= 0:
                os.close(ifd)

    def _listing(self, req: Request, fd: int, raw: bytes) -> Response:
        title = html.escape(urllib.parse.unquote_to_bytes(raw).decode("utf-8", "replace"))
        rows = []
        for name in sorted(os.listdir(fd)):
            try:
                is_dir = stat.S_ISDIR(os.stat(name, dir_fd=fd).st_mode)
            except OSError:
                continue
            b = os.fsencode(name) + (b"/" if is_dir else b"")    # names need not be UTF-8
            href = urllib.parse.quote_from_bytes(b)
            rows.append(f'<li><a href="{href}">{html.escape(b.decode("utf-8", "replace"))}'
                        f'</a></li>')
        body = (f"<html><head><title>Index of {title}</title></head><body>"
                f"<h1>Index of {title}</h1><ul>{''.join(rows)}</ul></body></html>\n").encode()
        head = build_head(200, [(b"Content-Type", b"text/html; charset=utf-8"),
                                (b"Content-Length", b"%d" % len(body))],
                          close=not req.keep_alive, keep_alive_10=req.version == "1.0")
        return Response(200, head, b"" if req.method == b"HEAD" else body,
                        close=not req.keep_alive, request=req)

    def _file(self, req: Request, fd: int, st: os.stat_result, ctype: bytes) -> Response:
        size = st.st_size
        close = not req.keep_alive
        ka10 = req.version == "1.0"
        h = req.headers
        if not (b"range" in h or b"if-none-match" in h or b"if-modified-since" in h
                or b"if-match" in h or b"if-unmodified-since" in h):
            # The common case: a whole file. Its head is built once per file and second.
            key = (st.st_ino, st.st_dev, st.st_mtime_ns, size, ctype, close, ka10)
            now = http_date()
            cached = self._heads.get(key)
            if cached is None or cached[0] is not now:
                if len(self._heads) > 4096:
                    self._heads.clear()
                cached = self._heads[key] = (now, self._full_head(st, ctype, close, ka10))
            if req.method == b"HEAD" or size == 0:
                return Response(200, cached[1], close=close, request=req)
            return Response(200, cached[1], file_fd=fd, file_count=size, close=close,
                            request=req)
        mtime = _mtime(st)
        etag = b'"%x-%x"' % (st.st_mtime_ns, size)
        last_modified = last_modified_date(mtime)
        validators = [(b"Last-Modified", last_modified), (b"ETag", etag)]
        if self._precondition_failed(h, etag, mtime):
            return error_response(412, req)
        if self._not_modified(h, etag, mtime):
            return Response(304, build_head(304, validators, close=close, keep_alive_10=ka10),
                            close=close, request=req)
        status, offset, count = 200, 0, size
        extra = [(b"Accept-Ranges", b"bytes")]
        rng = h.get(b"range") if req.method == b"GET" else None   # RFC 9110 section 14.2
        if rng is not None and self._if_range_ok(h.get(b"if-range"), etag, last_modified,
                                                 time.time() - st.st_mtime >= 1):
            r = parse_range(rng, size)
            if r == "unsatisfiable":
                return error_response(416, req, extra=((b"Content-Range", b"bytes */%d" % size),))
            if r is not None:
                status, (offset, count) = 206, r
                extra.append((b"Content-Range", b"bytes %d-%d/%d"
                              % (offset, offset + count - 1, size)))
        headers = [(b"Content-Type", ctype), (b"Content-Length", b"%d" % count),
                   *validators, *extra]
        head = build_head(status, headers, close=close, keep_alive_10=ka10)
        if req.method == b"HEAD" or count == 0:
            return Response(status, head, close=close, request=req)
        return Response(status, head, file_fd=fd, file_offset=offset, file_count=count,
                        close=close, request=req)

    @staticmethod
    def _full_head(st: os.stat_result, ctype: bytes, close: bool, ka10: bool) -> bytes:
        return build_head(200, [(b"Content-Type", ctype),
                                (b"Content-Length", b"%d" % st.st_size),
                                (b"Last-Modified", last_modified_date(_mtime(st))),
                                (b"ETag", b'"%x-%x"' % (st.st_mtime_ns, st.st_size)),
                                (b"Accept-Ranges", b"bytes")],
                          close=close, keep_alive_10=ka10)

    @staticmethod
    def _not_modified(h: dict, etag: bytes, mtime: int) -> bool:
        inm = h.get(b"if-none-match")
        if inm is not None:                  # it wins over If-Modified-Since (RFC 9110)
            tags = entity_tags(inm)
            return b"*" in tags or etag in tags or b"W/" + etag in tags
        ims = h.get(b"if-modified-since")
        if ims is not None:
            t = parse_http_date(ims)
            return t is not None and mtime <= t
        return False

    @staticmethod
    def _precondition_failed(h: dict, etag: bytes, mtime: int) -> bool:
        """If-Match (strong comparison) or, without it, If-Unmodified-Since (RFC 9110
        section 13.2.2); an invalid date is ignored."""
        im = h.get(b"if-match")
        if im is not None:
            tags = entity_tags(im)
            return not (b"*" in tags or etag in tags)
        ius = h.get(b"if-unmodified-since")
        if ius is not None:
            t = parse_http_date(ius)
            return t is not None and mtime > t
        return False

    @staticmethod
    def _if_range_ok(if_range: Optional[bytes], etag: bytes, last_modified: bytes,
                     strong_date: bool) -> bool:
        """May the Range be served? Without If-Range yes; else only if it is our entity
        tag, or our Last-Modified date while that is a strong validator: a file
        modified less than a second ago may change again within the same date (RFC
        9110 sections 13.1.5 and 8.8.2.2)."""
        if if_range is None:
            return True
        v = if_range.strip()
        return v == etag or (strong_date and v == last_modified)


def entity_tags(value: bytes) -> list:
    """The entity tags of an If-Match or If-None-Match value (``*`` kept as is)."""
    return [t.strip() for t in value.split(b",")]


def parse_http_date(value: bytes) -> Optional[float]:
    """The POSIX time of an HTTP date, or None if it is not one valid date (RFC 9110
    section 5.6.7: IMF-fixdate, RFC 850 or asctime, all in GMT; a field holding several,
    as repeated fields are joined, is not valid: section 13.1.3)."""
    if not _HTTP_DATE.fullmatch(value):
        return None
    try:
        t = email.utils.parsedate_tz(value.decode("latin-1"))
        if t is None:
            return None
        zone = datetime.timezone(datetime.timedelta(seconds=t[9] or 0))  # asctime: GMT
        return datetime.datetime(*t[:6], tzinfo=zone).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError, OSError):
        return None


def parse_range(value: bytes, size: int) -> Any:
    """A single ``bytes=`` range of a ``size``-byte file: ``(offset, count)``,
    ``"unsatisfiable"``, or None to ignore the header (bad syntax, several ranges)."""
    unit, _, spec = value.partition(b"=")
    if unit.strip().lower() != b"bytes" or b"," in spec:
        return None
    first, dash, last = spec.strip().partition(b"-")
    if not dash or not (first.isdigit() or last.isdigit()):
        return None
    if (first and not first.isdigit()) or (last and not last.isdigit()):
        return None
    if not first:                            # the last N bytes
        n = _position(last)
        if n == 0:
            return "unsatisfiable"
        if size == 0:
            return None                      # satisfiable, and nothing to send: the 200
        n = min(n, size)
        return size - n, n
    start = _position(first)
    if last and _order(last) < _order(first):
        return None
    if start >= size:
        return "unsatisfiable"
    end = min(_position(last), size - 1) if last else size - 1
    return start, end - start + 1


def _order(digits: bytes) -> tuple:
    """A key that orders byte positions of any length as their values."""
    digits = digits.lstrip(b"0")
    return len(digits), digits


def _position(digits: bytes) -> int:
    """A byte position of a Range: any number of digits (int() refuses over 4300); one
    beyond any file size stands for all the larger ones."""
    digits = digits.lstrip(b"0") or b"0"
    return int(digits) if len(digits) <= 18 else 1 << 62


# ----------------------------------------------------------------------- the I/O glue

class HTTPServer:
    """What the connections of one server share (any thread): the site, the limits, the
    open sessions (for the timeout sweep) and their count."""

    def __init__(self, engine: Any, site: StaticSite, limits: Limits, *,
                 log_access: bool = False) -> None:
        self.engine = engine
        self.site = site
        self.limits = limits
        self.log_access = log_access
        self.handlers: set = set()
        self._lock = threading.Lock()
        self._sweeper: Any = None
        self.engine_thread: Optional[int] = None     # learnt at the engine's first turn
        engine.call_soon(self._learn_thread)

    def _learn_thread(self) -> None:
        self.engine_thread = threading.get_ident()

    def handler(self) -> HTTPHandler:
        return HTTPHandler(self)

    def start_sweeping(self, interval: float = 1.0) -> None:
        """Check timeouts every ``interval`` s on the engine's thread (call from it or
        before the engine runs)."""
        def sweep() -> None:
            now = time.monotonic()
            for h in list(self.handlers):
                h.check_timeout(now)
            self._sweeper = self.engine.call_later(interval, sweep)
        self._sweeper = self.engine.call_later(interval, sweep)

    def stop_sweeping(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()

    def close(self) -> None:
        """Stop the sweep and close the site (the engine's server is closed apart)."""
        self.stop_sweeping()
        self.site.close()

    def admit(self, h: HTTPHandler) -> bool:
        with self._lock:
            if len(self.handlers) >= self.limits.max_connections:
                return False
            self.handlers.add(h)
            return True

    def leave(self, h: HTTPHandler) -> None:
        with self._lock:
            self.handlers.discard(h)


class HTTPHandler(proactor.Handler):
    """One client connection: feeds its session, writes the responses in order.

    With workers, the handler runs on a worker thread while the timeout sweep and
    ``when_drained`` callbacks run on the engine's thread: ``lock`` keeps them apart."""

    def __init__(self, server: HTTPServer) -> None:
        self.server = server
        self.conn: Any = None
        self.session = HTTPSession(server.site, server.limits)
        self.lock = threading.Lock()
        self.eof = False
        self.waiting = False                 # paused until the output drains
        self.queued = 0                      # bytes handed to the connection since then
        self.files = 0                       # and file bodies
        self.watching = False                # a when_drained(_output_sent) is due
        self.inline = False                  # runs on the engine's thread
        self.peer = "-"                      # the client's address, for the access log
        self.backlog = 0                     # queued output at the last sweep
        self.backlog_since = 0.0             # ... unchanged since then

    def connection_made(self, conn: Any) -> None:
        self.conn = conn
        # Inline (on the engine's thread) the connection's queue is known exactly; from a
        # worker, sends are posted and not queued yet.
        self.inline = threading.get_ident() == self.server.engine_thread
        if self.server.log_access:
            try:
                self.peer = conn.peername[0]
            except OSError:
                pass                         # already reset
        if not self.server.admit(self):
            self.session.done = True
            self._write(error_response(503, close=True))
            conn.close()

    def data_received(self, conn: Any, data: bytes) -> None:
        # Not while waiting: reading is paused then, and the engine holds what it had
        # already received (or queued for the workers) until resume_reading().
        with self.lock:
            self.session.feed(data)
            self._pump()

    def eof_received(self, conn: Any) -> None:
        with self.lock:
            self.eof = True                  # answer what was asked, then close
            self.session.done = True
            self._pump()

    def connection_lost(self, conn: Any, exc: Optional[BaseException]) -> None:
        self.server.leave(self)
        with self.lock:
            self.session.close()

    def _pump(self) -> None:
        """Write the responses that are ready, while little output is queued; pause
        reading while the rest waits for the queue to drain."""
        session, conn = self.session, self.conn
        if self.waiting:
            return
        if self.files and self.inline and not conn.get_write_buffer_size():
            self.queued = self.files = 0     # all gone out (requests come one by one)
        first = True
        while session.pending:
            # ``queued``, not conn.get_write_buffer_size(): from a worker thread a send is
            # posted to the engine and not in the connection's queue yet.
            limits = self.server.limits
            if ((not first and self.queued > limits.max_buffered_output)
                    or self.files >= limits.max_buffered_files):
                if not self.waiting:
                    self.waiting = True
                    conn.pause_reading()
                    conn.when_drained(self._drained)
                return
            first = False
            resp = session.next_response()
            if resp is None:
                break
            self._write(resp)
            if resp.close:
                conn.close()
                return
        if self.eof and not conn.closed:
            conn.close()

    def _drained(self) -> None:
        with self.lock:
            self.waiting = False
            self.queued = self.files = 0
            if self.conn.closed:
                return
            self._pump()
            if not self.waiting and not self.conn.closed:   # else a new when_drained is due
                self.conn.resume_reading()

    def _output_sent(self) -> None:
        """Everything handed to the connection so far has gone out (engine's thread)."""
        with self.lock:
            self.watching = False
            if not self.waiting:             # else _drained() is due and resets
                self.queued = self.files = 0

    def _write(self, resp: Response) -> None:
        conn = self.conn
        size = resp.body_size
        self.queued += len(resp.head) + size
        try:
            if conn.closing:                 # the peer has gone: nothing more to send
                self.session.close()
            elif resp.file_fd >= 0:
                self.files += 1
                conn.send(resp.head)
                conn.sendfile(resp.file_fd, resp.file_offset, resp.file_count)
                if not self.inline and not self.watching:
                    # To know when it has gone out: cheaper than a pause when requests
                    # come one by one. After the sends: from a worker thread all three
                    # are posted, and the engine takes them in order.
                    self.watching = True
                    conn.when_drained(self._output_sent)
            elif resp.body:
                conn.send(resp.head + resp.body)
            else:
                conn.send(resp.head)
        except OSError as e:
            # The file could not be queued (EMFILE: no fd for the engine's copy) after its
            # head was: the response cannot be completed, so the connection ends.
            logger.warning("%r: %s; aborting the connection", conn, e)
            self.session.close()
            conn.abort()
        finally:
            resp.discard()
        if self.server.log_access and resp.status != 100:
            self._log(resp, size)

    def _log(self, resp: Response, size: int) -> None:
        peer = self.peer
        req = resp.request
        line = (f"{req.method.decode()} {req.target.decode('latin-1')} HTTP/{req.version}"
                if req is not None else "-")
        # the target is the client's: control bytes and quotes escaped, one line per entry
        line = line.encode("unicode_escape").decode("ascii").replace('"', '\\"')
        access_log.info('%s - - [%s] "%s" %d %d', peer,
                        time.strftime("%d/%b/%Y:%H:%M:%S %z"), line, resp.status, size)

    def check_timeout(self, now: float) -> None:
        """Called by the sweep on the engine's thread."""
        with self.lock:
            if self.conn is None or self.conn.closed:
                return
            backlog = self.conn.get_write_buffer_size()
            if backlog:
                # A response is on its way: the client must keep taking it; the idle
                # time of a keep-alive connection begins once it has.
                self.session.sending(now)
                if backlog != self.backlog:
                    self.backlog, self.backlog_since = backlog, now
                elif now - self.backlog_since > self.server.limits.send_timeout:
                    logger.info("%r: no output taken for %.0f s; aborting", self.conn,
                                now - self.backlog_since)
                    self.session.close()
                    self.conn.abort()
                return
            self.backlog = 0
            why = self.session.timed_out(now)
            if why == "header":
                self.session.done = True
                self._write(error_response(408, close=True))
                self.conn.close()
            elif why == "idle":
                self.session.done = True
                self.conn.close()


class HelloHandler(proactor.Handler):
    """``--hello``: the 78-byte reply of the benchmark peer to every request, handled on
    the engine's thread (with workers, use :class:`ThreadedHelloHandler`).

    A client that pipelines without reading its replies does not grow the output without
    bound: past ``MAX_QUEUED`` bytes of queued replies, reading pauses until the output
    drains."""

    BODY = b"Hello, World!"
    RESPONSE = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                % (len(BODY), BODY))
    BAD = b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    MAX_QUEUED = 1 << 20

    def connection_made(self, conn: Any) -> None:
        self.conn = conn
        self.parser = httptools.HttpRequestParser(self)
        self.closing = False
        self.paused = False
        self.fed = 0                         # request bytes since the output was looked at

    def data_received(self, conn: Any, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # Answered as a plain request (upgrades are not offered); what follows would
            # be another protocol: the connection ends after the reply.
            self.closing = True
            conn.close()
            return
        except httptools.HttpParserError:
            self._bad()
            return
        # Look at the output every 64 KiB of requests (at most ~300 KB of replies).
        self.fed += len(data)
        if self.fed > 65536:
            self.fed = 0
            if self._backlog() > self.MAX_QUEUED and not self.closing:
                self.paused = True
                conn.pause_reading()
                conn.when_drained(self._drained)

    def _backlog(self) -> int:
        """Reply bytes queued (on the engine's thread the connection knows exactly)."""
        return self.conn.get_write_buffer_size()

    def eof_received(self, conn: Any) -> None:
        conn.close()

    def _bad(self) -> None:
        if not self.closing:
            self.closing = True
            self.conn.send(self.BAD)
            self.conn.close()

    def _drained(self) -> None:
        self.paused = False
        if not self.closing:
            self.conn.resume_reading()

    def on_message_complete(self) -> None:
        if self.closing:
            return
        self.conn.send(self.RESPONSE)
        if not self.parser.should_keep_alive():
            self.closing = True
            self.conn.close()


class ThreadedHelloHandler(HelloHandler):
    """:class:`HelloHandler` on a worker pool: the drain callback runs on the engine's
    thread (a lock keeps it apart from the worker), and a worker's sends are posted to the
    engine, not queued yet, so the handler counts the reply bytes itself."""

    def connection_made(self, conn: Any) -> None:
        super().connection_made(conn)
        self.lock = threading.RLock()
        self.queued = 0                      # reply bytes sent since the output drained

    def data_received(self, conn: Any, data: bytes) -> None:
        with self.lock:
            super().data_received(conn, data)

    def _backlog(self) -> int:
        return self.queued

    def eof_received(self, conn: Any) -> None:
        with self.lock:
            super().eof_received(conn)

    def _drained(self) -> None:
        with self.lock:
            self.queued = 0
            super()._drained()

    def on_message_complete(self) -> None:
        super().on_message_complete()
        self.queued += len(self.RESPONSE)


def fd_budget(max_connections: int, files: int = Limits.max_buffered_files) -> int:
    """``max_connections`` if the fd limit allows it, after raising the soft limit toward
    the hard one; else the most it allows, with a warning. A connection holds its socket,
    the engine's copies of the ``files`` file bodies it may have queued, and the file of
    the response being written; the process needs some more."""
    try:
        import resource
    except ImportError:                      # not on Windows
        return max_connections
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    per = 2 + files
    want = per * max_connections + 64
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
        if soft < want:
            fit = max(1, (soft - 64) // per)
            print(f"warning: the fd limit ({soft}) allows --max-connections {fit}, not "
                  f"{max_connections}; using {fit}", file=sys.stderr, flush=True)
            return fit
    return max_connections


def main(argv: Optional[list] = None) -> None:
    p = argparse.ArgumentParser(description="HTTP/1.1 static file server.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--root", default=DEMO_ROOT, help="directory to serve")
    p.add_argument("--workers", type=int, default=0,
                   help="run handlers on N worker threads (0: on the I/O thread)")
    p.add_argument("--backend", default=None, choices=["auto", "uring", "trio"],
                   help="engine backend (None: $PROACTOR_BACKEND, else auto)")
    p.add_argument("--access-log", action="store_true", help="log each request to stderr")
    p.add_argument("--listing", action="store_true", help="list directories without index")
    p.add_argument("--hello", action="store_true",
                   help="answer every request with the 78-byte 'Hello, World!' reply")
    d = Limits()
    p.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="clients at once (503 beyond; lowered to what the fd limit allows)")
    p.add_argument("--keepalive-timeout", type=float, default=d.keepalive_timeout,
                   help="seconds an idle keep-alive connection stays open")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help="seconds to send a request head (408 after)")
    p.add_argument("--send-timeout", type=float, default=d.send_timeout,
                   help="seconds a client may take none of its response (aborted after)")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO if a.access_log else logging.WARNING,
                        format="%(message)s")
    engine = proactor.Engine(backend=a.backend)
    if a.hello:
        server = engine.serve_tcp(ThreadedHelloHandler if a.workers else HelloHandler,
                                  a.host, a.port, workers=a.workers)
    else:
        limits = Limits(max_connections=fd_budget(a.max_connections),
                        keepalive_timeout=a.keepalive_timeout, header_timeout=a.header_timeout,
                        send_timeout=a.send_timeout)
        app = HTTPServer(engine, StaticSite(a.root, listing=a.listing), limits,
                         log_access=a.access_log)
        app.start_sweeping()
        server = engine.serve_tcp(app.handler, a.host, a.port, workers=a.workers)
    print(f"listening on {a.host}:{server.port}", flush=True)
    engine.run()


if __name__ == "__main__":
    main()
