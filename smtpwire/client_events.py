"""Events the client connection hands to its driver.

This module owns the client side's vocabulary, in the manner of h11 and of the server's
``mailstorm.wire.events``: plain classes the sans-IO ``ClientConnection`` produces and a driver
(the trio load session, a blocking socket, a Locust user) acts on. Every event is an instance of
its class (a dataclass: equal when its fields are), made when it happens, so a driver tests
``type(event) is X`` for all of them alike;
the one sentinel is ``NeedData``, the same object the server connection returns, for "send what
is pending, then receive more". Names differ from the server's events where the meaning differs
(the server's ``StartTLS`` and ``Closed`` are not the client's ``ReadyForTLS`` and
``SessionClosed``). Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from mailstorm.wire.events import NeedData
from mailstorm.wire.events import _NeedData as NeedDataType
from mailstorm.wire.replies import ParsedReply

__all__ = [
    "ClientEvent",
    "MessageDone",
    "NeedData",
    "NeedDataType",
    "PhaseDone",
    "ReadyForTLS",
    "SessionClosed",
    "SessionFailed",
    "SessionReady",
]


class ClientEvent:
    """Base class of the events ``ClientConnection.next_event`` returns (besides ``NeedData``)."""

    __slots__ = ()


@dataclass(slots=True)
class PhaseDone(ClientEvent):
    """A reply that ends a timed phase.

    ``elapsed`` is the receive time of the reply minus the send time of the command it answers
    (for ``auth``: of the AUTH command; for ``banner``: of ``connection_made``), in the unit of
    the timestamps the driver passes. ``ok`` says whether the reply is the one the plan wanted;
    a reply that is not ok is an error for the driver to count.
    """

    phase: str
    reply: ParsedReply
    elapsed: float
    ok: bool


@dataclass(slots=True)
class SessionReady(ClientEvent):
    """The session is set up (greeting, EHLO, STARTTLS and AUTH as configured): messages may
    start."""


@dataclass(slots=True)
class ReadyForTLS(ClientEvent):
    """The server said 220 to STARTTLS: do the TLS handshake, then call ``tls_started``."""


@dataclass(slots=True)
class MessageDone(ClientEvent):
    """The transaction of one message is over; the session is ready for the next one, or
    the message started behind it (``can_start_next``) is the current one now.

    ``delivered`` is True only after a 2xx to the end of the content (for LMTP: to at least one
    recipient). ``failed_phase`` and ``reply`` name the first failure, if any.
    """

    delivered: bool
    accepted_rcpts: int
    failed_phase: str | None = None
    reply: ParsedReply | None = None


@dataclass(slots=True)
class SessionFailed(ClientEvent):
    """The session cannot go on: close the connection.

    ``kind`` is None when the failure is a reply already reported by a ``PhaseDone`` with
    ``ok=False`` (a 554 banner, a 535 to AUTH, a 421); otherwise it says what else went wrong:
    ``"protocol"`` (the server broke the protocol, or lacks an extension the plan requires) or
    ``"reset"`` (the server closed the connection).
    """

    phase: str
    kind: str | None
    detail: str


@dataclass(slots=True)
class SessionClosed(ClientEvent):
    """QUIT was answered (or the server closed the connection after QUIT): close it too."""
