"""Chat server: line-based rooms; every message fans out to everyone in the room.

usage: python examples/chat_server.py [--host H] [--backend B] [--max-line BYTES]
           [--max-output BYTES] [--max-clients N] [--max-per-address N] [--rate N]
           [--login-timeout S] [--hangup-timeout S] PORT

Try it with ``nc 127.0.0.1 PORT`` (or ``telnet``) in two terminals.

The protocol is UTF-8 text, one line each way per message, lines ending in "\\n" (or
"\\r\\n"):

* The first line is your nickname (or send ``/nick NAME``): 1 to 16 ASCII letters, digits,
  "_" or "-", starting with a letter, unique regardless of case. You are then in room
  "lobby".
* ``/join ROOM`` moves you to ROOM (made when first joined, gone when empty), ``/rooms``
  lists the rooms, ``/who`` who is in yours, ``/nick NAME`` renames you, ``/quit`` says
  goodbye, ``/help`` lists the commands.
* Any other line is a message: everyone in your room, you included, receives
  ``[room] nick: text``. All members of a room see its lines in the same order, the order
  the server took them in, so your own copy shows where your message landed. Start a
  message with ``//`` to send one leading "/".
* The server's notices start with ``* `` (``* bob joined lobby``), errors with ``! ``.

Bounds, so that no client can grow the server's memory or hold up the others:

* A line longer than ``--max-line`` bytes gets an error and the connection is closed, as
  soon as that many bytes have come without a newline: input is buffered up to one line.
* Output queued for a connection (beyond what the kernel's socket buffers hold) may go
  over ``--max-output`` bytes for a moment: lines that arrive together from many members
  are queued in one engine turn, before the engine hands them to the kernel. A member
  whose queue is still over ``--max-output`` when the next line for it comes
  ``slow_grace`` seconds (1) or more after it went over, or whose queue holds more than
  four times ``--max-output`` queued before the last two engine turns, reads too slowly
  and is disconnected: a last line ``! disconnected: ...`` is queued, the room is told
  (members disconnected together, in one line) and the server logs it. It has
  ``--hangup-timeout`` seconds to read what is queued, then the connection is cut.
  Nobody waits for it: sending to a member only queues.
* ``--rate`` lines a second per client (empty ones included), in bursts of up to twice
  that. Lines beyond it wait, none is dropped: the client is told to slow down (once,
  until its whole burst is back), and the server stops reading from it until the next
  line is allowed (what has not been read waits in the kernel; what was, at most one
  read's worth, in the session).
  ``--max-clients`` connections at once, ``--max-per-address`` of them from one client
  address (one client cannot take all the places); a nickname must be chosen within
  ``--login-timeout`` seconds.

So the chat's memory is bounded by about ``--max-clients`` x (one read +
``--max-line`` +
4 x ``--max-output`` + what two engine turns queue for a member), however the clients
behave.

Design: :class:`Chat` is the whole chat (sessions, nicknames, rooms, line framing,
commands, limits) and does no I/O: it writes to each client through the small
:class:`Peer` interface (``write``, ``backlog``, ``pause``, ``close``), so it runs and is tested
without sockets. :class:`ChatConnection` is the glue to proactor's handler API. The
handlers run inline on the engine's I/O thread (``workers=0``): a fan-out is a few
``conn.send()`` calls, which queue and never block. As every handler call and timer runs
on that one thread, the chat's state is only ever touched by it and needs no locks.
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
import logging  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable, Optional, Protocol  # noqa: E402

import proactor  # noqa: E402

log = logging.getLogger("chat")

LOBBY = "lobby"
NICK_RULE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,15}")
ROOM_RULE = re.compile(r"[a-z0-9][a-z0-9_-]{0,23}")
#: C0 controls but tab, DEL, C1 controls: they would drive the other members' terminals;
#: the line and paragraph separators (a line break to many displays) and the
#: bidirectional overrides, embeddings, isolates and marks, which make text display in
#: another order than it reads (a line could look as if someone else had said it).
CONTROL_CHARS = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f"
                           "\u2028-\u202e\u2066-\u2069]")
#: /rooms and /who list at most this many names, so every reply is short.
MAX_LISTED = 50

WELCOME = b"* welcome! choose a nickname: send it as a line (/help lists the commands)\n"
HELP = (b"* commands:\n"
        b"*   /nick NAME   change your nickname\n"
        b"*   /join ROOM   leave your room for ROOM (made if new)\n"
        b"*   /rooms       list the rooms\n"
        b"*   /who         list who is in your room\n"
        b"*   /quit        leave\n"
        b"*   /help        this list\n"
        b"* any other line is a message to your room; start it with // to send a leading /\n")
BYE = b"* bye\n"
SERVER_FULL = b"! the server is full, try again later\n"
TOO_MANY = b"! too many connections from your address\n"
TOO_SLOW = b"! disconnected: too much output queued for you (you read too slowly)\n"
NO_NICK = b"! disconnected: no nickname chosen in time\n"
BAD_NICK = b"! a nickname is 1 to 16 letters, digits, _ or -, starting with a letter\n"
BAD_ROOM = (b"! a room name is 1 to 24 letters, digits, _ or -, starting with a letter "
            b"or digit\n")
NOT_UTF8 = b"! lines must be UTF-8 text\n"
CONTROL = b"! control characters are not allowed\n"
NICK_FIRST = b"! choose a nickname first\n"
UNKNOWN = b"! unknown command; /help lists them\n"


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one client may cost the server (see the module docstring)."""

    max_line: int = 1024            # bytes in a line, not counting "\n" or "\r\n"
    max_output: int = 128 * 1024    # bytes queued for one connection (see hard_output)
    max_clients: int = 1000         # connections at once
    max_per_address: int = 20       # connections at once from one client address
    rate: float = 10.0              # lines a second per client, 0: no limit
    login_timeout: float = 30.0     # seconds to choose a nickname
    hangup_timeout: float = 5.0     # seconds to read the last lines before the cut
    slow_grace: float = 1.0         # seconds a queue may stay over max_output

    def __post_init__(self) -> None:
        if self.max_line < 64:
            raise ValueError("max_line must be at least 64 bytes")
        if self.max_output < self.max_line + 4096:
            # a message, or any reply, must fit in an empty output queue
            raise ValueError("max_output must be at least max_line + 4096 bytes")
        if self.max_clients < 1 or self.max_per_address < 1:
            raise ValueError("max_clients and max_per_address must be at least 1")
        if self.rate < 0:
            raise ValueError("rate must not be negative")
        if self.login_timeout <= 0 or self.hangup_timeout <= 0 or self.slow_grace <= 0:
            raise ValueError("timeouts must be positive")

    @property
    def hard_output(self) -> int:
        """Bytes queued for one connection beyond which it is disconnected at once."""
        return 4 * self.max_output

    @property
    def burst(self) -> float:
        """Lines a client may send at once after a pause."""
        return max(1.0, 2 * self.rate)


class Peer(Protocol):
    """Where a session's output goes: one client connection."""

    def write(self, data: bytes) -> None:
        """Queue ``data`` to the client (never blocks)."""

    def backlog(self) -> int:
        """Bytes queued for the client and not sent yet."""

    def close(self) -> None:
        """Close once what is queued has been sent (or give up soon: see ``hangup_timeout``).
        The chat writes nothing more after it."""

    def pause(self, seconds: float) -> None:
        """Read nothing more from the client for ``seconds`` (the data waits in the
        kernel), then call :meth:`Chat.resume` before reading again, unless that asked
        for a new pause; a pause already running is not extended."""


class Session:
    """One client, from its connection to its disconnection."""

    __slots__ = ("peer", "address", "nick", "room", "open", "_buf", "_eof", "_tokens",
                 "_stamp", "_warned", "_over_since", "_w_turn", "_w_cur", "_w_prev")

    def __init__(self, peer: Peer, now: float, burst: float,
                 address: Optional[str] = None) -> None:
        self.peer = peer
        self.address = address          # the client's address, for max_per_address
        self.nick: Optional[str] = None
        self.room: Optional[str] = None
        self.open = True                # False once the chat has hung up on it
        self._buf = bytearray()         # lines waiting for the rate limit, then the start
                                        # of a line whose newline has not come
        self._eof = False               # the client has stopped sending
        self._tokens = burst            # the rate limit's token bucket
        self._stamp = now
        self._warned = False            # told to slow down since its burst was last full
        self._over_since: Optional[float] = None   # when its queue went over max_output
        self._w_turn = -2               # the engine turn of the last line queued for it,
        self._w_cur = 0                 # the bytes queued for it in that turn
        self._w_prev = 0                # and in the turn before

    @property
    def buffered(self) -> int:
        """Bytes of input held: lines waiting for the rate limit, the start of a line."""
        return len(self._buf)

    def __repr__(self) -> str:
        return f"<Session {self.nick or '(no nickname)'} from {self.peer}>"


class Chat:
    """Rooms of named clients; all the chat's logic, no I/O.

    Call :meth:`connect` for each new client, then :meth:`receive` with the bytes it sends,
    :meth:`eof` when it has stopped sending, :meth:`lost` when its connection is gone (also
    after the chat closed it). Output goes to the session's :class:`Peer`. ``clock`` is the
    time in seconds, for the rate limit. Not thread-safe: call it from one thread.
    """

    def __init__(self, limits: Limits = Limits(),
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self.sessions: set[Session] = set()             # connected, until lost()
        self.names: dict[str, Session] = {}             # nick.lower() -> session
        self.rooms: dict[str, dict[Session, None]] = {}  # room -> members, in join order
        self.turn = 0                                   # see next_turn()
        self.turn_pending = False                       # next_turn() is scheduled
        self.per_address: dict[str, int] = {}           # address -> sessions from it

    # ------------------------------------------------------------------ events
    def connect(self, peer: Peer, address: Optional[str] = None) -> Session:
        """A client connected (from ``address``, if known). Over ``max_clients``, or
        ``max_per_address`` from its address, it is told so and closed at once (the
        session returned is then not open)."""
        s = Session(peer, self._clock(), self.limits.burst, address)
        refusal = None
        if len(self.sessions) >= self.limits.max_clients:
            log.warning("refusing %s: %d clients connected", peer, len(self.sessions))
            refusal = SERVER_FULL
        elif address is not None and (self.per_address.get(address, 0)
                                      >= self.limits.max_per_address):
            log.warning("refusing %s: %d clients connected from %s", peer,
                        self.per_address[address], address)
            refusal = TOO_MANY
        if refusal is not None:
            s.open = False
            peer.write(refusal)
            peer.close()
            return s
        if address is not None:
            self.per_address[address] = self.per_address.get(address, 0) + 1
        self.sessions.add(s)
        self._reply(s, WELCOME)
        return s

    def receive(self, s: Session, data: bytes) -> None:
        """Bytes from the client: handle each complete line, keep the rest: the start of
        a line (at most ``max_line`` bytes, plus a "\\r"; a longer line ends the
        connection) and, over the rate, the lines that wait for :meth:`resume` (reading
        is paused meanwhile: at most what one read brought)."""
        if not s.open:
            return
        buf = s._buf
        buf += data
        limit = self.limits.max_line
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            stop = end - 1 if end > start and buf[end - 1] == 0x0D else end   # "\r\n"
            if stop - start > limit:
                self._line_too_long(s)
                return
            if not self._take_token(s):
                del buf[:start]          # the rest waits for resume()
                return
            line = bytes(buf[start:stop])
            start = end + 1
            self._line(s, line)
            if not s.open:
                return
        del buf[:start]
        n = len(buf)
        if n > limit + 1 or (n == limit + 1 and buf[-1] != 0x0D):
            self._line_too_long(s)
        elif s._eof:
            # The client stopped sending: a last line without its newline, then close.
            rest = bytes(buf).rstrip(b"\r")
            if rest:
                if not self._take_token(s):
                    return
                buf.clear()
                self._line(s, rest)
            self._hangup(s, b"")

    def eof(self, s: Session) -> None:
        """The client stopped sending: after the lines that wait, take a last line
        without its newline, then close."""
        if s.open:
            s._eof = True
            self.receive(s, b"")

    def resume(self, s: Session) -> None:
        """The pause that :class:`Peer` was asked for is over: handle the lines that
        waited (the I/O glue then reads again, unless it was asked to pause anew)."""
        self.receive(s, b"")

    def lost(self, s: Session, failed: bool = False) -> None:
        """The connection is gone (whoever closed it); ``failed``: by an error, a reset."""
        if s in self.sessions:
            self.sessions.discard(s)
            if s.address is not None:
                n = self.per_address[s.address] - 1
                if n:
                    self.per_address[s.address] = n
                else:
                    del self.per_address[s.address]
        if s.open:
            s.open = False
            self._forget(s, "connection lost" if failed else None)

    def login_expired(self, s: Session) -> None:
        """``login_timeout`` has passed since :meth:`connect`: no nickname, no stay."""
        if s.open and s.nick is None:
            log.info("disconnecting %s: no nickname chosen in time", s.peer)
            self._hangup(s, NO_NICK)

    # ------------------------------------------------------------------ lines
    def _line(self, s: Session, raw: bytes) -> None:
        if not raw.strip():
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._reply(s, NOT_UTF8)
            return
        if CONTROL_CHARS.search(text):
            self._reply(s, CONTROL)
            return
        if text.startswith("/") and not text.startswith("//"):
            cmd, _, arg = text[1:].partition(" ")
            self._command(s, cmd.lower(), arg.strip())
        elif s.nick is None:
            self._set_nick(s, text.strip())
        else:
            self._say(s, text[1:] if text.startswith("//") else text)

    def _take_token(self, s: Session) -> bool:
        """Every line, empty ones too, costs a token. Without one the line waits: the
        client is told once (until it has slowed down: its whole burst is back), and
        asked to pause until the next token."""
        rate = self.limits.rate
        if not rate:
            return True
        now = self._clock()
        tokens = min(self.limits.burst, s._tokens + (now - s._stamp) * rate)
        s._stamp = now
        if tokens < 1:
            s._tokens = tokens
            if not s._warned:
                s._warned = True
                self._reply(s, b"! slow down: at most %g lines a second; the rest wait\n"
                            % rate)
            if s.open:
                s.peer.pause((1 - tokens) / rate)
            return False
        if tokens == self.limits.burst:
            s._warned = False
        s._tokens = tokens - 1
        return True

    def _command(self, s: Session, cmd: str, arg: str) -> None:
        if cmd == "help":
            self._reply(s, HELP)
        elif cmd == "quit":
            self._hangup(s, BYE)
        elif cmd == "nick":
            self._set_nick(s, arg)
        elif s.nick is None:
            self._reply(s, NICK_FIRST)
        elif cmd == "join":
            self._join(s, arg.lower())
        elif cmd == "rooms":
            rooms = [f"{name} ({len(m)})" for name, m in sorted(self.rooms.items())]
            self._reply(s, f"* rooms: {_listing(rooms)}\n".encode())
        elif cmd == "who":
            assert s.room is not None
            names = sorted((m.nick or "" for m in self.rooms[s.room]), key=str.lower)
            self._reply(s, f"* in {s.room} ({len(names)}): {_listing(names)}\n".encode())
        else:
            self._reply(s, UNKNOWN)

    def _set_nick(self, s: Session, name: str) -> None:
        if not NICK_RULE.fullmatch(name):
            self._reply(s, BAD_NICK)
            return
        key = name.lower()
        holder = self.names.get(key)
        if holder is not None and holder is not s:
            self._reply(s, f"! the nickname {name} is taken\n".encode())
            return
        old = s.nick
        if old == name:
            self._reply(s, f"! you are {name} already\n".encode())
            return
        if old is not None:
            del self.names[old.lower()]
        self.names[key] = s
        s.nick = name
        if old is None:
            if self._reply(s, f"* hello {name}\n".encode()):
                self._enter(s, LOBBY)
        else:
            assert s.room is not None
            self._broadcast(s.room, f"* {old} is now {name}\n")

    def _join(self, s: Session, room: str) -> None:
        if not ROOM_RULE.fullmatch(room):
            self._reply(s, BAD_ROOM)
        elif room == s.room:
            self._reply(s, f"! you are in {room} already\n".encode())
        else:
            self._leave(s, f"* {s.nick} left {s.room}\n")
            self._enter(s, room)

    def _say(self, s: Session, text: str) -> None:
        assert s.room is not None
        self._broadcast(s.room, f"[{s.room}] {s.nick}: {text}\n")

    # ------------------------------------------------------------------ rooms
    def _enter(self, s: Session, room: str) -> None:
        self.rooms.setdefault(room, {})[s] = None
        s.room = room
        self._broadcast(room, f"* {s.nick} joined {room}\n")

    def _leave(self, s: Session, notice: Optional[str]) -> None:
        """Take ``s`` out of its room and tell the members left there ``notice`` (if any)."""
        room = s.room
        if room is None:
            return
        s.room = None
        members = self.rooms[room]
        del members[s]
        if not members:
            del self.rooms[room]
        elif notice is not None:
            self._broadcast(room, notice)

    # ------------------------------------------------------------------ output
    def next_turn(self) -> None:
        """The engine has had a turn to send what was queued (the I/O glue calls this
        once per engine turn in which lines were queued)."""
        self.turn_pending = False
        self.turn += 1

    def _fits(self, s: Session, n: int) -> bool:
        """May ``n`` more bytes be queued for ``s``? Not if it reads too slowly: what was
        queued for it before the last two engine turns (those bytes had the time to reach
        the kernel) is over ``hard_output``, or over ``max_output`` ``slow_grace`` after
        its queue went over."""
        limits = self.limits
        backlog = s.peer.backlog()
        if backlog + n <= limits.max_output:
            s._over_since = None
            return True
        turn = self.turn
        if s._w_turn == turn:
            recent = s._w_cur + s._w_prev
        elif s._w_turn == turn - 1:
            recent = s._w_cur
        else:
            recent = 0
        old = backlog - recent
        if old > limits.hard_output:
            return False
        now = self._clock()
        if s._over_since is None:
            s._over_since = now
            return True
        return now - s._over_since < limits.slow_grace or old <= limits.max_output

    def _write(self, s: Session, data: bytes) -> None:
        """Queue ``data`` for ``s``, counting it in this engine turn."""
        turn = self.turn
        if s._w_turn == turn:
            s._w_cur += len(data)
        else:
            s._w_prev = s._w_cur if s._w_turn == turn - 1 else 0
            s._w_cur = len(data)
            s._w_turn = turn
        s.peer.write(data)

    def _broadcast(self, room: str, line: str) -> None:
        """Queue ``line`` to every member of ``room``. Those too slow to take it are
        disconnected after the loop and the room is told in one line after this one
        (which may find more too slow: a loop, not a recursion)."""
        while True:
            members = self.rooms.get(room)
            if not members:
                return
            data = line.encode()
            slow = []
            for m in tuple(members):
                if self._fits(m, len(data)):
                    self._write(m, data)
                else:
                    slow.append(m)
            if not slow:
                return
            for m in slow:
                self._log_slow(m)
                self._hangup(m, TOO_SLOW, "too slow", tell_room=False)
            names = [m.nick or "?" for m in slow]
            verb = "was" if len(names) == 1 else "were"
            line = f"* {_listing(names)} {verb} disconnected (too slow)\n"

    def _reply(self, s: Session, data: bytes) -> bool:
        """Queue ``data`` to ``s`` alone; False if ``s`` is (now) disconnected."""
        if not s.open:
            return False
        if not self._fits(s, len(data)):
            self._too_slow(s)
            return False
        self._write(s, data)
        return True

    def _log_slow(self, s: Session) -> None:
        log.warning("disconnecting %s (%s): %d bytes queued for it, limit %d",
                    s.peer, s.nick, s.peer.backlog(), self.limits.max_output)

    def _too_slow(self, s: Session) -> None:
        if s.open:
            self._log_slow(s)
            self._hangup(s, TOO_SLOW, "too slow")

    def _line_too_long(self, s: Session) -> None:
        log.info("disconnecting %s (%s): line over %d bytes", s.peer, s.nick,
                 self.limits.max_line)
        self._hangup(s, b"! line too long (the limit is %d bytes); goodbye\n"
                     % self.limits.max_line, "line too long")

    def _hangup(self, s: Session, last: bytes, reason: Optional[str] = None, *,
                tell_room: bool = True) -> None:
        """Close ``s`` after ``last`` (queued even over the limits: it is short) and take
        it out of the chat; ``reason`` None means it left of its own accord."""
        if not s.open:
            return
        s.open = False
        s._buf = bytearray()
        if last:
            s.peer.write(last)
        s.peer.close()
        self._forget(s, reason, tell_room)

    def _forget(self, s: Session, reason: Optional[str], tell_room: bool = True) -> None:
        """Free the nickname of ``s`` and take it out of its room, telling the room."""
        if s.nick is None:
            return
        del self.names[s.nick.lower()]
        if not tell_room:
            self._leave(s, None)
        elif reason is None:
            self._leave(s, f"* {s.nick} quit\n")
        else:
            self._leave(s, f"* {s.nick} was disconnected ({reason})\n")


def _listing(names: list) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    if len(names) > MAX_LISTED:
        shown += f", and {len(names) - MAX_LISTED} more"
    return shown


class ChatConnection(proactor.Handler):
    """One TCP connection: proactor's handler events go to the :class:`Chat`, and this
    is the session's :class:`Peer`. Runs on the engine's thread (``workers=0``)."""

    def __init__(self, chat: Chat, engine: Any) -> None:
        self.chat = chat
        self.engine = engine
        self.conn: Any = None
        self.session: Optional[Session] = None
        self.label = "?"
        self._timer: Any = None          # the login timeout, then the hang-up timeout
        self._paused: Any = None         # the timer ending a rate-limit pause

    # -- proactor.Handler
    def connection_made(self, conn: Any) -> None:
        self.conn = conn
        host = None
        try:
            host, port = conn.peername[:2]
            self.label = f"{host}:{port}"
        except OSError:
            pass                         # already reset by the client
        self.session = s = self.chat.connect(self, host)
        if s.open:
            self._timer = self.engine.call_later(self.chat.limits.login_timeout,
                                                 self.chat.login_expired, s)

    def data_received(self, conn: Any, data: bytes) -> None:
        assert self.session is not None
        self.chat.receive(self.session, data)

    def eof_received(self, conn: Any) -> None:
        assert self.session is not None
        self.chat.eof(self.session)

    def connection_lost(self, conn: Any, exc: Optional[BaseException]) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._paused is not None:
            self._paused.cancel()
            self._paused = None
        if self.session is not None:
            self.chat.lost(self.session, exc is not None)

    # -- Peer
    def write(self, data: bytes) -> None:
        self.conn.send(data)             # dropped if it is closing: connection_lost follows
        chat = self.chat
        if not chat.turn_pending:        # what is queued in this turn goes out after it
            chat.turn_pending = True
            self.engine.call_soon(chat.next_turn)

    def backlog(self) -> int:
        return self.conn.get_write_buffer_size()

    def pause(self, seconds: float) -> None:
        if self._paused is None and not self.conn.closed:
            self.conn.pause_reading()
            self._paused = self.engine.call_later(seconds, self._resume)

    def _resume(self) -> None:
        self._paused = None
        if self.conn.closed or self.session is None:
            return
        self.chat.resume(self.session)       # the lines that waited; may pause again
        if self._paused is None and not self.conn.closed:
            self.conn.resume_reading()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.conn.close()
        # A client that does not read would keep the connection (and what is queued for
        # it) forever: cut it off if it has not taken everything in time.
        self._timer = self.engine.call_later(self.chat.limits.hangup_timeout,
                                             self.conn.abort)

    def __str__(self) -> str:
        return self.label


def serve(engine: Any, host: str = "127.0.0.1", port: int = 0,
          limits: Limits = Limits()) -> tuple[Any, Chat]:
    """Serve a new :class:`Chat` on ``host:port``; returns the server and the chat (whose
    state belongs to the engine's thread)."""
    chat = Chat(limits, clock=engine.time)
    server = engine.serve_tcp(lambda: ChatConnection(chat, engine), host, port, workers=0)
    return server, chat


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Limits()
    p.add_argument("port", type=int)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--backend", default=None, choices=["auto", "uring", "trio"],
                   help="engine backend (default: $PROACTOR_BACKEND or auto)")
    p.add_argument("--max-line", type=int, default=d.max_line, metavar="BYTES",
                   help=f"longest line accepted (default {d.max_line})")
    p.add_argument("--max-output", type=int, default=d.max_output, metavar="BYTES",
                   help="output queued for a client before it is disconnected as too "
                        f"slow (default {d.max_output})")
    p.add_argument("--max-clients", type=int, default=d.max_clients, metavar="N",
                   help=f"connections at once (default {d.max_clients})")
    p.add_argument("--max-per-address", type=int, default=d.max_per_address, metavar="N",
                   help=f"connections at once from one address (default {d.max_per_address})")
    p.add_argument("--rate", type=float, default=d.rate, metavar="N",
                   help=f"lines a second per client, 0 for no limit (default {d.rate:g})")
    p.add_argument("--login-timeout", type=float, default=d.login_timeout, metavar="S",
                   help=f"seconds to choose a nickname (default {d.login_timeout:g})")
    p.add_argument("--hangup-timeout", type=float, default=d.hangup_timeout, metavar="S",
                   help="seconds a disconnected client has to read its last lines "
                        f"(default {d.hangup_timeout:g})")
    a = p.parse_args()
    try:
        limits = Limits(max_line=a.max_line, max_output=a.max_output,
                        max_clients=a.max_clients, max_per_address=a.max_per_address,
                        rate=a.rate,
                        login_timeout=a.login_timeout, hangup_timeout=a.hangup_timeout)
    except ValueError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    engine = proactor.Engine(backend=a.backend)
    server, _ = serve(engine, a.host, a.port, limits)
    print(f"listening on {a.host}:{server.port}", flush=True)
    engine.run()


if __name__ == "__main__":
    main()
