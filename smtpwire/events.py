"""Events the server connection hands to its driver, and the envelope they carry.

Events are plain classes, in the manner of h11: the sans-IO core produces them, the trio shell
acts on them (store a message, check a password, upgrade to TLS, close) and reports back.
Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = [
    "REFUSED_FOR_EVERY_RECIPIENT",
    "AuthAttempt",
    "Closed",
    "Delay",
    "Dropped",
    "Envelope",
    "Event",
    "FaultReplied",
    "MessageReceived",
    "MessageRefused",
    "NeedData",
    "OutputFull",
    "StartTLS",
]

#: ``MessageRefused.reason`` in LMTP when injected faults refused each recipient at the end of
#: data (each is also a ``FaultReplied`` naming its recipient).
REFUSED_FOR_EVERY_RECIPIENT = "refused for every recipient"


@dataclass(slots=True)
class Envelope:
    """The SMTP envelope of one transaction, with what the session knew when it began."""

    mail_from: str = ""
    rcpt_tos: list[str] = field(default_factory=list)
    #: ESMTP parameters of MAIL FROM, keywords upper-cased, values as sent (None when absent).
    mail_options: dict[str, str | None] = field(default_factory=dict)
    #: ESMTP parameters per RCPT TO, in the same order as ``rcpt_tos``.
    rcpt_options: list[dict[str, str | None]] = field(default_factory=list)
    body_type: str = "7BIT"
    smtputf8: bool = False
    helo: str = ""
    #: "SMTP" after HELO, "ESMTP" after EHLO, "LMTP" after LHLO.
    greeting: str = "ESMTP"
    tls: bool = False
    auth_user: str | None = None
    #: The client's IP address, as the shell saw it (the core never sees sockets: the sink's
    #: protocol object fills it in before a message is stored).
    client_address: str = ""

    @property
    def protocol(self) -> str:
        """The RFC 3848 / RFC 6531 "with" keyword for a Received header."""
        if self.greeting == "SMTP":
            return "SMTP"
        if self.smtputf8:
            base = "UTF8LMTP" if self.greeting == "LMTP" else "UTF8SMTP"
        else:
            base = self.greeting
        return base + ("S" if self.tls else "") + ("A" if self.auth_user else "")


class Event:
    """Base class of everything ``ServerConnection.next_event`` returns."""

    __slots__ = ()


class _NeedData(Event):
    """All buffered input is processed: send pending output, then receive more."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Singleton: returned when the connection needs more bytes from the peer.
NeedData = _NeedData()


class _OutputFull(Event):
    """Replies are piling up unsent: send what ``data_to_send`` returns, then call
    ``next_event`` again; do not read more input first.

    The connection stops parsing while its queued output is at ``SessionPolicy.max_unsent_output``
    or above, so a client that pipelines commands without reading the replies costs that bound
    (plus one reply), not one reply per command it managed to send.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return "OUTPUT_FULL"


#: Singleton: returned when unsent replies reached their bound and must leave before parsing
#: goes on.
OutputFull = _OutputFull()


@dataclass(slots=True)
class MessageReceived(Event):
    """A complete message: store it, then call ``message_stored(ok)`` to release the reply."""

    envelope: Envelope
    #: The exact unstuffed content, CRLF line endings, ending in CRLF (or empty).
    content: bytes


@dataclass(slots=True)
class MessageRefused(Event):
    """A complete message was refused by policy; its 5xx is already queued. Nothing to answer:
    the event is there so the driver can count refusals (only the core sees them)."""

    envelope: Envelope
    #: Why: "too big" or "bare linefeed" (``data.DataFailure`` values), or, in LMTP,
    #: ``REFUSED_FOR_EVERY_RECIPIENT``.
    reason: str
    #: The code of the refusal queued (in LMTP, each recipient's: the first one's here).
    code: int


@dataclass(slots=True)
class AuthAttempt(Event):
    """Credentials to check: call ``auth_result(ok)`` with the verdict."""

    mechanism: str
    username: str
    password: str = field(repr=False)
    authzid: str = ""


class StartTLS(Event):
    """The 220 to STARTTLS is queued: send it, do the handshake, then call ``tls_started()``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "StartTLS()"


class Closed(Event):
    """The session is over (QUIT, 421, or peer gone): send what is pending, then close."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "Closed()"


# ---- injected faults (``faults.FaultPlan``): the core has already acted; these tell the driver
# what to carry out (a delay) and what to count and log.


@dataclass(slots=True)
class FaultReplied(Event):
    """An injected reply is queued instead of the usual answer at ``point`` (at EOD the message
    is not stored). Nothing to answer: the event is there for counting and logging."""

    point: str
    code: int
    #: The rule or magic address that chose it, for the log.
    why: str
    #: LMTP's end of data: the one recipient it refused (the message may be stored for the
    #: others). None when it answers a whole command or message.
    recipient: str | None = None


@dataclass(slots=True)
class Delay(Event):
    """Wait ``seconds`` before sending what is queued (the answer at ``point`` is among it),
    then go on. The wait is the server's time: no client timeout runs during it."""

    point: str
    seconds: float
    why: str


@dataclass(slots=True)
class Dropped(Event):
    """The connection must be closed now, without the answer at ``point`` (mid-content for a
    drop at DATA; at EOD the message is not stored)."""

    point: str
    why: str
