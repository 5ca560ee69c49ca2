"""The trio driver of one SMTP session: moves bytes between a stream and ``SinkProtocol``.

It owns time (deadlines watched by ``IdleReaper``), the TLS upgrade, calls to the store and the
credential check, and the session's part in a graceful shutdown. It decides nothing: each step
is ``SinkProtocol.advance`` (``protocol.py``), and this module only carries out the action it
returns. While the task waits for input on a plain socket with a readiness hub, the hub runs
``_on_readable`` for it, which carries out the same actions as far as they need no waiting
(see the handler contract in ``mailstorm._net.readiness``).

Time. A command has ``command_timeout`` from the moment the session is ready for it until its
line is complete: the deadline starts at a command boundary and is not moved by partial reads,
so a client trickling a byte at a time cannot hold a session. While message content is read,
the deadline is ``data_timeout`` after the last read, but never later than ``data_timeout``
after the content began plus one second per ``min_data_rate`` octets received (as Apache's
mod_reqtimeout MinRate). Time spent storing a message or checking a password is the server's,
not the client's: no deadline runs then, so a slow store can never turn a stored message into
a 421 (and a retried duplicate). A session older than ``max_session_time`` ends with 421 after
its transaction, as a graceful shutdown does. An injected delay (``Action.DELAY``: ``--delay``,
``--throttle``) is the server's time too: the idle deadline waits while it runs, and during
message content it does not count against ``min_data_rate``; a graceful stop ends it at once
outside a transaction (a tarpit does not hold a shutdown). Only the task carries out a delay:
the inline handler hands it back without sending the delayed answer.

PROXY protocol (``--proxy-protocol``): ``run`` first reads the header in the task, before the
banner and before any inline handling (``proxy.py``); the client it names is the session's peer.

Resource handling: the connection is closed when ``run`` returns, whatever happened. Error
handling: a peer that vanishes, resets, or fails the TLS handshake ends the session quietly
(counted, not raised); a store failure becomes a 451 and the session goes on.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial

import trio

from mailstorm._net.netstream import RECEIVE_SIZE, SocketTransport
from mailstorm._net.readiness import ReadinessHub
from mailstorm.wire import reply_table as R
from mailstorm.wire.replies import Reply
from mailstorm.wire.server import SessionPolicy

from .authlimit import AuthFailureLimiter
from .credentials import CredentialStore
from .eventlog import SessionLog, client_text
from .protocol import Action, SinkProtocol, ThrottledSinkProtocol
from .proxy import ProxyPolicy, ReplayStream, receive_proxy_header
from .stats import SinkStats
from .stores import Store, StoreError

__all__ = ["IdleReaper", "Session", "SinkContext"]

_DELAY = Action.DELAY

log = logging.getLogger("mailstorm.sink")

#: scrypt costs 16 MiB and tens of milliseconds per check: bound how many run at once.
_SCRYPT_LIMITER = trio.CapacityLimiter(4)
#: SO_SNDBUF of a session's socket, in octets (Linux doubles it for its bookkeeping).
SEND_BUFFER = 16384
#: How long a last reply (421 on shutdown) may take to send before the socket is just closed.
GOODBYE_TIMEOUT = 2.0
_STREAM_ERRORS = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.BusyResourceError,
    OSError,
)


@dataclass(slots=True)
class SinkContext:
    """What every session of one server shares."""

    policy: SessionPolicy
    store: Store
    stats: SinkStats
    credentials: CredentialStore | None
    ssl_context: ssl.SSLContext | None
    command_timeout: float
    data_timeout: float
    #: Octets per second a message's content must keep up, on average (0: no minimum).
    min_data_rate: float = 0.0
    #: Seconds a session may last before it is ended after its transaction (0: no limit).
    max_session_time: float = 0.0
    #: Failed AUTH attempts per client address (None: no delays, no cut-off).
    auth_limiter: AuthFailureLimiter | None = None
    #: Where plain sockets learn readiness (None: through trio's own waits).
    hub: ReadinessHub | None = None
    #: Octets per second each session reads at most (0: no throttle; ``--throttle``).
    throttle: int = 0
    #: Every connection opens with a PROXY header (None: no PROXY protocol; ``proxy.py``).
    proxy: ProxyPolicy | None = None
    # ---- logs ----
    #: Log each session's events (``--log-events``, ``eventlog.SessionLog``).
    log_events: bool = False


class IdleReaper:
    """Ends sessions whose deadline has passed: one task per server, not one timer per
    session operation.

    Precision is ``interval`` (a quarter of the shortest timeout, at most a second): a session
    gets its 421 between its deadline and ``interval`` after it.
    """

    def __init__(self, sessions: set[Session], interval: float) -> None:
        self.sessions = sessions
        self.interval = interval

    @classmethod
    def for_timeouts(cls, sessions: set[Session], *timeouts: float) -> IdleReaper:
        return cls(sessions, max(0.01, min((1.0, *(t / 4 for t in timeouts if t > 0)))))

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval)
            now = trio.current_time()
            for session in [s for s in self.sessions if s.idle_deadline < now]:
                session.time_out()
            for session in [s for s in self.sessions if s.end_deadline < now]:
                session.lifetime_over()


class Session:
    """One connection, from banner to close.

    Time: before each wait for input the session writes ``idle_deadline`` (a float; nothing
    else), and the server's ``IdleReaper`` cancels the session's one cancel scope once that
    deadline has passed. Moving a trio deadline on every command cost more than parsing the
    command. A cancelled session says 421 (timeout, or the reply its stop chose) and ends.
    """

    def __init__(
        self,
        sock: socket.socket,
        ctx: SinkContext,
        *,
        tls: bool,
        peer: tuple[str, int] | None = None,
    ) -> None:
        # A sink only ever sends short replies: a small kernel send buffer is plenty, and it
        # bounds what a client that never reads can make the kernel hold for it (with the
        # core's bound on unsent replies, a few KiB per session instead of megabytes).
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        plain = SocketTransport(sock, ctx.hub)
        # The address accept() gave: getpeername() fails once the peer has reset, as HAProxy's
        # health checks do right after their PROXY header.
        self.peer_ip, self.peer_port = peer or plain.peer()
        #: The session's byte stream: the socket, or an SSLStream over it after TLS starts.
        self.stream: trio.abc.Stream = plain
        self.ctx = ctx
        self.implicit_tls = tls
        protocol_class: Callable[..., SinkProtocol] = SinkProtocol
        #: The stream on which the hub may run ``_on_readable`` (None: never, as a throttled
        #: session reads and waits in its task).
        self._inline_stream: SocketTransport | None = plain
        #: Octets asked for per read.
        self._read_size = RECEIVE_SIZE
        if ctx.throttle:
            protocol_class = partial(ThrottledSinkProtocol, throttle=ctx.throttle)
            self._inline_stream = None
            # At most a second of link time per read, so the octets arrive evenly.
            self._read_size = max(1, min(RECEIVE_SIZE, ctx.throttle))
        self.protocol = protocol_class(
            ctx.policy,
            ctx.store,
            ctx.stats,
            peer_ip=self.peer_ip,
            tls=tls,
            auth_limiter=ctx.auth_limiter,
        )
        if ctx.log_events:
            protocol = self.protocol
            protocol.events = SessionLog(protocol.session_id, self.peer_ip, self.peer_port)
        self._scope = trio.CancelScope()
        #: When this session has waited too long (trio clock); watched by ``IdleReaper``.
        self.idle_deadline = math.inf
        #: When this session has lasted too long (trio clock); watched by ``IdleReaper``.
        self.end_deadline = math.inf
        self._waiting_for_input = False
        #: In an injected delay: outside a transaction, a graceful stop need not wait for it.
        self._delaying = False
        #: While message content is read: when it began, and octets received since.
        self._content_started = -1.0
        self._content_bytes = 0
        #: The TCP stream under any TLS: while it is the session's stream and has a readiness
        #: hub, the hub runs ``_on_readable`` for it (see ``_receive``).
        self._plain = plain
        #: Where ``_on_readable`` stopped: the action the woken task carries out next.
        self._resume_action = Action.RECEIVE
        #: Replies ``_on_readable`` could not send without waiting.
        self._unsent = b""

    # ---- lifecycle hooks called by the server ------------------------------------------

    def request_stop(self, reply: Reply | None = None) -> None:
        """Graceful shutdown: an idle session stops now, a busy one after its transaction."""
        protocol = self.protocol
        protocol.stop(reply or R.shutting_down(self.ctx.policy.hostname))
        if (self._waiting_for_input or self._delaying) and not protocol.in_transaction:
            self._scope.cancel()

    def force_stop(self) -> None:
        """The grace period is over: stop whatever the session is doing (a store in progress
        finishes first, and its message gets its 250 before the 421)."""
        self.protocol.stop(R.shutting_down(self.ctx.policy.hostname))
        self._scope.cancel()

    def time_out(self) -> None:
        """``idle_deadline`` has passed: the session ends with 421 4.4.2."""
        if self.protocol.events is not None:
            self.protocol.events.ended_because("timeout")
        self._scope.cancel()

    def lifetime_over(self) -> None:
        """``end_deadline`` has passed: the session ends with 421 after its transaction."""
        self.end_deadline = math.inf
        if self.protocol.events is not None:
            self.protocol.events.stopping = "session time"
        self.request_stop(R.session_too_long(self.ctx.policy.hostname))

    # ---- the session -----------------------------------------------------------------------

    async def run(self) -> None:
        ctx = self.ctx
        stats = ctx.stats
        stats.sessions_total += 1
        stats.sessions_active += 1
        events = self.protocol.events
        try:
            with self._scope:
                if ctx.proxy is not None and not await self._proxy_header(ctx.proxy):
                    if events is not None:
                        events.ended_because("PROXY header refused")
                    return
                # After any PROXY header: the real client is counted and logged.
                stats.count_client(self.peer_ip)
                if events is not None:
                    events.session_start(self.implicit_tls)
                now = trio.current_time()
                self.idle_deadline = now + ctx.command_timeout
                if ctx.max_session_time > 0:
                    self.end_deadline = now + ctx.max_session_time
                if self.implicit_tls and not await self._handshake():
                    return
                await self._loop()
            if self._scope.cancelled_caught:
                if events is not None:
                    events.ended_because(events.stopping or "shutdown")
                await self._goodbye()
        except _STREAM_ERRORS as exc:
            # The peer vanished or reset: there is nobody to report to.
            log.debug("session %s:%s ended: %r", self.peer_ip, self.peer_port, exc)
            if events is not None:
                events.ended_because("connection lost")
        finally:
            stats.sessions_active -= 1
            if events is not None:
                events.session_end("closed")
            stream = self.stream
            if isinstance(stream, SocketTransport):
                stream.close()  # plain TCP: nothing to say goodbye with, no need to wait
            else:
                await trio.aclose_forcefully(stream)

    #: While the PROXY header is awaited: the connection is not a session yet, so a stop ends
    #: it at once and without a word (no banner, no 421).
    _proxy_pending = False

    async def _proxy_header(self, policy: ProxyPolicy) -> bool:
        """Read the PROXY header before anything else; False if the connection is refused.

        The client it names becomes the session's peer. What followed it in the same read is
        the client's: the TLS layer's (implicit TLS), or pipelined SMTP input, which the
        protocol answers after its banner (queued when it was made).
        """
        peer = (self.peer_ip, self.peer_port)
        self._proxy_pending = self._waiting_for_input = True
        try:
            header = await receive_proxy_header(self._plain, policy, self.ctx.stats, peer)
        finally:
            self._waiting_for_input = False
        if header is None:
            return False
        self._proxy_pending = False
        if header.client is not None:
            self.peer_ip, self.peer_port = header.client
            self.protocol.peer_ip = self.peer_ip
            if self.protocol.events is not None:
                self.protocol.events.client = client_text(self.peer_ip, self.peer_port)
        if header.following:
            if self.implicit_tls:
                self.stream = ReplayStream(self._plain, header.following)
            else:
                self.protocol.receive(header.following)
        return True

    async def _loop(self) -> None:
        """Carry out the protocol's actions until one of them ends the session."""
        action: Action | None = self.protocol.advance()
        while action is not None:
            action = await _CARRY_OUT[action](self)

    async def _flush(self) -> None:
        data = self.protocol.data_to_send()
        if data:
            await self.stream.send_all(data)

    # ---- one method per action: each carries it out and returns the next ------------------

    async def _send(self) -> Action:
        await self._flush()
        return self.protocol.advance()

    async def _close(self) -> None:
        await self._flush()

    async def _delay(self) -> Action:
        """Wait the protocol's delay (the server's time), then send what it held back."""
        seconds = self.protocol.delay
        self.idle_deadline = math.inf
        self._delaying = True
        try:
            await trio.sleep(seconds)
        finally:
            self._delaying = False
        if self._content_started >= 0:
            self._content_started += seconds  # not the client's time either
        return await self._send()

    async def _receive(self) -> Action:
        """Answer everything so far, wait for more input, and return the next action."""
        protocol = self.protocol
        # The replies to everything read so far, in one send (inline: once a command).
        await self._flush()
        self._arm_idle_deadline()
        plain = self._plain
        self._waiting_for_input = True
        data: bytes | bytearray | None = None
        try:
            if self.stream is self._inline_stream and plain.drained:
                self._resume_action = Action.RECEIVE
                await plain.wait_inline(self._on_readable)
            else:
                data = await self.stream.receive_some(self._read_size)
        finally:
            self._waiting_for_input = False
        if data is None:
            return await self._resume_inline()
        if self._content_started >= 0:
            self._content_bytes += len(data)
        protocol.receive(data)
        return protocol.advance()

    async def _deliver(self) -> Action:
        protocol = self.protocol
        delivery = protocol.delivery
        assert delivery is not None
        # The store's time is not the client's: no deadline runs while it works, and a
        # shutdown waits for it, so a message is never stored and then answered 421.
        self.idle_deadline = math.inf
        started = time.perf_counter()
        try:
            with trio.CancelScope(shield=True):
                await self.ctx.store.deliver(
                    delivery.event.envelope, delivery.event.content, delivery.trace
                )
        except (StoreError, OSError) as exc:
            log.error(
                "storing message %s failed: %s",
                delivery.queue_id,
                exc,
                extra={
                    "event": "store_failed",
                    "session": protocol.session_id,
                    "queue_id": delivery.queue_id,
                    "reason": str(exc),
                },
            )
            protocol.delivery_failed()
        else:
            protocol.delivered()
        finally:
            self.ctx.stats.observe_store(time.perf_counter() - started)
        # The client's time again: it must read the answer (in LMTP up to a reply per
        # recipient, more than the socket buffers) or a send could wait forever.
        self.idle_deadline = trio.current_time() + self.ctx.command_timeout
        return protocol.advance()

    async def _check_credentials(self) -> Action:
        protocol = self.protocol
        attempt = protocol.auth_attempt
        assert attempt is not None
        credentials = self.ctx.credentials
        self.idle_deadline = math.inf  # the server's time, as for a store
        ok = False
        if credentials is not None and not protocol.auth_blocked:
            if credentials.needs_thread(attempt.username):
                # scrypt takes tens of milliseconds: keep the event loop free meanwhile.
                ok = await trio.to_thread.run_sync(
                    credentials.verify, attempt.username, attempt.password, limiter=_SCRYPT_LIMITER
                )
            else:
                ok = credentials.verify(attempt.username, attempt.password)
        if not ok and protocol.events is None:  # with --log-events the protocol logs it
            # The username is not a secret; the password never appears in a log line.
            log.info(
                "AUTH %s failed for user %r from %s",
                attempt.mechanism,
                attempt.username[:64],
                self.peer_ip,
                extra={
                    "event": "auth_failed",
                    "session": protocol.session_id,
                    "client": client_text(self.peer_ip, self.peer_port),
                    "mechanism": attempt.mechanism,
                    "user": attempt.username[:64],
                },
            )
        delay = protocol.auth_checked(ok)
        if delay:
            await trio.sleep(delay)
        return protocol.advance()

    async def _start_tls(self) -> Action | None:
        await self._flush()
        if not await self._handshake():
            return None
        return self.protocol.advance()

    # ---- the inline fast path ----------------------------------------------------------------
    #
    # Why: a lock-step client (one command per write, as smtp-source and most MTAs send) cost
    # the sink four task wake-ups per message, and a trio task switch costs more than parsing
    # the command. So while the task waits for input on a plain socket, the readiness hub calls
    # ``_on_readable`` on each arrival: one read, fed to the protocol, replies sent without
    # waiting. Any other action, a full socket buffer, or more input than one read wakes the
    # task, which carries on from the action ``_on_readable`` stopped at.

    async def _resume_inline(self) -> Action:
        """Woken from the inline wait: finish what ``_on_readable`` left, return its action."""
        unsent, self._unsent = self._unsent, b""
        if unsent:
            await self._plain.send_all(unsent)
        return self._resume_action

    def _on_readable(self) -> bool:
        """Run on the hub's turn: True to let the task sleep on, False to wake it."""
        plain = self._plain
        protocol = self.protocol
        data = plain.receive_nowait(RECEIVE_SIZE)
        if data is None:
            return True  # nothing new after all (edges may be spurious)
        if self._content_started >= 0:
            self._content_bytes += len(data)
        protocol.receive(data)
        action = protocol.advance()
        # A delay is the task's to carry out, and the answer it delays must not leave first.
        while action is not _DELAY:
            replies = protocol.data_to_send()
            if replies:
                sent = plain.send_nowait(replies)
                if sent < len(replies):
                    self._unsent = replies[sent:]  # the task waits for buffer space
                    self._resume_action = action
                    return False
            if action is not Action.SEND:
                break
            action = protocol.advance()
        if action is not Action.RECEIVE or not plain.drained:
            self._resume_action = action
            return False
        self._arm_idle_deadline()
        return True

    # ---- time ------------------------------------------------------------------------------

    def _arm_idle_deadline(self) -> None:
        """The session waits for input from now: set the deadline that applies (see the
        module docstring)."""
        ctx = self.ctx
        # Which deadline applies is a question of time, the driver's: it reads the core's
        # state directly, as these two checks run on every read.
        conn = self.protocol.conn
        now = trio.current_time()
        if conn.receiving_content:
            if self._content_started < 0:
                self._content_started = now
                self._content_bytes = 0
            deadline = now + ctx.data_timeout
            if ctx.min_data_rate > 0:
                earned = self._content_started + ctx.data_timeout
                deadline = min(deadline, earned + self._content_bytes / ctx.min_data_rate)
            self.idle_deadline = deadline
            return
        self._content_started = -1.0
        if not conn.buffered or self.idle_deadline == math.inf:
            self.idle_deadline = now + ctx.command_timeout
        # Otherwise a partial command line is buffered: its deadline keeps running.

    # ---- helpers ------------------------------------------------------------------------

    async def _goodbye(self) -> None:
        """Send what is pending and a last 421, shielded and bounded, if the connection
        still works (a message stored during a shutdown thus still gets its 250)."""
        data = b"" if self._proxy_pending else self.protocol.goodbye()
        if not data:
            return
        with trio.move_on_after(GOODBYE_TIMEOUT) as scope:
            scope.shield = True
            with contextlib.suppress(*_STREAM_ERRORS):
                await self.stream.send_all(data)

    async def _handshake(self) -> bool:
        ctx = self.ctx
        assert ctx.ssl_context is not None
        tls_stream = trio.SSLStream(self.stream, ctx.ssl_context, server_side=True)
        self.stream = tls_stream
        self.idle_deadline = trio.current_time() + ctx.command_timeout
        try:
            await tls_stream.do_handshake()
        except trio.BrokenResourceError as exc:
            ctx.stats.tls_failures += 1
            log.debug("TLS handshake with %s failed: %r", self.peer_ip, exc)
            if self.protocol.events is not None:
                self.protocol.events.ended_because("TLS handshake failed")
            return False
        self.protocol.tls_started(*_tls_details(tls_stream))
        return True


#: Each action, and the session method that carries it out (one table for every session: a
#: table of bound methods per session cost about 0.7 KiB of each idle session's memory).
_CARRY_OUT: dict[Action, Callable[[Session], Awaitable[Action | None]]] = {
    Action.RECEIVE: Session._receive,
    Action.SEND: Session._send,
    Action.DELIVER: Session._deliver,
    Action.CHECK_AUTH: Session._check_credentials,
    Action.START_TLS: Session._start_tls,
    Action.CLOSE: Session._close,
    Action.DELAY: Session._delay,
}


def _tls_details(stream: trio.abc.Stream) -> tuple[str | None, str | None]:
    """The negotiated TLS version and cipher, for the Received header."""
    if not isinstance(stream, trio.SSLStream):
        return None, None
    cipher = stream.cipher()
    return stream.version(), cipher[0] if cipher else None
