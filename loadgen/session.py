"""One load session: a trio task that drives SMTP connections for the messages it is handed.

This module owns the trio shell around ``mailstorm.wire.client.ClientConnection``: connecting
(with a round-robin source address), implicit TLS and STARTTLS handshakes, the per-reply timeout,
reconnecting after ``--per-connection`` messages or a failure, and recording what happened into
``RunStats``. It never decides when a message starts (``schedule``) and never formats reports.

Every message taken from the schedule ends exactly once: delivered, or failed with its error
counted once under a kind (refused, connect, reset, timeout, tls, protocol, or 4xx/5xx by reply
code). After a connection-level failure the connection is dropped, every message in flight on
it fails, and the next message opens a new one. With ``--pipeline-messages`` a message that is
already due starts behind the content of the one before it (``ClientConnection.can_start_next``);
the session then has two in flight, which end in order.

Waiting for replies on a plain connection is inline (``mailstorm._net.readiness``): the readiness
hub reads, records and writes for the session in its own turn, and wakes the task only for
what needs it, so a steady chain of messages costs no task switch per message.

Timeouts: each chain of messages (one message, or a run of pipelined ones) runs in one cancel
scope whose deadline moves to ``now + --timeout`` before every write and read, so the timeout
is per reply, yet costs one scope per chain.
"""

from __future__ import annotations

import errno
import math
import socket
import ssl
from collections import deque
from dataclasses import dataclass, field
from itertools import count

import trio

from mailstorm._net.netstream import RECEIVE_SIZE, SocketTransport
from mailstorm._net.readiness import ReadinessHub
from mailstorm.load.config import LoadConfig
from mailstorm.load.schedule import MessageTickets
from mailstorm.load.stats import RunStats
from mailstorm.load.workload import MessageFactory
from mailstorm.wire.client import ClientConfig, ClientConnection
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

__all__ = ["LoadSession", "SessionContext"]

#: Bind a source address without picking a port until connect(), so the port can be shared
#: across destinations (the 4-tuple must be unique, not the port). Used only where the
#: platform's socket module defines it (Linux); elsewhere bind() picks the port, as usual.
_IP_BIND_ADDRESS_NO_PORT: int | None = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", None)
#: How long to wait, after the 221 to QUIT, for the server to close first: the side that closes
#: first keeps the TIME_WAIT state, and a load generator that opens thousands of connections
#: should leave that to the server rather than run out of ephemeral ports.
CLOSE_WAIT = 2.0


@dataclass
class SessionContext:
    """What every session of one process shares."""

    config: LoadConfig
    client_config: ClientConfig
    stats: RunStats
    factory: MessageFactory
    family: int
    sockaddr: tuple
    ssl_context: ssl.SSLContext | None = None
    server_hostname: str | None = None
    source_addresses: list[str] = field(default_factory=list)
    #: Where connections learn readiness (None: through trio's own waits).
    hub: ReadinessHub | None = None
    _source_counter: count = field(default_factory=count)

    @property
    def deadline_slack(self) -> float:
        """How late a reply timeout may fire. Moving a cancel scope's deadline is a heap
        update in trio; doing it only when it moved by more than 1% of the timeout saves that
        on almost every read and write, at the price of timeouts up to 1% late."""
        return self.config.timeout * 0.01

    def next_source_address(self) -> str | None:
        sources = self.source_addresses
        if not sources:
            return None
        return sources[next(self._source_counter) % len(sources)]


class _Failure(Exception):
    """A message or connection failed; ``kind`` None means the error was counted already."""

    def __init__(self, kind: str | None, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


class LoadSession:
    """One concurrent session: takes messages, keeps a connection open between them."""

    __slots__ = (
        "conn",
        "ctx",
        "inflight",
        "now",
        "on_connection",
        "resume",
        "scope",
        "stream",
        "tickets",
        "unsent",
    )

    def __init__(self, ctx: SessionContext) -> None:
        self.ctx = ctx
        #: (due time, size) of each message started and not ended, oldest first: one, or
        #: two while a message rides behind the content of the one before it.
        self.inflight: deque[tuple[float, int]] = deque()
        #: Where the next message comes from while messages may be pipelined, else None.
        self.tickets: MessageTickets | None = None
        self.stream: trio.abc.Stream | None = None
        self.conn: ClientConnection | None = None
        self.on_connection = 0
        self.scope = trio.CancelScope()
        #: The clock at the session's latest read (when the latest reply arrived).
        self.now = 0.0
        #: Where ``_on_readable`` stopped: the event the woken task handles next (None: none).
        self.resume: ClientEvent | None = None
        #: What ``_on_readable`` could not send without waiting.
        self.unsent = b""

    # -- the message loop ------------------------------------------------------------------

    async def send_messages(
        self, n: int, due: float, tickets: MessageTickets | None = None
    ) -> None:
        """Deliver message ``n`` (due at ``due``), opening a connection first if needed.

        With ``--pipeline-messages`` and ``tickets``, every message that is already due when
        the one before it has its content on the way starts in the same write (RFC 2920
        3.1), so one call may deliver a long chain of messages; it returns when none is in
        flight. Each message ends exactly once; when the connection fails, every message in
        flight fails with it, its error counted once each.
        """
        ctx = self.ctx
        stats = ctx.stats
        # The transport does not yield when a read or write completes at once; this is the
        # session's guaranteed cancellation point per chain of messages.
        await trio.lowlevel.checkpoint_if_cancelled()
        inflight = self.inflight
        msg = ctx.factory.message(n)
        stats.attempted += 1
        inflight.append((due, msg.size))
        self.tickets = tickets if ctx.config.pipeline_messages else None
        failure: _Failure | None = None
        self.now = trio.current_time()
        with trio.CancelScope(deadline=self.now + ctx.config.timeout) as scope:
            self.scope = scope
            try:
                if self.conn is None:
                    await self._open()
                conn = self.conn
                assert conn is not None
                conn.start_message(msg.mail_from, msg.rcpts, msg.payload, msg.head)
                while inflight:
                    event = await self._pump()
                    if type(event) is not MessageDone:
                        failure = self._session_failure(event)
                        break
                    self._end_message(event)
                else:
                    per_connection = ctx.config.per_connection
                    if per_connection and self.on_connection >= per_connection:
                        scope.deadline = math.inf
                        await self.quit()
                    return
            except _Failure as exc:
                failure = exc
            except trio.BrokenResourceError as exc:
                failure = self._broken(exc)
            finally:
                self.tickets = None
        if scope.cancelled_caught:
            failure = self._timeout()
        assert failure is not None
        now = trio.current_time()
        while inflight:
            inflight.popleft()
            if failure.kind is not None:
                stats.error(failure.kind, failure.detail)
            stats.message_failed(now)
        await self.abort()

    def _end_message(self, event: MessageDone) -> None:
        """The oldest message in flight is over: count it, at the time its last reply came."""
        now = self.now
        message_due, size = self.inflight.popleft()
        if event.delivered:
            self.ctx.stats.message_delivered(now, now - message_due, size)
        else:
            self.ctx.stats.message_failed(now)
        self.on_connection += 1

    def _start_next(self, conn: ClientConnection, tickets: MessageTickets) -> None:
        """Start the next message behind the current one, if it is due and allowed."""
        per_connection = self.ctx.config.per_connection
        if per_connection and self.on_connection + len(self.inflight) >= per_connection:
            return
        ticket = tickets.take_now()
        if ticket is None:
            return
        n, due = ticket
        ctx = self.ctx
        msg = ctx.factory.message(n)
        ctx.stats.attempted += 1
        self.inflight.append((due, msg.size))
        conn.start_message(msg.mail_from, msg.rcpts, msg.payload, msg.head)

    async def quit(self) -> None:
        """QUIT and close; waits for the server's 221 and then for it to close first."""
        conn, stream = self.conn, self.stream
        if conn is None or stream is None:
            return
        failure: _Failure | None = None
        self.now = trio.current_time()
        with trio.CancelScope(deadline=self.now + self.ctx.config.timeout) as scope:
            self.scope = scope
            try:
                conn.quit()
                event = await self._pump()
                if type(event) is SessionClosed:
                    # Wait (briefly) for the server's close, so TIME_WAIT lands on its side.
                    scope.deadline = trio.current_time() + min(CLOSE_WAIT, self.ctx.config.timeout)
                    while await stream.receive_some(RECEIVE_SIZE):
                        pass
                else:
                    failure = self._session_failure(event)
            except trio.BrokenResourceError:
                pass  # a reset after QUIT: the session was over anyway
        if scope.cancelled_caught and not conn.is_closed:
            failure = self._timeout()
        if failure is not None and failure.kind is not None:
            self.ctx.stats.error(failure.kind, failure.detail)
        await self.abort()

    # -- connection set-up -----------------------------------------------------------------

    async def _open(self) -> None:
        ctx = self.ctx
        stats = ctx.stats
        timeout = ctx.config.timeout
        started = trio.current_time()
        self.scope.deadline = started + timeout
        raw = socket.socket(ctx.family, socket.SOCK_STREAM)
        transport = SocketTransport(raw, ctx.hub)
        try:
            source = ctx.next_source_address()
            if source is not None:
                if ctx.family == socket.AF_INET and _IP_BIND_ADDRESS_NO_PORT is not None:
                    raw.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
                raw.bind((source, 0))  # an IP address (checked): binding never waits
            await transport.connect(ctx.sockaddr)
        except OSError as exc:
            transport.close()
            kind = "refused" if exc.errno == errno.ECONNREFUSED else "connect"
            raise _Failure(kind, f"connect: {exc.strerror or exc}") from None
        except BaseException:
            transport.close()
            raise
        now = trio.current_time()
        stats.phases.record("connect", now - started)
        stats.connections += 1
        stream: trio.abc.Stream = transport
        self.stream = stream
        implicit_tls = ctx.config.target.implicit_tls
        if implicit_tls:
            stream = self.stream = await self._handshake(stream)
        conn = self.conn = ClientConnection(ctx.client_config, tls_active=implicit_tls)
        self.on_connection = 0
        self.now = trio.current_time()
        conn.connection_made(self.now)
        while True:
            event = await self._pump()
            if type(event) is SessionReady:
                if ctx.config.pipeline_messages and not conn.pipelining:
                    stats.unpipelined_connections += 1  # the report warns: the flag did nothing
                return
            if type(event) is ReadyForTLS:
                self.stream = await self._handshake(self.stream)
                self.now = trio.current_time()
                conn.tls_started()
                continue
            raise self._session_failure(event)

    async def _handshake(self, stream: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream]:
        ctx = self.ctx
        assert ctx.ssl_context is not None
        started = trio.current_time()
        tls = trio.SSLStream(
            stream, ctx.ssl_context, server_hostname=ctx.server_hostname, https_compatible=False
        )
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            raise _Failure("tls", f"TLS handshake: {exc.__cause__ or exc}") from None
        ctx.stats.phases.record("tls", trio.current_time() - started)
        return tls

    # -- the I/O pump ----------------------------------------------------------------------

    async def _pump(self) -> ClientEvent:
        """Write and read until the connection has an event that ``_advance`` leaves to us.

        A plain connection that has read all there is waits inline: the readiness hub runs
        ``_on_readable`` on each arrival, and this task wakes only for what that cannot do.
        """
        conn = self.conn
        stream = self.stream
        assert conn is not None and stream is not None
        while True:
            event = self._advance(conn)
            if isinstance(event, ClientEvent):
                return event
            if conn.wants_to_send:
                await stream.send_all(self._outgoing(conn, trio.current_time()))
                continue
            self._refresh_deadline(self.now)
            if type(stream) is SocketTransport and stream.drained:
                self.resume = None
                await stream.wait_inline(self._on_readable)
                unsent, self.unsent = self.unsent, b""
                if unsent:
                    await stream.send_all(unsent)
                if self.resume is not None:
                    return self.resume
            else:
                data = await stream.receive_some(RECEIVE_SIZE)
                self.now = trio.current_time()
                conn.receive_data(data, self.now)

    def _on_readable(self) -> bool:
        """Run on the readiness hub's turn: True to let the task sleep on, False to wake it.

        Why: with ``--pipeline-messages`` every message is one write and one read, and waking
        the session's task for each read cost more than the client's own work for it. Here a
        read, its timed replies, the messages it ends and the next write happen in the hub's
        turn; anything else (a failure, the end of a chain, a full socket buffer, more input
        than one read) is left to the task, which owns the connection and its cancel scope.
        """
        stream = self.stream
        conn = self.conn
        assert type(stream) is SocketTransport and conn is not None
        data = stream.receive_nowait(RECEIVE_SIZE)
        if data is None:
            return True  # nothing new after all (edges may be spurious)
        now = self.now = trio.current_time()
        conn.receive_data(data, now)
        while True:
            event = self._advance(conn)
            if isinstance(event, ClientEvent):
                self.resume = event
                return False
            if not conn.wants_to_send:
                break
            # A clock reading of its own: the write stamps the commands it carries.
            out = self._outgoing(conn, trio.current_time())
            sent = stream.send_nowait(out)
            if sent < len(out):
                self.unsent = out[sent:]  # the task waits for buffer space
                return False
        if not stream.drained:
            return False  # more than one read waiting: the task reads on
        self._refresh_deadline(now)
        return True

    def _advance(self, conn: ClientConnection) -> ClientEvent | NeedDataType:
        """Take the connection's events that need no waiting; return the first other one.

        Timed replies are recorded (errors among them counted, once), and a message that
        another one follows ends here. ``NeedData``: the connection waits for a write or a read.
        """
        stats = self.ctx.stats
        while True:
            event = conn.next_event()
            if event is NeedData:
                return event
            if type(event) is PhaseDone:
                if event.ok:
                    stats.phases.record(event.phase, event.elapsed)
                else:
                    reply = event.reply
                    stats.reply_error(event.phase, reply.code, reply.text)
            elif type(event) is MessageDone and len(self.inflight) > 1:
                self._end_message(event)
            else:
                return event

    def _outgoing(self, conn: ClientConnection, now: float) -> bytes:
        """The next write, stamped ``now``: with the next message behind it, if one is due."""
        if self.tickets is not None and conn.can_start_next:
            self._start_next(conn, self.tickets)
        self._refresh_deadline(now)
        return conn.data_to_send(now)

    def _refresh_deadline(self, now: float) -> None:
        """Give the next reply the whole timeout from ``now`` (see ``deadline_slack``)."""
        deadline = now + self.ctx.config.timeout
        scope = self.scope
        if deadline - scope.deadline > self.ctx.deadline_slack:
            scope.deadline = deadline

    # -- failures --------------------------------------------------------------------------

    def _session_failure(self, event: ClientEvent) -> _Failure:
        if isinstance(event, SessionFailed):
            return _Failure(event.kind, f"{event.phase}: {event.detail}")
        return _Failure("protocol", f"unexpected {event!r}")

    def _broken(self, exc: trio.BrokenResourceError) -> _Failure:
        cause = exc.__cause__
        phase = self._pending_phase()
        if isinstance(cause, ssl.SSLError):
            return _Failure("tls", f"{phase}: TLS error: {cause}")
        reason = getattr(cause, "strerror", None) or "connection broken"
        return _Failure("reset", f"{phase}: {reason}")

    def _timeout(self) -> _Failure:
        phase = self._pending_phase()
        return _Failure("timeout", f"{phase}: no reply within {self.ctx.config.timeout:g}s")

    def _pending_phase(self) -> str:
        conn = self.conn
        if conn is None:
            return "connect"
        return conn.pending_phase or "session"

    async def abort(self) -> None:
        """Close the connection at once (after a failure, or when cancelled)."""
        stream = self.stream
        self.stream = None
        self.conn = None
        if type(stream) is SocketTransport:
            # Plain TCP: nothing to say goodbye with. aclose_forcefully's cancelled checkpoint
            # (an exception raised and caught) was a fifth of a connection's cost.
            stream.close()
        elif stream is not None:
            await trio.aclose_forcefully(stream)
