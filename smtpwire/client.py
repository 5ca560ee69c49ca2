"""The client side of an SMTP or LMTP session as a sans-IO state machine.

This module owns the client's session plan (greeting, EHLO/LHLO, optional STARTTLS and AUTH,
then MAIL/RCPT/DATA or BDAT per message, RSET after a failed transaction, QUIT), the parsing of
EHLO capabilities, and the grouping of commands for PIPELINING (RFC 2920). It never does I/O,
never reads a clock and never sleeps: the driver feeds received bytes with ``receive_data``,
takes bytes to send with ``data_to_send``, and passes the time it read for each of those calls.
That makes one implementation serve a trio load generator, a blocking socket and a Locust user.

Theory of operation: every command the client writes appends one *expectation* (what kind of
reply it waits for) to a FIFO. ``data_to_send(now)`` stamps the expectations of the commands it
returns with ``now``; each reply pops one expectation, so the time from the write that carried a
command to the arrival of its reply is known without the driver keeping any bookkeeping. Each
reply the driver should time comes out of ``next_event`` as a ``PhaseDone``; the events are
those of ``mailstorm.wire.client_events``. What a reply does depends only on the expectation it
answers: ``_ON_REPLY`` maps each expectation kind to its handler (a transition table, like the
server connection's ``_HANDLERS``).

With pipelining, MAIL, every RCPT and DATA (or MAIL, RCPT and BDAT with the whole content) go
out in one write, so a message costs one write and one read per group. Once a message's content
is queued, the driver may start the next message behind it (``can_start_next``, RFC 2920 3.1):
its commands leave in the same write as the content, and it becomes the current message when
the end-of-data reply before it is in, so a stream of messages costs one write and one read
each. A MAIL or RCPT failure inside a group does not stop the group (the server answers every
command); the replies that only follow from an earlier failure (503 to DATA after MAIL failed)
are not reported as errors.

Replies are parsed by ``mailstorm.wire.replies.ReplyParser`` and content is dot-stuffed by
``mailstorm.wire.data.dot_stuff``: the codec is shared with the server.
"""

from __future__ import annotations

import base64
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from mailstorm.wire.client_events import (
    ClientEvent,
    MessageDone,
    NeedData,
    NeedDataType,
    PhaseDone,
    ReadyForTLS,
    SessionClosed,
    SessionFailed,
    SessionReady,
)
from mailstorm.wire.data import dot_stuff, normalize_line_endings
from mailstorm.wire.replies import ParsedReply, ProtocolViolation, ReplyParser, ReplyTooLong

__all__ = [
    "PHASES",
    "Capabilities",
    "ClientConfig",
    "ClientConnection",
    "Payload",
]

#: Reply phases the client reports, in session order. ``bdat`` is an intermediate BDAT chunk;
#: the reply to the last chunk (or to the end of DATA) is ``eod``.
PHASES = (
    "banner",
    "ehlo",
    "starttls",
    "auth",
    "mail",
    "rcpt",
    "data",
    "bdat",
    "eod",
    "rset",
    "quit",
)

# Expectation kinds: what the reply at the head of the FIFO answers. Small ints, because the
# FIFO is touched for every command on the hot path.
_BANNER = 0
_EHLO = 1
_HELO = 2
_STARTTLS = 3
_AUTH = 4  # AUTH PLAIN with initial response, or the last step of AUTH LOGIN
_AUTH_LOGIN_USER = 5  # AUTH LOGIN: 334 asking for the user name
_AUTH_LOGIN_PASS = 6  # 334 asking for the password
_MAIL = 7
_RCPT = 8
_DATA = 9
_EOD = 10  # the reply to the end of DATA, or to BDAT LAST
_BDAT = 11  # the reply to a BDAT chunk that is not the last
_DISCARD_EOD = 12  # the reply to a lone "." sent because DATA got 354 with no recipients
_RSET = 13
_QUIT = 14

_PHASE_OF = {
    _BANNER: "banner",
    _EHLO: "ehlo",
    _HELO: "ehlo",
    _STARTTLS: "starttls",
    _AUTH: "auth",
    _AUTH_LOGIN_USER: "auth",
    _AUTH_LOGIN_PASS: "auth",
    _MAIL: "mail",
    _RCPT: "rcpt",
    _DATA: "data",
    _EOD: "eod",
    _BDAT: "bdat",
    _DISCARD_EOD: "eod",
    _RSET: "rset",
    _QUIT: "quit",
}

# Session states.
_GREETING = 0  # banner, EHLO, STARTTLS, AUTH in progress
_TLS = 1  # 220 to STARTTLS received: the driver is doing the handshake
_READY = 2
_MESSAGE = 3
_QUITTING = 4
_CLOSED = 5
_FAILED = 6

_CRLF = b"\r\n"
_LONE_DOT = b".\r\n"


# ------------------------------------------------------------------------------------------
# Configuration, capabilities, payloads
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """What the session does; shared by every connection of a run."""

    ehlo_name: str = "mailstorm.test"
    lmtp: bool = False
    starttls: bool = False
    auth_user: str | None = None
    auth_password: str = ""
    #: "PLAIN" or "LOGIN".
    auth_mech: str = "PLAIN"
    #: "auto" pipelines when the server offers PIPELINING, "on" always, "off" never.
    pipelining: str = "auto"
    #: Send content with BDAT (RFC 3030); the server must offer CHUNKING.
    chunking: bool = False
    #: Largest BDAT chunk; 0 sends the whole content as one ``BDAT n LAST``.
    chunk_size: int = 0

    def __post_init__(self) -> None:
        if self.auth_mech not in ("PLAIN", "LOGIN"):
            raise ValueError(f"unsupported AUTH mechanism {self.auth_mech!r}")
        if self.pipelining not in ("auto", "on", "off"):
            raise ValueError(f"pipelining must be auto, on or off, not {self.pipelining!r}")
        if self.chunk_size < 0:
            raise ValueError("chunk_size must not be negative")


@dataclass(slots=True)
class Capabilities:
    """The extensions a server announced in its EHLO or LHLO reply."""

    greeting: str = ""
    pipelining: bool = False
    #: The SIZE limit (0 when announced without a number); None when SIZE is not offered.
    size: int | None = None
    chunking: bool = False
    starttls: bool = False
    auth: frozenset[str] = frozenset()
    eightbitmime: bool = False
    smtputf8: bool = False
    #: Every keyword, upper-cased, with its parameter text.
    keywords: dict[str, str] | None = None

    @classmethod
    def from_ehlo(cls, reply: ParsedReply) -> Capabilities:
        caps = cls(greeting=reply.lines[0] if reply.lines else "", keywords={})
        keywords: dict[str, str] = {}
        auth: set[str] = set()
        for line in reply.lines[1:]:
            parts = line.split(None, 1)
            if not parts:
                continue
            keyword = parts[0].upper()
            params = parts[1] if len(parts) > 1 else ""
            # Some old servers announce "AUTH=LOGIN PLAIN" as well as (or instead of) AUTH.
            if keyword.startswith("AUTH="):
                params = keyword[5:] + " " + params
                keyword = "AUTH"
            keywords[keyword] = params
            if keyword == "AUTH":
                auth.update(p.upper() for p in params.split())
        caps.keywords = keywords
        caps.pipelining = "PIPELINING" in keywords
        caps.chunking = "CHUNKING" in keywords
        caps.starttls = "STARTTLS" in keywords
        caps.eightbitmime = "8BITMIME" in keywords
        caps.smtputf8 = "SMTPUTF8" in keywords
        caps.auth = frozenset(auth)
        if "SIZE" in keywords:
            value = keywords["SIZE"].strip()
            caps.size = int(value) if value.isdigit() else 0
        return caps


class Payload:
    """Message content, prepared once and sent many times.

    ``raw`` has CRLF line ends and ends with CRLF (what the server stores); ``stuffed`` is the
    DATA wire form with the end marker, computed on first use and kept, so a body reused for
    thousands of messages is stuffed once.
    """

    __slots__ = ("_stuffed", "eight_bit", "raw")

    def __init__(self, content: bytes) -> None:
        raw = normalize_line_endings(content)
        if raw and not raw.endswith(_CRLF):
            raw += _CRLF
        self.raw = raw
        self.eight_bit = not raw.isascii()
        self._stuffed: bytes | None = None

    @property
    def stuffed(self) -> bytes:
        stuffed = self._stuffed
        if stuffed is None:
            stuffed = self._stuffed = dot_stuff(self.raw)
        return stuffed

    def __len__(self) -> int:
        return len(self.raw)


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


# ------------------------------------------------------------------------------------------
# The connection
# ------------------------------------------------------------------------------------------


class ClientConnection:
    """One client session. Not reusable: make a new one for each connection.

    Driver loop: call ``connection_made(now)`` once connected, then repeatedly take events with
    ``next_event``; when it returns ``NeedData``, send ``data_to_send(now)`` if it is not
    empty, else receive bytes and pass them to ``receive_data(data, now)`` (``b""`` at end of
    stream).
    """

    __slots__ = (
        "_accepted",
        "_auth_started",
        "_bdat_pos",
        "_content_sent",
        "_eod_ok",
        "_events",
        "_expect",
        "_fail_phase",
        "_fail_reply",
        "_lmtp_left",
        "_mail_ok",
        "_msg_content",
        "_msg_head",
        "_msg_rcpts",
        "_msg_whole",
        "_next_rcpt",
        "_out",
        "_parser",
        "_queued",
        "_recv_now",
        "_stamps",
        "_state",
        "capabilities",
        "config",
        "pipelining",
        "tls_active",
    )

    def __init__(self, config: ClientConfig, *, tls_active: bool = False) -> None:
        self.config = config
        #: True once the stream is TLS (implicit TLS, or after ``tls_started``).
        self.tls_active = tls_active
        self.capabilities = Capabilities()
        #: Whether commands are pipelined; decided after EHLO.
        self.pipelining = False
        self._parser = ReplyParser()
        self._state = _GREETING
        self._out: list[bytes] = []
        self._expect: deque[int] = deque()
        #: Send times of the commands in ``_expect``, oldest first; the commands queued but
        #: not yet handed out by ``data_to_send`` are the ones past its end.
        self._stamps: deque[float] = deque()
        self._events: deque[ClientEvent] = deque()
        self._recv_now = 0.0
        self._auth_started = 0.0
        # Per-message state.
        self._mail_ok = False
        self._accepted = 0
        self._lmtp_left = 0
        self._eod_ok = 0
        self._fail_phase: str | None = None
        self._fail_reply: ParsedReply | None = None
        self._msg_rcpts: Sequence[str] = ()
        self._next_rcpt = 0
        self._msg_head = b""
        #: Head and content joined once per message, only when BDAT chunks split them.
        self._msg_whole: memoryview | None = None
        self._msg_content = b""
        self._bdat_pos = 0
        #: The current message's content is queued: only its end-of-data reply is to come.
        self._content_sent = False
        #: A message started behind the current one (``can_start_next``), not yet current.
        self._queued: tuple[str, Sequence[str], Payload, bytes] | None = None

    # -- driver interface ----------------------------------------------------------------

    def connection_made(self, now: float) -> None:
        """The transport is up (after the TLS handshake for implicit TLS): wait for the banner."""
        self._expect.append(_BANNER)
        self._stamps.append(now)

    def receive_data(self, data: bytes | bytearray, now: float) -> None:
        """Bytes from the server; ``b""`` means the server closed the connection."""
        self._recv_now = now
        if data:
            self._parser.feed(data)
        elif self._state == _QUITTING:
            self._state = _CLOSED
            self._events.append(SessionClosed())
        elif self._state not in (_CLOSED, _FAILED):
            self._fail("reset", "connection closed by server")

    def data_to_send(self, now: float) -> bytes:
        """The bytes to write now. Commands in them count as sent at ``now``."""
        out = self._out
        if not out:
            return b""
        unstamped = len(self._expect) - len(self._stamps)
        if unstamped:
            self._stamps.extend([now] * unstamped)
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        return data

    def next_event(self) -> ClientEvent | NeedDataType:
        """The next event, or ``NeedData`` when the client needs to send or receive first."""
        events = self._events
        parser = self._parser
        while not events:
            # Checking for buffered bytes first saves a parse attempt on every empty read.
            if self._state >= _CLOSED or not parser.buffered:
                return NeedData
            try:
                reply = parser.next_reply()
            except (ProtocolViolation, ReplyTooLong) as exc:
                self._fail("protocol", str(exc))
                break
            if reply is None:
                return NeedData
            self._on_reply(reply)
        return events.popleft()

    @property
    def wants_to_send(self) -> bool:
        """True when ``data_to_send`` has bytes (so the driver reads its clock only then)."""
        return bool(self._out)

    @property
    def is_ready(self) -> bool:
        """True when a message may start (or QUIT may be sent)."""
        return self._state == _READY

    @property
    def can_start_next(self) -> bool:
        """True when another message may start behind the current one in the same write.

        RFC 2920 3.1 lets message content be the first "command" of a pipelined group: once
        the 354 is in and the content is queued, the next message's MAIL, RCPT and DATA may
        follow it, so a steady stream of messages costs one write and one read each. Only
        with pipelining and DATA (not BDAT, not LMTP), and one message deep.
        """
        return (
            self._content_sent
            and self._queued is None
            and self._state == _MESSAGE
            and self.pipelining
            and not self.config.chunking
            and not self.config.lmtp
        )

    @property
    def is_closed(self) -> bool:
        return self._state >= _CLOSED

    @property
    def pending_phase(self) -> str | None:
        """The phase whose reply the client waits for (to name a timeout), if any."""
        if self._state == _TLS:
            return "tls"
        return _PHASE_OF[self._expect[0]] if self._expect else None

    def tls_started(self) -> None:
        """The TLS handshake after STARTTLS succeeded: greet again over TLS (RFC 3207 4.2)."""
        if self._state != _TLS:
            raise RuntimeError("tls_started() without a ReadyForTLS event")
        self.tls_active = True
        self.capabilities = Capabilities()
        self._parser = ReplyParser()
        self._state = _GREETING
        self._send_greeting()

    def start_message(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        payload: Payload,
        head: bytes = b"",
    ) -> None:
        """Queue one message.

        ``head`` goes before the content: header lines with CRLF ends, none starting with "."
        (it is not dot-stuffed, so a per-message header costs no pass over the body).
        """
        if not rcpts:
            raise ValueError("a message needs at least one recipient")
        if self._state != _READY:
            if not self.can_start_next:
                raise RuntimeError("start_message() while the session is not ready")
            # Behind the current message: its commands go out now, right after the content;
            # it becomes the current message when the current one's last reply is in.
            self._queued = (mail_from, rcpts, payload, head)
            self._queue_commands(mail_from, rcpts, payload, head)
            return
        self._begin(mail_from, rcpts, payload, head)
        self._queue_commands(mail_from, rcpts, payload, head)

    def _begin(
        self, mail_from: str, rcpts: Sequence[str], payload: Payload, head: bytes
    ) -> None:
        """Make this message the current one: its replies are the next to come."""
        self._state = _MESSAGE
        self._mail_ok = False
        self._accepted = 0
        self._lmtp_left = 0
        self._eod_ok = 0
        self._fail_phase = None
        self._fail_reply = None
        self._content_sent = False
        self._msg_rcpts = rcpts
        self._msg_head = head
        self._msg_content = payload.raw if self.config.chunking else payload.stuffed
        self._msg_whole = None
        self._bdat_pos = 0
        self._next_rcpt = len(rcpts) if self.pipelining else 0

    def _queue_commands(
        self, mail_from: str, rcpts: Sequence[str], payload: Payload, head: bytes
    ) -> None:
        """MAIL, and with pipelining every RCPT and DATA (or every BDAT chunk)."""
        self._command(self._mail_command(mail_from, rcpts, payload, len(head)), _MAIL)
        if self.pipelining:
            for rcpt in rcpts:
                self._command(b"RCPT TO:<%s>\r\n" % rcpt.encode(), _RCPT)
            if self.config.chunking:
                # Every chunk goes in the same write; the server consumes the octets of a
                # BDAT even when it refuses the command (RFC 3030 2), so this stays in step.
                while not self._queue_bdat_chunk():
                    pass
            else:
                self._command(b"DATA\r\n", _DATA)

    def quit(self) -> None:
        """Queue QUIT (allowed when ready, or to give up politely after a failure)."""
        if self._state in (_QUITTING, _CLOSED):
            return
        self._state = _QUITTING
        self._command(b"QUIT\r\n", _QUIT)

    # -- internals -------------------------------------------------------------------------

    def _command(self, line: bytes, expect: int) -> None:
        self._out.append(line)
        self._expect.append(expect)

    def _mail_command(
        self, mail_from: str, rcpts: Sequence[str], payload: Payload, head_len: int
    ) -> bytes:
        caps = self.capabilities
        params = ""
        if caps.size is not None:
            params += f" SIZE={len(payload.raw) + head_len}"
        if payload.eight_bit and caps.eightbitmime:
            params += " BODY=8BITMIME"
        if caps.smtputf8 and not (mail_from.isascii() and all(r.isascii() for r in rcpts)):
            params += " SMTPUTF8"
        return f"MAIL FROM:<{mail_from}>{params}\r\n".encode()

    def _queue_bdat_chunk(self) -> bool:
        """Queue the next BDAT chunk of the current message; True if it was the last."""
        head = self._msg_head
        content = self._msg_content
        size = len(head) + len(content)
        pos = self._bdat_pos
        chunk = self.config.chunk_size
        out = self._out
        whole = self._msg_whole
        if chunk and size - pos > chunk:
            # Only split content (rare, --chunk-size) pays for a joined copy of it, made once
            # per message: joining per chunk made a large message cost size^2 / chunk.
            if whole is None:
                whole = self._msg_whole = memoryview(head + content)
            out.append(b"BDAT %d\r\n" % chunk)
            out.append(bytes(whole[pos : pos + chunk]))
            self._bdat_pos = pos + chunk
            self._expect.append(_BDAT)
            return False
        out.append(b"BDAT %d LAST\r\n" % (size - pos))
        if pos:
            assert whole is not None
            out.append(bytes(whole[pos:]))
        else:
            if head:
                out.append(head)
            out.append(content)
        self._bdat_pos = size
        self._expect.append(_EOD)
        return True

    def _send_greeting(self) -> None:
        verb = "LHLO" if self.config.lmtp else "EHLO"
        self._command(f"{verb} {self.config.ehlo_name}\r\n".encode(), _EHLO)

    def _fail(self, kind: str | None, detail: str, phase: str | None = None) -> None:
        if phase is None:
            phase = _PHASE_OF[self._expect[0]] if self._expect else "session"
        self._state = _FAILED
        self._queued = None
        self._out.clear()
        self._expect.clear()
        self._stamps.clear()
        self._events.append(SessionFailed(phase, kind, detail))

    # -- replies: one handler per expectation kind, chosen through ``_ON_REPLY`` -----------

    def _on_reply(self, reply: ParsedReply) -> None:
        """Pop the expectation ``reply`` answers and run that expectation's handler.

        A 421 ends the session whatever command it answers (the server is shutting down), so
        it is checked once here rather than in every handler; to QUIT it is just the goodbye.
        """
        if not self._stamps:
            self._fail("protocol", f"unexpected reply {reply.code} with no command outstanding")
            return
        kind = self._expect.popleft()
        sent_at = self._stamps.popleft()
        code = reply.code
        elapsed = self._recv_now - sent_at
        if code == 421 and kind != _QUIT:
            self._events.append(PhaseDone(_PHASE_OF[kind], reply, elapsed, False))
            self._fail(None, f"server closing the session: {reply.code} {reply.text}")
            return
        _ON_REPLY[kind](self, reply, code, elapsed, sent_at)

    # The session set-up: banner, EHLO (or HELO), STARTTLS, AUTH.

    def _on_banner(self, reply: ParsedReply, code: int, elapsed: float, sent_at: float) -> None:
        ok = code == 220
        self._events.append(PhaseDone("banner", reply, elapsed, ok))
        if ok:
            self._send_greeting()
        else:
            self._fail(None, f"greeting refused: {code} {reply.text}", "banner")

    def _on_ehlo(self, reply: ParsedReply, code: int, elapsed: float, sent_at: float) -> None:
        if code // 100 == 2:
            self._greeted(reply, elapsed, Capabilities.from_ehlo(reply))
        elif not self.config.lmtp and code in (500, 502, 504, 550):
            # An SMTP server without ESMTP: fall back to HELO (RFC 5321 3.2).
            self._command(f"HELO {self.config.ehlo_name}\r\n".encode(), _HELO)
        else:
            self._greeting_refused(reply, code, elapsed)

    def _on_helo(self, reply: ParsedReply, code: int, elapsed: float, sent_at: float) -> None:
        if code // 100 == 2:
            self._greeted(reply, elapsed, Capabilities(greeting="HELO"))
        else:
            self._greeting_refused(reply, code, elapsed)

    def _greeting_refused(self, reply: ParsedReply, code: int, elapsed: float) -> None:
        self._events.append(PhaseDone("ehlo", reply, elapsed, False))
        self._fail(None, f"greeting refused: {code} {reply.text}", "ehlo")

    def _greeted(self, reply: ParsedReply, elapsed: float, caps: Capabilities) -> None:
        """EHLO or HELO accepted: STARTTLS, AUTH or readiness, as the plan says."""
        self._events.append(PhaseDone("ehlo", reply, elapsed, True))
        self.capabilities = caps
        config = self.config
        if config.starttls and not self.tls_active:
            if not caps.starttls:
                self._fail("protocol", "server does not offer STARTTLS", "starttls")
            else:
                self._command(b"STARTTLS\r\n", _STARTTLS)
            return
        if config.auth_user is not None:
            if config.auth_mech not in caps.auth:
                offered = " ".join(sorted(caps.auth)) or "none"
                self._fail(
                    "protocol",
                    f"server does not offer AUTH {config.auth_mech} (offers: {offered})",
                    "auth",
                )
            elif config.auth_mech == "PLAIN":
                token = _b64(f"\0{config.auth_user}\0{config.auth_password}")
                self._command(f"AUTH PLAIN {token}\r\n".encode(), _AUTH)
            else:
                self._command(b"AUTH LOGIN\r\n", _AUTH_LOGIN_USER)
            return
        self._greeting_done()

    def _on_starttls(self, reply: ParsedReply, code: int, elapsed: float, sent_at: float) -> None:
        ok = code == 220
        self._events.append(PhaseDone("starttls", reply, elapsed, ok))
        if not ok:
            self._fail(None, f"STARTTLS refused: {code} {reply.text}", "starttls")
        elif self._parser.buffered:
            # Anything after the 220 was sent in clear text before the handshake and would
            # be taken as if it came over TLS (the STARTTLS injection attack).
            self._fail("protocol", "server sent data after its 220 to STARTTLS", "starttls")
        else:
            self._state = _TLS
            self._events.append(ReadyForTLS())

    def _on_auth_login_user(
        self, reply: ParsedReply, code: int, elapsed: float, sent_at: float
    ) -> None:
        # The AUTH phase is timed from the AUTH LOGIN command, across both challenges.
        self._auth_started = sent_at
        self._auth_login_step(reply, code, self.config.auth_user or "", _AUTH_LOGIN_PASS)

    def _on_auth_login_pass(
        self, reply: ParsedReply, code: int, elapsed: float, sent_at: float
    ) -> None:
        self._auth_login_step(reply, code, self.config.auth_password, _AUTH)

    def _auth_login_step(self, reply: ParsedReply, code: int, answer: str, then: int) -> None:
        """A 334 challenge of AUTH LOGIN: answer it (``then`` is what the answer expects)."""
        if code // 100 == 2:
            # Some sinks (Postfix smtp-sink) accept AUTH at once, without the challenges.
            self._events.append(
                PhaseDone("auth", reply, self._recv_now - self._auth_started, True)
            )
            self._greeting_done()
        elif code != 334:
            self._events.append(
                PhaseDone("auth", reply, self._recv_now - self._auth_started, False)
            )
            self._fail(None, f"AUTH LOGIN refused: {code} {reply.text}", "auth")
        else:
            self._command(_b64(answer).encode() + _CRLF, then)

    def _on_auth(self, reply: ParsedReply, code: int, elapsed: float, sent_at: float) -> None:
        if self.config.auth_mech == "PLAIN":
            self._auth_started = sent_at
        ok = code // 100 == 2
        self._events.append(PhaseDone("auth", reply, self._recv_now - self._auth_started, ok))
        if ok:
            self._greeting_done()
        else:
            self._fail(None, f"authentication failed: {code} {reply.text}", "auth")

    def _greeting_done(self) -> None:
        caps = self.capabilities
        if self.config.chunking and not caps.chunking:
            self._fail("protocol", "server does not offer CHUNKING (BDAT)", "ehlo")
            return
        mode = self.config.pipelining
        self.pipelining = mode == "on" or (mode == "auto" and caps.pipelining)
        self._state = _READY
        self._events.append(SessionReady())

    # The mail transaction. Replies that only follow from an earlier failure of the same
    # transaction (everything after a refused MAIL, the content reply when no recipient was
    # accepted) produce no event: the failure was counted once, where it happened.

    def _on_mail(self, reply: ParsedReply, code: int, elapsed: float, sent_at: float) -> None:
        positive = code // 100 == 2
        self._events.append(PhaseDone("mail", reply, elapsed, positive))
        if positive:
            self._mail_ok = True
            if not self.pipelining:
                self._send_next_rcpt()
        else:
            self._message_failed("mail", reply)
            if not self.pipelining:
                self._message_done()  # no transaction was opened: nothing to reset

    def _on_rcpt(self, reply: ParsedReply, code: int, elapsed: float, sent_at: float) -> None:
        if not self._mail_ok:
            return
        positive = code // 100 == 2
        self._events.append(PhaseDone("rcpt", reply, elapsed, positive))
        if positive:
            self._accepted += 1
        else:
            self._message_failed("rcpt", reply)
        if not self.pipelining:
            self._send_next_rcpt()

    def _on_data(self, reply: ParsedReply, code: int, elapsed: float, sent_at: float) -> None:
        usable = self._mail_ok and self._accepted > 0
        if code == 354:
            if usable:
                self._events.append(PhaseDone("data", reply, elapsed, True))
                if self._msg_head:
                    self._out.append(self._msg_head)
                self._out.append(self._msg_content)
                self._expect.append(_EOD)
                self._content_sent = True
            else:
                # RFC 2920 3.1: DATA was accepted although no recipient was; the content
                # must not go out, and a lone "." ends the transaction.
                self._out.append(_LONE_DOT)
                self._expect.append(_DISCARD_EOD)
            return
        if usable:
            self._events.append(PhaseDone("data", reply, elapsed, False))
            self._message_failed("data", reply)
        self._end_transaction(rset=self._mail_ok)

    def _on_bdat(self, reply: ParsedReply, code: int, elapsed: float, sent_at: float) -> None:
        usable = self._mail_ok and self._accepted > 0
        positive = code // 100 == 2
        if usable:
            self._events.append(PhaseDone("bdat", reply, elapsed, positive))
            if not positive:
                self._message_failed("bdat", reply)
        if not self.pipelining:
            if positive and usable:
                self._queue_bdat_chunk()
            else:
                self._end_transaction(rset=self._mail_ok)

    def _on_eod(self, reply: ParsedReply, code: int, elapsed: float, sent_at: float) -> None:
        """The reply to the end of DATA or to BDAT LAST."""
        if not (self._mail_ok and self._accepted > 0):
            # BDAT LAST answered after MAIL or every RCPT failed (pipelined): the server
            # refused it; MAIL may still be open.
            self._end_transaction(rset=self._mail_ok)
            return
        positive = code // 100 == 2
        self._events.append(PhaseDone("eod", reply, elapsed, positive))
        if positive:
            self._eod_ok += 1
        else:
            self._message_failed("eod", reply)
        if self.config.lmtp:
            # RFC 2033 4.2: one reply per accepted recipient, in RCPT order. The expectation is
            # put back, with its send time, until every accepted recipient is answered.
            left = (self._lmtp_left or self._accepted) - 1
            self._lmtp_left = left
            if left > 0:
                self._expect.appendleft(_EOD)
                self._stamps.appendleft(sent_at)
                return
        self._end_transaction(rset=False)

    def _on_discard_eod(
        self, reply: ParsedReply, code: int, elapsed: float, sent_at: float
    ) -> None:
        self._end_transaction(rset=False)

    # The end of the session.

    def _on_rset(self, reply: ParsedReply, code: int, elapsed: float, sent_at: float) -> None:
        self._events.append(PhaseDone("rset", reply, elapsed, code // 100 == 2))
        self._message_done()

    def _on_quit(self, reply: ParsedReply, code: int, elapsed: float, sent_at: float) -> None:
        self._events.append(PhaseDone("quit", reply, elapsed, code // 100 == 2))
        self._state = _CLOSED
        self._events.append(SessionClosed())

    # -- the transaction's bookkeeping -----------------------------------------------------

    def _send_next_rcpt(self) -> None:
        """Without pipelining: the next RCPT, or the content once every RCPT is answered."""
        rcpts = self._msg_rcpts
        i = self._next_rcpt
        if i < len(rcpts):
            self._next_rcpt = i + 1
            self._command(b"RCPT TO:<%s>\r\n" % rcpts[i].encode(), _RCPT)
        elif self._accepted == 0:
            self._end_transaction(rset=True)
        elif self.config.chunking:
            self._queue_bdat_chunk()
        else:
            self._command(b"DATA\r\n", _DATA)

    def _message_failed(self, phase: str, reply: ParsedReply) -> None:
        if self._fail_phase is None:
            self._fail_phase = phase
            self._fail_reply = reply

    def _end_transaction(self, *, rset: bool) -> None:
        """The last reply of the transaction is in. RSET when MAIL was accepted but the
        transaction did not end with the content, so the next MAIL is not refused as nested."""
        if rset:
            self._command(b"RSET\r\n", _RSET)
        else:
            self._message_done()

    def _message_done(self) -> None:
        self._state = _READY
        self._content_sent = False
        self._events.append(
            MessageDone(self._eod_ok > 0, self._accepted, self._fail_phase, self._fail_reply)
        )
        queued = self._queued
        if queued is not None:
            # The message pipelined behind this one: its replies come next.
            self._queued = None
            self._begin(*queued)
            return
        self._msg_head = b""
        self._msg_whole = None
        self._msg_content = b""
        self._msg_rcpts = ()


_ReplyHandler = Callable[[ClientConnection, ParsedReply, int, float, float], None]

#: What to do with a reply, by the expectation it answers: the client's transition table
#: (indexed by expectation kind, so one subscript replaces a chain of comparisons).
_ON_REPLY: tuple[_ReplyHandler, ...] = (
    ClientConnection._on_banner,  # _BANNER
    ClientConnection._on_ehlo,  # _EHLO
    ClientConnection._on_helo,  # _HELO
    ClientConnection._on_starttls,  # _STARTTLS
    ClientConnection._on_auth,  # _AUTH
    ClientConnection._on_auth_login_user,  # _AUTH_LOGIN_USER
    ClientConnection._on_auth_login_pass,  # _AUTH_LOGIN_PASS
    ClientConnection._on_mail,  # _MAIL
    ClientConnection._on_rcpt,  # _RCPT
    ClientConnection._on_data,  # _DATA
    ClientConnection._on_eod,  # _EOD
    ClientConnection._on_bdat,  # _BDAT
    ClientConnection._on_discard_eod,  # _DISCARD_EOD
    ClientConnection._on_rset,  # _RSET
    ClientConnection._on_quit,  # _QUIT
)
assert len(_ON_REPLY) == len(_PHASE_OF) == _QUIT + 1
