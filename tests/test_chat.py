"""examples/chat_server.py: the chat logic without sockets, then the server on real
loopback sockets (every backend): rooms and nicknames, byte-exact fan-out in one order for
all, over-long lines, slow readers disconnected with bounded memory, the script itself."""
from __future__ import annotations

import importlib.util
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Optional, Union

import pytest
from support import connect, on_engine_thread, recv_until_eof, wait_until

pytestmark = [pytest.mark.linux, pytest.mark.timeout(60)]

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "examples" / "chat_server.py"

# Loaded from its file: putting examples/ first on sys.path would let examples/copy.py
# shadow the standard library's ``copy``. Registered before it runs (dataclasses look
# the module up in sys.modules).
_spec = importlib.util.spec_from_file_location("proactor_example_chat", SCRIPT)
chat_server = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = chat_server
_spec.loader.exec_module(chat_server)

Chat = chat_server.Chat
Limits = chat_server.Limits

WELCOME = chat_server.WELCOME
TOO_SLOW = chat_server.TOO_SLOW


# ============================================================================ without sockets
class FakePeer:
    """A client for :class:`Chat` alone: records what is written. ``stuck`` peers read
    nothing, so everything written to them stays in their backlog."""

    def __init__(self, name: str = "peer", stuck: bool = False) -> None:
        self.name = name
        self.stuck = stuck
        self.out = bytearray()
        self.queued = 0
        self.closed = False
        self.pauses: list[float] = []

    def write(self, data: bytes) -> None:
        assert not self.closed, f"{self.name}: write after close: {data!r}"
        assert type(data) is bytes
        self.out += data
        if self.stuck:
            self.queued += len(data)

    def backlog(self) -> int:
        return self.queued

    def close(self) -> None:
        assert not self.closed, f"{self.name}: closed twice"
        self.closed = True

    def pause(self, seconds: float) -> None:
        assert seconds > 0
        self.pauses.append(seconds)

    def take(self) -> list[str]:
        """The lines written since the last take()."""
        text = self.out.decode()
        self.out.clear()
        assert text == "" or text.endswith("\n"), text
        return text.splitlines()

    def __str__(self) -> str:
        return self.name


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_chat(**limits: Any) -> tuple[Chat, Clock]:
    limits.setdefault("rate", 0)
    clock = Clock()
    return Chat(Limits(**limits), clock=clock), clock


def join(chat: Chat, nick: str, stuck: bool = False) -> tuple[Any, FakePeer]:
    """A client that has chosen ``nick`` (and is in the lobby); its output is taken."""
    p = FakePeer(nick, stuck=stuck)
    s = chat.connect(p)
    chat.receive(s, f"{nick}\n".encode())
    assert p.take() == [WELCOME.decode().rstrip("\n"), f"* hello {nick}",
                        f"* {nick} joined lobby"]
    return s, p


def say(chat: Chat, s: Any, text: Union[str, bytes], turn: bool = True) -> None:
    """``s`` sends ``text`` (a line if str); then, with ``turn``, the engine's turn ends
    (what was queued then had the time to reach the kernel two turns later)."""
    chat.receive(s, text if isinstance(text, bytes) else text.encode() + b"\n")
    if turn:
        chat.next_turn()


def test_first_line_is_the_nickname_then_lobby():
    chat, _ = make_chat()
    a, pa = join(chat, "alice")
    b, pb = join(chat, "Bob")
    assert pa.take() == ["* Bob joined lobby"]
    assert chat.rooms == {"lobby": {a: None, b: None}}
    assert set(chat.names) == {"alice", "bob"}


def test_message_goes_to_the_whole_room_sender_included():
    chat, _ = make_chat()
    a, pa = join(chat, "alice")
    b, pb = join(chat, "bob")
    pa.take()
    say(chat, a, "hi there  ")
    assert pa.take() == pb.take() == ["[lobby] alice: hi there  "]
    say(chat, b, "//join is not a command here")
    assert pa.take() == pb.take() == ["[lobby] bob: /join is not a command here"]
    say(chat, b, "héllo ☃ 日本")
    assert pb.out == pa.out == "[lobby] bob: héllo ☃ 日本\n".encode()


def test_lines_split_anywhere_and_crlf():
    """Byte by byte, in one chunk, with \\r\\n: the same lines; empty lines are ignored."""
    chat, _ = make_chat()
    a, pa = join(chat, "alice")
    data = "one\r\n\n  \r\ntwo ☃\nthree\r\n".encode()
    for i in range(len(data)):
        chat.receive(a, data[i:i + 1])
    one_by_one = pa.take()
    chat.receive(a, data)
    assert pa.take() == one_by_one == ["[lobby] alice: one", "[lobby] alice: two ☃",
                                       "[lobby] alice: three"]
    assert a.buffered == 0


@pytest.mark.parametrize("name", ["", "1abc", "a b", "é", "x" * 17, "a/b", "a.b", "_x"])
def test_bad_nicknames_are_refused(name):
    chat, _ = make_chat()
    p = FakePeer()
    s = chat.connect(p)
    p.take()
    chat.receive(s, f"/nick {name}\n".encode())
    assert p.take() == [chat_server.BAD_NICK.decode().rstrip("\n")]
    assert s.nick is None and not chat.names and not chat.rooms
    assert s.open


def test_nicknames_are_unique_regardless_of_case():
    chat, _ = make_chat()
    a, pa = join(chat, "alice")
    p = FakePeer()
    s = chat.connect(p)
    p.take()
    say(chat, s, "ALICE")
    assert p.take() == ["! the nickname ALICE is taken"]
    assert s.nick is None
    say(chat, s, "a" * 16)                   # the longest
    assert p.take() == [f"* hello {'a' * 16}", f"* {'a' * 16} joined lobby"]
    say(chat, a, "/nick Alice")               # one's own, in another case: fine
    assert pa.take() == ["* a" + "a" * 15 + " joined lobby", "* alice is now Alice"]
    say(chat, a, "/nick Alice")
    assert pa.take() == ["! you are Alice already"]
    say(chat, s, "/nick alice")
    assert p.take() == ["* alice is now Alice", "! the nickname alice is taken"]
    say(chat, a, "/nick al")
    assert p.take() == pa.take() == ["* Alice is now al"]
    say(chat, s, "/nick ALICE")                # freed by the rename
    assert p.take() == pa.take() == [f"* {'a' * 16} is now ALICE"]
    assert set(chat.names) == {"al", "alice"}


def test_commands_before_a_nickname():
    chat, _ = make_chat()
    p = FakePeer()
    s = chat.connect(p)
    p.take()
    for cmd in ("/join x", "/who", "/rooms"):
        say(chat, s, cmd)
        assert p.take() == ["! choose a nickname first"]
    say(chat, s, "/HELP")
    assert p.out == chat_server.HELP
    p.take()
    say(chat, s, "/quit")
    assert p.take() == ["* bye"] and p.closed and not s.open


def test_join_leave_rooms_who():
    chat, _ = make_chat()
    a, pa = join(chat, "alice")
    b, pb = join(chat, "bob")
    c, pc = join(chat, "carol")
    pa.take(), pb.take()
    say(chat, b, "/join Games")
    assert pa.take() == pc.take() == ["* bob left lobby"]
    assert pb.take() == ["* bob joined games"]
    say(chat, c, "/join games")
    assert pb.take() == pc.take() == ["* carol joined games"]
    assert pa.take() == ["* carol left lobby"]
    assert "lobby" in chat.rooms
    say(chat, a, "/join games")
    assert "lobby" not in chat.rooms            # empty rooms go away
    say(chat, a, "/join lobby")
    say(chat, b, "in games")
    assert pb.take() == pc.take() == ["* alice joined games", "* alice left games",
                                      "[games] bob: in games"]
    assert pa.take() == ["* alice joined games", "* alice joined lobby"]
    say(chat, b, "/join games")
    say(chat, b, "/join bad.room")
    say(chat, b, "/join " + "r" * 25)
    assert pb.take() == ["! you are in games already"] + 2 * [
        chat_server.BAD_ROOM.decode().rstrip("\n")]
    say(chat, a, "/rooms")
    say(chat, c, "/WHO")
    say(chat, a, "/frobnicate")
    assert pa.take() == ["* rooms: games (2), lobby (1)",
                         "! unknown command; /help lists them"]
    assert pc.take() == ["* in games (2): bob, carol"]


def test_long_listings_are_cut():
    chat, _ = make_chat()
    sessions = [join(chat, f"u{i:03d}") for i in range(chat_server.MAX_LISTED + 3)]
    s, p = sessions[0]
    p.take()
    say(chat, s, "/who")
    names = ", ".join(f"u{i:03d}" for i in range(chat_server.MAX_LISTED))
    assert p.take() == [f"* in lobby ({chat_server.MAX_LISTED + 3}): {names}, and 3 more"]


def test_quit_eof_and_lost_tell_the_room():
    chat, _ = make_chat()
    a, pa = join(chat, "alice")
    b, pb = join(chat, "bob")
    c, pc = join(chat, "carol")
    pa.take(), pb.take()
    say(chat, b, "/quit")
    assert pb.take() == ["* bye"] and pb.closed
    assert pa.take() == pc.take() == ["* bob quit"]
    assert "bob" not in chat.names and b in chat.sessions    # until the connection is gone
    chat.lost(b)
    assert b not in chat.sessions and pa.take() == []
    chat.receive(c, b"last words without a newline")
    chat.eof(c)
    assert pc.take() == ["[lobby] carol: last words without a newline"] and pc.closed
    assert pa.take() == ["[lobby] carol: last words without a newline", "* carol quit"]
    chat.lost(c)
    chat.lost(a)                               # the connection broke
    assert not chat.sessions and not chat.names and not chat.rooms
    assert not pa.closed                       # nothing is written or closed after lost()


def test_bad_text_is_refused_not_sent():
    chat, _ = make_chat()
    a, pa = join(chat, "alice")
    b, pb = join(chat, "bob")
    pa.take()
    say(chat, a, b"caf\xe9\n")
    say(chat, a, "beep\x07")
    say(chat, a, "\x1b[2Jclear screen")
    say(chat, a, "c1\x9bcontrol")
    say(chat, a, "bob: \u202eevil")             # right-to-left override
    say(chat, a, "two\u2028lines")              # line separator
    say(chat, a, "iso\u2067late")               # right-to-left isolate
    assert pa.take() == [chat_server.NOT_UTF8.decode().rstrip("\n")] + 6 * [
        chat_server.CONTROL.decode().rstrip("\n")]
    say(chat, a, "tab\tis fine")
    assert pb.take() == ["[lobby] alice: tab\tis fine"]


@pytest.mark.parametrize("pieces", [1, 7, 100], ids=lambda n: f"chunks{n}")
def test_over_long_line_without_newline_is_refused_early(pieces):
    """The input held for a client never exceeds max_line + 1 (+ one chunk while it is
    being looked at): without a newline by then, it is disconnected."""
    limit = 100
    chat, _ = make_chat(max_line=limit)
    a, pa = join(chat, "alice")
    b, pb = join(chat, "bob")
    pa.take()
    data = b"x" * 5000
    step = -(-len(data) // pieces)
    for i in range(0, len(data), step):
        chat.receive(b, data[i:i + step])
        assert b.buffered <= limit + 1
        if not b.open:
            break
    assert i < limit + 1 + step               # noticed as soon as the line is over
    assert pb.take() == ["! line too long (the limit is 100 bytes); goodbye"] and pb.closed
    assert pa.take() == ["* bob was disconnected (line too long)"]
    chat.receive(b, b"more\n")                 # ignored after the hang-up
    assert pa.take() == []


def test_line_length_boundary():
    limit = 64
    chat, _ = make_chat(max_line=limit)
    a, pa = join(chat, "alice")
    ok = "y" * limit
    chat.receive(a, ok.encode() + b"\r")      # all of it, but the newline: still waiting
    assert a.open and a.buffered == limit + 1
    chat.receive(a, b"\n" + ok.encode() + b"\n")
    assert pa.take() == [f"[lobby] alice: {ok}"] * 2
    chat.receive(a, ok.encode() + b"z\r\n")   # one byte too many, in a complete line
    assert not a.open and pa.closed
    assert pa.take() == ["! line too long (the limit is 64 bytes); goodbye"]


def test_a_stuck_member_is_disconnected_the_others_get_everything():
    """A member whose queue is still over max_output slow_grace after it went over is
    disconnected at the next line for it; the others get every line and the notice."""
    chat, clock = make_chat(max_output=8192, max_line=1024)
    a, pa = join(chat, "alice")
    b, pb = join(chat, "bob", stuck=True)
    c, pc = join(chat, "carol")
    pa.take(), pb.take()
    msgs = [f"{i:03d} " + "m" * 900 for i in range(20)]
    size = len(f"[lobby] alice: {msgs[0]}\n")
    over = next(i for i in range(20) if (i + 1) * size > 8192)   # the line taking it over
    for m in msgs:
        say(chat, a, m)
        clock.now += 0.25
    lines = pa.take()
    assert lines == pc.take()
    # the notice follows the first message bob could not take: 1 s after it went over
    kick = lines.index("* bob was disconnected (too slow)")
    assert lines[:kick] + lines[kick + 1:] == [f"[lobby] alice: {m}" for m in msgs]
    assert kick == over + 4 + 1
    got = pb.take()
    assert got == [f"[lobby] alice: {m}" for m in msgs[:kick - 1]] + [
        TOO_SLOW.decode().rstrip("\n")]
    assert pb.closed and not b.open and b.room is None and "bob" not in chat.names
    chat.lost(b)
    assert b not in chat.sessions


def test_a_burst_over_max_output_is_not_slow_if_it_drains():
    """Lines queued in one go may take a member over max_output for a moment (they have
    not reached the kernel yet): it is disconnected only if still over slow_grace later,
    or at once past hard_output."""
    chat, clock = make_chat(max_output=8192, max_line=1024)
    a, pa = join(chat, "alice")
    b, pb = join(chat, "bob", stuck=True)
    for _ in range(3):
        for _ in range(20):                       # 18 KB in one turn: over max_output
            say(chat, a, "z" * 900, turn=False)
        chat.next_turn()
        assert b.open and pb.queued > 8192
        clock.now += 5
        pb.queued = 0                             # the engine sent it all meanwhile
        say(chat, a, "z")                         # under the limit again: forgiven
        assert b.open
    for _ in range(100):                          # 90 KB in one turn: not judged yet
        say(chat, a, "z" * 900, turn=False)
    assert b.open
    chat.next_turn()
    chat.next_turn()
    say(chat, a, "z")                             # two turns later: past 4 x max_output
    assert not b.open and pb.closed


def test_many_slow_members_at_once_are_told_in_one_line():
    """Disconnecting many members at once is one notice to the room, not one each (and
    no recursion however many there are)."""
    chat, _ = make_chat(max_output=8192, max_line=1024, max_clients=1000)
    a, pa = join(chat, "alice")
    stuck = [join(chat, f"s{i}", stuck=True) for i in range(400)]
    pa.take()
    for _, p in stuck:
        p.queued = chat.limits.hard_output + 1    # all full, for two turns now
    chat.next_turn()
    chat.next_turn()
    say(chat, a, "hello")
    assert all(p.closed and not s.open for s, p in stuck)
    lines = pa.take()
    assert lines[0] == "[lobby] alice: hello"
    assert lines[1].startswith("* s0, s1, ") and lines[1].endswith(
        ", and 350 more were disconnected (too slow)")
    assert len(lines) == 2 and sorted(chat.names) == ["alice"]


def test_a_stuck_sender_is_disconnected_by_its_own_message():
    chat, _ = make_chat(max_output=8192, max_line=1024)
    a, pa = join(chat, "alice", stuck=True)
    b, pb = join(chat, "bob")
    pa.take()
    n = 0
    while a.open:
        say(chat, a, "z" * 1000)
        n += 1
        assert n < 40
    got = pb.take()
    assert got == [f"[lobby] alice: {'z' * 1000}"] * n + ["* alice was disconnected (too slow)"]
    assert pa.out.endswith(TOO_SLOW) and pa.closed


def test_a_stuck_client_is_disconnected_by_a_reply_too():
    chat, _ = make_chat(max_output=4096 + 64, max_line=64)
    a, pa = join(chat, "alice", stuck=True)
    while a.open:
        say(chat, a, "/help")
    assert pa.out.endswith(TOO_SLOW) and pa.closed and not chat.names


def test_rate_limit_makes_lines_wait():
    chat, clock = make_chat(rate=2)                 # bursts of 4
    a, pa = join(chat, "alice")
    clock.now += 10                                 # the bucket is full
    chat.receive(a, b"".join(b"m%d\n" % i for i in range(6)))
    wait = "! slow down: at most 2 lines a second; the rest wait"
    # m4 and m5 wait; told once, and reading paused until the next token (0.5 s)
    assert pa.take() == [f"[lobby] alice: m{i}" for i in range(4)] + [wait]
    assert pa.pauses == [0.5]
    clock.now += 0.5                                # one line's worth
    chat.resume(a)
    assert pa.take() == ["[lobby] alice: m4"]        # m5 waits on, not told again
    assert pa.pauses == [0.5, 0.5]
    clock.now += 0.5
    chat.resume(a)
    assert pa.take() == ["[lobby] alice: m5"]
    clock.now += 10
    chat.receive(a, b"\n\n\n\n")                  # empty lines cost a token too
    say(chat, a, "m6")
    assert pa.take() == [wait]
    clock.now += 0.5
    chat.resume(a)
    assert pa.take() == ["[lobby] alice: m6"]
    assert a.buffered == 0


def test_eof_waits_behind_the_lines_over_the_rate():
    """The lines that wait for the rate, then the last line without a newline, then the
    close: the EOF does not overtake them, and a /quit among them is not lost."""
    chat, clock = make_chat(rate=1)                 # bursts of 2
    a, pa = join(chat, "alice")
    b, pb = join(chat, "bob")
    assert pa.take() == ["* bob joined lobby"]
    clock.now += 10
    chat.receive(a, b"one\ntwo\nthree\nlast")
    chat.eof(a)
    assert pb.take() == ["[lobby] alice: one", "[lobby] alice: two"]
    assert a.open and not pa.closed
    clock.now += 1
    chat.resume(a)
    assert pb.take() == ["[lobby] alice: three"] and a.open
    clock.now += 1
    chat.resume(a)
    assert pb.take() == ["[lobby] alice: last", "* alice quit"]
    assert pa.closed and not a.open
    clock.now += 10
    chat.receive(b, b"x\ny\n/quit\n")
    assert pb.take() == ["[lobby] bob: x", "[lobby] bob: y",
                         "! slow down: at most 1 lines a second; the rest wait"]
    assert b.open
    clock.now += 1
    chat.resume(b)
    assert pb.take() == [chat_server.BYE.decode().rstrip("\n")]
    assert pb.closed and not b.open


def test_max_clients_and_login_timeout():
    chat, _ = make_chat(max_clients=2)
    a, pa = join(chat, "alice")
    p2 = FakePeer()
    s2 = chat.connect(p2)
    p3 = FakePeer()
    s3 = chat.connect(p3)
    assert not s3.open and p3.closed and bytes(p3.out) == chat_server.SERVER_FULL
    chat.lost(s3)
    chat.login_expired(a)                          # has a nickname: stays
    assert a.open
    chat.login_expired(s2)
    assert not s2.open and p2.closed and p2.out.endswith(chat_server.NO_NICK)
    chat.lost(s2)
    p4 = FakePeer()
    assert chat.connect(p4).open                   # room again
    assert pa.take() == []


def test_connections_per_address_are_capped():
    """One address cannot take every place: beyond max_per_address its connections are
    refused with a reason; another address still gets in, and a place freed is free."""
    chat, _ = make_chat(max_per_address=2)
    peers = [FakePeer(f"p{i}") for i in range(3)]
    s0 = chat.connect(peers[0], "192.0.2.1")
    s1 = chat.connect(peers[1], "192.0.2.1")
    s2 = chat.connect(peers[2], "192.0.2.1")
    assert s0.open and s1.open and not s2.open
    assert bytes(peers[2].out) == chat_server.TOO_MANY and peers[2].closed
    chat.lost(s2)
    other = FakePeer("other")
    assert chat.connect(other, "198.51.100.7").open
    chat.lost(s0)
    again = FakePeer("again")
    assert chat.connect(again, "192.0.2.1").open
    assert chat.per_address == {"192.0.2.1": 2, "198.51.100.7": 1}


def test_connections_per_address_over_sockets(engine, serve):
    srv = serve(max_per_address=2)
    srv.client("alice")
    srv.client("bob")
    third = connect(("127.0.0.1", srv.port), timeout=10)
    with third:
        assert recv_until_eof(third) == chat_server.TOO_MANY


@pytest.mark.parametrize("kwargs", [{"max_line": 10}, {"max_output": 1024},
                                    {"max_clients": 0}, {"max_per_address": 0},
                                    {"rate": -1},
                                    {"hangup_timeout": 0}, {"login_timeout": -1}])
def test_limits_are_checked(kwargs):
    with pytest.raises(ValueError):
        Limits(**kwargs)


# ============================================================================ on sockets
class Client:
    """A blocking line client of the chat server (127.0.0.1 only)."""

    def __init__(self, port: int, nick: Optional[str] = None,
                 rcvbuf: Optional[int] = None) -> None:
        self.sock = connect(("127.0.0.1", port), timeout=10, rcvbuf=rcvbuf)
        self.buf = bytearray()
        self.nick = nick
        self.expect(WELCOME)
        if nick is not None:
            self.send(f"{nick}\n")
            self.expect(f"* hello {nick}\n", f"* {nick} joined lobby\n")

    def send(self, data: Union[str, bytes]) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def line(self) -> bytes:
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line = bytes(self.buf[:i + 1])
                del self.buf[:i + 1]
                return line
            data = self.sock.recv(1 << 16)
            if not data:
                raise AssertionError(f"EOF; unfinished line {bytes(self.buf[:200])!r}")
            self.buf += data

    def expect(self, *lines: Union[str, bytes]) -> None:
        for want in lines:
            want_b = want.encode() if isinstance(want, str) else want
            assert self.line() == want_b

    def expect_eof(self) -> None:
        assert not self.buf
        assert recv_until_eof(self.sock) == b""

    def sync(self) -> None:
        """Ask for a reply: every line queued before it has then been read and checked."""
        self.send("/rooms\n")
        assert self.line().startswith(b"* rooms: ")

    def close(self) -> None:
        self.sock.close()


class Served:
    """A chat served on an engine, and the clients a test opened (closed at the end)."""

    def __init__(self, server: Any, chat: Chat) -> None:
        self.port = server.port
        self.chat = chat                 # its state belongs to the engine's thread
        self.clients: list[Client] = []

    def client(self, *args: Any, **kwargs: Any) -> Client:
        c = Client(self.port, *args, **kwargs)
        self.clients.append(c)
        return c


@pytest.fixture
def serve(engine):
    """``serve(**limits)`` serves a chat on the engine (no rate limit unless given)."""
    served: list[Served] = []

    def start(**limits: Any) -> Served:
        limits.setdefault("rate", 0)
        limits.setdefault("max_per_address", 10_000)      # every test client is 127.0.0.1
        srv = Served(*chat_server.serve(engine, "127.0.0.1", 0, Limits(**limits)))
        served.append(srv)
        return srv

    yield start
    for srv in served:
        for c in srv.clients:
            c.close()


def test_rooms_over_sockets(engine, serve):
    srv = serve()
    alice = srv.client("alice")
    bob = srv.client("bob")
    alice.expect("* bob joined lobby\n")
    bob.send("/nick ALICE\n/nick bob\n/join games\n")
    bob.expect("! the nickname ALICE is taken\n", "! you are bob already\n",
               "* bob joined games\n")
    alice.expect("* bob left lobby\n")
    carol = srv.client("carol")
    alice.expect("* carol joined lobby\n")
    carol.send("/join games\r\nhello, games\r\n")
    for c in (bob, carol):
        c.expect("* carol joined games\n", "[games] carol: hello, games\n")
    alice.expect("* carol left lobby\n")
    carol.send("/who\n/nick Caro\n")
    carol.expect("* in games (2): bob, carol\n", "* carol is now Caro\n")
    bob.expect("* carol is now Caro\n")
    bob.send("/quit\n")
    bob.expect("* bye\n")
    bob.expect_eof()
    carol.expect("* bob quit\n")
    carol.close()                              # gone without a word
    wait_until(lambda: on_engine_thread(engine, lambda: sorted(srv.chat.names)) == ["alice"])
    alice.send("/rooms\n")
    alice.expect("* rooms: lobby (1)\n")


def test_fan_out_is_byte_exact_and_in_one_order_for_all(engine, serve):
    """6 members send 150 messages each at the same time, split at random places: each
    member receives all 900 lines, byte-exact, each sender's in its order, and all
    members the very same transcript."""
    srv = serve(max_line=4096, max_output=4 << 20)     # this one is not about the limits
    rng = random.Random(5)
    nicks = [f"m{i}" for i in range(6)]
    members = []
    for nick in nicks:
        c = srv.client(nick)
        for m in members:
            m.expect(f"* {nick} joined lobby\n")
        members.append(c)
    words = ["hi", "héllo", "☃", "日本語", "a" * 300, "x", "/slash", "tab\there"]
    sent = {nick: [f"{nick} #{k} " + " ".join(rng.choices(words, k=rng.randint(1, 6)))
                   for k in range(150)] for nick in nicks}
    transcripts: dict[str, bytes] = {}
    total = sum(len(f"[lobby] {n}: {t}\n".encode()) for n in nicks for t in sent[n])

    def read_all(c: Client) -> None:
        got = bytearray(c.buf)
        while len(got) < total:
            data = c.sock.recv(1 << 16)
            if not data:
                break
            got += data
        transcripts[c.nick] = bytes(got)

    def send_all(c: Client) -> None:
        r = random.Random(c.nick)
        payload = b"".join(t.encode() + b"\n" for t in sent[c.nick])
        i = 0
        while i < len(payload):
            n = r.randint(1, 2000)
            c.sock.sendall(payload[i:i + n])
            i += n

    readers = [threading.Thread(target=read_all, args=(c,)) for c in members]
    senders = [threading.Thread(target=send_all, args=(c,)) for c in members]
    for t in readers + senders:
        t.start()
    for t in readers + senders:
        t.join(30)
        assert not t.is_alive()
    assert len(transcripts) == len(members)
    first = transcripts[nicks[0]]
    assert len(first) == total
    for nick in nicks[1:]:
        assert transcripts[nick] == first, f"{nick} saw another order than {nicks[0]}"
    lines = first.decode().splitlines(keepends=True)
    for nick in nicks:
        mine = [ln for ln in lines if ln.startswith(f"[lobby] {nick}: ")]
        assert mine == [f"[lobby] {nick}: {t}\n" for t in sent[nick]]
    for c in members:
        c.sync()


def test_lines_over_the_rate_wait_over_sockets(engine, serve):
    """At 10 lines a second in bursts of 20 (the nickname took one), 29 lines in one
    write: all reach the room, in order, the last ten about a second later, and the
    sender is told once; then 5 more, a /quit and the EOF at once: all of them, in
    order, with no second notice."""
    srv = serve(rate=10)
    alice = srv.client("alice")
    bob = srv.client("bob")
    alice.expect("* bob joined lobby\n")
    t0 = time.monotonic()
    alice.send("".join(f"line {i}\n" for i in range(29)))
    bob.expect(*(f"[lobby] alice: line {i}\n" for i in range(29)))
    assert time.monotonic() - t0 >= 0.8          # the last ten waited for their tokens
    alice.expect(*(f"[lobby] alice: line {i}\n" for i in range(19)),
                 b"! slow down: at most 10 lines a second; the rest wait\n",
                 *(f"[lobby] alice: line {i}\n" for i in range(19, 29)))
    alice.send("".join(f"more {i}\n" for i in range(5)) + "/quit")
    alice.sock.shutdown(socket.SHUT_WR)
    bob.expect(*(f"[lobby] alice: more {i}\n" for i in range(5)), "* alice quit\n")
    alice.expect(*(f"[lobby] alice: more {i}\n" for i in range(5)), chat_server.BYE)
    alice.expect_eof()


def test_over_long_line_is_refused_and_disconnected(engine, serve):
    srv = serve(max_line=200)
    alice = srv.client("alice")
    anon = srv.client()
    anon.send(b"n" * 202)                        # no newline: no room for one
    anon.expect(b"! line too long (the limit is 200 bytes); goodbye\n")
    anon.expect_eof()
    bob = srv.client("bob")
    alice.expect("* bob joined lobby\n")
    bob.send(b"b" * 200 + b"\r\n" + b"c" * 201 + b"\nnot seen\n")
    bob.expect(f"[lobby] bob: {'b' * 200}\n",
               b"! line too long (the limit is 200 bytes); goodbye\n")
    bob.expect_eof()
    alice.expect(f"[lobby] bob: {'b' * 200}\n", "* bob was disconnected (line too long)\n")
    alice.sync()


def test_max_clients_and_login_timeout_over_sockets(engine, serve):
    srv = serve(max_clients=2, login_timeout=1.0)
    alice = srv.client("alice")
    anon = srv.client()
    third = connect(("127.0.0.1", srv.port), timeout=10)
    with third:
        assert recv_until_eof(third) == chat_server.SERVER_FULL
    anon.expect(chat_server.NO_NICK)            # after login_timeout
    anon.expect_eof()
    wait_until(lambda: on_engine_thread(engine, lambda: len(srv.chat.sessions)) == 1)
    srv.client("bob")                          # room again
    alice.expect("* bob joined lobby\n")


MSG = 4000                  # message size in the slow-reader tests
BATCH = 8                   # messages sent, then read by every fast member, in lock-step
MAX_OUTPUT = 64 * 1024


def push_until_kicked(engine: Any, chat: Any, sender: Client, fast: list[Client],
                      slow_nick: str, extra_batches: int) -> tuple[list[str], int, int]:
    """The sender sends batches of messages; after each, every fast member (the sender
    too) must receive the whole batch (promptly: the sockets time out in 10 s), and the
    engine must have ended the turn that queued it (``chat.next_turn`` ran: otherwise the
    reader of the next batch may run first, on trio, and one turn queues two batches,
    which the bounds below do not allow for). Stops ``extra_batches`` after the slow
    member has been disconnected. Returns the messages sent, the index of the first one
    the slow member did not get (the notice that it was disconnected follows that
    message), and the largest ``send_queued`` seen."""
    kick_line = f"* {slow_nick} was disconnected (too slow)\n".encode()
    sent: list[str] = []
    missed: Optional[int] = None
    batches_after = 0
    max_queued = 0
    while batches_after < extra_batches:
        assert len(sent) * MSG < 40 << 20, "the slow reader was never disconnected"
        batch = [f"{len(sent) + k:06d} " + "x" * (MSG - 7) for k in range(BATCH)]
        sender.send("".join(m + "\n" for m in batch))
        for c in fast:
            for k, m in enumerate(batch):
                line = c.line()
                if line == kick_line:
                    assert missed in (None, len(sent) + k - 1)   # the same for all
                    missed = len(sent) + k - 1
                    line = c.line()
                assert line == f"[lobby] {sender.nick}: {m}\n".encode()
        wait_until(lambda: on_engine_thread(engine, lambda: not chat.turn_pending),
                   message="the end of the engine turn that queued the batch")
        sent += batch
        max_queued = max(max_queued, engine.stats().send_queued)
        if missed is not None:
            batches_after += 1
    assert missed is not None and missed > 0
    return sent, missed, max_queued


def test_slow_reader_is_disconnected_others_unaffected(engine, serve, caplog):
    """A member that never reads (small receive buffer) is disconnected once its queue
    stays over MAX_OUTPUT (or passes four times that); the others keep getting every
    message, memory stays bounded, and the slow one finds everything it was sent before,
    then the reason, then EOF."""
    srv = serve(max_line=MSG, max_output=MAX_OUTPUT, hangup_timeout=10)
    slow = srv.client("slow", rcvbuf=4096)
    fast = [srv.client(f"fast{i}") for i in range(3)]
    for i, c in enumerate(fast):
        for later in fast[i + 1:]:
            c.expect(f"* {later.nick} joined lobby\n")
    sent, missed, max_queued = push_until_kicked(engine, srv.chat, fast[0], fast, "slow", 40)
    assert (len(sent) - missed) * MSG > 10 * MAX_OUTPUT   # the others went on and on
    assert max_queued <= 4 * MAX_OUTPUT + len(TOO_SLOW) + 6 * BATCH * (MSG + 32)
    # what the kernel does not hold for the slow reader: at most the hard limit, what
    # two engine turns queued for it, and the reason
    wait_until(lambda: engine.stats().send_queued
               <= 4 * MAX_OUTPUT + 2 * BATCH * (MSG + 32) + len(TOO_SLOW),
               message="only the slow reader's bounded queue")
    assert on_engine_thread(engine, lambda: sorted(srv.chat.names)) == [
        "fast0", "fast1", "fast2"]
    assert any(r.name == "chat" and "disconnecting" in r.getMessage()
               and "(slow)" in r.getMessage() for r in caplog.records)
    for c in fast:
        c.sync()
    # the slow reader now reads: all it was sent until the limit, the reason, EOF
    slow.expect(*(f"* fast{i} joined lobby\n" for i in range(3)))
    slow.expect(*(f"[lobby] fast0: {m}\n" for m in sent[:missed]))
    slow.expect(TOO_SLOW)
    slow.expect_eof()


def test_bursts_from_many_members_at_once_disconnect_nobody(engine, serve):
    """30 members each send a full rate-limit burst (20 lines of 1000 bytes) at the same
    moment: 600 KB for every member, more than 4 x max_output, queued in a few engine
    turns. Members that read are not slow: nobody is disconnected, all get everything."""
    srv = serve(rate=10, max_output=128 * 1024)
    reader = srv.client("reader")
    senders = [srv.client(f"s{i}") for i in range(30)]
    for c in senders:
        reader.expect(f"* {c.nick} joined lobby\n")
    got = []
    done = threading.Event()

    def read():
        try:
            for _ in range(30 * 20):
                got.append(reader.line())
        finally:
            done.set()

    t = threading.Thread(target=read)
    t.start()
    time.sleep(0.3)                            # the nickname line's token comes back
    blob = "".join(f"{k:02d}" + "x" * 998 + "\n" for k in range(20))
    for c in senders:
        c.send(blob)
    done.wait(30)
    t.join(1)
    assert len(got) == 600 and all(b"disconnected" not in line for line in got), got[-3:]
    for c in senders:                          # each got the 600 lines, in one order
        lines = []
        while len(lines) < 600:
            line = c.line()
            if not line.startswith(b"* "):      # the later members' joins came first
                lines.append(line)
        assert lines == got
    assert on_engine_thread(engine, lambda: len(srv.chat.names)) == 31


def test_slow_reader_that_never_reads_is_cut_off(engine, serve):
    """After the disconnection, a reader that still does not read is aborted once
    hangup_timeout has passed: its connection and queue do not stay."""
    srv = serve(max_line=MSG, max_output=MAX_OUTPUT, hangup_timeout=0.5)
    slow = srv.client("slow", rcvbuf=4096)
    fast = [srv.client("fast0"), srv.client("fast1")]
    fast[0].expect("* fast1 joined lobby\n")
    push_until_kicked(engine, srv.chat, fast[0], fast, "slow", 1)
    wait_until(lambda: engine.stats().connections == 2, timeout=10,
               message="the slow reader's connection to be cut")
    wait_until(lambda: engine.stats().send_queued == 0, message="nothing queued any more")
    with pytest.raises((ConnectionResetError, AssertionError)):
        while True:                              # what the kernel had, then the reset
            slow.line()
    for c in fast:
        c.sync()


def test_script(backend):
    """The script serves on the port it prints and stops cleanly on SIGINT; bad limits
    are a usage error."""
    env = dict(os.environ)
    env.pop("PROACTOR_BACKEND", None)
    p = subprocess.Popen([sys.executable, str(SCRIPT), "--backend", backend, "--rate", "5",
                          "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=env, cwd=SCRIPT.parent)
    clients: list[Client] = []
    try:
        first = p.stdout.readline()
        m = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", first)
        assert m, (first, p.stderr.read() if p.poll() is not None else "")
        port = int(m.group(1))
        a = Client(port, "alice")
        clients.append(a)
        b = Client(port, "bob")
        clients.append(b)
        a.expect("* bob joined lobby\n")
        b.send("hello from the script test\n")
        for c in (a, b):
            c.expect("[lobby] bob: hello from the script test\n")
        a.close()
        b.expect("* alice quit\n")
        p.send_signal(signal.SIGINT)
        b.expect_eof()
        assert p.wait(20) == 0
    finally:
        for c in clients:
            c.close()
        if p.poll() is None:
            p.kill()
            p.wait()
        p.stdout.close()
        p.stderr.close()
    bad = subprocess.run([sys.executable, str(SCRIPT), "--max-output", "10", "0"],
                         capture_output=True, text=True, timeout=30, env=env)
    assert bad.returncode == 2 and "max_output must be at least" in bad.stderr
