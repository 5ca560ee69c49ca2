"""The sink's session ids and its per-session log events (``--log-events``).

Session ids. Every session gets an id of 12 characters: a random prefix drawn once per process
(7 characters of Crockford base32, 35 bits) and a per-process counter (5 or more). Workers and
restarted sinks draw their own prefix, so ids do not repeat across them (two processes share
a prefix with odds of 1 in 34 billion). A stored message's queue id is its session's id, a
hyphen and the message's number in the session (``0KX7M2Q00001-1``): the ``id`` clause of its
``Received:`` header (an RFC 5322 atom: letters, digits and ``-``) leads to the session's log
lines. The id is built when first asked for (the first message, or the first event).

Events. With ``--log-events``, each session logs at INFO to the logger
``mailstorm.sink.events``: ``session_start``, ``tls_started``, ``auth_ok``, ``auth_failed``,
``message_accepted``, ``message_refused``, ``session_end``. Each record carries its fields
with ``extra=`` (``session``, ``client``, ``code``, ``queue_id``, ``size``, ...), which
``--log-format json`` writes as keys. Off (the default), a session has no ``SessionLog`` and
the hot path pays one ``is None`` check per message: a sink taking 10,000 messages a second
does not write 10,000 lines a second unless asked.

What is never logged: message content (only its size and, with events on, its ``Message-ID``
header, found by a bounded search of the header block), passwords and the AUTH exchange (the
username is, cut to 64 characters, as Postfix logs ``sasl_username``).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import re
import secrets
import time

from mailstorm.logsetup import add_logging_options
from mailstorm.wire.server import Mode, ServerConnection

__all__ = [
    "EVENTS_LOGGER",
    "SessionLog",
    "add_log_options",
    "client_text",
    "find_message_id",
    "next_session_number",
    "session_id",
]

#: The logger of per-session and per-message events.
EVENTS_LOGGER = "mailstorm.sink.events"
_events = logging.getLogger(EVENTS_LOGGER)

#: Crockford's base32: digits and capitals without I, L, O and U (nothing to misread).
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_PREFIX_CHARS = 7
_COUNTER_CHARS = 5


def _base32(number: int, width: int) -> str:
    digits: list[str] = []
    while number or len(digits) < width:
        number, digit = divmod(number, 32)
        digits.append(_ALPHABET[digit])
    return "".join(reversed(digits))


def _new_prefix() -> str:
    return _base32(secrets.randbits(5 * _PREFIX_CHARS), _PREFIX_CHARS)


_prefix = _new_prefix()
_numbers = itertools.count(1)


def _after_fork() -> None:
    # A forked child is another process: it must not hand out its parent's ids.
    global _prefix, _numbers
    _prefix = _new_prefix()
    _numbers = itertools.count(1)


os.register_at_fork(after_in_child=_after_fork)


def next_session_number() -> int:
    """A number for a new session, unique in this process (cheap: a counter)."""
    return next(_numbers)


def session_id(number: int) -> str:
    """The session id of ``next_session_number()``'s ``number`` (see the module docstring)."""
    return _prefix + _base32(number, _COUNTER_CHARS)


#: How far into a message the Message-ID header is looked for (header blocks are small).
_HEADER_SCAN = 16384
_MESSAGE_ID = re.compile(
    rb"^message-id:[ \t]*(?:\r?\n[ \t]+)?(<[\x21-\x7e]{1,250}>)", re.IGNORECASE | re.MULTILINE
)


def find_message_id(content: bytes) -> str | None:
    """The ``Message-ID`` header's ``<...>`` in the header block of ``content``, if any;
    only the first ``_HEADER_SCAN`` octets are searched."""
    end = content.find(b"\r\n\r\n", 0, _HEADER_SCAN)
    match = _MESSAGE_ID.search(content, 0, end if end >= 0 else _HEADER_SCAN)
    return match.group(1).decode("ascii") if match else None


def client_text(ip: str, port: int) -> str:
    """A client's address as log lines give it: ``ip:port``, ``[ipv6]:port``."""
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def add_log_options(parser: argparse.ArgumentParser) -> None:
    """The sink's "logging" options: ``--log-format``, ``--log-level`` and ``--log-events``."""
    group = add_logging_options(parser, default_level="info")
    group.add_argument(
        "--log-events",
        action="store_true",
        help="log one line per session event (session_start, tls_started, auth_ok, "
        "auth_failed, message_accepted, message_refused, session_end) to the logger "
        f"{EVENTS_LOGGER}, whatever --log-level says. Each line names its session, whose "
        "id begins the queue id in a stored message's Received header. Off by default: at "
        "thousands of messages a second a line each would cost more than the mail",
    )


def _recipients(count: int) -> str:
    return f"{count} recipient{'s' * (count != 1)}"


class SessionLog:
    """The events of one session (only made with ``--log-events``): each method logs one
    line with the session's id and client, and keeps the counts ``session_end`` reports."""

    __slots__ = ("client", "messages", "octets", "reason", "session", "started", "stopping")

    def __init__(self, session: str, ip: str, port: int) -> None:
        self.session = session
        self.client = client_text(ip, port)
        self.started = time.monotonic()
        self.messages = 0
        self.octets = 0
        #: Why the session ended, once known (the first reason given wins).
        self.reason = ""
        #: Why the server asked the session to stop (for the reason, if it ends that way).
        self.stopping = ""

    def _log(self, event: str, text: str, fields: dict[str, object]) -> None:
        extra = {"event": event, "session": self.session, "client": self.client, **fields}
        _events.info("session %s (%s): %s", self.session, self.client, text, extra=extra)

    def ended_because(self, reason: str) -> None:
        """Note why the session ends (kept only if no reason was noted before)."""
        if not self.reason:
            self.reason = reason

    def closed(self, conn: ServerConnection) -> None:
        """The core ended the session (a ``Closed`` event): say why."""
        if conn.mode is not Mode.CLOSED:
            self.ended_because("client closed")
        elif conn.policy.max_errors and conn.errors >= conn.policy.max_errors:
            self.ended_because("too many errors")
        elif conn.policy.max_junk_commands and conn.junk_commands > conn.policy.max_junk_commands:
            self.ended_because("too many commands")
        else:
            self.ended_because("quit")

    def session_start(self, tls: bool) -> None:
        self._log("session_start", "connect" + (" (implicit TLS)" if tls else ""), {"tls": tls})

    def session_end(self, reason: str) -> None:
        self.ended_because(reason)
        duration = round(time.monotonic() - self.started, 3)
        self._log(
            "session_end",
            f"disconnect ({self.reason}) after {duration:.3f}s, "
            f"{self.messages} message{'s' * (self.messages != 1)}, {self.octets} bytes",
            {
                "reason": self.reason,
                "duration": duration,
                "messages": self.messages,
                "size": self.octets,
            },
        )

    def tls_started(self, version: str | None, cipher: str | None) -> None:
        self._log(
            "tls_started", f"TLS {version} {cipher}", {"tls_version": version, "cipher": cipher}
        )

    def auth(self, ok: bool, mechanism: str, username: str) -> None:
        user = username[:64]
        self._log(
            "auth_ok" if ok else "auth_failed",
            f"AUTH {mechanism} {'ok' if ok else 'failed'} for user {user!r}",
            {"mechanism": mechanism, "user": user},
        )

    def message_accepted(
        self, queue_id: str, mail_from: str, recipients: int, content: bytes
    ) -> None:
        size = len(content)
        self.messages += 1
        self.octets += size
        message_id = find_message_id(content)
        self._log(
            "message_accepted",
            f"message {queue_id} accepted: from <{mail_from}>, {_recipients(recipients)}, "
            f"{size} bytes" + (f", message-id {message_id}" if message_id else ""),
            {
                "code": 250,
                "queue_id": queue_id,
                "message_id": message_id,
                "from": mail_from,
                "recipients": recipients,
                "size": size,
            },
        )

    def message_refused(self, code: int, reason: str, mail_from: str, recipients: int) -> None:
        self._log(
            "message_refused",
            f"message from <{mail_from}> to {_recipients(recipients)} refused with {code}: "
            f"{reason}",
            {"code": code, "reason": reason, "from": mail_from, "recipients": recipients},
        )
