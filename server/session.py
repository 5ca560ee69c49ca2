"""The trio driver of one SMTP session: moves bytes between a stream and ``ServerConnection``.

It owns time (command and data timeouts as cancel scopes), the TLS upgrade, calls to the store
and the credential check, and the session's part in a graceful shutdown. It never parses SMTP:
every decision about the protocol is the sans-IO core's.

Resource handling: the connection is closed when ``run`` returns, whatever happened. Error handling:
a peer that vanishes, resets, or fails the TLS handshake ends the session quietly (counted, not
raised); a store failure becomes a 451 and the session goes on.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import socket
import ssl
import time
from dataclasses import dataclass

import trio

from mailstorm._net.netstream import RECEIVE_SIZE, SocketTransport
from mailstorm._net.readiness import ReadinessHub
from mailstorm.wire import reply_table as R
from mailstorm.wire.events import (
    AuthAttempt,
    Closed,
    Event,
    MessageReceived,
    MessageRefused,
    NeedData,
    StartTLS,
)
from mailstorm.wire.replies import Reply
from mailstorm.wire.server import ServerConnection, SessionPolicy

from .credentials import CredentialStore
from .stats import SinkStats
from .stores import Store, StoreError
from .trace import trace_headers

__all__ = ["Session", "SessionContext"]

log = logging.getLogger("mailstorm.sink")

#: scrypt costs 16 MiB and tens of milliseconds per check: bound how many run at once.
_SCRYPT_LIMITER = trio.CapacityLimiter(4)
#: How long a last reply (421 on shutdown) may take to send before the socket is just closed.
GOODBYE_TIMEOUT = 2.0
_STREAM_ERRORS = (
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    trio.BusyResourceError,
    OSError,
)


@dataclass(slots=True)
class SessionContext:
    """What every session of one server shares."""

    policy: SessionPolicy
    store: Store
    stats: SinkStats
    credentials: CredentialStore | None
    ssl_context: ssl.SSLContext | None
    command_timeout: float
    data_timeout: float
    #: Whether the store keeps messages (then trace headers are built for each one). One
    #: that does not never waits either, so ``Session._on_readable`` counts its messages.
    keeps_messages: bool
    #: Where plain sockets learn readiness (None: through trio's own waits).
    hub: ReadinessHub | None = None


class _QueueIds:
    """Short unique queue ids: a per-process prefix and a counter, as Postfix's are short."""

    def __init__(self) -> None:
        self._prefix = f"{int(time.time()) & 0xFFFFFF:06X}{os.getpid() & 0xFFFF:04X}"
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):06X}"


_queue_ids = _QueueIds()


class IdleReaper:
    """Ends sessions whose ``idle_deadline`` has passed: one task per server, not one timer
    per session operation.

    Precision is ``interval`` (a quarter of the shortest timeout, at most a second): a session
    gets its 421 between ``timeout`` and ``timeout + interval`` after it began to wait.
    """

    def __init__(self, sessions: set[Session], interval: float) -> None:
        self.sessions = sessions
        self.interval = interval

    @classmethod
    def for_timeouts(cls, sessions: set[Session], *timeouts: float) -> IdleReaper:
        return cls(sessions, max(0.01, min(1.0, *(t / 4 for t in timeouts))))

    async def run(self) -> None:
        while True:
            await trio.sleep(self.interval)
            now = trio.current_time()
            for session in [s for s in self.sessions if s.idle_deadline < now]:
                session.time_out()


class Session:
    """One connection, from banner to close.

    Time: before each wait for input the session writes ``idle_deadline`` (a float; nothing
    else), and the server's ``IdleReaper`` cancels the session's one cancel scope once that
    deadline has passed. Moving a trio deadline on every command cost more than parsing the
    command. A cancelled session says 421 (timeout, or shutdown when ``stopping``) and ends.
    """

    def __init__(self, sock: socket.socket, ctx: SessionContext, *, tls: bool) -> None:
        plain = SocketTransport(sock, ctx.hub)
        self.peer_ip, self.peer_port = plain.peer()
        #: The session's byte stream: the socket, or an SSLStream over it after TLS starts.
        self.stream: trio.abc.Stream = plain
        self.ctx = ctx
        self.implicit_tls = tls
        self.conn = ServerConnection(ctx.policy, tls_active=tls)
        #: Set by a graceful shutdown: finish the transaction in progress, then say 421.
        self.stopping = False
        self._scope = trio.CancelScope()
        #: When this session has waited too long (trio clock); watched by ``IdleReaper``.
        self.idle_deadline = math.inf
        self._waiting_for_input = False
        #: The TCP stream under any TLS: while it is the session's stream and has a readiness
        #: hub, the hub runs ``_on_readable`` for it (see ``_next_input``).
        self._plain = plain
        #: Where ``_on_readable`` stopped: the event the woken task handles next.
        self._resume_event: Event = NeedData
        #: Replies ``_on_readable`` could not send without waiting.
        self._unsent = b""

    # ---- lifecycle hooks called by the server ------------------------------------------

    def request_stop(self) -> None:
        """Graceful shutdown: an idle session stops now, a busy one after its transaction."""
        self.stopping = True
        if self._waiting_for_input and not self.conn.in_transaction:
            self._scope.cancel()

    def force_stop(self) -> None:
        """The grace period is over: stop whatever the session is doing."""
        self.stopping = True
        self._scope.cancel()

    def time_out(self) -> None:
        """``idle_deadline`` has passed: the session ends with 421 4.4.2."""
        self._scope.cancel()

    # ---- the session -----------------------------------------------------------------------

    async def run(self) -> None:
        stats = self.ctx.stats
        stats.sessions_total += 1
        stats.sessions_active += 1
        try:
            with self._scope:
                self.idle_deadline = trio.current_time() + self.ctx.command_timeout
                if self.implicit_tls and not await self._handshake():
                    return
                await self._loop()
            if self._scope.cancelled_caught:
                hostname = self.ctx.policy.hostname
                await self._goodbye(
                    R.shutting_down(hostname) if self.stopping else R.timed_out(hostname)
                )
        except _STREAM_ERRORS as exc:
            # The peer vanished or reset: there is nobody to report to.
            log.debug("session %s:%s ended: %r", self.peer_ip, self.peer_port, exc)
        finally:
            stats.sessions_active -= 1
            stream = self.stream
            if isinstance(stream, SocketTransport):
                stream.close()  # plain TCP: nothing to say goodbye with, no need to wait
            else:
                await trio.aclose_forcefully(stream)

    async def _loop(self) -> None:
        conn = self.conn
        ctx = self.ctx
        event = conn.next_event()
        while True:
            if event is NeedData:
                event = await self._next_input()
                continue
            if type(event) is MessageReceived:
                await self._deliver(event)
            elif type(event) is MessageRefused:
                ctx.stats.messages_refused += 1
            elif type(event) is AuthAttempt:
                await self._check_credentials(event)
            elif type(event) is StartTLS:
                await self._flush()
                if not await self._handshake():
                    return
                conn.tls_started()
            elif type(event) is Closed:
                await self._flush()
                return
            event = conn.next_event()

    async def _next_input(self) -> Event:
        """Answer everything read so far, wait for more input, and return the next event."""
        conn = self.conn
        ctx = self.ctx
        # The replies to everything read so far, in one send (inline: once a command).
        replies = conn.data_to_send()
        if replies:
            await self.stream.send_all(replies)
        if self.stopping and not conn.in_transaction:
            conn.close(R.shutting_down(ctx.policy.hostname))
            return conn.next_event()
        self._arm_idle_deadline()
        plain = self._plain
        self._waiting_for_input = True
        data: bytes | bytearray | None = None
        try:
            if self.stream is plain and plain.drained:
                self._resume_event = NeedData
                await plain.wait_inline(self._on_readable)
            else:
                data = await self.stream.receive_some(RECEIVE_SIZE)
        finally:
            self._waiting_for_input = False
        if data is None:
            return await self._resume_inline()
        conn.receive_data(data)
        return conn.next_event()

    # ---- the inline fast path ----------------------------------------------------------------
    #
    # Why: a lock-step client (one command per write, as smtp-source and most MTAs send) cost
    # the sink four task wake-ups per message, and a trio task switch costs more than parsing
    # the command. So while the task waits for input on a plain socket, the readiness hub calls
    # ``_on_readable`` on each arrival, in its own turn: one read, fed to the core, replies
    # sent, discarded messages counted, without waking the task. Whatever needs waiting (a
    # store that writes, AUTH, STARTTLS, a full socket buffer, the end of the session, a
    # shutdown) or more input than one read (a large body, which the task then reads with the
    # transport's fairness) wakes the task, which goes on from the event ``_on_readable``
    # stopped at. The task still owns the session: its cancel scope (timeouts, shutdown) ends
    # the wait at any time, and the protocol is still only the core's.

    async def _resume_inline(self) -> Event:
        """Woken from the inline wait: finish what ``_on_readable`` left, return its event."""
        unsent, self._unsent = self._unsent, b""
        if unsent:
            await self._plain.send_all(unsent)
        return self._resume_event

    def _on_readable(self) -> bool:
        """Run on the hub's turn: True to let the task sleep on, False to wake it."""
        plain = self._plain
        conn = self.conn
        ctx = self.ctx
        data = plain.receive_nowait(RECEIVE_SIZE)
        if data is None:
            return True  # nothing new after all (edges may be spurious)
        conn.receive_data(data)
        event = conn.next_event()
        while event is not NeedData:
            if type(event) is MessageReceived and not ctx.keeps_messages:
                self._count_delivery(event, _queue_ids.next())
            elif type(event) is MessageRefused:
                ctx.stats.messages_refused += 1
            else:
                self._resume_event = event
                return False
            event = conn.next_event()
        replies = conn.data_to_send()
        if replies:
            sent = plain.send_nowait(replies)
            if sent < len(replies):
                self._unsent = replies[sent:]  # the task waits for buffer space
                return False
        if (self.stopping and not conn.in_transaction) or not plain.drained:
            return False
        self._arm_idle_deadline()
        return True

    def _arm_idle_deadline(self) -> None:
        """The session waits for input from now: a command's timeout, or a data block's."""
        ctx = self.ctx
        timeout = ctx.data_timeout if self.conn.receiving_content else ctx.command_timeout
        self.idle_deadline = trio.current_time() + timeout

    async def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            await self.stream.send_all(data)

    async def _goodbye(self, reply: Reply) -> None:
        """Send a last 421, shielded and bounded, if the connection still works."""
        self.conn.close(reply)
        data = self.conn.data_to_send()
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
            log.debug("TLS handshake with %s failed: %r", self.peer_ip, exc)
            return False
        ctx.stats.tls_sessions += 1
        return True

    async def _deliver(self, event: MessageReceived) -> None:
        ctx = self.ctx
        stats = ctx.stats
        queue_id = _queue_ids.next()
        envelope = event.envelope
        try:
            if ctx.keeps_messages:
                version, cipher = _tls_details(self.stream)
                trace = trace_headers(
                    envelope,
                    hostname=ctx.policy.hostname,
                    peer_name="unknown",
                    peer_ip=self.peer_ip,
                    queue_id=queue_id,
                    tls_version=version,
                    tls_cipher=cipher,
                )
            else:
                trace = b""
            await ctx.store.deliver(envelope, event.content, trace)
        except (StoreError, OSError) as exc:
            stats.storage_failures += 1
            stats.messages_refused += 1
            log.error("storing message %s failed: %s", queue_id, exc)
            self.conn.message_failed()
            return
        self._count_delivery(event, queue_id)

    def _count_delivery(self, event: MessageReceived, queue_id: str) -> None:
        """The message is stored (or discarded): count it and send the 250."""
        stats = self.ctx.stats
        stats.messages += 1
        stats.bytes += len(event.content)
        stats.recipients += len(event.envelope.rcpt_tos)
        self.conn.message_stored(queue_id)

    async def _check_credentials(self, event: AuthAttempt) -> None:
        credentials = self.ctx.credentials
        ok = False
        if credentials is not None:
            if credentials.needs_thread(event.username):
                # scrypt takes tens of milliseconds: keep the event loop free meanwhile.
                ok = await trio.to_thread.run_sync(
                    credentials.verify, event.username, event.password, limiter=_SCRYPT_LIMITER
                )
            else:
                ok = credentials.verify(event.username, event.password)
        if not ok:
            self.ctx.stats.auth_failures += 1
            # The username is not a secret; the password never appears in a log line.
            log.info(
                "AUTH %s failed for user %r from %s", event.mechanism, event.username, self.peer_ip
            )
        self.conn.auth_result(ok)


def _tls_details(stream: trio.abc.Stream) -> tuple[str | None, str | None]:
    """The negotiated TLS version and cipher, for the Received header."""
    if not isinstance(stream, trio.SSLStream):
        return None, None
    cipher = stream.cipher()
    return stream.version(), cipher[0] if cipher else None
