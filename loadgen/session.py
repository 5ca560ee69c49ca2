"""One load session: a trio task that drives SMTP connections for the messages it is handed.

This module owns the trio shell around ``mailstorm.load.protocol.LoadProtocol``: the socket
(connecting with a round-robin source address), implicit TLS and STARTTLS handshakes, the
per-reply timeout, the waits, and carrying out the actions the protocol returns (send, receive,
handshake, QUIT, close). It never decides or counts anything about the session itself (the
protocol does: recording replies, ending messages, what to write, when to QUIT), never decides
when a message is due (``schedule``) and never formats reports.

Every message taken from the schedule ends exactly once: delivered, or failed with its error
counted once under a kind (refused, connect, reset, timeout, tls, protocol, or 4xx/5xx by reply
code). After a connection-level failure the connection is dropped, every message in flight on
it fails, and the next message opens a new one. With ``--pipeline-messages`` a message that is
already due starts behind the content of the one before it (``ClientConnection.can_start_next``);
the session then has two in flight, which end in order.

Two drivers carry out the protocol's actions: the session's task, and the readiness hub's
inline handler (``_on_readable``) running on the task's behalf while it waits.

Waiting for replies on a plain connection is inline (``mailstorm._net.readiness``): the readiness
hub reads, records and writes for the session in its own turn, and wakes the task only for
what needs it, so a steady chain of messages costs no task switch per message.

Timeouts: each chain of messages (one message, or a run of pipelined ones) runs in one cancel
scope whose deadline moves to ``now + --timeout`` before every write and read, so the timeout
is per reply, yet costs one scope per chain.
"""

from __future__ import annotations

import math
import socket
import ssl
from dataclasses import dataclass, field
from itertools import count

import trio

from mailstorm._net.netstream import RECEIVE_SIZE, SocketTransport
from mailstorm._net.readiness import ReadinessHub
from mailstorm.load.config import LoadConfig
from mailstorm.load.protocol import Action, LoadFailure, LoadProtocol
from mailstorm.load.schedule import MessageTickets
from mailstorm.load.stats import RunStats
from mailstorm.load.workload import MessageFactory

__all__ = ["LoadContext", "LoadSession"]

#: Bind a source address without picking a port until connect(), so the port can be shared
#: across destinations (the 4-tuple must be unique, not the port). Used only where the
#: platform's socket module defines it (Linux); elsewhere bind() picks the port, as usual.
_IP_BIND_ADDRESS_NO_PORT: int | None = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", None)
#: How long to wait, after the 221 to QUIT, for the server to close first: the side that closes
#: first keeps the TIME_WAIT state, and a load generator that opens thousands of connections
#: should leave that to the server rather than run out of ephemeral ports.
CLOSE_WAIT = 2.0

# The actions of the hot path as globals: an enum member's lookup through its class costs
# ten times a global's.
_RECEIVE = Action.RECEIVE
_SEND = Action.SEND


@dataclass
class LoadContext:
    """What every load session of one process shares."""

    config: LoadConfig
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


class LoadSession:
    """One concurrent session: takes messages, keeps a connection open between them.

    The trio shell around ``LoadProtocol``: it owns the socket, the cancel scope and the
    waits, and carries out the actions the protocol returns; every decision and every count
    of the session is the protocol's.
    """

    __slots__ = (
        "ctx",
        "now",
        "protocol",
        "resume",
        "scope",
        "stream",
        "unsent",
    )

    def __init__(self, ctx: LoadContext) -> None:
        self.ctx = ctx
        self.protocol = LoadProtocol(ctx.config, ctx.stats, ctx.factory)
        self.stream: trio.abc.Stream | None = None
        self.scope = trio.CancelScope()
        #: The clock at the session's latest read, or at the start of what it waits for: the
        #: reply timeout counts from here.
        self.now = 0.0
        #: Where ``_on_readable`` stopped: the action the woken task carries out next (None:
        #: none, the task was woken for something else).
        self.resume: Action | None = None
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
        # The transport does not yield when a read or write completes at once; this is the
        # session's guaranteed cancellation point per chain of messages.
        await trio.lowlevel.checkpoint_if_cancelled()
        protocol = self.protocol
        if protocol.backoff_until and protocol.backing_off(trio.current_time()):
            # Open loop: the schedule goes on while the session backs off; this message
            # fails at its scheduled time (closed loop waits in ``wait_backoff`` instead).
            protocol.not_started(due)
            return
        protocol.add_message(n, due)
        while True:
            failure: LoadFailure | None = None
            self.now = trio.current_time()
            with trio.CancelScope(deadline=self.now + self.ctx.config.timeout) as scope:
                self.scope = scope
                try:
                    if protocol.needs_connection:
                        await self._open()
                    protocol.begin_chain(tickets)
                    action = await self._pump()
                    if action is Action.IDLE:
                        return
                    if action is Action.QUIT:
                        scope.deadline = math.inf
                        await self.quit()
                        return
                    failure = protocol.failure_of(action)
                except LoadFailure as exc:
                    failure = exc
                except trio.BrokenResourceError as exc:
                    failure = protocol.broken(exc.__cause__)
                finally:
                    protocol.end_chain()
            if scope.cancelled_caught:
                failure = protocol.timed_out()
            assert failure is not None
            again = protocol.connection_failed(failure, trio.current_time())
            await self.abort()
            if not again:
                return

    async def wait_backoff(self, deadline: float) -> None:
        """Closed loop: sleep while the session backs off after a failed connection (but not
        past ``deadline``, the end of the run), before it takes its next message."""
        until = self.protocol.backoff_until
        if until:
            await trio.sleep_until(min(until, deadline))
            self.protocol.backing_off(trio.current_time())

    async def quit(self) -> None:
        """QUIT and close; waits for the server's 221 and then for it to close first."""
        protocol, stream = self.protocol, self.stream
        if protocol.needs_connection or stream is None:
            return
        failure: LoadFailure | None = None
        self.now = trio.current_time()
        with trio.CancelScope(deadline=self.now + self.ctx.config.timeout) as scope:
            self.scope = scope
            try:
                protocol.quit()
                action = await self._pump()
                if action is Action.CLOSE:
                    # Wait (briefly) for the server's close, so TIME_WAIT lands on its side.
                    scope.deadline = trio.current_time() + min(CLOSE_WAIT, self.ctx.config.timeout)
                    while await stream.receive_some(RECEIVE_SIZE):
                        pass
                else:
                    failure = protocol.failure_of(action)
            except trio.BrokenResourceError:
                pass  # a reset after QUIT: the session was over anyway
        if scope.cancelled_caught and not protocol.quit_answered:
            failure = protocol.timed_out()
        if failure is not None:
            protocol.count_failure(failure)
        await self.abort()

    # -- connection set-up -----------------------------------------------------------------

    async def _open(self) -> None:
        ctx = self.ctx
        protocol = self.protocol
        started = trio.current_time()
        self.scope.deadline = started + ctx.config.timeout
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
            raise protocol.connect_failed(exc) from None
        except BaseException:
            transport.close()
            raise
        protocol.connected(trio.current_time() - started)
        stream: trio.abc.Stream = transport
        self.stream = stream
        implicit_tls = ctx.config.target.implicit_tls
        if implicit_tls:
            stream = self.stream = await self._handshake(stream)
        self.now = trio.current_time()
        protocol.connection_made(self.now, tls_active=implicit_tls)
        while True:
            action = await self._pump()
            if action is Action.READY:
                if isinstance(self.stream, trio.SSLStream):
                    protocol.keep_tls_session(self.stream.session)
                return
            if action is Action.START_TLS:
                self.stream = await self._handshake(self.stream)
                self.now = trio.current_time()
                protocol.tls_started()
                continue
            raise protocol.failure_of(action)

    async def _handshake(self, stream: trio.abc.Stream) -> trio.SSLStream[trio.abc.Stream]:
        ctx = self.ctx
        assert ctx.ssl_context is not None
        started = trio.current_time()
        tls = trio.SSLStream(
            stream, ctx.ssl_context, server_hostname=ctx.server_hostname, https_compatible=False
        )
        offer = self.protocol.tls_session_to_offer()
        if offer is not None:
            tls.session = offer
        try:
            await tls.do_handshake()
        except trio.BrokenResourceError as exc:
            raise self.protocol.tls_failed(exc.__cause__ or exc) from None
        cipher = tls.cipher()
        self.protocol.tls_done(
            trio.current_time() - started,
            resumed=bool(tls.session_reused),
            version=tls.version() or "",
            cipher=cipher[0] if cipher else "",
        )
        return tls

    # -- the I/O pump ----------------------------------------------------------------------

    async def _pump(self) -> Action:
        """Write and read until the protocol returns an action other than SEND or RECEIVE.

        A plain connection that has read all there is waits inline: the readiness hub runs
        ``_on_readable`` on each arrival, and this task wakes only for what that cannot do.
        """
        protocol = self.protocol
        stream = self.stream
        assert stream is not None
        while True:
            action = protocol.next_action()
            if action is _SEND:
                now = trio.current_time()
                self._refresh_deadline(now)
                await stream.send_all(protocol.data_to_send(now))
                continue
            if action is not _RECEIVE:
                return action
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
                now = self.now = trio.current_time()
                protocol.data_received(data, now)

    def _on_readable(self) -> bool:
        """Run on the readiness hub's turn: True to let the task sleep on, False to wake it.

        Why: with ``--pipeline-messages`` every message is one write and one read, and waking
        the session's task for each read cost more than the client's own work for it. Here a
        read, and the protocol's actions on it (timed replies, the messages it ends and the
        next write), happen in the hub's turn; anything else (a failure, the end of a chain, a
        full socket buffer, more input than one read) is left to the task, which owns the
        connection and its cancel scope.
        """
        stream = self.stream
        assert type(stream) is SocketTransport
        data = stream.receive_nowait(RECEIVE_SIZE)
        if data is None:
            return True  # nothing new after all (edges may be spurious)
        protocol = self.protocol
        now = self.now = trio.current_time()
        protocol.data_received(data, now)
        while True:
            action = protocol.next_action()
            if action is _RECEIVE:
                break
            if action is not _SEND:
                self.resume = action
                return False
            # A clock reading of its own: the write stamps the commands it carries.
            sent_at = trio.current_time()
            self._refresh_deadline(sent_at)
            out = protocol.data_to_send(sent_at)
            sent = stream.send_nowait(out)
            if sent < len(out):
                self.unsent = out[sent:]  # the task waits for buffer space
                return False
        if not stream.drained:
            return False  # more than one read waiting: the task reads on
        self._refresh_deadline(now)
        return True

    def _refresh_deadline(self, now: float) -> None:
        """Give the next reply the whole timeout from ``now`` (see ``deadline_slack``)."""
        deadline = now + self.ctx.config.timeout
        scope = self.scope
        if deadline - scope.deadline > self.ctx.deadline_slack:
            scope.deadline = deadline

    async def abort(self) -> None:
        """Close the connection at once (after a failure, or when cancelled)."""
        stream = self.stream
        self.stream = None
        self.protocol.connection_lost()
        if type(stream) is SocketTransport:
            # Plain TCP: nothing to say goodbye with. aclose_forcefully's cancelled checkpoint
            # (an exception raised and caught) was a fifth of a connection's cost.
            stream.close()
        elif stream is not None:
            await trio.aclose_forcefully(stream)
