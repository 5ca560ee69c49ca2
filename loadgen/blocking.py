"""A blocking-socket driver for ``mailstorm.wire.client``: SMTP without trio.

This module owns a minimal synchronous session (``BlockingSession``) and the one-call
``send_message``, for scripts and for load tools with their own concurrency (a Locust user calls
``BlockingSession.send`` in its task and reports ``MessageResult.elapsed``). It speaks through
the same sans-IO client connection as the trio load generator, so both measure the same phases
the same way. It never spawns threads, never retries, and never hides a failure: a session that
cannot go on raises ``SMTPSessionError``; a refused message returns a result saying so.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import NoReturn

from mailstorm._net.netstream import RECEIVE_SIZE
from mailstorm.load.tls import client_ssl_context
from mailstorm.wire.client import ClientConfig, ClientConnection, Payload
from mailstorm.wire.client_events import (
    ClientEvent,
    MessageDone,
    NeedData,
    PhaseDone,
    ReadyForTLS,
    SessionClosed,
    SessionFailed,
    SessionReady,
)
from mailstorm.wire.replies import ParsedReply

__all__ = ["BlockingSession", "MessageResult", "SMTPSessionError", "send_message"]


class SMTPSessionError(Exception):
    """The session failed (refused greeting, failed AUTH, reset, timeout, protocol error)."""

    def __init__(self, phase: str, kind: str, detail: str) -> None:
        super().__init__(f"{phase}: {detail}")
        self.phase = phase
        self.kind = kind
        self.detail = detail


@dataclass
class MessageResult:
    """What became of one message. Times are in seconds."""

    delivered: bool
    accepted_rcpts: int
    #: From the MAIL command to the reply that ended the message.
    elapsed: float
    #: Seconds per phase (``mail``, ``rcpt``, ``data``, ``eod`` ...); the last of repeated ones.
    phases: dict[str, float] = field(default_factory=dict)
    failed_phase: str | None = None
    #: The first refusal, if any.
    reply: ParsedReply | None = None


class BlockingSession:
    """One SMTP/LMTP connection over a blocking socket. Use as a context manager."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        config: ClientConfig | None = None,
        timeout: float = 30.0,
        implicit_tls: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        server_hostname: str | None = None,
        source_address: str | None = None,
        clock: Callable[[], float] = time.perf_counter,
        on_phase: Callable[[PhaseDone], None] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.config = config or ClientConfig()
        self.timeout = timeout
        self.implicit_tls = implicit_tls
        self.ssl_context = ssl_context
        self.server_hostname = server_hostname or host
        self.source_address = source_address
        self.clock = clock
        #: Called with every timed reply (greeting, message and QUIT phases) as it comes, ok
        #: or not, so a caller can report each one (the Locust user does); it must not raise.
        self.on_phase = on_phase
        self.sock: socket.socket | None = None
        self.conn: ClientConnection | None = None
        #: Seconds per phase of the connection set-up (connect, banner, ehlo, ...).
        self.setup_phases: dict[str, float] = {}

    def __enter__(self) -> BlockingSession:
        self.connect()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None:
            self.quit()
        else:
            self.close()

    def _context(self) -> ssl.SSLContext:
        if self.ssl_context is None:
            self.ssl_context = client_ssl_context()
        return self.ssl_context

    def connect(self) -> None:
        """Connect and run the greeting (EHLO, STARTTLS, AUTH as configured)."""
        started = self.clock()
        source = (self.source_address, 0) if self.source_address else None
        try:
            sock = socket.create_connection(
                (self.host, self.port), timeout=self.timeout, source_address=source
            )
        except ConnectionRefusedError as exc:
            raise SMTPSessionError("connect", "refused", str(exc)) from exc
        except TimeoutError as exc:
            raise SMTPSessionError("connect", "timeout", str(exc)) from exc
        except OSError as exc:
            raise SMTPSessionError("connect", "connect", str(exc)) from exc
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.setup_phases["connect"] = self.clock() - started
        if self.implicit_tls:
            self._handshake()
        conn = self.conn = ClientConnection(self.config, tls_active=self.implicit_tls)
        conn.connection_made(self.clock())
        while True:
            event = self._pump(self.setup_phases)
            if type(event) is SessionReady:
                return
            if type(event) is ReadyForTLS:
                self._handshake()
                conn.tls_started()
                continue
            self._raise(event)

    def _handshake(self) -> None:
        assert self.sock is not None
        started = self.clock()
        try:
            self.sock = self._context().wrap_socket(self.sock, server_hostname=self.server_hostname)
        except (ssl.SSLError, OSError) as exc:
            self.close()
            raise SMTPSessionError("tls", "tls", f"TLS handshake: {exc}") from exc
        self.setup_phases["tls"] = self.clock() - started

    def send(
        self,
        mail_from: str,
        rcpts: Sequence[str],
        content: bytes | Payload,
        head: bytes = b"",
    ) -> MessageResult:
        """Send one message; connects first if needed."""
        if self.conn is None:
            self.connect()
        conn = self.conn
        assert conn is not None
        payload = content if isinstance(content, Payload) else Payload(content)
        started = self.clock()
        conn.start_message(mail_from, rcpts, payload, head)
        phases: dict[str, float] = {}
        event = self._pump(phases)
        if not isinstance(event, MessageDone):
            self._raise(event)
        return MessageResult(
            delivered=event.delivered,
            accepted_rcpts=event.accepted_rcpts,
            elapsed=self.clock() - started,
            phases=phases,
            failed_phase=event.failed_phase,
            reply=event.reply,
        )

    def quit(self) -> None:
        """QUIT politely and close; never raises."""
        conn = self.conn
        if conn is not None and self.sock is not None and conn.is_ready:
            try:
                conn.quit()
                self._pump({})
            except (SMTPSessionError, OSError):
                pass
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None
        self.conn = None

    def _pump(self, phases: dict[str, float]) -> ClientEvent:
        conn = self.conn
        sock = self.sock
        assert conn is not None and sock is not None
        while True:
            event = conn.next_event()
            if event is NeedData:
                try:
                    if conn.wants_to_send:
                        sock.sendall(conn.data_to_send(self.clock()))
                    else:
                        data = sock.recv(RECEIVE_SIZE)
                        conn.receive_data(data, self.clock())
                except TimeoutError as exc:
                    phase = conn.pending_phase or "session"
                    self.close()
                    raise SMTPSessionError(phase, "timeout", "no reply in time") from exc
                except OSError as exc:
                    phase = conn.pending_phase or "session"
                    self.close()
                    raise SMTPSessionError(phase, "reset", str(exc)) from exc
            elif type(event) is PhaseDone:
                phases[event.phase] = event.elapsed
                if self.on_phase is not None:
                    self.on_phase(event)
            else:
                assert isinstance(event, ClientEvent)
                return event

    def _raise(self, event: ClientEvent) -> NoReturn:
        self.close()
        if isinstance(event, SessionFailed):
            raise SMTPSessionError(event.phase, event.kind or "reply", event.detail)
        if type(event) is SessionClosed:
            raise SMTPSessionError("session", "reset", "the session was closed")
        raise SMTPSessionError("session", "protocol", f"unexpected {event!r}")


def send_message(
    host: str,
    port: int,
    mail_from: str,
    rcpts: Sequence[str],
    content: bytes | Payload,
    **session_options: object,
) -> MessageResult:
    """Connect, send one message, QUIT. Options are those of ``BlockingSession``."""
    with BlockingSession(host, port, **session_options) as session:  # type: ignore[arg-type]
        return session.send(mail_from, rcpts, content)
