"""The per-session decisions of a load session, in one synchronous object: ``LoadProtocol``.

This module owns what a load session decides and counts about its connection and the messages
on it: recording each timed reply (errors among them counted once), ending messages and
counting them delivered or failed, starting the next message behind the current one with
``--pipeline-messages``, what to write next, when the connection has to QUIT (``--per-connection``)
how a failure is named and counted, whether a message the server turned away between
messages goes again on a new connection (``connection_failed``: after a 421 or a close, counted
as a reconnect by reason), and how long to back off after a failed connection (exponential,
jittered, bounded; counted). Its drivers (the session's trio task in
``mailstorm.load.session``, and the readiness hub's inline handler running for that task) call
it and carry out the ``Action`` it returns: send, receive, do a TLS handshake, close. New
per-session behaviour belongs here, so that both drivers get it at once.

It never does I/O, never awaits and never reads a clock: every time comes from its caller
(taking a due ticket reads the schedule's clock, inside ``MessageTickets``). The sans-IO
``ClientConnection`` below it speaks SMTP; this object never parses SMTP either.
"""

from __future__ import annotations

import errno
import random
import ssl
from collections import deque
from enum import IntEnum, auto
from typing import TYPE_CHECKING

from mailstorm.load.config import LoadConfig
from mailstorm.load.stats import RunStats
from mailstorm.load.workload import MessageFactory, OutgoingMessage
from mailstorm.wire.client import ClientConnection
from mailstorm.wire.client_events import (
    MessageDone,
    NeedData,
    PhaseDone,
    ReadyForTLS,
    SessionClosed,
    SessionFailed,
    SessionReady,
)

if TYPE_CHECKING:
    from mailstorm.load.schedule import MessageTickets

__all__ = ["BACKOFF_ERROR", "Action", "LoadFailure", "LoadProtocol"]

#: The error kind of a message that could not start because its session was backing off
#: after a failed connection (open loop: it fails at its scheduled time).
BACKOFF_ERROR = "backoff"


class Action(IntEnum):
    """What the driver does next. The names are those of the sink's ``Action``
    (``mailstorm.sink.protocol``) where the meaning is the same: RECEIVE, SEND, START_TLS,
    CLOSE."""

    #: Everything read is handled: wait for more input and pass it to ``data_received``.
    RECEIVE = auto()
    #: Write ``data_to_send(now)``, then ask again.
    SEND = auto()
    #: STARTTLS was accepted: do the TLS handshake, then call ``tls_started``.
    START_TLS = auto()
    #: The connection is set up (greeting, STARTTLS, AUTH): messages may start.
    READY = auto()
    #: Every message in flight has ended; keep the connection for the next one.
    IDLE = auto()
    #: Every message in flight has ended and the connection has carried its
    #: ``--per-connection`` messages: ``quit``, then carry on until ``CLOSE``.
    QUIT = auto()
    #: QUIT was answered: wait briefly for the server to close first, then close.
    CLOSE = auto()
    #: The connection failed: ``failure_of(FAIL)`` says how; every message in flight fails
    #: (``fail_inflight``) and the connection is closed.
    FAIL = auto()


#: Doublings of the back-off ceiling counted at most (the ceiling is capped well before).
_MAX_DOUBLINGS = 30

# Module-level names for the actions of the hot path: an enum member's lookup through its
# class costs ten times a global's, several times per message.
_RECEIVE = Action.RECEIVE
_SEND = Action.SEND
_IDLE = Action.IDLE


class LoadFailure(Exception):
    """A failure of the connection: every message in flight on it fails (``fail_inflight``).

    ``kind`` is the error kind to count for each message (None when the cause was counted
    already, as a refused reply).
    """

    def __init__(self, kind: str | None, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class LoadProtocol:
    """One load session's decisions and counting; the same object across its connections."""

    __slots__ = (
        "_client_config",
        "_failure",
        "_per_connection",
        "_retry_reason",
        "_rng",
        "_tls_session",
        "_waiting",
        "backoff_until",
        "config",
        "conn",
        "factory",
        "failures_in_row",
        "inflight",
        "now",
        "on_connection",
        "stats",
        "tickets",
    )

    def __init__(
        self,
        config: LoadConfig,
        stats: RunStats,
        factory: MessageFactory,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.stats = stats
        self.factory = factory
        self._client_config = config.client
        self._per_connection = config.per_connection
        #: The client connection of the current SMTP connection (None: not connected).
        self.conn: ClientConnection | None = None
        #: (due time, message) of each message started and not ended, oldest first: one, or
        #: two while a message rides behind the content of the one before it.
        self.inflight: deque[tuple[float, OutgoingMessage]] = deque()
        #: Where the next message comes from while messages may be pipelined, else None.
        self.tickets: MessageTickets | None = None
        #: Messages ended on the current connection.
        self.on_connection = 0
        #: The clock at the latest read: when the replies being handled arrived.
        self.now = 0.0
        #: The message taken by ``add_message`` and not yet handed to the connection.
        self._waiting: OutgoingMessage | None = None
        #: What the latest ``FAIL`` was about.
        self._failure: LoadFailure | None = None
        #: Set while a connection fails in a way that lets its message go again on a new one
        #: ("421", "closed"); ``connection_failed`` reads it.
        self._retry_reason: str | None = None
        #: Failed connections in a row (none of them ended a message): sets the back-off.
        self.failures_in_row = 0
        #: Clock reading until which the session backs off (0.0: it does not).
        self.backoff_until = 0.0
        self._rng = rng if rng is not None else random.Random()
        #: The TLS session of the latest connection, to resume on the next (``--tls-resume``).
        self._tls_session: ssl.SSLSession | None = None

    # -- messages --------------------------------------------------------------------------

    def add_message(self, n: int, due: float) -> None:
        """Message ``n`` (due at ``due``) is this session's: it is attempted, and in flight
        until it ends. ``begin_chain`` starts it once the connection is ready."""
        msg = self.factory.message(n)
        self.stats.attempted += 1
        self.inflight.append((due, msg))
        self._waiting = msg

    def begin_chain(self, tickets: MessageTickets | None) -> None:
        """Start the message ``add_message`` took; with ``--pipeline-messages``, messages due
        from ``tickets`` then start behind it until the chain ends."""
        msg = self._waiting
        conn = self.conn
        assert msg is not None and conn is not None
        self._waiting = None
        self.tickets = tickets if self.config.pipeline_messages else None
        conn.start_message(msg.mail_from, msg.rcpts, msg.payload, msg.head)

    def end_chain(self) -> None:
        """The chain is over (however it ended): no message starts behind it any more."""
        self.tickets = None

    def _start_next(self, conn: ClientConnection, tickets: MessageTickets) -> None:
        """Start the next message behind the current one, if it is due and allowed."""
        per_connection = self._per_connection
        if per_connection and self.on_connection + len(self.inflight) >= per_connection:
            return
        ticket = tickets.take_now()
        if ticket is None:
            return
        n, due = ticket
        msg = self.factory.message(n)
        self.stats.attempted += 1
        self.inflight.append((due, msg))
        conn.start_message(msg.mail_from, msg.rcpts, msg.payload, msg.head)

    def fail_inflight(self, failure: LoadFailure, now: float) -> None:
        """The connection failed: every message in flight fails, its error counted once
        each."""
        stats = self.stats
        inflight = self.inflight
        while inflight:
            inflight.popleft()
            if failure.kind is not None:
                stats.error(failure.kind, failure.detail)
            stats.message_failed(now)
        self._waiting = None

    # -- the conversation ------------------------------------------------------------------
    # Called only while connected (between ``connection_made`` and ``connection_lost``), and
    # several times per message: they take ``conn`` as set, without a check (or an assert) on
    # every call.

    def data_received(self, data: bytes | bytearray, now: float) -> None:
        """Bytes read at ``now`` (``b""``: the server closed the connection)."""
        self.now = now
        self.conn.receive_data(data, now)  # type: ignore[union-attr]  # connected: see above

    def data_to_send(self, now: float) -> bytes:
        """The next write, stamped ``now``: with the next message behind it, if one is due."""
        conn: ClientConnection = self.conn  # type: ignore[assignment]  # connected: see above
        tickets = self.tickets
        if tickets is not None and conn.can_start_next:
            self._start_next(conn, tickets)
        return conn.data_to_send(now)

    def next_action(self) -> Action:
        """Handle the connection's events that need no waiting; say what the driver does next.

        Timed replies are recorded (errors among them counted, once) and ended messages
        counted here. ``SEND`` and ``RECEIVE`` keep a conversation going; any other action
        ends what the driver was waiting for.
        """
        conn: ClientConnection = self.conn  # type: ignore[assignment]  # connected: see above
        stats = self.stats
        while True:
            event = conn.next_event()
            if event is NeedData:
                return _SEND if conn.wants_to_send else _RECEIVE
            if type(event) is PhaseDone:
                if event.ok:
                    stats.phases.record(event.phase, event.elapsed)
                else:
                    reply = event.reply
                    if reply.code == 421 and self._may_retry(event.phase):
                        # The server limits messages per connection (or is closing idle
                        # ones): its 421 turned the next message away before it began.
                        self._retry_reason = "421"
                    else:
                        stats.reply_error(event.phase, reply.code, reply.text)
            elif type(event) is MessageDone and self.inflight:
                # The oldest message in flight is over: count it at the time its last reply
                # came. (Inline: this runs once per message.)
                inflight = self.inflight
                now = self.now
                message_due, msg = inflight.popleft()
                if event.delivered:
                    stats.message_delivered(now, now - message_due, msg.size)
                else:
                    stats.message_failed(now)
                self.on_connection += 1
                if not inflight:
                    per_connection = self._per_connection
                    if per_connection and self.on_connection >= per_connection:
                        return Action.QUIT
                    return _IDLE
            elif type(event) is SessionReady:
                if self.config.pipeline_messages and not conn.pipelining:
                    stats.unpipelined_connections += 1  # the report warns: the flag did nothing
                return Action.READY
            elif type(event) is ReadyForTLS:
                return Action.START_TLS
            elif type(event) is SessionClosed:
                return Action.CLOSE
            elif isinstance(event, SessionFailed):
                if event.kind == "reset" and self._may_retry(event.phase):
                    self._retry_reason = "closed"
                return self._fail(event.kind, f"{event.phase}: {event.detail}")
            else:
                return self._fail("protocol", f"unexpected {event!r}")

    def _fail(self, kind: str | None, detail: str) -> Action:
        self._failure = LoadFailure(kind, detail)
        return Action.FAIL

    # -- the connection --------------------------------------------------------------------

    def connected(self, elapsed: float) -> None:
        """A TCP connection is up, ``elapsed`` after connecting started."""
        self.stats.phases.record("connect", elapsed)
        self.stats.connections += 1

    def connect_failed(self, exc: OSError) -> LoadFailure:
        kind = "refused" if exc.errno == errno.ECONNREFUSED else "connect"
        return LoadFailure(kind, f"connect: {exc.strerror or exc}")

    def tls_session_to_offer(self) -> ssl.SSLSession | None:
        """The TLS session to resume in the next handshake, if any (``--no-tls-resume``:
        none, every handshake is full)."""
        return self._tls_session if self.config.tls_resume else None

    def tls_done(
        self, elapsed: float, *, resumed: bool = False, version: str = "", cipher: str = ""
    ) -> None:
        """A TLS handshake (implicit TLS, or after STARTTLS) took ``elapsed``: timed as a
        full or a resumed one, its version and cipher counted."""
        self.stats.phases.record("tls_resumed" if resumed else "tls", elapsed)
        self.stats.tls_ciphers[f"{version} {cipher}".strip() or "unknown"] += 1

    def keep_tls_session(self, session: ssl.SSLSession | None) -> None:
        """The connection's TLS session once it is set up (a TLS 1.3 ticket comes after the
        handshake, so it is taken once the server has answered over TLS)."""
        if self.config.tls_resume and session is not None:
            self._tls_session = session

    def tls_failed(self, cause: BaseException) -> LoadFailure:
        return LoadFailure("tls", f"TLS handshake: {cause}")

    def connection_made(self, now: float, *, tls_active: bool) -> None:
        """The transport is ready for SMTP (after the handshake, for implicit TLS): a new
        client connection waits for the banner."""
        conn = self.conn = ClientConnection(self._client_config, tls_active=tls_active)
        self.on_connection = 0
        conn.connection_made(now)

    def tls_started(self) -> None:
        """The handshake after STARTTLS succeeded: greet again over TLS."""
        assert self.conn is not None
        self.conn.tls_started()

    def quit(self) -> None:
        """Queue QUIT; ``next_action`` then leads to ``Action.CLOSE``."""
        assert self.conn is not None
        self.conn.quit()

    @property
    def needs_connection(self) -> bool:
        """No connection: the next message opens one (at the start, after QUIT, after a
        failure)."""
        return self.conn is None

    @property
    def quit_answered(self) -> bool:
        """The connection has ended its conversation (QUIT answered, or failed)."""
        return self.conn is not None and self.conn.is_closed

    def connection_lost(self) -> None:
        """The driver closed the connection."""
        self.conn = None
        self.on_connection = 0

    # -- reconnecting and backing off ------------------------------------------------------

    def _may_retry(self, phase: str) -> bool:
        """Whether the message in flight may go again on a new connection if this one fails
        in ``phase``: the server ended a connection that had carried messages, before the
        next one's MAIL was answered (so nothing of it was accepted, and no content sent),
        the way Postfix's and Exim's per-connection limits and idle timeouts do it. Once per
        message: its new connection has carried nothing yet."""
        return phase == "mail" and self.on_connection > 0 and len(self.inflight) == 1

    def connection_failed(self, failure: LoadFailure, now: float) -> bool:
        """The connection failed with ``failure`` at ``now`` (the driver closes it next).

        True: the message in flight goes again on a new connection at once (counted in
        ``stats.reconnects`` by reason); ``begin_chain`` restarts it. False: every message in
        flight fails, and the session backs off before its next connection.
        """
        reason = self._retry_reason
        self._retry_reason = None
        if reason is not None and len(self.inflight) == 1:
            self.stats.reconnects[reason] += 1
            self._waiting = self.inflight[0][1]
            self.failures_in_row = 0
            return True
        self.fail_inflight(failure, now)
        self._back_off(now)
        return False

    def _back_off(self, now: float) -> None:
        """Wait a random time in [MIN, ceiling] before the next connection; the ceiling
        doubles from MIN with each failed connection in a row, up to MAX (``--backoff``)."""
        if self.on_connection:
            self.failures_in_row = 0  # the connection carried messages: a new streak
        self.failures_in_row += 1
        low, high = self.config.backoff_min, self.config.backoff_max
        if high <= 0:
            return
        ceiling = min(high, low * 2.0 ** min(self.failures_in_row - 1, _MAX_DOUBLINGS))
        delay = self._rng.uniform(low, max(low, ceiling))
        self.backoff_until = now + delay
        self.stats.backoffs += 1
        self.stats.backoff_s += delay

    def backing_off(self, now: float) -> bool:
        """True while the session backs off after a failed connection."""
        if now < self.backoff_until:
            return True
        self.backoff_until = 0.0
        return False

    def not_started(self, due: float) -> None:
        """A message due while the session backs off (open loop): it is attempted, and fails
        at its scheduled time without a connection being tried."""
        stats = self.stats
        stats.attempted += 1
        stats.error(BACKOFF_ERROR, "not started: the session was backing off after a failure")
        stats.message_failed(due)

    # -- failures --------------------------------------------------------------------------

    def failure_of(self, action: Action) -> LoadFailure:
        """The failure ``FAIL`` reported, or the one any other action means where the driver
        did not expect it."""
        failure = self._failure
        if action is Action.FAIL and failure is not None:
            self._failure = None
            return failure
        return LoadFailure("protocol", f"unexpected {action.name}")

    def count_failure(self, failure: LoadFailure) -> None:
        """Count a failure no message was in flight for (a failed QUIT)."""
        if failure.kind is not None:
            self.stats.error(failure.kind, failure.detail)

    def broken(self, cause: BaseException | None) -> LoadFailure:
        """The stream broke with ``cause``: a TLS error, or a reset."""
        phase = self.pending_phase
        if isinstance(cause, ssl.SSLError):
            return LoadFailure("tls", f"{phase}: TLS error: {cause}")
        if self._may_retry(phase):
            self._retry_reason = "closed"
        reason = getattr(cause, "strerror", None) or "connection broken"
        return LoadFailure("reset", f"{phase}: {reason}")

    def timed_out(self) -> LoadFailure:
        """No reply came within ``--timeout``."""
        self._retry_reason = None
        return LoadFailure(
            "timeout", f"{self.pending_phase}: no reply within {self.config.timeout:g}s"
        )

    @property
    def pending_phase(self) -> str:
        """The phase the session waits in, to name a failure."""
        conn = self.conn
        if conn is None:
            return "connect"
        return conn.pending_phase or "session"
