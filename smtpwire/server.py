"""The server side of an SMTP session as a sans-IO state machine.

Rules of this file: it never touches sockets, clocks, threads or files. Bytes go in with
``receive_data``; ``next_event`` processes as much buffered input as it can and returns an
event (``NeedData``, ``OutputFull``, ``MessageReceived``, ``MessageRefused``, ``AuthAttempt``,
``StartTLS``, ``Closed``); replies pile up until the driver takes them with ``data_to_send``,
and parsing pauses (``OutputFull``) while they are over ``SessionPolicy.max_unsent_output``.
Events that need the driver's answer (storing a message, checking a password, the TLS
handshake) park the machine until the driver calls ``message_stored``/``message_failed``,
``auth_result`` or ``tls_started``.

Theory of operation. Input is read by a reader chosen by ``Mode`` (command lines, a DATA body,
BDAT octets, an AUTH continuation line, the discarded rest of an overlong line), h11-style. A
command line is matched once against ``grammar.COMMAND`` and dispatched through ``_HANDLERS``
by verb. Whether a verb may run in the current transaction ``Phase`` is decided by one lookup
in the ``_OUT_OF_SEQUENCE`` table; the handlers only move between phases. Because every
complete command already buffered is processed before the driver is asked for more bytes, the
replies to a PIPELINING group leave in one send.

Security properties held here:
- every buffer and count is bounded (command line, AUTH line, message size, recipients, errors,
  non-transaction commands, unsent replies); a line is refused as soon as it passes its limit,
  and the rest of it is discarded unread;
- after STARTTLS, anything the client pipelined in plaintext is discarded (CVE-2011-0411) and
  the session forgets HELO, envelope and AUTH (RFC 3207 4.2); STARTTLS inside a transaction
  is refused, so no envelope is lost to it;
- only CRLF "." CRLF ends DATA (see ``data.DataReader``);
- passwords only ever leave in an ``AuthAttempt`` (whose repr hides them).

Injected faults (``SessionPolicy.faults``, a ``faults.FaultPlan``): when a plan is set, the
commands are dispatched through ``_FAULTY_HANDLERS``, whose wrappers ask the plan before the
usual handler answers an in-sequence command; the banner is decided in ``__init__`` and the end
of data in ``_finish_message``. An injected reply replaces the answer (421 also ends the
session; at EOD the message is not stored), a delay is a ``Delay`` event returned before the
queued answer may leave, a drop closes without the answer (at DATA: once content arrives,
read from ``Mode.DROP_CONTENT``). Events that must follow another wait in ``Mode.HELD``.
Without a plan none of this runs: the only cost is the handler table being an attribute.

LMTP (RFC 2033, ``SessionPolicy.lmtp``): chosen once, in ``__init__``, as a handler table
(``_LMTP_HANDLERS``: LHLO is the hello, HELO and EHLO are refused) and a sequence table that
asks for LHLO, so plain SMTP pays nothing per command. At the end of data (``_finish_message``,
its one per-message branch) an LMTP session answers once per accepted recipient, in RCPT order:
an EOD fault is decided per recipient, the store is asked once for the recipients left, and
its result becomes each of their replies. The replies are queued one at a time by
``Mode.LMTP_REPLIES``, so the bound on unsent output holds however many recipients there are.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum, auto
from functools import cache
from types import MappingProxyType

from . import reply_table as R
from .data import BareLinefeedPolicy, BdatReader, DataFailure, DataReader
from .events import (
    REFUSED_FOR_EVERY_RECIPIENT,
    AuthAttempt,
    Closed,
    Delay,
    Dropped,
    Envelope,
    Event,
    FaultReplied,
    MessageReceived,
    MessageRefused,
    NeedData,
    OutputFull,
    StartTLS,
)
from .faults import FaultPlan, Verdict
from .grammar import COMMAND, MAIL_ARGS, MAX_PATH_OCTETS, RCPT_ARGS, DuplicateParameter, Path
from .grammar import parse_path as _parse_path
from .replies import Reply

__all__ = ["Mode", "Phase", "ServerConnection", "SessionPolicy"]

#: RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
MAX_COMMAND_LINE = 512
#: RFC 4954 4: AUTH lines (the command and every response line) may be up to 12288 octets.
MAX_AUTH_LINE = 12288
# The same limits for a line's content, without its CRLF (a bare LF counts as a CRLF).
_COMMAND_CONTENT = MAX_COMMAND_LINE - 2
_AUTH_CONTENT = MAX_AUTH_LINE - 2
#: What ``_take_line`` returns for a refused overlong line: no real line contains LF.
_LINE_REFUSED = b"\n"
#: ``max_unsent_output == 0`` (no bound) as a bound no queue reaches, so that the check per
#: command stays one integer compare.
_NO_OUTPUT_BOUND = 1 << 62
_BDAT_ARGS = re.compile(r"([0-9]{1,18})( +LAST)? *", re.IGNORECASE)
_SIZE_VALUE = re.compile(r"[0-9]{1,20}")


@dataclass(frozen=True, slots=True)
class SessionPolicy:
    """What the server offers and enforces; shared by all sessions of a server."""

    hostname: str = "localhost"
    #: Largest message in octets (advertised as SIZE); 0 means no limit.
    max_size: int = 10 * 1024 * 1024
    #: Recipients per transaction; the next one gets 452 4.5.3. 0 means no limit.
    max_recipients: int = 1000
    #: Protocol errors (5xx to commands) before the session is ended with 421 4.7.0.
    #: 0 means no limit.
    max_errors: int = 20
    #: NOOP, RSET, VRFY, EXPN and HELP commands a session may send (as Postfix's
    #: smtpd_junk_command_limit); the next one is answered 421 4.7.0 and ends the session. The
    #: count starts over when a message is accepted, so a long session that sends RSET
    #: between messages is not cut off. 0 means no limit.
    max_junk_commands: int = 100
    #: Octets of unsent replies at which parsing pauses and ``next_event`` returns
    #: ``OutputFull`` until the driver takes them with ``data_to_send``: a client that
    #: pipelines without reading then costs about this much output, not a reply per command.
    #: 0 means no bound (a driver that does not know ``OutputFull`` would spin on it).
    max_unsent_output: int = 4096
    #: True when credentials exist, so AUTH PLAIN LOGIN can be offered.
    auth_enabled: bool = False
    auth_required: bool = False
    #: True when a certificate is configured, so STARTTLS can be offered.
    tls_available: bool = False
    #: Offer AUTH on a plaintext connection even though TLS is available.
    insecure_auth: bool = False
    bare_linefeed: BareLinefeedPolicy = BareLinefeedPolicy.NORMALIZE
    #: Replies, delays and drops to inject (None: none, the usual case). One plan is shared
    #: by all sessions of a server: its ``every=N`` counts and once-keys are per process.
    faults: FaultPlan | None = None
    #: Where to count the replies queued, by code (``reply_counts[250] += 1``), shared by all
    #: sessions; None: not counted. A list indexed by code: one increment per reply.
    reply_counts: list[int] | None = field(default=None, compare=False, hash=False)
    #: Speak LMTP (RFC 2033) instead of SMTP: LHLO, and a reply per recipient at end of data.
    lmtp: bool = False

    def ehlo_keywords(self, tls_active: bool) -> list[str]:
        """The EHLO keyword lines (RFC 5321 4.1.1.1) for a session in this TLS state."""
        keywords = [
            "PIPELINING",
            f"SIZE {self.max_size}" if self.max_size else "SIZE",
            "8BITMIME",
            "SMTPUTF8",
            "ENHANCEDSTATUSCODES",
            "CHUNKING",
        ]
        if self.auth_offered(tls_active):
            keywords.append("AUTH PLAIN LOGIN")
        if self.tls_available and not tls_active:
            keywords.append("STARTTLS")
        return keywords

    def auth_offered(self, tls_active: bool) -> bool:
        # With TLS configured, credentials only travel encrypted unless told otherwise.
        return self.auth_enabled and (tls_active or not self.tls_available or self.insecure_auth)


class Mode(IntEnum):
    """Which reader consumes the next input bytes (an IntEnum: hashed in C on the hot path)."""

    #: Command lines.
    COMMAND = auto()
    #: A DATA body, until CRLF.CRLF.
    DATA = auto()
    #: The octets of one BDAT chunk.
    BDAT = auto()
    #: One line of an AUTH exchange (a base64 response or "*").
    AUTH_LINE = auto()
    #: The rest of a line already refused as too long, up to its LF: dropped unread.
    DISCARD_LINE = auto()
    #: Parked: the driver owes an answer (store, password check, TLS handshake).
    WAITING = auto()
    #: Events are held to be returned, one per ``next_event``, before the mode they follow.
    HELD = auto()
    #: A drop at DATA: the 354 is out; the connection closes once content arrives.
    DROP_CONTENT = auto()
    #: LMTP: the end of data is answered, one reply per recipient queued per step.
    LMTP_REPLIES = auto()
    #: The session is over; input is ignored.
    CLOSED = auto()


class Phase(IntEnum):
    """Where the session is in the mail transaction; decides which commands are in sequence."""

    #: No HELO/EHLO yet (also right after STARTTLS).
    CONNECTED = auto()
    #: Greeted, no transaction.
    READY = auto()
    #: MAIL accepted, no recipient yet.
    MAIL = auto()
    #: At least one recipient accepted.
    RCPT = auto()
    #: Inside a BDAT sequence (after a non-LAST chunk).
    BDAT = auto()
    #: An injected failure banner was sent: only QUIT is in sequence (RFC 5321 3.1).
    NO_SERVICE = auto()


# Commands out of sequence: (verb, phase) -> the 503 to send. Absent means "in sequence".
_OUT_OF_SEQUENCE: dict[tuple[str, Phase], Reply] = {
    ("MAIL", Phase.CONNECTED): R.NEED_HELO,
    ("MAIL", Phase.MAIL): R.NESTED_MAIL,
    ("MAIL", Phase.RCPT): R.NESTED_MAIL,
    ("MAIL", Phase.BDAT): R.NESTED_MAIL,
    ("RCPT", Phase.CONNECTED): R.NEED_MAIL,
    ("RCPT", Phase.READY): R.NEED_MAIL,
    ("RCPT", Phase.BDAT): R.BDAT_IN_PROGRESS,
    ("DATA", Phase.CONNECTED): R.NEED_MAIL,
    ("DATA", Phase.READY): R.NEED_MAIL,
    ("DATA", Phase.MAIL): R.NEED_RCPT,
    ("DATA", Phase.BDAT): R.DATA_DURING_BDAT,
    ("BDAT", Phase.CONNECTED): R.NEED_MAIL,
    ("BDAT", Phase.READY): R.NEED_MAIL,
    ("BDAT", Phase.MAIL): R.NEED_RCPT,
    ("AUTH", Phase.CONNECTED): R.NEED_HELO,
    ("AUTH", Phase.MAIL): R.AUTH_IN_TRANSACTION,
    ("AUTH", Phase.RCPT): R.AUTH_IN_TRANSACTION,
    ("AUTH", Phase.BDAT): R.AUTH_IN_TRANSACTION,
    ("STARTTLS", Phase.MAIL): R.TLS_IN_TRANSACTION,
    ("STARTTLS", Phase.RCPT): R.TLS_IN_TRANSACTION,
    ("STARTTLS", Phase.BDAT): R.TLS_IN_TRANSACTION,
    **{
        (verb, Phase.NO_SERVICE): R.NO_SERVICE
        for verb in ("HELO", "EHLO", "MAIL", "RCPT", "DATA", "BDAT", "RSET", "NOOP", "VRFY",
                     "EXPN", "HELP", "AUTH", "STARTTLS")
    },
}
#: The same for LMTP: LHLO is the hello the refusals ask for (RFC 2033 4.1).
_LMTP_OUT_OF_SEQUENCE: dict[tuple[str, Phase], Reply] = {
    key: R.NEED_LHLO if reply is R.NEED_HELO else reply for key, reply in _OUT_OF_SEQUENCE.items()
} | {("LHLO", Phase.NO_SERVICE): R.NO_SERVICE}

_HELP_TOPICS: dict[str, str] = {
    "HELO": "HELO hostname",
    "EHLO": "EHLO hostname",
    "LHLO": "LHLO hostname",
    "MAIL": "MAIL FROM:<address> [SIZE=n] [BODY=7BIT|8BITMIME] [SMTPUTF8]",
    "RCPT": "RCPT TO:<address>",
    "DATA": "DATA, then the message, ended by a line with a single dot",
    "BDAT": "BDAT chunk-size [LAST]",
    "RSET": "RSET",
    "NOOP": "NOOP [string]",
    "QUIT": "QUIT",
    "VRFY": "VRFY address",
    "EXPN": "EXPN list",
    "HELP": "HELP [command]",
    "AUTH": "AUTH PLAIN|LOGIN [initial-response]",
    "STARTTLS": "STARTTLS",
}
_HELP_REPLIES = {verb: Reply(214, "2.0.0", text) for verb, text in _HELP_TOPICS.items()}
_HELP_UNKNOWN = Reply(504, "5.5.1", "HELP topic unknown")

_AUTH_MECHANISMS = ("PLAIN", "LOGIN")
#: LMTP: no reply injected for any recipient (immutable, so it can be a shared default).
_NO_ANSWERS: Mapping[int, Reply] = MappingProxyType({})


class ServerConnection:
    """One SMTP session, server side. See the module docstring for the theory of operation."""

    # LMTP's end of data: the stored message's recipients in RCPT order and the replies
    # injected for some of them (by index), until the store answers; then the recipients
    # being answered, their injected replies, the reply for the others, how many are queued,
    # and whether the session ends after them (an injected 421). Each reply is built as it is
    # queued: a thousand recipients never mean a thousand replies held. Immutable class
    # defaults, only ever replaced, never changed in place: an SMTP session carries none.
    _lmtp_rcpts: Sequence[str] = ()
    _lmtp_refused: Mapping[int, Reply] = _NO_ANSWERS
    _lmtp_queue: Sequence[str] = ()
    _lmtp_answers: Mapping[int, Reply] = _NO_ANSWERS
    _lmtp_default: Reply | None = None
    _lmtp_sent = 0
    _lmtp_close = False

    def __init__(self, policy: SessionPolicy, *, tls_active: bool = False) -> None:
        self.policy = policy
        self.tls_active = tls_active
        self.mode = Mode.COMMAND
        self.phase = Phase.CONNECTED
        self.helo = ""
        self.greeting = "LMTP" if policy.lmtp else "ESMTP"
        self.auth_user: str | None = None
        self.envelope: Envelope | None = None
        self.errors = 0
        #: NOOP, RSET, VRFY, EXPN and HELP since the session began or a message was accepted.
        self.junk_commands = 0
        self._buf = bytearray()
        banner = (R.lmtp_banner if policy.lmtp else R.banner)(policy.hostname).to_bytes()
        self._out: list[bytes] = [banner]
        self._reply_counts = policy.reply_counts
        if self._reply_counts is not None:
            self._reply_counts[220] += 1  # taken back if an injected fault replaces it
        # Octets in ``_out``, kept as replies are queued: the back-pressure check is then one
        # compare against ``_unsent_bound`` (``policy.max_unsent_output``, or never when 0).
        self._unsent = len(banner)
        self._unsent_bound = policy.max_unsent_output or _NO_OUTPUT_BOUND
        self._eof = False
        # DATA/BDAT state.
        self._data_reader: DataReader | None = None
        self._bdat_reader: BdatReader | None = None
        self._bdat_chunks: list[bytes] = []
        self._bdat_size = 0
        self._bdat_last = False
        self._bdat_refusal: Reply | None = None
        # AUTH exchange state: mechanism, and for LOGIN the username once given.
        self._auth_mechanism = ""
        self._auth_username: str | None = None
        self._pending: Event | None = None
        # Injected faults: the plan, the handler table that consults it, events held back
        # (``Mode.HELD``) and the mode they return to, a delay owed after the driver's answer.
        plan = policy.faults
        self._faults = plan
        # LMTP is chosen here, once: its own tables, so SMTP commands pay nothing for it.
        self._lmtp = policy.lmtp
        if policy.lmtp:
            self._handlers = _LMTP_HANDLERS if plan is None else _FAULTY_LMTP_HANDLERS
            self._sequence = _LMTP_OUT_OF_SEQUENCE
        else:
            self._handlers = _HANDLERS if plan is None else _FAULTY_HANDLERS
            self._sequence = _OUT_OF_SEQUENCE
        self._held: list[Event] = []
        self._held_mode = Mode.COMMAND
        self._delay_after_answer: Delay | None = None
        if plan is not None and plan.applies_to("BANNER"):
            self._fault_banner(plan)

    # ---- driver API --------------------------------------------------------------------

    def receive_data(self, data: bytes | bytearray) -> None:
        """Add bytes from the peer; ``b""`` means the peer closed its side."""
        if data:
            if self.mode is not Mode.CLOSED:
                self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Event:
        """Process buffered input until an event for the driver comes up.

        Before each step it checks the unsent replies against their bound: at or over it,
        ``OutputFull`` is returned and nothing more is parsed until ``data_to_send``. Held
        events (``Mode.HELD``, such as a delay owed before the queued replies may leave) come
        out first: they parse nothing, and sending first would defeat the delay.
        """
        while True:
            if self._unsent >= self._unsent_bound and (
                self.mode is not Mode.CLOSED and self.mode is not Mode.HELD
            ):
                return OutputFull
            event = _READERS[self.mode](self)
            if event is not None:
                return event

    def data_to_send(self) -> bytes:
        """Everything queued for the peer, as one buffer (one send for a pipelined group)."""
        out = self._out
        if not out:
            return b""
        data = out[0] if len(out) == 1 else b"".join(out)
        out.clear()
        self._unsent = 0
        return data

    @property
    def in_transaction(self) -> bool:
        """True between an accepted MAIL and the end of its message (for graceful shutdown)."""
        return self.phase in (Phase.MAIL, Phase.RCPT, Phase.BDAT) or self.mode in (
            Mode.DATA,
            Mode.BDAT,
        )

    @property
    def receiving_content(self) -> bool:
        """True while message octets are expected (the driver applies the data timeout)."""
        return self.mode is Mode.DATA or self.mode is Mode.BDAT

    @property
    def buffered(self) -> int:
        """Octets received and not yet processed (a partial line, or input held back while
        the output is full); 0 at a command boundary, where a new command's deadline starts."""
        return len(self._buf)

    def message_stored(self, queue_id: str) -> None:
        """The driver stored the message of the last ``MessageReceived``."""
        # As Postfix: junk commands are counted between delivered messages, not per session.
        self.junk_commands = 0
        if self._lmtp_rcpts:
            self._lmtp_answer(R.queued(queue_id))
        else:
            self._resume(R.queued(queue_id))

    def message_failed(self, reply: Reply = R.STORAGE_FAILED) -> None:
        """The driver could not store the message; the client is told to try later."""
        if self._lmtp_rcpts:
            self._lmtp_answer(reply)
        else:
            self._resume(reply)

    def auth_result(self, ok: bool) -> None:
        """The driver checked the credentials of the last ``AuthAttempt``."""
        if ok:
            self.auth_user = self._auth_username
            self._resume(R.AUTH_OK)
        else:
            self._auth_username = None
            self._resume(R.AUTH_FAILED, error=True)

    def tls_started(self) -> None:
        """The TLS handshake after ``StartTLS`` succeeded: start over as RFC 3207 4.2 says."""
        self.tls_active = True
        self.helo = ""
        self.greeting = "LMTP" if self._lmtp else "ESMTP"
        self.auth_user = None
        self.envelope = None
        if self.phase is not Phase.NO_SERVICE:
            self.phase = Phase.CONNECTED
        # Implicit TLS: the banner's injected fault (a delay or reply held, a drop) outlives
        # the handshake, which comes before the banner is sent.
        if self.mode is Mode.HELD:
            if self._held_mode is not Mode.CLOSED:
                self._held_mode = Mode.COMMAND
        elif self.mode is not Mode.CLOSED:
            self.mode = Mode.COMMAND

    def close(self, reply: Reply | None = None) -> None:
        """End the session, optionally queueing a last reply (421 on shutdown or timeout)."""
        if self.mode is Mode.HELD and self._held_mode is Mode.LMTP_REPLIES:
            self._held.clear()  # a delay before the replies: moot now
            self.mode = Mode.LMTP_REPLIES
        if self.mode is Mode.LMTP_REPLIES:
            # The message is stored: its recipients' answers must not be lost to a 421.
            self._lmtp_flush()
        if reply is not None and self.mode is not Mode.CLOSED:
            self._reply(reply)
        self.mode = Mode.CLOSED
        self._buf.clear()

    def timed_out(self) -> None:
        self.close(R.timed_out(self.policy.hostname))

    # ---- internals: replies ------------------------------------------------------------

    def _reply(self, reply: Reply) -> None:
        wire = reply.to_bytes()
        self._out.append(wire)
        self._unsent += len(wire)
        counts = self._reply_counts
        if counts is not None:
            counts[reply.code] += 1

    def _refuse(self, reply: Reply) -> None:
        """Reply to a client error and count it; past the limit the session ends with 421."""
        self._reply(reply)
        self.errors += 1
        limit = self.policy.max_errors
        if limit and self.errors >= limit:
            self.close(R.too_many_errors(self.policy.hostname))

    def _junk_command(self) -> bool:
        """Count a NOOP, RSET, VRFY, EXPN or HELP; True when it was one too many and the
        session is now closed (with 421), so the command itself must not be answered."""
        self.junk_commands += 1
        limit = self.policy.max_junk_commands
        if limit and self.junk_commands > limit:
            self.close(R.too_many_commands(self.policy.hostname))
            return True
        return False

    def _resume(self, reply: Reply, *, error: bool = False) -> None:
        if self.mode is not Mode.WAITING:
            raise RuntimeError("no pending event to answer")
        self._pending = None
        self.mode = Mode.COMMAND
        if error:
            self._refuse(reply)
        else:
            self._reply(reply)
        if self._delay_after_answer is not None:
            delay, self._delay_after_answer = self._delay_after_answer, None
            self._hold(delay)

    def _park(self, event: Event) -> Event:
        self.mode = Mode.WAITING
        self._pending = event
        return event

    def _reset_transaction(self) -> None:
        self.envelope = None
        self._bdat_chunks = []
        self._bdat_size = 0
        if self.phase is not Phase.CONNECTED:
            self.phase = Phase.READY

    # ---- injected faults (see the module docstring) ------------------------------------

    def _hold(self, *events: Event) -> None:
        """Return ``events`` from the next ``next_event`` calls, then go on in this mode."""
        if self.mode is not Mode.HELD:
            self._held_mode = self.mode
            self.mode = Mode.HELD
        self._held.extend(events)

    def _read_held(self) -> Event | None:
        held = self._held
        event = held.pop(0)
        if not held:
            self.mode = self._held_mode
        return event

    def _then(self, first: Event, after: Event | None) -> Event:
        """``first`` now, ``after`` (if any) on the next ``next_event``."""
        if after is not None:
            self._hold(after)
        return first

    def _fault_reply(self, point: str, reply: Reply, why: str) -> FaultReplied:
        """Queue an injected reply; a 421 ends the session, as any 421 does."""
        self._reply(reply)
        if reply.code == 421:
            self.close()
        return FaultReplied(point, reply.code, why)

    def _fault_banner(self, plan: FaultPlan) -> None:
        verdict = plan.decide("BANNER")
        if verdict is None:
            return
        event: Event | None = None
        if (verdict.drop or verdict.reply is not None) and self._reply_counts is not None:
            self._reply_counts[220] -= 1  # the banner counted in __init__ never leaves
        if verdict.drop:
            self._out.clear()
            self._unsent = 0
            self.close()
            event = Dropped("BANNER", verdict.why)
        elif verdict.reply is not None:
            self._out.clear()
            self._unsent = 0
            event = self._fault_reply("BANNER", verdict.reply, verdict.why)
            if self.mode is not Mode.CLOSED:
                self.phase = Phase.NO_SERVICE
        if verdict.delay:
            self._hold(Delay("BANNER", verdict.delay, verdict.why))
        if event is not None:
            self._hold(event)

    def _fault_command(
        self, verb: str, verdict: Verdict, handler: _Handler, arg: str | None
    ) -> Event | None:
        """Carry out ``verdict`` for a command about to be answered by ``handler``."""
        event: Event | None
        if verdict.drop:
            if verb in _DROP_MID_CONTENT:
                event = handler(self, arg)
                if self.mode is Mode.DATA:
                    self._data_reader = None
                    self.mode = Mode.DROP_CONTENT
            else:
                self.close()
                event = Dropped(verb, verdict.why)
        elif verdict.reply is not None:
            event = self._fault_reply(verb, verdict.reply, verdict.why)
        else:
            event = handler(self, arg)
        if verdict.delay:
            return self._then(Delay(verb, verdict.delay, verdict.why), event)
        return event

    def _fault_at_eod(self, verdict: Verdict, message: MessageReceived) -> Event:
        """The end of data with a verdict: a drop or an injected reply keeps the message from
        the store; a delay alone holds the answer the driver gives (250 or 451) after storing."""
        event: Event
        if verdict.drop:
            self.close()
            event = Dropped("EOD", verdict.why)
        elif verdict.reply is not None:
            event = self._fault_reply("EOD", verdict.reply, verdict.why)
        else:
            self._delay_after_answer = Delay("EOD", verdict.delay, verdict.why)
            return self._park(message)
        if verdict.delay:
            return self._then(Delay("EOD", verdict.delay, verdict.why), event)
        return event

    def _drop_content(self) -> Event | None:
        """A drop at DATA: close as soon as content arrives, without reading it."""
        if self._buf:
            self.close()
            return Dropped("DATA", "drop at DATA")
        return Closed() if self._eof else NeedData

    # ---- LMTP's end of data (RFC 2033 4.2; see the module docstring) ---------------------

    def _finish_lmtp(
        self, envelope: Envelope, content: bytes | None, failure: DataFailure | None
    ) -> Event:
        """The end of data of an LMTP session: one reply per recipient, in RCPT order.

        A message refused by policy (size, bare LF) is refused for each recipient. An EOD
        fault is asked about each recipient alone (``to=`` names that recipient, ``every=N``
        counts recipients): its reply goes to that recipient only, a drop closes the
        connection (nothing stored), the first delay holds all the replies. The message is
        stored once, its envelope holding only the recipients no fault refused; if a fault
        refused them all, nothing is stored.
        """
        rcpts = envelope.rcpt_tos
        if failure is not None:
            reply = self._failure_reply(failure)
            self._lmtp_start(rcpts, {}, reply)
            return MessageRefused(envelope, failure.value, reply.code)
        assert content is not None
        refused: dict[int, Reply] = {}
        events: list[Event] = []
        delay: Delay | None = None
        plan = self._faults
        if plan is not None:
            for i, rcpt in enumerate(rcpts):
                verdict = plan.decide("EOD", envelope.mail_from, (rcpt,))
                if verdict is None:
                    continue
                if verdict.drop:
                    self.close()
                    return Dropped("EOD", verdict.why)
                if verdict.reply is not None:
                    refused[i] = verdict.reply
                    events.append(FaultReplied("EOD", verdict.reply.code, verdict.why, rcpt))
                    # 421 ends the session, but only once every recipient has its answer.
                    self._lmtp_close = self._lmtp_close or verdict.reply.code == 421
                if verdict.delay and delay is None:
                    delay = Delay("EOD", verdict.delay, verdict.why)
        if len(refused) == len(rcpts):
            self._lmtp_start(rcpts, refused, None)
            # Each recipient has its own code (its FaultReplied); the message, the first one's.
            first_code = refused[min(refused)].code
            events.append(MessageRefused(envelope, REFUSED_FOR_EVERY_RECIPIENT, first_code))
            if delay is not None:
                events.insert(0, delay)  # held events come out before any reply is queued
            return self._emit(events)
        stored = envelope
        if refused:
            kept = [i for i in range(len(rcpts)) if i not in refused]
            stored = replace(
                envelope,
                rcpt_tos=[rcpts[i] for i in kept],
                rcpt_options=[envelope.rcpt_options[i] for i in kept],
            )
        self._lmtp_rcpts = rcpts
        self._lmtp_refused = refused
        self._delay_after_answer = delay
        events.append(self._park(MessageReceived(stored, content)))
        return self._emit(events)

    def _emit(self, events: list[Event]) -> Event:
        """The first of ``events`` now, the others from the next ``next_event`` calls; then
        the session goes on in the mode it is in now."""
        first, *rest = events
        if rest:
            self._hold(*rest)
        return first

    def _lmtp_answer(self, reply: Reply) -> None:
        """The store's answer (250 or 451) for every recipient no fault refused."""
        if self.mode is not Mode.WAITING:
            raise RuntimeError("no pending event to answer")
        self._pending = None
        rcpts, refused = self._lmtp_rcpts, self._lmtp_refused
        self._lmtp_rcpts = ()
        self._lmtp_refused = _NO_ANSWERS
        self._lmtp_start(rcpts, refused, reply)
        if self._delay_after_answer is not None:
            delay, self._delay_after_answer = self._delay_after_answer, None
            self._hold(delay)

    def _lmtp_start(
        self, rcpts: Sequence[str], answers: Mapping[int, Reply], default: Reply | None
    ) -> None:
        """Answer ``rcpts``, in order, with ``answers`` by index and ``default`` for the others,
        one reply per reader step (``Mode.LMTP_REPLIES``): the output bound is checked between
        them, so a thousand recipients never pile up a thousand unsent replies."""
        self._lmtp_queue = rcpts
        self._lmtp_answers = answers
        self._lmtp_default = default
        self._lmtp_sent = 0
        self.mode = Mode.LMTP_REPLIES

    def _read_lmtp_replies(self) -> Event | None:
        rcpts = self._lmtp_queue
        sent = self._lmtp_sent
        if sent < len(rcpts):
            reply = self._lmtp_answers.get(sent) or self._lmtp_default
            assert reply is not None
            self._reply(_for_recipient(reply, rcpts[sent]))
            sent += 1
            self._lmtp_sent = sent
            if sent < len(rcpts):
                return None
        self._lmtp_queue = ()
        self._lmtp_answers = _NO_ANSWERS
        self._lmtp_default = None
        self.mode = Mode.COMMAND
        if self._lmtp_close:
            self._lmtp_close = False
            self.close()
        return None

    def _lmtp_flush(self) -> None:
        """Queue every reply still owed, past the output bound (the session is closing)."""
        while self.mode is Mode.LMTP_REPLIES:
            self._read_lmtp_replies()

    # ---- readers, one per mode ---------------------------------------------------------

    def _take_line(self) -> bytes | None:
        """The next complete line without its CRLF (or bare LF), or None if there is none yet.

        A line over its limit (``_line_limit``) is refused with 500 as soon as it passes the
        limit, whether or not its end is buffered yet, so that a client waiting for a reply
        gets one; what is left of it up to its LF is then discarded unread (``DISCARD_LINE``),
        never taken for a command. Either way ``_LINE_REFUSED`` is returned, and an AUTH
        exchange in progress is over.
        """
        buf = self._buf
        end = buf.find(b"\n")
        if end < 0:
            # No end yet. A trailing CR may be half of the CRLF, so it does not count.
            length = len(buf)
            if length > _COMMAND_CONTENT and length - (buf[-1] == 13) > self._line_limit(buf):
                buf.clear()
                self.mode = Mode.DISCARD_LINE
                self._refuse(R.LINE_TOO_LONG)
                return _LINE_REFUSED
            return None
        length = end - 1 if end and buf[end - 1] == 13 else end
        if length > _COMMAND_CONTENT and length > self._line_limit(buf):
            del buf[: end + 1]
            self.mode = Mode.COMMAND
            self._refuse(R.LINE_TOO_LONG)
            return _LINE_REFUSED
        line = bytes(memoryview(buf)[:length])
        del buf[: end + 1]
        return line

    def _line_limit(self, buf: bytearray) -> int:
        """The longest content (octets without CRLF) the line starting ``buf`` may have: an AUTH
        command or response line may be as long as RFC 4954 allows, any other command line as
        long as RFC 5321 allows. Only asked about lines longer than a command line may be."""
        if self.mode is Mode.AUTH_LINE or buf[:5].upper() == b"AUTH ":
            return _AUTH_CONTENT
        return _COMMAND_CONTENT

    def _discard_line(self) -> Event | None:
        """Drop the rest of a refused overlong line, up to and including its LF."""
        buf = self._buf
        end = buf.find(b"\n")
        if end < 0:
            buf.clear()
            return Closed() if self._eof else NeedData
        del buf[: end + 1]
        self.mode = Mode.COMMAND
        return None

    def _read_command(self) -> Event | None:
        line = self._take_line()
        if line is None:
            return Closed() if self._eof else NeedData
        if line is _LINE_REFUSED:
            return None
        event = self._dispatch_line(line)
        mode = self.mode
        if event is None and not self._buf and not self._eof and (
            mode is Mode.COMMAND or mode is Mode.DATA
        ):
            # Nothing more buffered, and the next reader (command or DATA) would only say so:
            # ask for more now. Saves a second reader pass per command, the common case.
            return NeedData
        return event

    def _dispatch_line(self, line: bytes) -> Event | None:
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(R.BAD_UTF8)
            return None
        m = COMMAND.fullmatch(text)
        if m is None:
            self._refuse(R.UNKNOWN_COMMAND)
            return None
        verb = m.group(1).upper()
        handler = self._handlers.get(verb)
        if handler is None:
            self._refuse(R.UNKNOWN_COMMAND)
            return None
        refusal = self._sequence.get((verb, self.phase))
        if refusal is not None:
            if verb == "BDAT":
                # The chunk's octets follow regardless: they must be drained, then refused.
                return self._bdat(m.group(2), refusal)
            self._refuse(refusal)
            return None
        return handler(self, m.group(2))

    def _read_data(self) -> Event | None:
        reader = self._data_reader
        assert reader is not None
        result = reader.read(self._buf)
        if result is None:
            return Closed() if self._eof else NeedData
        content, failure = result
        self._data_reader = None
        self.mode = Mode.COMMAND
        return self._finish_message(content, failure)

    def _read_bdat(self) -> Event | None:
        reader = self._bdat_reader
        assert reader is not None
        chunk = reader.read(self._buf)
        if chunk is None:
            return Closed() if self._eof else NeedData
        self._bdat_reader = None
        self.mode = Mode.COMMAND
        refusal = self._bdat_refusal
        if refusal is not None:
            self._bdat_refusal = None
            if refusal.code == 552:
                # RFC 3030 2: after a 5xx to a chunk the client sends no more of this message;
                # the transaction is over, and any further chunk is out of sequence.
                if self._lmtp and self._bdat_last:
                    # LMTP answers BDAT LAST once per recipient (RFC 2033 4.3), refusals too.
                    return self._finish_message(None, DataFailure.TOO_BIG)
                envelope = self.envelope
                self._reset_transaction()
                self._reply(refusal)
                assert envelope is not None
                return MessageRefused(envelope, DataFailure.TOO_BIG.value, refusal.code)
            self._refuse(refusal)
            return None
        self._bdat_chunks.append(chunk)
        if not self._bdat_last:
            self.phase = Phase.BDAT
            self._reply(R.chunk_received(len(chunk)))
            return None
        chunks = self._bdat_chunks
        self._bdat_chunks = []
        # The same line-ending policy as DATA, over the joined chunks (data.py's docstring).
        policy = self.policy
        return self._finish_message(
            *BdatReader.finish(chunks, policy.bare_linefeed, policy.max_size)
        )

    def _read_auth_line(self) -> Event | None:
        line = self._take_line()
        if line is None:
            return Closed() if self._eof else NeedData
        if line is _LINE_REFUSED:
            return None  # the exchange is over; the session reads commands again
        self.mode = Mode.COMMAND
        return self._auth_response(line.decode("ascii", "replace"))

    def _read_nothing(self) -> Event | None:
        # WAITING: the driver owes an answer; CLOSED: there is nothing more to do.
        if self.mode is Mode.CLOSED:
            return Closed()
        raise RuntimeError(f"next_event() while waiting for the answer to {self._pending!r}")

    # ---- command handlers ----------------------------------------------------------------

    def _helo(self, arg: str | None) -> Event | None:
        return self._greet(arg, "SMTP")

    def _ehlo(self, arg: str | None) -> Event | None:
        return self._greet(arg, "ESMTP")

    def _lhlo(self, arg: str | None) -> Event | None:
        return self._greet(arg, "LMTP")

    def _hello_in_lmtp(self, arg: str | None) -> Event | None:
        # RFC 2033 4.1: LHLO is the only hello; HELO and EHLO are not LMTP commands.
        self._refuse(R.NOT_LMTP)
        return None

    def _greet(self, arg: str | None, greeting: str) -> Event | None:
        arg = (arg or "").strip()
        if not arg or " " in arg:
            self._refuse(_SYNTAX_HELLO[greeting])
            return None
        # A sink accepts whatever name the client gives (as Postfix does by default); it is
        # recorded as sent, and sanitized where it is written into a Received header.
        self._reset_transaction()
        self.helo = arg
        self.greeting = greeting
        self.phase = Phase.READY
        if greeting == "SMTP":
            self._reply(R.helo(self.policy.hostname))
        else:
            self._reply(_ehlo_reply(self.policy, self.tls_active))
        return None

    def _mail(self, arg: str | None) -> Event | None:
        policy = self.policy
        if policy.auth_required and self.auth_user is None:
            self._refuse(R.AUTH_REQUIRED)
            return None
        path = self._path(MAIL_ARGS, arg, R.SYNTAX_MAIL)
        if path is None:
            return None
        params = path.params
        body_type = "7BIT"
        smtputf8 = False
        if params:
            if self.greeting == "SMTP":
                self._refuse(R.NEED_EHLO_FOR_PARAMS)
                return None
            for key, value in params.items():
                refusal = _check_mail_param(key, value, policy.max_size)
                if refusal is not None:
                    self._refuse(refusal)
                    return None
            body_type = (params.get("BODY") or "7BIT").upper()
            smtputf8 = "SMTPUTF8" in params
        if not smtputf8 and not path.mailbox.isascii():
            self._refuse(R.NON_ASCII_ADDRESS)
            return None
        self.envelope = Envelope(
            mail_from=path.mailbox,
            mail_options=params,
            body_type=body_type,
            smtputf8=smtputf8,
            helo=self.helo,
            greeting=self.greeting,
            tls=self.tls_active,
            auth_user=self.auth_user,
        )
        self.phase = Phase.MAIL
        self._reply(R.SENDER_OK)
        return None

    def _path(self, pattern: re.Pattern[str], arg: str | None, syntax: Reply) -> Path | None:
        """The parsed MAIL/RCPT argument, or None after refusing it (syntax, duplicate
        parameter, or a path over the RFC 5321 length limit)."""
        m = pattern.fullmatch(arg or "")
        if m is None:
            self._refuse(syntax)
            return None
        try:
            path = _parse_path(m)
        except DuplicateParameter:
            self._refuse(R.DUPLICATE_PARAM)
            return None
        if len(path.mailbox) > MAX_PATH_OCTETS - 2:
            self._refuse(R.PATH_TOO_LONG)
            return None
        return path

    def _rcpt(self, arg: str | None) -> Event | None:
        envelope = self.envelope
        assert envelope is not None
        path = self._path(RCPT_ARGS, arg, R.SYNTAX_RCPT)
        if path is None:
            return None
        if path.params:
            # No RCPT parameters are advertised (no DSN), so any is unrecognized.
            self._refuse(R.UNKNOWN_PARAM)
            return None
        if not envelope.smtputf8 and not path.mailbox.isascii():
            self._refuse(R.NON_ASCII_RECIPIENT)
            return None
        limit = self.policy.max_recipients
        if limit and len(envelope.rcpt_tos) >= limit:
            self._reply(R.TOO_MANY_RECIPIENTS)
            return None
        envelope.rcpt_tos.append(path.mailbox)
        envelope.rcpt_options.append(path.params)
        self.phase = Phase.RCPT
        self._reply(R.RECIPIENT_OK)
        return None

    def _data(self, arg: str | None) -> Event | None:
        if arg:
            self._refuse(R.SYNTAX_NO_ARGS)
            return None
        self._data_reader = DataReader(self.policy.max_size, self.policy.bare_linefeed)
        self.mode = Mode.DATA
        self._reply(R.START_DATA)
        return None

    def _bdat(self, arg: str | None, refusal: Reply | None = None) -> Event | None:
        """Start reading a BDAT chunk; with ``refusal`` (out of sequence) it is drained and
        then refused, as is a chunk that would take the message over the size limit."""
        m = _BDAT_ARGS.fullmatch(arg or "")
        if m is None:
            # Without a valid size the chunk cannot be skipped: the stream is lost.
            self._reply(R.SYNTAX_BDAT)
            self.close(R.too_many_errors(self.policy.hostname))
            return None
        size = int(m.group(1))
        self._bdat_last = m.group(2) is not None
        max_size = self.policy.max_size
        if refusal is None and max_size and self._bdat_size + size > max_size:
            refusal = R.size_exceeded(max_size)
        if refusal is None:
            self._bdat_size += size
        self._bdat_refusal = refusal
        self._bdat_reader = BdatReader(size, keep=refusal is None)
        self.mode = Mode.BDAT
        return None

    def _failure_reply(self, failure: DataFailure) -> Reply:
        """The refusal of a message that broke the content policy (size, bare CR/LF)."""
        if failure is DataFailure.BARE_LINEFEED:
            return R.BARE_LINEFEED
        return R.size_exceeded(self.policy.max_size)

    def _finish_message(self, content: bytes | None, failure: DataFailure | None) -> Event | None:
        envelope = self.envelope
        self._reset_transaction()
        assert envelope is not None
        if self._lmtp:
            return self._finish_lmtp(envelope, content, failure)
        if failure is not None:
            reply = self._failure_reply(failure)
            self._reply(reply)
            return MessageRefused(envelope, failure.value, reply.code)
        assert content is not None
        if self._faults is not None:
            verdict = self._faults.decide("EOD", envelope.mail_from, envelope.rcpt_tos)
            if verdict is not None:
                return self._fault_at_eod(verdict, MessageReceived(envelope, content))
        return self._park(MessageReceived(envelope, content))

    def _rset(self, arg: str | None) -> Event | None:
        if self._junk_command():
            return None
        if arg and arg.strip():
            self._refuse(R.SYNTAX_NO_ARGS)
            return None
        self._reset_transaction()
        self._reply(R.RESET_OK)
        return None

    def _noop(self, arg: str | None) -> Event | None:
        if self._junk_command():
            return None
        self._reply(R.OK)
        return None

    def _quit(self, arg: str | None) -> Event | None:
        if arg and arg.strip():
            self._refuse(R.SYNTAX_NO_ARGS)
            return None
        self.close(R.closing(self.policy.hostname))
        return Closed()

    def _vrfy(self, arg: str | None) -> Event | None:
        if self._junk_command():
            return None
        if not arg or not arg.strip():
            self._refuse(R.SYNTAX_VRFY)
            return None
        self._reply(R.CANNOT_VRFY)
        return None

    def _expn(self, arg: str | None) -> Event | None:
        if self._junk_command():
            return None
        if not arg or not arg.strip():
            self._refuse(R.SYNTAX_EXPN)
            return None
        self._reply(R.CANNOT_EXPN)
        return None

    def _help(self, arg: str | None) -> Event | None:
        if self._junk_command():
            return None
        topic = (arg or "").strip().upper()
        self._reply(_help_replies(self.policy, self.tls_active).get(topic, _HELP_UNKNOWN))
        return None

    def _starttls(self, arg: str | None) -> Event | None:
        if arg and arg.strip():
            self._refuse(R.SYNTAX_NO_ARGS)
            return None
        if self.tls_active:
            self._refuse(R.TLS_ALREADY_ACTIVE)
            return None
        if not self.policy.tls_available:
            self._reply(R.TLS_NOT_AVAILABLE)
            return None
        self._reply(R.START_TLS)
        # CVE-2011-0411: nothing sent before the handshake may be read as if it came after.
        self._buf.clear()
        return self._park(StartTLS())

    # ---- AUTH (RFC 4954) -----------------------------------------------------------------

    def _auth(self, arg: str | None) -> Event | None:
        policy = self.policy
        if not policy.auth_enabled:
            self._refuse(R.AUTH_NOT_ENABLED)
            return None
        if not policy.auth_offered(self.tls_active):
            self._refuse(R.ENCRYPTION_REQUIRED)
            return None
        if self.auth_user is not None:
            self._refuse(R.ALREADY_AUTHENTICATED)
            return None
        parts = (arg or "").split()
        if not parts or len(parts) > 2:
            self._refuse(R.SYNTAX_AUTH)
            return None
        mechanism = parts[0].upper()
        if mechanism not in _AUTH_MECHANISMS:
            self._refuse(R.UNKNOWN_MECHANISM)
            return None
        self._auth_mechanism = mechanism
        self._auth_username = None
        if len(parts) == 2:
            return self._auth_response(parts[1], initial=True)
        self.mode = Mode.AUTH_LINE
        self._reply(R.AUTH_EMPTY_CHALLENGE if mechanism == "PLAIN" else R.AUTH_LOGIN_USERNAME)
        return None

    def _auth_response(self, response: str, *, initial: bool = False) -> Event | None:
        response = response.strip()
        if response == "*":
            self._refuse(R.AUTH_CANCELLED)
            return None
        if initial and response == "=":
            # RFC 4954 4: "=" is an initial response of zero length.
            decoded = b""
        else:
            try:
                decoded = base64.b64decode(response, validate=True)
            except (binascii.Error, ValueError):
                self._refuse(R.AUTH_BAD_BASE64)
                return None
        try:
            text = decoded.decode("utf-8")
        except UnicodeDecodeError:
            self._refuse(R.AUTH_BAD_RESPONSE)
            return None

        if self._auth_mechanism == "PLAIN":
            # RFC 4616: [authzid] NUL authcid NUL passwd
            fields = text.split("\x00")
            if len(fields) != 3 or not fields[1]:
                self._refuse(R.AUTH_BAD_RESPONSE)
                return None
            authzid, username, password = fields
            self._auth_username = username
            return self._park(AuthAttempt("PLAIN", username, password, authzid))

        if self._auth_username is None:
            # AUTH LOGIN, first step: the username (an initial response is the username too).
            if not text:
                self._refuse(R.AUTH_BAD_RESPONSE)
                return None
            self._auth_username = text
            self.mode = Mode.AUTH_LINE
            self._reply(R.AUTH_LOGIN_PASSWORD)
            return None
        return self._park(AuthAttempt("LOGIN", self._auth_username, text))


@cache
def _ehlo_reply(policy: SessionPolicy, tls_active: bool) -> Reply:
    """The EHLO reply, built once per policy and TLS state (its wire bytes cached with it)."""
    return Reply(250, None, policy.hostname, *policy.ehlo_keywords(tls_active))


@cache
def _help_replies(policy: SessionPolicy, tls_active: bool) -> dict[str, Reply]:
    """HELP's answers for a session in this TLS state, by topic ("" for the list): AUTH and
    STARTTLS only where they are offered, as in the EHLO reply."""
    hellos = ("LHLO",) if policy.lmtp else ("HELO", "EHLO")
    verbs = [
        verb
        for verb in _HELP_TOPICS
        if (verb not in ("HELO", "EHLO", "LHLO") or verb in hellos)
        and (verb != "AUTH" or policy.auth_offered(tls_active))
        and (verb != "STARTTLS" or (policy.tls_available and not tls_active))
    ]
    replies = {verb: _HELP_REPLIES[verb] for verb in verbs}
    replies[""] = Reply(
        214,
        "2.0.0",
        "Commands supported:",
        " ".join(verbs),
        "For information on a command, send HELP command",
    )
    return replies


def _for_recipient(reply: Reply, rcpt: str) -> Reply:
    """``reply`` as LMTP's answer for one recipient: its text names the recipient, as
    Dovecot's and Cyrus's do, so a client's log says whose delivery failed."""
    first, *rest = reply.lines
    return Reply(reply.code, reply.enhanced, f"<{rcpt}> {first}", *rest)


def _check_mail_param(key: str, value: str | None, max_size: int) -> Reply | None:
    """The refusal for one MAIL FROM parameter, or None when it is acceptable."""
    if key == "SIZE":
        if value is None or not _SIZE_VALUE.fullmatch(value):
            return R.BAD_PARAM_VALUE
        if max_size and int(value) > max_size:
            return R.size_exceeded(max_size)
        return None
    if key == "BODY":
        if value is None:
            return R.BAD_PARAM_VALUE
        return None if value.upper() in ("7BIT", "8BITMIME") else R.UNSUPPORTED_BODY
    if key == "SMTPUTF8":
        return None if value is None else R.BAD_PARAM_VALUE
    if key == "AUTH":
        # RFC 4954 5: the submitter's identity, xtext; recorded, not trusted.
        return None if value else R.BAD_PARAM_VALUE
    return R.UNKNOWN_PARAM


_SYNTAX_HELLO = {"SMTP": R.SYNTAX_HELO, "ESMTP": R.SYNTAX_EHLO, "LMTP": R.SYNTAX_LHLO}

_Handler = Callable[[ServerConnection, str | None], Event | None]

_HANDLERS: dict[str, _Handler] = {
    "HELO": ServerConnection._helo,
    "EHLO": ServerConnection._ehlo,
    "MAIL": ServerConnection._mail,
    "RCPT": ServerConnection._rcpt,
    "DATA": ServerConnection._data,
    "BDAT": ServerConnection._bdat,
    "RSET": ServerConnection._rset,
    "NOOP": ServerConnection._noop,
    "QUIT": ServerConnection._quit,
    "VRFY": ServerConnection._vrfy,
    "EXPN": ServerConnection._expn,
    "HELP": ServerConnection._help,
    "STARTTLS": ServerConnection._starttls,
    "AUTH": ServerConnection._auth,
}

#: An LMTP session's handlers: LHLO instead of HELO and EHLO (RFC 2033 4.1).
_LMTP_HANDLERS: dict[str, _Handler] = _HANDLERS | {
    "HELO": ServerConnection._hello_in_lmtp,
    "EHLO": ServerConnection._hello_in_lmtp,
    "LHLO": ServerConnection._lhlo,
}

#: A drop at these points closes in the middle of the content, after the 354.
_DROP_MID_CONTENT = frozenset({"DATA"})


def _mailbox(pattern: re.Pattern[str], arg: str | None) -> str | None:
    """The mailbox of a MAIL/RCPT argument, or None when the handler will refuse it anyway."""
    m = pattern.fullmatch(arg or "")
    if m is None:
        return None
    try:
        return _parse_path(m).mailbox
    except DuplicateParameter:
        return None


def _ask_mail(conn: ServerConnection, arg: str | None, plan: FaultPlan) -> Verdict | None:
    sender = _mailbox(MAIL_ARGS, arg)
    return None if sender is None else plan.decide("MAIL", sender)


def _ask_rcpt(conn: ServerConnection, arg: str | None, plan: FaultPlan) -> Verdict | None:
    recipient = _mailbox(RCPT_ARGS, arg)
    envelope = conn.envelope
    if recipient is None or envelope is None:
        return None
    return plan.decide("RCPT", envelope.mail_from, (recipient,))


def _ask_data(conn: ServerConnection, arg: str | None, plan: FaultPlan) -> Verdict | None:
    envelope = conn.envelope
    if envelope is None:
        return None
    return plan.decide("DATA", envelope.mail_from, envelope.rcpt_tos)


_FaultQuestion = Callable[[ServerConnection, str | None, FaultPlan], Verdict | None]
#: How the plan is asked about a verb: with the envelope's addresses where they are known.
_FAULT_QUESTIONS: dict[str, _FaultQuestion] = {
    "MAIL": _ask_mail,
    "RCPT": _ask_rcpt,
    "DATA": _ask_data,
}


def _with_faults(verb: str, handler: _Handler) -> _Handler:
    """``handler``, asking the fault plan first (only in a connection that has one)."""
    ask = _FAULT_QUESTIONS.get(verb)

    def faulty(conn: ServerConnection, arg: str | None) -> Event | None:
        plan = conn._faults
        assert plan is not None
        verdict = plan.decide(verb) if ask is None else ask(conn, arg, plan)
        if verdict is None:
            return handler(conn, arg)
        return conn._fault_command(verb, verdict, handler, arg)

    return faulty


#: The handlers of a connection with a fault plan (BDAT has no point: its chunk must be read).
_FAULTY_HANDLERS: dict[str, _Handler] = {
    verb: handler if verb == "BDAT" else _with_faults(verb, handler)
    for verb, handler in _HANDLERS.items()
}
#: The same for LMTP (HELO and EHLO are refused whatever the plan says: they are unknown).
_FAULTY_LMTP_HANDLERS: dict[str, _Handler] = {
    verb: handler if verb in ("BDAT", "HELO", "EHLO") else _with_faults(verb, handler)
    for verb, handler in _LMTP_HANDLERS.items()
}

_READERS: dict[Mode, Callable[[ServerConnection], Event | None]] = {
    Mode.COMMAND: ServerConnection._read_command,
    Mode.DATA: ServerConnection._read_data,
    Mode.BDAT: ServerConnection._read_bdat,
    Mode.AUTH_LINE: ServerConnection._read_auth_line,
    Mode.DISCARD_LINE: ServerConnection._discard_line,
    Mode.WAITING: ServerConnection._read_nothing,
    Mode.HELD: ServerConnection._read_held,
    Mode.DROP_CONTENT: ServerConnection._drop_content,
    Mode.LMTP_REPLIES: ServerConnection._read_lmtp_replies,
    Mode.CLOSED: ServerConnection._read_nothing,
}
