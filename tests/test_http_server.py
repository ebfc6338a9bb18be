"""examples/http_server.py: the protocol without sockets, then real clients on loopback
(curl, http.client, a pipelining h11 client) against both backends."""
from __future__ import annotations

import concurrent.futures
import email.utils
import hashlib
import http.client
import importlib.util
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import h11
import pytest
from support import connect, open_fds, recv_until_eof, wait_until

pytestmark = [pytest.mark.linux, pytest.mark.timeout(120)]

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod       # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


hs = load_example("http_server")

SIZES = [0, 1, 100, 4095, 4096, 4097, 65536, 131072 + 1, 1 << 20, 5 * (1 << 20) + 3]


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A root with files of many sizes, a subdirectory with an index, one without, a
    symlink inside the root and one leading out of it."""
    root = tmp_path_factory.mktemp("site")
    rng = random.Random(42)
    files = {}
    for n in SIZES:
        data = rng.randbytes(n)
        (root / f"f{n}.bin").write_bytes(data)
        files[f"/f{n}.bin"] = data
    (root / "index.html").write_bytes(b"<h1>home</h1>\n")
    files["/"] = b"<h1>home</h1>\n"
    (root / "sub").mkdir()
    (root / "sub" / "index.html").write_bytes(b"sub index\n")
    (root / "empty").mkdir()
    (root / "a b.txt").write_bytes(b"spaced\n")
    outside = tmp_path_factory.mktemp("outside")
    (outside / "secret.txt").write_bytes(b"secret\n")
    os.symlink(outside / "secret.txt", root / "escape.txt")
    os.symlink(outside, root / "escape_dir")
    os.symlink("f100.bin", root / "link_inside.bin")
    os.symlink(root / "f100.bin", root / "abs_link_inside.bin")
    return root, files


# ------------------------------------------------------------------ protocol, no sockets

def session_for(root, **limits):
    return hs.HTTPSession(hs.StaticSite(str(root)), hs.Limits(**limits))


def session_opening(root, openat2):
    """A session whose site opens files with openat2 (skipped where the kernel lacks it)
    or, ``openat2`` false, by name with the check of the path opened."""
    s = session_for(root)
    if not openat2:
        s.site._openat2 = None
    elif s.site._openat2 is None:
        pytest.skip("openat2 is not available here")
    return s


def responses(session):
    out = []
    while True:
        r = session.next_response()
        if r is None:
            return out
        out.append(r)
        r.discard()


def status_of(session, data):
    session.feed(data)
    rs = responses(session)
    assert rs, "no response"
    return rs[-1]


@pytest.mark.parametrize("value,size,want", [
    (b"bytes=0-0", 10, (0, 1)), (b"bytes=2-", 10, (2, 8)), (b"bytes=-3", 10, (7, 3)),
    (b"bytes=-30", 10, (0, 10)), (b"bytes=5-100", 10, (5, 5)), (b"bytes=10-", 10, "unsatisfiable"),
    (b"bytes=-0", 10, "unsatisfiable"), (b"bytes=0-1,3-4", 10, None), (b"bytes=3-2", 10, None),
    (b"items=0-1", 10, None), (b"bytes=x-1", 10, None), (b"bytes=", 10, None),
    (b"bytes=0-", 0, "unsatisfiable"),
])
def test_parse_range(value, size, want):
    assert hs.parse_range(value, size) == want


def test_pipelined_requests_answered_in_order(site):
    root, files = site
    s = session_for(root)
    s.feed(b"GET /f1.bin HTTP/1.1\r\nHost: x\r\n\r\nHEAD /f100.bin HTTP/1.1\r\nHost: t\r\n\r\n"
           b"GET /nope HTTP/1.1\r\nHost: t\r\n\r\nGET /f4096.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    rs = responses(s)
    assert [r.status for r in rs] == [200, 200, 404, 200]
    assert rs[0].file_count == 1
    assert rs[1].body == b"" and b"Content-Length: 100\r\n" in rs[1].head
    assert not any(r.close for r in rs)


@pytest.mark.parametrize("raw,status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: t\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(101))
     + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 20000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 30000, 431),          # never completed
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 70000\r\n\r\n", 413),
    (b"GET / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n8000\r\n" + b"z" * 0x8000
     + b"\r\n8000\r\n" + b"z" * 0x8000 + b"\r\n10\r\n" + b"z" * 16, 413),
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"\x16\x03\x01 not http\r\n\r\n", 400),
])
def test_limits_and_errors_close(site, raw, status):
    root, _ = site
    s = session_for(root)
    for i in range(0, len(raw), 4096):                # as a socket would deliver it
        s.feed(raw[i:i + 4096])
    rs = responses(s)
    assert rs[-1].status == status
    assert rs[-1].close and b"Connection: close\r\n" in rs[-1].head
    s.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert responses(s) == [], "nothing is parsed after a closing error"


def test_small_body_on_get_is_read_and_ignored(site):
    root, files = site
    s = session_for(root)
    s.feed(b"GET /f1.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello"
           b"GET /f100.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    rs = responses(s)
    assert [(r.status, r.file_count) for r in rs] == [(200, 1), (200, 100)]


def test_methods_and_versions(site):
    root, _ = site
    s = session_for(root)
    r = status_of(s, b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
    assert r.status == 405 and b"Allow: GET, HEAD\r\n" in r.head and not r.close
    r = status_of(s, b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    assert r.status == 200 and b"Connection: keep-alive\r\n" in r.head and not r.close
    r = status_of(s, b"GET / HTTP/1.0\r\n\r\n")
    assert r.status == 200 and r.close
    s = session_for(root)
    r = status_of(s, b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    assert r.close and b"Connection: close\r\n" in r.head


@pytest.mark.parametrize("target,status", [
    (b"/../etc/passwd", 400), (b"/%2e%2e/etc/passwd", 400), (b"/sub/%2E%2e/%2e%2E/x", 400),
    (b"/sub/./index.html", 400), (b"/f1.bin%00.txt", 400), (b"/escape.txt", 403),
    (b"/escape_dir/secret.txt", 403), (b"/escape_dir/", 403), (b"/link_inside.bin", 200),
    (b"/sub/../f1.bin", 400),
    (b"/a%20b.txt", 200), (b"/sub/", 200), (b"/sub", 301), (b"/empty/", 404),
    (b"/missing", 404), (b"/f1.bin/x", 404), (b"http://example/f1.bin", 200),
    (b"/sub/?q=1", 200), (b"*", 400),
])
@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "by-name"])
def test_paths(site, target, status, openat2):
    root, _ = site
    s = session_opening(root, openat2)
    r = status_of(s, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target)
    assert r.status == status, r.head
    if status == 301:
        assert b"Location: /sub/\r\n" in r.head


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "by-name"])
def test_absolute_symlink_inside_root(site, openat2):
    """openat2(RESOLVE_BENEATH) refuses absolute symlinks; by name they may point inside."""
    root, files = site
    s = session_opening(root, openat2)
    r = status_of(s, b"GET /abs_link_inside.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    assert r.status == (403 if openat2 else 200)


def test_listing_only_when_enabled(site):
    root, _ = site
    s = hs.HTTPSession(hs.StaticSite(str(root), listing=True), hs.Limits())
    r = status_of(s, b"GET /empty/ HTTP/1.1\r\nHost: t\r\n\r\n")
    assert r.status == 200 and b"Index of /empty/" in r.body


def test_conditional_and_range(site):
    root, files = site
    s = session_for(root)
    r = status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    head = dict(line.split(b": ", 1) for line in r.head.split(b"\r\n")[1:] if b": " in line)
    etag, lm = head[b"ETag"], head[b"Last-Modified"]
    assert status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\nIf-None-Match: %s\r\n\r\n"
                     % etag).status == 304
    assert status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"x\", %s\r\n\r\n"
                     % etag).status == 304
    assert status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\n"
                     b"If-None-Match: \"x\"\r\n\r\n").status == 200
    assert status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\nIf-Modified-Since: %s\r\n\r\n"
                     % lm).status == 304
    old = email.utils.formatdate(0, usegmt=True).encode()
    assert status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\nIf-Modified-Since: %s\r\n\r\n"
                     % old).status == 200
    # If-None-Match wins over If-Modified-Since
    assert status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\nIf-None-Match: \"x\"\r\n"
                     b"If-Modified-Since: %s\r\n\r\n" % lm).status == 200
    r = status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=10-19\r\n\r\n")
    assert (r.status, r.file_offset, r.file_count) == (206, 10, 10)
    assert b"Content-Range: bytes 10-19/4096\r\n" in r.head
    r = status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=5000-\r\n\r\n")
    assert r.status == 416 and b"Content-Range: bytes */4096\r\n" in r.head and not r.close
    r = status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\n"
                     b"Range: bytes=0-0\r\nIf-Range: \"old\"\r\n\r\n")
    assert r.status == 200 and r.file_count == 4096
    r = status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\n"
                     b"Range: bytes=0-0\r\nIf-Range: %s\r\n\r\n" % etag)
    assert r.status == 206
    # Range is for GET only (RFC 9110 section 14.2): HEAD tells the whole file's length
    r = status_of(s, b"HEAD /f4096.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=0-9\r\n\r\n")
    assert r.status == 200 and r.file_fd == -1 and b"Content-Length: 4096\r\n" in r.head
    # positions of any length (Python's int() refuses over 4300 digits)
    r = status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=10-%s\r\n\r\n"
                     % (b"9" * 5000))
    assert (r.status, r.file_offset, r.file_count) == (206, 10, 4086)
    r = status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=-%s\r\n\r\n"
                     % (b"9" * 5000))
    assert (r.status, r.file_offset, r.file_count) == (206, 0, 4096)
    r = status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=%s1-2\r\n\r\n"
                     % (b"0" * 5000))
    assert (r.status, r.file_offset, r.file_count) == (206, 1, 2)
    r = status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=%s-\r\n\r\n"
                     % (b"9" * 5000))
    assert r.status == 416 and not r.close
    r = status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\nRange: bytes=%s-%s\r\n\r\n"
                     % (b"2" + b"0" * 30, b"1" + b"0" * 30))    # last before first: ignored
    assert r.status == 200 and r.file_count == 4096


def test_a_name_too_long_for_the_file_system_is_not_found(site):
    """A path segment longer than a file name can be: 404 (no such file can exist), the
    connection kept; a target over max_request_line is what gets 414."""
    root, _ = site
    s = session_for(root)
    r = status_of(s, b"GET /" + b"n" * 300 + b" HTTP/1.1\r\nHost: t\r\n\r\n")
    assert r.status == 404 and not r.close


def test_if_range_date_only_when_strong(tmp_path):
    """If-Range with the Last-Modified date serves the range only when that date is a
    strong validator: not for a file modified within the last second (it may change
    again within the same date; RFC 9110 section 8.8.2.2)."""
    s = session_for(tmp_path)
    path = tmp_path / "f4096.bin"
    path.write_bytes(b"x" * 4096)

    def range_with_date():
        lm = email.utils.formatdate(int(path.stat().st_mtime), usegmt=True).encode()
        return status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\n"
                            b"Range: bytes=0-0\r\nIf-Range: %s\r\n\r\n" % lm)

    os.utime(path, (time.time() - 100, time.time() - 100))
    assert range_with_date().status == 206
    os.utime(path)                               # modified now
    r = range_with_date()
    assert r.status == 200 and r.file_count == 4096


def test_timeouts_logic(site):
    root, _ = site
    s = session_for(root, header_timeout=5, keepalive_timeout=20)
    t0 = s.since
    assert s.timed_out(t0 + 4) is None
    assert s.timed_out(t0 + 6) == "header"        # connected, nothing sent: slowloris
    s.feed(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    responses(s)
    t1 = s.since
    assert s.timed_out(t1 + 19) is None
    assert s.timed_out(t1 + 21) == "idle"
    s.sending(t1 + 60)          # the response took a minute to go out: idle from then on
    assert s.timed_out(t1 + 79) is None
    assert s.timed_out(t1 + 81) == "idle"
    s.feed(b"GET / HTTP/1.1\r\nHost")              # a head begun
    assert s.timed_out(s.since + 6) == "header"


def test_pipelined_heads_in_one_large_read_are_not_431(site):
    """Only the bytes of the head being received count toward its bound, not the whole
    read (64 KiB reads full of small pipelined requests are normal)."""
    root, _ = site
    s = session_for(root)
    one = b"GET /f1.bin HTTP/1.1\r\nHost: t\r\n\r\n"
    data = one * 2000 + b"GET /f1.bin HTTP/1.1\r\nHost: t\r\n"     # 68 KiB, last head open
    s.feed(data)
    s.feed(b"X-A: b\r\n")
    s.feed(b"\r\n")
    rs = responses(s)
    assert [r.status for r in rs] == [200] * 2001
    # the bound still holds for a head that keeps growing over several reads
    s.feed(one * 10 + b"GET / HTTP/1.1\r\nX-Big: ")
    for _ in range(8):
        s.feed(b"v" * 4096)
    rs = responses(s)
    assert [r.status for r in rs] == [200] * 10 + [431] and rs[-1].close


@pytest.mark.parametrize("raw,status", [
    (b"GET / HTTP/1.1\r\n\r\n", 400),                                   # no Host
    (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    (b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a@b\r\n\r\n", 400),
    (b"GET / HTTP/1.1\r\nHost: a\xffb\r\n\r\n", 400),
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
    (b"GET / HTTP/0.9\r\nHost: a\r\n\r\n", 505),
])
def test_host_and_version_checked(site, raw, status):
    root, _ = site
    s = session_for(root)
    r = status_of(s, raw)
    assert r.status == status and r.close, r.head


@pytest.mark.parametrize("host", [b"example.test", b"127.0.0.1:8080", b"[::1]:80", b""])
def test_valid_hosts_and_http10_without_host(site, host):
    root, _ = site
    s = session_for(root)
    assert status_of(s, b"GET / HTTP/1.1\r\nHost: %s\r\n\r\n" % host).status == 200
    assert status_of(s, b"GET / HTTP/1.0\r\n\r\n").status == 200


def test_unknown_method_is_501(site):
    root, _ = site
    s = session_for(root)
    r = status_of(s, b"PROPFIND / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert r.status == 501 and not r.close
    r = status_of(s, b"DELETE / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert r.status == 405


def test_trailers_are_not_headers(site):
    """A trailer field of a chunked body does not act as a request header."""
    root, _ = site
    s = session_for(root)
    r = status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"3\r\nabc\r\n0\r\nRange: bytes=0-0\r\n\r\n")
    assert r.status == 200 and r.file_count == 4096


def test_expect_100_continue_interim(site):
    root, _ = site
    s = session_for(root)
    s.feed(b"GET /f1.bin HTTP/1.1\r\nHost: t\r\n\r\n"
           b"GET /f100.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n"
           b"Expect: 100-continue\r\n\r\n")
    rs = responses(s)
    assert [r.status for r in rs] == [200, 100]        # in order, before the body comes
    assert rs[1].head == b"HTTP/1.1 100 Continue\r\n\r\n" and not rs[1].close
    s.feed(b"body")
    assert [(r.status, r.file_count) for r in responses(s)] == [(200, 100)]
    # no interim answer without a body, nor for HTTP/1.0
    s.feed(b"GET / HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\n\r\n"
           b"GET / HTTP/1.0\r\nContent-Length: 1\r\nExpect: 100-continue\r\n\r\nx")
    assert [r.status for r in responses(s)] == [200, 200]
    # nor when the body is refused anyway (the HTTP/1.0 request ended that session)
    s = session_for(root)
    r = status_of(s, b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 999999\r\n"
                     b"Expect: 100-continue\r\n\r\n")
    assert r.status == 413


@pytest.mark.parametrize("openat2", [True, False], ids=["openat2", "by-name"])
@pytest.mark.parametrize("target,location", [
    (b"//sub", b"/sub/"), (b"///sub?x=1", b"/sub/?x=1"), (b"/sub?a=%2F", b"/sub/?a=%2F"),
    (b"/sp%20ace", b"/sp%20ace/"), (b"http://evil.example//sub", b"/sub/"),
])
def test_redirect_location_is_built_not_echoed(site, target, location, openat2):
    """``GET //evil.example`` must not answer ``Location: //evil.example/`` (another host)."""
    root, _ = site
    (root / "sp ace").mkdir(exist_ok=True)
    s = session_opening(root, openat2)
    r = status_of(s, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target)
    assert r.status == 301 and b"\r\nLocation: %s\r\n" % location in r.head, r.head


@pytest.mark.parametrize("target", [b"http://example.test", b"http://example.test?q"])
def test_absolute_form_without_path_is_the_root(site, target):
    root, files = site
    s = session_for(root)
    r = status_of(s, b"GET %s HTTP/1.1\r\nHost: example.test\r\n\r\n" % target)
    assert r.status == 200 and r.file_count == len(files["/"])


@pytest.mark.parametrize("openat2", [True, False])
def test_the_root_of_the_file_system_as_root(tmp_path, openat2):
    """--root / serves files (by name, the check of the opened path once took "//" for
    the root's prefix and refused everything)."""
    (tmp_path / "x.txt").write_bytes(b"x\n")
    s = session_opening("/", openat2)
    target = urllib.parse.quote(str(tmp_path / "x.txt")).encode()
    r = status_of(s, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % target)
    assert r.status == 200 and r.file_count == 2


def test_dates_are_gmt_and_one_only(site, monkeypatch):
    """An asctime date (no zone) is GMT whatever the server's zone; a field with two
    dates (repeated fields are joined) or another zone is not a valid date and is
    ignored (RFC 9110 sections 5.6.7, 13.1.3)."""
    monkeypatch.setenv("TZ", "America/New_York")
    time.tzset()
    try:
        assert hs.parse_http_date(b"Sun Nov  6 08:49:37 1994") == 784111777
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()
    for bad in (b"Sun Nov  6 08:49:37 1994, Mon Nov  7 08:49:37 1994",
                b"Sun, 06 Nov 1994 08:49:37 +0200", b"Sun, 06 Nov 1994 08:49:37 EST"):
        assert hs.parse_http_date(bad) is None, bad
    assert hs.parse_http_date(b"Sunday, 06-Nov-94 08:49:37 GMT") == 784111777
    assert hs.parse_http_date(b"Sun, 06 Nov 1994 08:49:37 GMT") == 784111777
    both = b"Sun, 06 Nov 1994 08:49:37 GMT, Sun, 06 Nov 1994 08:49:37 GMT"
    assert hs.parse_http_date(both) is None
    root, _ = site
    s = session_for(root)
    assert status_of(s, b"GET /f100.bin HTTP/1.1\r\nHost: t\r\nIf-Modified-Since: %s\r\n\r\n"
                        % both).status == 200


def test_a_file_from_the_future_was_modified_now(tmp_path):
    path = tmp_path / "future.txt"
    path.write_bytes(b"soon\n")
    later = time.time() + 365 * 86400
    os.utime(path, (later, later))
    s = session_for(tmp_path)
    for extra in (b"", b"Range: bytes=0-1\r\n"):
        r = status_of(s, b"GET /future.txt HTTP/1.1\r\nHost: t\r\n%s\r\n" % extra)
        lm = r.head.split(b"Last-Modified: ", 1)[1].split(b"\r\n", 1)[0]
        assert hs.parse_http_date(lm) <= time.time() + 1


def test_suffix_range_of_an_empty_file_is_the_whole_empty_file(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    s = session_for(tmp_path)
    r = status_of(s, b"GET /empty.txt HTTP/1.1\r\nHost: t\r\nRange: bytes=-5\r\n\r\n")
    assert r.status == 200 and b"Content-Length: 0\r\n" in r.head
    r = status_of(s, b"GET /empty.txt HTTP/1.1\r\nHost: t\r\nRange: bytes=0-5\r\n\r\n")
    assert r.status == 416


def test_http10_request_with_transfer_encoding_closes_after_its_answer(site):
    """RFC 9112 section 6.1: its framing is faulty; answered, then the connection ends
    (the request after it is not)."""
    root, _ = site
    s = session_for(root)
    s.feed(b"GET /f100.bin HTTP/1.0\r\nConnection: keep-alive\r\n"
           b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
           b"GET /f1.bin HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    r = s.next_response()
    assert r.status == 200 and r.close and b"Connection: close\r\n" in r.head
    assert s.next_response() is None


def test_a_large_head_and_a_chunk_line_in_one_read_are_not_431(site):
    """Bytes of the head fed with the body's first chunk line do not count as bytes the
    body's framing held (the head's own bound applies to them)."""
    root, _ = site
    s = session_for(root)
    head = (b"POST /f1.bin HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n"
            + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 200) for i in range(45)) + b"\r\n")
    assert 9000 < len(head) < hs.Limits().max_header_bytes
    s.feed(b"GET /" + b"a" * 7000 + b" HTTP/1.1\r\nHost: t\r\n\r\n" + head + b"5\r\n")
    s.feed(b"hello\r\n0\r\n\r\n")
    assert [r.status for r in iter(s.next_response, None)] == [404, 405]


def test_limits_refuse_a_zero_file_budget():
    with pytest.raises(ValueError):
        hs.Limits(max_buffered_files=0)


def test_endless_trailer_field_is_refused(site):
    """A chunked body's trailer field that never ends is bounded as a header is (431),
    fed in small pieces as a slow client would."""
    root, _ = site
    s = session_for(root)
    s.feed(b"GET /f100.bin HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
           b"3\r\nabc\r\n0\r\nX-T: ")
    fed = 0
    while not s.done:
        s.feed(b"a" * 1000)
        fed += 1000
        assert fed < 100_000
    assert fed <= hs.Limits().max_header_bytes + 1000
    assert [r.status for r in iter(s.next_response, None)] == [431]


@pytest.mark.parametrize("date", [
    b"Mon, 01 Jan 2020 00:00:00 +99999999999999999999",
    b"Mon, 01 Jan 99999999999999999999 00:00:00 GMT",
    b"Mon, 99999999999999999999 Jan 2020 00:00:00 GMT",
    b"Mon, 31 Feb 2020 00:00:00 GMT", b"yesterday", b"",
])
def test_invalid_dates_are_ignored(site, date):
    root, _ = site
    s = session_for(root)
    for name in (b"If-Modified-Since", b"If-Unmodified-Since"):
        r = status_of(s, b"GET /f100.bin HTTP/1.1\r\nHost: t\r\n%s: %s\r\n\r\n" % (name, date))
        assert r.status == 200 and not r.close, (name, r.head)


def test_preconditions_412(site):
    root, _ = site
    s = session_for(root)
    r = status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\n\r\n")
    etag = r.head.split(b"ETag: ", 1)[1].split(b"\r\n", 1)[0]
    old = email.utils.formatdate(0, usegmt=True).encode()
    future = email.utils.formatdate(time.time() + 86400, usegmt=True).encode()

    def status(extra):
        return status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\n%s\r\n" % extra).status
    assert status(b"If-Match: \"other\"\r\n") == 412
    assert status(b"If-Match: \"other\", %s\r\n" % etag) == 200
    assert status(b"If-Match: W/%s\r\n" % etag) == 412        # a weak tag never matches
    assert status(b"If-Match: *\r\n") == 200
    assert status(b"If-Unmodified-Since: %s\r\n" % old) == 412
    assert status(b"If-Unmodified-Since: %s\r\n" % future) == 200
    # If-Match wins over If-Unmodified-Since
    assert status(b"If-Match: %s\r\nIf-Unmodified-Since: %s\r\n" % (etag, old)) == 200
    r = status_of(s, b"GET /f4096.bin HTTP/1.1\r\nHost: t\r\n"
                     b"If-Match: \"x\"\r\nRange: bytes=0-1\r\n\r\n")
    assert r.status == 412 and not r.close


def test_only_short_paths_are_cached(site):
    root, _ = site
    s = session_for(root)
    long = b"/nope" + b"/xx" * 1300
    assert status_of(s, b"GET %s HTTP/1.1\r\nHost: t\r\n\r\n" % long).status == 404
    assert status_of(s, b"GET /f1.bin HTTP/1.1\r\nHost: t\r\n\r\n").status == 200
    assert b"/f1.bin" in s.site._paths and long not in s.site._paths


def test_listing_names_that_are_not_utf8(site):
    root, _ = site
    d = root / "odd"
    d.mkdir(exist_ok=True)
    name = b"\xff\xfe<b>.txt"
    with open(os.path.join(os.fsencode(d), name), "wb") as f:
        f.write(b"odd\n")
    s = hs.HTTPSession(hs.StaticSite(str(root), listing=True), hs.Limits())
    r = status_of(s, b"GET /odd/ HTTP/1.1\r\nHost: t\r\n\r\n")
    assert r.status == 200 and b'href="%FF%FE%3Cb%3E.txt"' in r.body, r.body
    assert b"&lt;b&gt;" in r.body and b"<b>" not in r.body
    r = status_of(s, b"GET /odd/%FF%FE%3Cb%3E.txt HTTP/1.1\r\nHost: t\r\n\r\n")
    assert r.status == 200 and r.file_count == 4


def test_out_of_fds_is_503_not_404(site):
    """EMFILE while opening a file is the server's trouble: 503, and the next request,
    once fds are free, is served. (A child process: it lowers its own fd limit.)"""
    root, _ = site
    code = f"""
import os, resource, sys
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_http_server import session_for, responses
s = session_for({str(root)!r})
held = []
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
s.feed(b"GET /f100.bin HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n")
first = [r.status for r in responses(s)]
for fd in held:
    os.close(fd)
s.feed(b"GET /f100.bin HTTP/1.1\\r\\nHost: t\\r\\n\\r\\n")
print(first, [r.status for r in responses(s)])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=str(Path(__file__).parent))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[503] [200]", r.stdout + r.stderr


# ------------------------------------------------------------------ over sockets

@pytest.fixture
def serve(engine, site):
    """Start the static server on the test's engine: serve(workers=0, **limits)."""
    root, _ = site
    apps = []

    def start(workers=0, sweep=0.05, **limits):
        app = hs.HTTPServer(engine, hs.StaticSite(str(root)), hs.Limits(**limits))
        app.start_sweeping(sweep)
        srv = engine.serve_tcp(app.handler, "127.0.0.1", 0, workers=workers)
        apps.append(app)
        return app, srv.port

    yield start
    for app in apps:
        app.close()


WORKERS = [pytest.param(0, id="workers0"), pytest.param(2, id="workers2")]


@pytest.mark.parametrize("workers", WORKERS)
def test_curl_downloads_byte_exact(serve, site, tmp_path, workers):
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed (make deps installs it)")
    _, files = site
    _, port = serve(workers)
    urls, outs = [], []
    for name in files:
        urls.append(f"http://127.0.0.1:{port}{name}")
        outs.append(tmp_path / f"out{len(outs)}")
    args = [curl, "--http1.1", "-sS", "--fail", "--max-time", "60"]
    for u, o in zip(urls, outs):                 # one curl, one keep-alive connection
        args += ["-o", str(o), u]
    subprocess.run(args, check=True, timeout=90)
    for name, o in zip(files, outs):
        assert hashlib.sha256(o.read_bytes()).digest() == hashlib.sha256(files[name]).digest(), name
    # a range and a conditional request
    r = subprocess.run([curl, "-sS", "-r", "100-199", f"http://127.0.0.1:{port}/f65536.bin"],
                       check=True, capture_output=True, timeout=30)
    assert r.stdout == files["/f65536.bin"][100:200]
    r = subprocess.run([curl, "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-z",
                        email.utils.formatdate(time.time() + 3600, usegmt=True),
                        f"http://127.0.0.1:{port}/f1.bin"],
                       check=True, capture_output=True, timeout=30)
    assert r.stdout == b"304"


@pytest.mark.parametrize("workers", WORKERS)
def test_http_client_keepalive(serve, site, workers):
    _, files = site
    app, port = serve(workers)
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        for name in ["/f4096.bin", "/", "/f1.bin", "/f1048576.bin", "/f0.bin"]:
            c.request("GET", name)
            r = c.getresponse()
            assert r.status == 200 and r.read() == files[name]
        c.request("HEAD", "/f65536.bin")
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Length") == "65536" and r.read() == b""
        etag = r.getheader("ETag")
        c.request("GET", "/f65536.bin", headers={"If-None-Match": etag})
        r = c.getresponse()
        assert r.status == 304 and r.read() == b""
        c.request("GET", "/nope")
        r = c.getresponse()
        assert r.status == 404
        r.read()
        assert len(app.handlers) == 1            # all of it on one connection
    finally:
        c.close()
    wait_until(lambda: not app.handlers)


@pytest.mark.parametrize("workers", WORKERS)
def test_pipelining_in_order(serve, site, workers):
    """200 requests sent at once, responses parsed by h11 in order, bodies exact."""
    _, files = site
    app, port = serve(workers, max_buffered_output=256 * 1024)
    rng = random.Random(5)
    names = [rng.choice(list(files) + ["/missing"]) for _ in range(200)]
    methods = [rng.choice(["GET", "GET", "HEAD"]) for _ in names]
    raw = b"".join(f"{m} {n} HTTP/1.1\r\nHost: t\r\n\r\n".encode() for m, n in zip(methods, names))
    client = h11.Connection(h11.CLIENT)
    with connect(("127.0.0.1", port), timeout=30) as s:
        s.sendall(raw)
        for m, n in zip(methods, names):
            client.send(h11.Request(method=m, target=n, headers=[("Host", "t")]))
            client.send(h11.EndOfMessage())
            status, body = None, bytearray()
            while True:
                ev = client.next_event()
                if ev is h11.NEED_DATA:
                    client.receive_data(s.recv(1 << 20))
                    continue
                if isinstance(ev, h11.Response):
                    status = ev.status_code
                elif isinstance(ev, h11.Data):
                    body += ev.data
                elif isinstance(ev, h11.EndOfMessage):
                    break
            want = 404 if n == "/missing" else 200
            assert status == want, (m, n)
            if want == 200:
                assert bytes(body) == (b"" if m == "HEAD" else files[n]), (m, n)
            client.start_next_cycle()


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def read_response(s):
    data = recv_until_eof(s)
    return data


@pytest.mark.parametrize("raw,status", [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\nHost: t\r\nX-Big: " + b"v" * 40000 + b"\r\n\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\n\r\n", 413),
    (b"NOT-HTTP\r\n\r\n", 400),
])
def test_limits_over_socket(serve, raw, status):
    _, port = serve()
    with connect(("127.0.0.1", port)) as s:
        s.sendall(raw)
        data = read_response(s)           # the server closes after the error
    assert data.startswith(b"HTTP/1.1 %d " % status), data[:80]
    assert b"Connection: close\r\n" in data


def test_slow_header_gets_408_and_close(serve):
    _, port = serve(header_timeout=0.3)
    with connect(("127.0.0.1", port)) as s:
        t0 = time.monotonic()
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nHo")
        for _ in range(3):                # dribbling bytes does not extend the deadline
            time.sleep(0.05)
            s.sendall(b"s")
        data = read_response(s)
        assert time.monotonic() - t0 < 5
    assert data.startswith(b"HTTP/1.1 408 "), data[:80]


def test_idle_keepalive_closed(serve, site):
    _, files = site
    app, port = serve(keepalive_timeout=0.3)
    with connect(("127.0.0.1", port)) as s:
        s.sendall(b"GET /f1.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        data = read_response(s)           # the response, then EOF once idle too long
    assert data.startswith(b"HTTP/1.1 200 ") and data.endswith(files["/f1.bin"])
    wait_until(lambda: not app.handlers)


def test_client_that_never_reads_is_aborted(serve, site):
    root, _ = site
    (root / "big2.bin").write_bytes(b"\0" * (32 << 20))
    app, port = serve(send_timeout=0.3, sweep=0.1)
    with connect(("127.0.0.1", port), rcvbuf=4096) as s:
        s.sendall(b"GET /big2.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: app.handlers)
        wait_until(lambda: not app.handlers, timeout=10)   # aborted, not left hanging
        got = recv_until_eof(s)
    assert 0 < len(got) < 32 << 20


def test_too_many_connections(serve):
    app, port = serve(max_connections=2)
    with connect(("127.0.0.1", port)) as a, connect(("127.0.0.1", port)) as b:
        wait_until(lambda: len(app.handlers) == 2)
        with connect(("127.0.0.1", port)) as c:
            assert read_response(c).startswith(b"HTTP/1.1 503 ")
        for s in (a, b):                  # the first two are still served
            s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            assert s.recv(100).startswith(b"HTTP/1.1 200 ")


def test_ten_thousand_short_connections(serve, engine, site):
    """10,000 connections of one request each; afterwards no fd growth, no handler."""
    _, files = site
    app, port = serve()
    want = files["/f100.bin"]

    def client(n):
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
                s.sendall(b"GET /f100.bin HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                data = recv_until_eof(s)
                assert data.endswith(want) and data.startswith(b"HTTP/1.1 200 ")

    def run(total):
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for f in [pool.submit(client, total // 4) for _ in range(4)]:
                f.result()

    run(400)                              # warm up: lazily created pools, buffers...
    wait_until(lambda: not app.handlers)
    fds = len(open_fds())
    run(10_000)
    wait_until(lambda: not app.handlers, timeout=20)
    wait_until(lambda: engine.stats().connections == 0)
    assert len(open_fds()) <= fds, "fds grew over 10,000 connections"


def test_large_file_to_slow_reader_is_bounded(serve, engine, site):
    """A 24 MiB file to a reader that stalls: the engine holds the file, not its bytes."""
    root, _ = site
    body = random.Random(3).randbytes(24 << 20)
    (root / "big.bin").write_bytes(body)
    app, port = serve()
    with connect(("127.0.0.1", port), rcvbuf=8192) as s:
        rss0 = rss()
        s.sendall(b"GET /big.bin HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_until(lambda: engine.stats().bytes_out > 0)
        time.sleep(0.2)
        assert engine.stats().send_queued > 16 << 20          # queued as a file,
        assert rss() - rss0 < 4 << 20                         # not held in memory
        data = b""
        head_end = -1
        while head_end < 0 or len(data) - head_end - 4 < len(body):
            data += s.recv(1 << 20)
            head_end = data.find(b"\r\n\r\n")
        assert data[head_end + 4:] == body


def read_h11_responses(s, client, n):
    """``n`` responses from socket ``s`` through the h11 ``client``: [(status, body)]."""
    out = []
    for _ in range(n):
        client.send(h11.Request(method="GET", target="/", headers=[("Host", "t")]))
        client.send(h11.EndOfMessage())
        status, body = None, bytearray()
        while True:
            ev = client.next_event()
            if ev is h11.NEED_DATA:
                client.receive_data(s.recv(1 << 20))
            elif isinstance(ev, h11.Response):
                status = ev.status_code
            elif isinstance(ev, h11.Data):
                body += ev.data
            elif isinstance(ev, h11.EndOfMessage):
                break
        out.append((status, bytes(body)))
        client.start_next_cycle()
    return out


@pytest.mark.parametrize("workers", WORKERS)
def test_pipelined_output_is_bounded(serve, engine, site, workers):
    """30 pipelined 1 MiB responses to a client that does not read: no more than about
    max_buffered_output is queued at once, with workers too (their sends are posted to
    the engine and not in the connection's queue yet when the next response is due)."""
    _, files = site
    app, port = serve(workers, max_buffered_output=256 * 1024)
    n = 30
    with connect(("127.0.0.1", port), rcvbuf=8192) as s:
        s.sendall(b"GET /f1048576.bin HTTP/1.1\r\nHost: t\r\n\r\n" * n)
        s.shutdown(socket.SHUT_WR)              # all answered all the same, then EOF
        wait_until(lambda: engine.stats().bytes_out > 0)
        time.sleep(0.3)
        queued = engine.stats().send_queued
        assert 0 < queued <= 2 << 20, queued
        got = read_h11_responses(s, h11.Connection(h11.CLIENT), n)
        assert s.recv(100) == b""
    assert got == [(200, files["/f1048576.bin"])] * n


@pytest.mark.parametrize("workers", WORKERS)
def test_pipelined_small_files_without_reading_hold_few_fds(engine, serve, site, workers):
    """Each file body queued holds a file descriptor (the engine's copy): a client that
    pipelines thousands of requests for a 1-byte file and reads nothing makes the server
    wait after the first one, not hold an fd per response; then it gets them all."""
    _, files = site
    app, port = serve(workers)
    n = 8000                                 # 2 MB of answers, over the kernel's buffers
    with connect(("127.0.0.1", port), rcvbuf=4096) as s:
        fds0 = open_fds()
        s.sendall(b"GET /f1.bin HTTP/1.1\r\nHost: t\r\n\r\n" * n)
        s.shutdown(socket.SHUT_WR)
        wait_until(lambda: engine.stats().bytes_out > 0)
        time.sleep(0.3)
        assert len(open_fds() - fds0) <= 4
        got = read_h11_responses(s, h11.Connection(h11.CLIENT), n)
        assert s.recv(100) == b""
    assert got == [(200, files["/f1.bin"])] * n


@pytest.mark.parametrize("workers", WORKERS)
def test_hello_answers_an_upgrade_offer_then_closes(engine, workers):
    handler = hs.ThreadedHelloHandler if workers else hs.HelloHandler
    srv = engine.serve_tcp(handler, "127.0.0.1", 0, workers=workers)
    with connect(("127.0.0.1", srv.port)) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\n"
                  b"Upgrade: websocket\r\n\r\nnot http")
        assert recv_until_eof(s) == hs.HelloHandler.RESPONSE


@pytest.mark.parametrize("workers", WORKERS)
def test_hello_flood_without_reading_is_bounded(engine, workers):
    """--hello: a client pipelining requests without reading its answers makes the
    server stop reading, not queue replies without end."""
    handler = hs.ThreadedHelloHandler if workers else hs.HelloHandler
    srv = engine.serve_tcp(handler, "127.0.0.1", 0, workers=workers)
    port = srv.port
    n = 150_000                               # 4 MB of requests, 11.7 MB of replies
    req = b"GET / HTTP/1.1\r\nHost: b\r\n\r\n"
    with connect(("127.0.0.1", port), rcvbuf=8192) as s:
        def send_all():
            s.sendall(req * n)
            s.shutdown(socket.SHUT_WR)          # the EOF comes after requests still held

        sender = concurrent.futures.ThreadPoolExecutor(1)
        sent = sender.submit(send_all)
        wait_until(lambda: engine.stats().bytes_out > 0)
        time.sleep(0.5)
        queued = engine.stats().send_queued   # (the kernel's socket buffers hold more)
        assert queued <= 2 << 20, queued
        want = len(hs.HelloHandler.RESPONSE) * n
        got = 0
        while True:                              # every reply, then the server's EOF
            b = s.recv(1 << 20)
            if not b:
                break
            got += len(b)
        sent.result(timeout=30)
        sender.shutdown()
    assert got == want


@pytest.mark.parametrize("workers", WORKERS)
def test_expect_100_continue_over_socket(serve, site, workers):
    _, files = site
    _, port = serve(workers)
    with connect(("127.0.0.1", port)) as s:
        s.sendall(b"GET /f100.bin HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        got = b""
        while len(got) < len(hs.CONTINUE):
            got += s.recv(100)
        assert got == hs.CONTINUE           # and nothing else until the body is sent
        s.sendall(b"hello")
        got = read_h11_responses(s, h11.Connection(h11.CLIENT), 1)
    assert got == [(200, files["/f100.bin"])]


class ServerProcess:
    """The example run as a program: ``python examples/http_server.py ARGS 0``."""

    def __init__(self, backend, *args, **popen):
        self.proc = subprocess.Popen(
            [sys.executable, str(EXAMPLES / "http_server.py"), "--backend", backend, *args, "0"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)
        line = self.proc.stdout.readline().decode()
        assert line.startswith("listening on 127.0.0.1:"), (line, self.stop())
        self.port = int(line.rsplit(":", 1)[1])

    def stop(self):
        self.proc.terminate()
        try:
            out, err = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return err.decode()


def test_hello_mode_program(backend):
    server = ServerProcess(backend, "--hello")
    try:
        with connect(("127.0.0.1", server.port)) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n" * 3)
            got = b""
            while len(got) < 3 * 78:
                got += s.recv(4096)
        one = (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 13\r\n\r\n"
               b"Hello, World!")
        assert len(one) == 78 and got == one * 3
    finally:
        server.stop()


def test_demo_site_program_with_access_log(backend):
    server = ServerProcess(backend, "--access-log")
    try:
        c = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        c.request("GET", "/")
        r = c.getresponse()
        assert r.status == 200 and r.read() == (EXAMPLES / "demo_site" / "index.html").read_bytes()
        c.request("GET", "/hello.txt", headers={"Range": "bytes=0-4"})
        r = c.getresponse()
        assert r.status == 206 and r.read() == b"Hello"
        c.close()
        with connect(("127.0.0.1", server.port)) as s:    # a quote cannot forge a field
            s.sendall(b'GET /x"y" HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n')
            assert recv_until_eof(s).startswith(b"HTTP/1.1 404 ")
    finally:
        err = server.stop()
    assert '"GET / HTTP/1.1" 200 ' in err and '"GET /hello.txt HTTP/1.1" 206 5' in err, err
    assert '"GET /x\\"y\\" HTTP/1.1" 404 ' in err, err


def test_max_connections_fit_the_fd_limit(backend):
    """With a low fd limit the program lowers --max-connections (and says so) rather than
    fail with EMFILE; the connections beyond it get a 503."""
    import resource

    def low_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))

    server = ServerProcess(backend, "--max-connections", "10000", preexec_fn=low_limit)
    try:
        socks = [connect(("127.0.0.1", server.port)) for _ in range(45)]   # (200 - 64) // 3
        try:
            for s in socks[:3]:
                s.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: t\r\n\r\n")
                assert s.recv(100).startswith(b"HTTP/1.1 200 ")
            with connect(("127.0.0.1", server.port)) as extra:
                assert recv_until_eof(extra).startswith(b"HTTP/1.1 503 ")
        finally:
            for s in socks:
                s.close()
    finally:
        err = server.stop()
    assert "allows --max-connections 45, not 10000" in err, err
