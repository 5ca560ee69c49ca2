"""SMTP phases as Locust request events: names, times, sizes and failures with their reply code.

This module owns how one SMTP conversation shows in Locust's statistics: one request event per
timed reply (``connect``, ``TLS``, ``banner``, ``EHLO`` (``LHLO`` in LMTP), ``STARTTLS``,
``AUTH``, ``MAIL``, ``RCPT``, ``DATA``, ``BDAT``, ``end of data``, ``RSET``, ``QUIT``), all with
``request_type="SMTP"``; with pipelining the MAIL, RCPT and DATA replies of one write are one
event (``MAIL+RCPT+DATA``), as ``mailstorm load`` measures them. A refused reply is a failure
whose error is the reply itself (``550 5.1.1 ...``, prefixed by its phase inside a pipelined
group), so Locust's failure table groups by code. ``end of data`` carries the message size as
``response_length`` and is a success only for a 2xx: Locust's count of successful
``end of data`` requests is the number of messages the server accepted. In LMTP (RFC 2033)
the end of data gets one reply per accepted recipient, each a delivery to one mailbox, and
each is one ``end of data`` request: the count is then of deliveries (recipients).

It never imports locust or gevent (the caller passes the function that fires an event, so this
is testable without monkey-patching a process), never does I/O and never decides anything about
the session: ``mailstorm.wire.client`` decides, ``mailstorm.load.blocking`` carries it out.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mailstorm.wire.client_events import PhaseDone
from mailstorm.wire.replies import ParsedReply

__all__ = [
    "PHASE_NAMES",
    "REQUEST_TYPE",
    "PhaseReporter",
    "SMTPReplyError",
    "SMTPSessionFailure",
]

REQUEST_TYPE = "SMTP"

#: The client's phase names (``mailstorm.wire.client.PHASES``, plus the driver's ``connect``
#: and ``tls``) as Locust shows them.
PHASE_NAMES = {
    "connect": "connect",
    "tls": "TLS",
    "banner": "banner",
    "ehlo": "EHLO",
    "starttls": "STARTTLS",
    "auth": "AUTH",
    "mail": "MAIL",
    "rcpt": "RCPT",
    "data": "DATA",
    "bdat": "BDAT",
    "eod": "end of data",
    "rset": "RSET",
    "quit": "QUIT",
    "session": "session",
}

#: Phases whose commands travel in one write when the server pipelines.
_GROUPED = frozenset({"mail", "rcpt", "data", "bdat"})

FireRequest = Callable[..., Any]


class SMTPReplyError(Exception):
    """A reply that was not the one the session wanted; its text is the reply."""

    def __init__(self, reply: ParsedReply, phase: str | None = None) -> None:
        first = reply.lines[0] if reply.lines else ""
        text = f"{reply.code} {first}".rstrip()
        super().__init__(f"{PHASE_NAMES.get(phase, phase)} {text}" if phase else text)
        self.reply = reply


class SMTPSessionFailure(Exception):
    """A session that ended without a reply to report (reset, timeout, protocol, TLS, refused
    connection); its text is the kind and the detail."""


class PhaseReporter:
    """Fires one request event per timed phase of one Locust user's SMTP sessions.

    ``fire`` is ``environment.events.request.fire`` (or a stand-in in tests). Call ``phase``
    for every ``PhaseDone`` (``BlockingSession(on_phase=...)``), ``timed`` for what the driver
    times itself (``connect``, ``tls``), ``session_failed`` for a failure no reply reported,
    and ``flush`` when a message or session is over.
    """

    def __init__(self, fire: FireRequest) -> None:
        self._fire = fire
        #: Whether the current connection pipelines (set once its greeting is done).
        self.pipelining = False
        #: The size of the message being sent: ``response_length`` of ``end of data``.
        self.message_size = 0
        #: ``DATA`` or ``BDAT``: the last command of a pipelined group.
        self.content_verb = "DATA"
        #: ``EHLO`` or, for an LMTP session, ``LHLO``: the name of the greeting's event.
        self.hello_verb = "EHLO"
        self._group: list[PhaseDone] = []

    @property
    def group_name(self) -> str:
        return f"MAIL+RCPT+{self.content_verb}"

    def name_of(self, phase: str) -> str:
        """The event name of ``phase`` on the current connection."""
        if self.pipelining and phase in _GROUPED:
            return self.group_name
        return PHASE_NAMES.get(phase, phase)

    def phase(self, event: PhaseDone) -> None:
        if self.pipelining and event.phase in _GROUPED:
            self._group.append(event)
            return
        self.flush()
        phase = event.phase
        length = self.message_size if phase == "eod" else 0
        error = None if event.ok else SMTPReplyError(event.reply)
        name = self.hello_verb if phase == "ehlo" else PHASE_NAMES.get(phase, phase)
        self._emit(name, event.elapsed, length, error)

    def timed(self, phase: str, seconds: float) -> None:
        self._emit(PHASE_NAMES.get(phase, phase), seconds, 0, None)

    def session_failed(self, phase: str, kind: str, detail: str, seconds: float) -> None:
        self.flush()
        self._emit(self.name_of(phase), seconds, 0, SMTPSessionFailure(f"{kind}: {detail}"))

    def flush(self) -> None:
        """Fire the pipelined group held so far as one event: its time is its last reply's
        (every command of the group was sent in the same write), its error the first refusal."""
        group = self._group
        if not group:
            return
        self._group = []
        error = None
        for event in group:
            if not event.ok:
                error = SMTPReplyError(event.reply, event.phase)
                break
        self._emit(self.group_name, max(e.elapsed for e in group), 0, error)

    def _emit(self, name: str, seconds: float, length: int, error: Exception | None) -> None:
        self._fire(
            request_type=REQUEST_TYPE,
            name=name,
            response_time=seconds * 1000.0,
            response_length=length,
            exception=error,
            context={},
        )
