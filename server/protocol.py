"""One sink session's decisions, in one synchronous place: the sink's protocol object.

A session is driven from two places: its trio task (``session.Session``), and, while that task
waits for input on a plain socket, the readiness hub's inline handler (``mailstorm._net``).
Both only call ``SinkProtocol.advance`` and carry out the ``Action`` it returns; neither
decides anything. Whatever a session decides (what to count, which message is stored at once,
when a graceful stop closes it, what a stored message's trace headers say) is decided here,
so that new per-session behaviour has exactly one place to go, as with hypercorn's protocol
objects driven by a thin trio server.

Injected faults are chosen by the core (its ``FaultPlan``); here they become actions
(``Action.DELAY`` with ``delay`` seconds, ``Action.CLOSE`` for a drop), are counted in
``SinkStats`` and logged, one INFO line each. ``ThrottledSinkProtocol`` adds the link time of
``--throttle`` to every read as a delay before the read is processed.

The session's id (``session_id``, built lazily from a per-process counter) names its queue
ids, ``<session id>-<n>``, which the stored ``Received:`` header carries. With ``--log-events``
the session has a ``SessionLog`` (``events``, else None: one ``is None`` check per message is
all the hot path pays) and each event is logged from here (``eventlog``).

Rules of this module: no I/O but those log lines, no awaiting, no clock, no trio. The SMTP
protocol itself is the sans-IO core's (``mailstorm.wire.server``); this object turns the core's
events into actions for a driver and counts them in ``SinkStats``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum, auto
from typing import Any

from mailstorm.wire import reply_table as R
from mailstorm.wire.events import (
    REFUSED_FOR_EVERY_RECIPIENT,
    AuthAttempt,
    Closed,
    Delay,
    Dropped,
    FaultReplied,
    MessageReceived,
    MessageRefused,
    NeedData,
    OutputFull,
    StartTLS,
)
from mailstorm.wire.replies import Reply
from mailstorm.wire.server import ServerConnection, SessionPolicy

from .authlimit import AuthFailureLimiter
from .eventlog import SessionLog, next_session_number, session_id
from .stats import SinkStats
from .stores import Store
from .trace import trace_headers

__all__ = ["Action", "Delivery", "SinkProtocol", "ThrottledSinkProtocol"]

log = logging.getLogger("mailstorm.sink")


class Action(IntEnum):
    """What the driver must do next. Before each, it sends ``data_to_send()`` when there is any
    (for ``DELIVER`` and ``CHECK_AUTH`` it may wait, so that a pipelined group's replies leave
    in one send with the reply that follows), except before ``DELAY``: what is queued then
    includes the delayed answer, and nothing may leave until the wait is over."""

    #: Everything buffered is answered: wait for more input and ``receive`` it.
    RECEIVE = auto()
    #: The replies queued so far reached their bound: send them, then ``advance`` without
    #: reading (a client that never reads costs a few KiB, not everything it sent).
    SEND = auto()
    #: Store ``delivery`` (it waits), then call ``delivered`` or ``delivery_failed``.
    DELIVER = auto()
    #: Check the credentials of ``auth_attempt``, then call ``auth_checked``.
    CHECK_AUTH = auto()
    #: Send the 220, do the TLS handshake, then call ``tls_started``.
    START_TLS = auto()
    #: Send what is left, then close the connection.
    CLOSE = auto()
    #: Wait ``delay`` seconds without sending (the answer being delayed is queued), then send
    #: and ``advance``. The wait is the server's time: no client deadline runs during it.
    DELAY = auto()


@dataclass(slots=True)
class Delivery:
    """A message the driver must store: ``trace + content``, with its envelope."""

    event: MessageReceived
    trace: bytes
    queue_id: str


class SinkProtocol:
    """The decisions of one sink session; see the module docstring.

    Use: ``receive(data)`` for each read (``b""`` at end of stream), then ``advance()`` until it
    returns ``RECEIVE`` or ``CLOSE``, carrying out each action; ``data_to_send()`` gives the
    replies to send. ``stop(reply)`` asks for a graceful end: the session closes with ``reply``
    at the next command boundary outside a transaction.
    """

    __slots__ = (
        "_message_number",
        "_session_id",
        "_stop_reply",
        "auth_attempt",
        "auth_limiter",
        "conn",
        "data_to_send",
        "delay",
        "delivery",
        "events",
        "hostname",
        "lmtp",
        "peer_ip",
        "receive",
        "session_number",
        "stats",
        "store",
        "tls_cipher",
        "tls_version",
    )

    def __init__(
        self,
        policy: SessionPolicy,
        store: Store,
        stats: SinkStats,
        *,
        peer_ip: str,
        tls: bool,
        auth_limiter: AuthFailureLimiter | None = None,
    ) -> None:
        self.conn = conn = ServerConnection(policy, tls_active=tls)
        # The two calls each read makes go straight to the core: bound methods held here
        # rather than methods that forward (one Python frame less each, on every read).
        #: ``receive(data)``: bytes read from the peer; ``b""`` when it closed its side.
        self.receive: Callable[[bytes | bytearray], None] = conn.receive_data
        #: ``data_to_send()``: the replies queued for the peer, as one buffer.
        self.data_to_send: Callable[[], bytes] = conn.data_to_send
        self.store = store
        self.stats = stats
        #: Failed AUTH attempts per client address, shared by the server's sessions.
        self.auth_limiter = auth_limiter
        self.hostname = policy.hostname
        #: LMTP: recipients are counted as they are answered at the end of data.
        self.lmtp = policy.lmtp
        self.peer_ip = peer_ip
        #: The negotiated TLS version and cipher once a handshake is done (for trace headers).
        self.tls_version: str | None = None
        self.tls_cipher: str | None = None
        #: The message an ``Action.DELIVER`` asks the driver to store.
        self.delivery: Delivery | None = None
        #: The credentials an ``Action.CHECK_AUTH`` asks the driver to check.
        self.auth_attempt: AuthAttempt | None = None
        #: How long an ``Action.DELAY`` asks the driver to wait, in seconds.
        self.delay = 0.0
        self._stop_reply: Reply | None = None
        # ---- logs (--log-events): the session id, and the event log when asked for -------
        #: This session's number in the process; ``session_id`` is built from it when needed.
        self.session_number = next_session_number()
        self._session_id: str | None = None
        self._message_number = 0
        #: The session's event log (``--log-events``; None, the default, logs no events).
        self.events: SessionLog | None = None

    @property
    def session_id(self) -> str:
        """The session's id: in its log lines and in its messages' queue ids."""
        if self._session_id is None:
            self._session_id = session_id(self.session_number)
        return self._session_id

    # ---- the step both drivers call ----------------------------------------------------------

    def advance(self) -> Action:
        """Process buffered input until the driver must act; return what it must do."""
        conn = self.conn
        while True:
            event = conn.next_event()
            if event is NeedData:
                if self._stop_reply is not None and not conn.in_transaction:
                    if self.events is not None:
                        self.events.ended_because(self.events.stopping or "shutdown")
                    conn.close(self._stop_reply)
                    return Action.CLOSE
                return Action.RECEIVE
            kind = type(event)
            if kind is MessageReceived:
                assert isinstance(event, MessageReceived)
                delivery = self._delivery(event)
                if not self.store.immediate:
                    self.delivery = delivery
                    return Action.DELIVER
                # A store that never waits (discard) takes the message here, on whichever
                # driver's turn this is: no task wakes for it.
                self.store.deliver_now(event.envelope, event.content, delivery.trace)
                self._count_delivery(delivery)
            elif kind is MessageRefused:
                assert isinstance(event, MessageRefused)
                self._count_refused(event)
            elif event is OutputFull:
                return Action.SEND
            elif kind is AuthAttempt:
                assert isinstance(event, AuthAttempt)
                self.auth_attempt = event
                return Action.CHECK_AUTH
            elif kind is StartTLS:
                return Action.START_TLS
            elif kind is Closed:
                if self.events is not None:
                    self.events.closed(conn)
                return Action.CLOSE
            elif kind is FaultReplied:
                assert isinstance(event, FaultReplied)
                recipient = event.recipient
                detail = "" if recipient is None else f" to <{recipient}>"
                self._count_fault(event.point, str(event.code), event.why, detail)
                if recipient is not None:
                    # LMTP: one recipient refused; the message may be stored for the others.
                    self.stats.lmtp_recipients_refused += 1
                elif event.point == "EOD":
                    self.stats.count_refused("fault")
                if self.events is not None:
                    if event.code == 421:
                        self.events.ended_because("fault")
                    if event.point == "EOD":
                        self._log_refused(event.code, f"fault {event.why}", None)
            elif kind is Delay:
                assert isinstance(event, Delay)
                self._count_fault(event.point, "delay", event.why, f" {event.seconds:g}s")
                self.delay = event.seconds
                return Action.DELAY
            elif kind is Dropped:
                assert isinstance(event, Dropped)
                self._count_fault(event.point, "drop", event.why)
                if self.events is not None:
                    self.events.ended_because("fault drop")
                return Action.CLOSE
            else:  # pragma: no cover - the core has no other events
                raise AssertionError(f"unexpected event {event!r}")

    # ---- answers from the driver ----------------------------------------------------------

    def delivered(self) -> None:
        """The store kept ``delivery``: count it and queue its 250."""
        delivery = self.delivery
        assert delivery is not None
        self.delivery = None
        self._count_delivery(delivery)

    def delivery_failed(self) -> None:
        """The store failed: nothing was kept, the client is told to try later (451; in LMTP,
        a 451 for each recipient the message was to be stored for)."""
        delivery = self.delivery
        if self.events is not None:
            self._log_refused(451, "storage failed", None)
        self.delivery = None
        self.stats.storage_failures += 1
        self.stats.count_refused("storage_failure")
        if self.lmtp and delivery is not None:
            self.stats.lmtp_recipients_refused += len(delivery.event.envelope.rcpt_tos)
        self.conn.message_failed()

    @property
    def auth_blocked(self) -> bool:
        """This client address failed AUTH too often: refuse without checking a password."""
        limiter = self.auth_limiter
        return limiter is not None and limiter.blocked(self.peer_ip)

    def auth_checked(self, ok: bool) -> float:
        """The verdict on ``auth_attempt``: queue the answer (235, 535, or 421 and the end of
        the session once this client address failed too often) and return how long the
        driver must wait before sending it (a delay growing with the address's failures)."""
        attempt, self.auth_attempt = self.auth_attempt, None
        limiter = self.auth_limiter
        if self.events is not None and attempt is not None:
            self.events.auth(ok, attempt.mechanism, attempt.username)
        self.conn.auth_result(ok)
        if ok:
            self.stats.auth_successes += 1
            if limiter is not None:
                limiter.record_success(self.peer_ip)
            return 0.0
        self.stats.auth_failures += 1
        if limiter is None:
            return 0.0
        if not limiter.record_failure(self.peer_ip):
            self.conn.close(R.too_many_auth_failures(self.hostname))
            if self.events is not None:
                self.events.ended_because("too many auth failures")
        return limiter.delay_for(self.peer_ip)

    def tls_started(self, version: str | None, cipher: str | None) -> None:
        """A handshake succeeded (implicit TLS, or after STARTTLS): the core starts over, as
        RFC 3207 4.2 says (for implicit TLS there is nothing yet to forget)."""
        self.tls_version = version
        self.tls_cipher = cipher
        self.stats.tls_sessions += 1
        self.conn.tls_started()
        if self.events is not None:
            self.events.tls_started(version, cipher)

    # ---- time and shutdown, decided by the driver's clock ---------------------------------

    @property
    def in_transaction(self) -> bool:
        return self.conn.in_transaction

    def stop(self, reply: Reply) -> None:
        """End the session with ``reply`` at the next command boundary outside a transaction
        (graceful shutdown, or the session's time is up)."""
        if self._stop_reply is None:
            self._stop_reply = reply

    def goodbye(self) -> bytes:
        """End now (the session's scope was cancelled): what is left to send, ending with the
        reply ``stop`` chose, or else 421 for a timeout."""
        self.conn.close(self._stop_reply or R.timed_out(self.hostname))
        return self.conn.data_to_send()

    # ---- internals -------------------------------------------------------------------------

    def _delivery(self, event: MessageReceived) -> Delivery:
        # The queue id leads from a stored message's Received header to the session's logs.
        self._message_number += 1
        queue_id = f"{self.session_id}-{self._message_number}"
        event.envelope.client_address = self.peer_ip
        trace = b""
        if self.store.keeps_messages:
            trace = trace_headers(
                event.envelope,
                hostname=self.hostname,
                peer_name="unknown",
                peer_ip=self.peer_ip,
                queue_id=queue_id,
                tls_version=self.tls_version,
                tls_cipher=self.tls_cipher,
            )
        return Delivery(event, trace, queue_id)

    def _count_fault(self, point: str, what: str, why: str, detail: str = "") -> None:
        self.stats.count_fault(point, what)
        log.info(
            "injected fault: %s %s%s for %s (%s)",
            point,
            what,
            detail,
            self.peer_ip,
            why,
            extra={
                "event": "fault",
                "session": self.session_id,
                # The port is the session's to know: session_start has the whole address.
                "client_ip": self.peer_ip,
                "point": point,
                "fault": what,
                "rule": why,
            },
        )

    def _log_refused(self, code: int, reason: str, event: MessageRefused | None) -> None:
        """``--log-events``: a message was refused (the envelope is the refused one's, or
        the one being delivered)."""
        assert self.events is not None
        delivery = self.delivery
        envelope = event.envelope if event is not None else None
        if envelope is None and delivery is not None:
            envelope = delivery.event.envelope
        self.events.message_refused(
            code,
            reason,
            envelope.mail_from if envelope is not None else "",
            len(envelope.rcpt_tos) if envelope is not None else 0,
        )

    def _count_refused(self, event: MessageRefused) -> None:
        """A message refused at its end of data (by policy, or in LMTP by faults for each of
        its recipients, who are counted with their ``FaultReplied``)."""
        stats = self.stats
        if event.reason == REFUSED_FOR_EVERY_RECIPIENT:
            stats.count_refused("fault")  # each refusal was logged with its FaultReplied
            return
        if self.events is not None:
            self._log_refused(event.code, event.reason, event)
        stats.count_refused(event.reason.replace(" ", "_"))
        if self.lmtp:
            stats.lmtp_recipients_refused += len(event.envelope.rcpt_tos)

    def _count_delivery(self, delivery: Delivery) -> None:
        """The message is stored (or discarded): count it and queue the 250 (in LMTP, a 250
        for each recipient it was stored for)."""
        stats = self.stats
        event = delivery.event
        stats.messages += 1
        stats.bytes += len(event.content)
        recipients = len(event.envelope.rcpt_tos)
        stats.recipients += recipients
        if self.lmtp:
            stats.lmtp_recipients_delivered += recipients
        self.conn.message_stored(delivery.queue_id)
        if self.events is not None:
            envelope = event.envelope
            self.events.message_accepted(
                delivery.queue_id, envelope.mail_from, len(envelope.rcpt_tos), event.content
            )


class ThrottledSinkProtocol(SinkProtocol):
    """A session on a slow link (``--throttle``): each read of N octets costs N / ``throttle``
    seconds, returned as an ``Action.DELAY`` before the read is processed, so the client's
    octets reach the session at ``throttle`` octets per second at most. Replies are not
    throttled. Its own class, so that unthrottled sessions pay nothing for it."""

    __slots__ = ("_link_time", "throttle")

    def __init__(self, *args: Any, throttle: int, **kwargs: Any) -> None:
        """``SinkProtocol``'s arguments, and ``throttle`` in octets per second."""
        super().__init__(*args, **kwargs)
        if throttle <= 0:
            raise ValueError("throttle must be a positive number of octets per second")
        #: Octets per second.
        self.throttle = throttle
        self._link_time = 0.0
        self.receive = self._receive_throttled

    def _receive_throttled(self, data: bytes | bytearray) -> None:
        self.conn.receive_data(data)
        self._link_time += len(data) / self.throttle

    def advance(self) -> Action:
        link_time = self._link_time
        if link_time:
            self._link_time = 0.0
            self.delay = link_time
            return Action.DELAY
        return super().advance()
