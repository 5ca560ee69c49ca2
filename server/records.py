"""What an embedded sink received, as records a test can look at: ``MessageRecord``, the
bounded ``MessageLog`` that keeps them, ``MemoryStore``, the store that fills it, and
``read_maildir``, records of a Maildir any sink wrote (``--workers`` included).

This module owns the record's shape (the envelope, the client's address, the raw content and
its parsed ``email.message.EmailMessage``) and the log's bound: at most ``max_messages``
records, the oldest dropped and counted. It never parses content on the sink's path (a record
parses its message when first asked) and never does I/O there: a record read back from a
Maildir reads its file when its content is first asked for, in the caller's thread.

Threads: the sink adds records on its trio thread; ``SinkThread`` callers read, clear and wait
for them from others. The log's state is guarded by one ``threading.Condition`` whose lock is
held for a few list operations at a time; ``wait`` (trio, on the sink's thread) wakes through a
``trio.Event``, ``wait_blocking`` (any other thread) through the condition.
"""

from __future__ import annotations

import collections
import email
import email.policy
import email.utils
import math
import os
import re
import threading
import time
from email.message import EmailMessage

import trio

from mailstorm.wire.events import Envelope

__all__ = [
    "DEFAULT_MAX_MESSAGES",
    "MemoryStore",
    "MessageLog",
    "MessageRecord",
    "SinkTimeout",
    "read_maildir",
]

#: Records a log keeps unless told otherwise: plenty for a test, bounded for a long load run.
DEFAULT_MAX_MESSAGES = 1000


class SinkTimeout(TimeoutError):
    """``wait_for`` ran out of time; the message says how many messages did arrive."""


class MessageRecord:
    """One message the sink accepted (answered 250 to), with its envelope.

    ``raw`` is the content exactly as the client sent it (dot-unstuffed, CRLF line endings,
    without the sink's trace headers, which are in ``trace``); ``message`` is that content
    parsed with ``email.policy.default``, so encoded words (RFC 2047) in headers decode.
    A record read back from a Maildir (``path`` set) reads its file on first access.
    """

    __slots__ = ("_message", "_raw", "envelope", "path", "received_at", "trace")

    def __init__(
        self,
        envelope: Envelope,
        *,
        trace: bytes = b"",
        raw: bytes | None = None,
        path: str | None = None,
        received_at: float | None = None,
    ) -> None:
        if raw is None and path is None:
            raise ValueError("a record needs its content or the path of the file holding it")
        self.envelope = envelope
        #: The ``Return-Path`` and ``Received`` headers the sink put before the content.
        self.trace = trace
        #: The Maildir file holding ``trace + raw`` (None for a record kept in memory).
        self.path = path
        #: When the sink accepted it (``time.time()``).
        self.received_at = time.time() if received_at is None else received_at
        self._raw = raw
        self._message: EmailMessage | None = None

    @property
    def mail_from(self) -> str:
        """The MAIL FROM address (``""`` for the null sender ``<>``)."""
        return self.envelope.mail_from

    @property
    def rcpt_tos(self) -> list[str]:
        """The RCPT TO addresses, in the order they were accepted."""
        return self.envelope.rcpt_tos

    @property
    def client_address(self) -> str:
        """The client's IP address."""
        return self.envelope.client_address

    @property
    def tls(self) -> bool:
        """Whether the message arrived over TLS (implicit or after STARTTLS)."""
        return self.envelope.tls

    @property
    def auth_user(self) -> str | None:
        """The authenticated user (AUTH), or None."""
        return self.envelope.auth_user

    @property
    def queue_id(self) -> str | None:
        """The sink's queue id of the message (the ``id`` of its ``Received`` header, as in
        the 250 reply), or None when the record has no trace headers."""
        match = _parse_received(self.trace)
        return match["id"] if match else None

    @property
    def session_id(self) -> str | None:
        """The id of the session that brought the message: the one in the sink's log lines
        (``--log-events``), the queue id without its ``-N`` message number."""
        queue_id = self.queue_id
        if queue_id is None or "-" not in queue_id:
            return None
        return queue_id.rpartition("-")[0]

    @property
    def raw(self) -> bytes:
        """The content as received; for a Maildir record, read from its file (the sink's
        trace headers cut off)."""
        if self._raw is None:
            assert self.path is not None
            with open(self.path, "rb") as file:
                stored = file.read()
            if not stored.startswith(self.trace):
                raise ValueError(f"{self.path}: not the message the sink stored there")
            self._raw = stored[len(self.trace) :]
        return self._raw

    @property
    def message(self) -> EmailMessage:
        """``raw`` parsed with ``email.policy.default`` (once, when first asked). Its CRLF
        line endings are read as Python's ``\\n``, so ``get_content()`` gives the text as
        written and ``as_bytes(policy=email.policy.SMTP)`` gives CRLF back."""
        if self._message is None:
            text = self.raw.replace(b"\r\n", b"\n")
            parsed = email.message_from_bytes(text, policy=email.policy.default)
            assert isinstance(parsed, EmailMessage)
            self._message = parsed
        return self._message

    def __repr__(self) -> str:
        return (
            f"<MessageRecord from {self.mail_from!r} to {self.rcpt_tos!r}"
            f" client {self.client_address!r}>"
        )


class MessageLog:
    """The most recent ``max_messages`` records, with counts of what arrived and was dropped.

    ``arrived`` counts every message added since the log was made or last cleared, including
    those dropped to keep the bound, so ``wait(count)`` works past the bound too.
    """

    def __init__(self, max_messages: int = DEFAULT_MAX_MESSAGES) -> None:
        if max_messages < 1:
            raise ValueError("max_messages must be at least 1")
        self.max_messages = max_messages
        self._records: collections.deque[MessageRecord] = collections.deque(maxlen=max_messages)
        self._lock = threading.Condition()
        self._arrived = 0
        self._dropped = 0
        self._changed = trio.Event()

    def add(self, record: MessageRecord) -> None:
        """Keep ``record`` (dropping the oldest when full) and wake waiters. Call it on the
        sink's trio thread."""
        with self._lock:
            if len(self._records) == self.max_messages:
                self._dropped += 1
            self._records.append(record)
            self._arrived += 1
            self._lock.notify_all()
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def records(self) -> list[MessageRecord]:
        """The records kept, oldest first (a copy: safe to hold while more arrive)."""
        with self._lock:
            return list(self._records)

    @property
    def arrived(self) -> int:
        """Messages added since the log was made or last cleared, dropped ones included."""
        return self._arrived

    @property
    def dropped(self) -> int:
        """Records dropped to keep the bound since the log was made or last cleared."""
        return self._dropped

    def clear(self) -> None:
        """Forget every record and reset ``arrived`` and ``dropped``."""
        with self._lock:
            self._records.clear()
            self._arrived = 0
            self._dropped = 0

    async def wait(self, count: int, timeout: float) -> list[MessageRecord]:
        """Wait until ``count`` messages have arrived (since the last ``clear``), then return
        the records kept. Raises ``SinkTimeout`` after ``timeout`` seconds. Call it on the
        sink's trio thread."""
        if not math.isfinite(timeout) or timeout < 0:
            raise ValueError("timeout must be a finite number of seconds")
        with trio.move_on_after(timeout):
            while self._arrived < count:
                await self._changed.wait()
            return self.records()
        raise self._timeout(count, timeout)

    def wait_blocking(self, count: int, timeout: float) -> list[MessageRecord]:
        """``wait`` for any thread but the sink's: blocks the caller (its event loop too, if it
        has one) until ``count`` messages have arrived or ``timeout`` seconds have passed."""
        if not math.isfinite(timeout) or timeout < 0:
            raise ValueError("timeout must be a finite number of seconds")
        with self._lock:
            if not self._lock.wait_for(lambda: self._arrived >= count, timeout):
                raise self._timeout(count, timeout)
            return list(self._records)

    def _timeout(self, count: int, timeout: float) -> SinkTimeout:
        return SinkTimeout(
            f"waited {timeout:g}s for {count} message{'s' * (count != 1)}, "
            f"{self._arrived} arrived"
        )


class MemoryStore:
    """A store that keeps each accepted message as a ``MessageRecord`` in a ``MessageLog``.

    It never waits (``immediate``): the session's protocol object hands it each message on
    whichever driver's turn it is. Trace headers are built (``keeps_messages``) and kept in
    the record beside the content.
    """

    keeps_messages = True
    immediate = True

    def __init__(self, max_messages: int = DEFAULT_MAX_MESSAGES) -> None:
        self.log = MessageLog(max_messages)

    async def deliver(self, envelope: Envelope, content: bytes, trace: bytes) -> None:
        self.deliver_now(envelope, content, trace)

    def deliver_now(self, envelope: Envelope, content: bytes, trace: bytes) -> None:
        self.log.add(MessageRecord(envelope, trace=trace, raw=content))

    def describe(self) -> str:
        return f"memory (the last {self.log.max_messages} messages)"


# ---- records of a Maildir written by any sink ------------------------------------------------

#: A Maildir file name of the sink's stores: seconds, microseconds, pid and counter sort it.
_MAILDIR_NAME = re.compile(r"(\d+)\.M(\d+)P(\d+)Q(\d+)\.")
#: The clauses of the sink's Received header (``trace.trace_headers``), once unfolded.
_RECEIVED = re.compile(
    r"from (?P<helo>\S+) \((?:\\.|[^()\\])* \[(?:IPv6:)?(?P<ip>[^\]]*)\]\)"
    r" by \S+ \(mailstorm\) with (?P<protocol>\S+)"
    r"(?: \((?:version|cipher)=[^)]*\))?"
    r"(?: \(authenticated as (?P<user>(?:\\.|[^()\\])*)\))?"
    r" id (?P<id>\S+)(?: for <(?P<rcpt>.*)>)?; (?P<date>.*)"
)
_QUOTED_PAIR = re.compile(r"\\(.)")

#: Longest trace line read; the sink's are under 300 octets.
_MAX_TRACE_LINE = 4096


def read_maildir(path: str | os.PathLike[str]) -> list[MessageRecord]:
    """Records of the messages a sink stored in the Maildir at ``path`` (``new/`` and
    ``cur/``), oldest first, from the trace headers the sink wrote before each message.

    What the trace headers say is what the records know: the sender, the client's address,
    HELO, TLS, the AUTH user and the time; the recipient only when the message had exactly
    one (the ``Received`` header names no more, RFC 5321 7.6), else ``rcpt_tos`` is empty.
    Files without the sink's trace headers are skipped. Content is read when first asked for.
    """
    root = os.fspath(path)
    files = []
    for sub in ("new", "cur"):
        with os.scandir(os.path.join(root, sub)) as entries:
            files += [(_maildir_order(e.name), e.path) for e in entries if e.is_file()]
    records = []
    for _, file_path in sorted(files):
        record = _record_from_trace(file_path)
        if record is not None:
            records.append(record)
    return records


def _maildir_order(name: str) -> tuple[int, ...]:
    m = _MAILDIR_NAME.match(name)
    return tuple(int(part) for part in m.groups()) if m else (0, 0, 0, 0)


def _record_from_trace(path: str) -> MessageRecord | None:
    """The record of one stored message, or None if it does not start with the sink's trace
    (a Return-Path line, then one Received header and its continuation lines)."""
    lines: list[bytes] = []
    with open(path, "rb") as file:
        line = file.readline(_MAX_TRACE_LINE)
        if not line.startswith(b"Return-Path: <"):
            return None
        lines.append(line)
        line = file.readline(_MAX_TRACE_LINE)
        if not line.startswith(b"Received: "):
            return None
        while line.startswith((b"Received: ", b"\t")):
            lines.append(line)
            line = file.readline(_MAX_TRACE_LINE)
    return_path = lines[0].decode("utf-8", "replace").rstrip("\r\n")
    m = _parse_received(b"".join(lines))
    if m is None or not return_path.endswith(">"):
        return None
    protocol = m["protocol"]
    user = m["user"]
    envelope = Envelope(
        mail_from=return_path[len("Return-Path: <") : -1],
        rcpt_tos=[m["rcpt"]] if m["rcpt"] is not None else [],
        helo=m["helo"],
        greeting="SMTP" if protocol == "SMTP" else "ESMTP",
        tls=protocol.removesuffix("A").endswith("S"),
        auth_user=_QUOTED_PAIR.sub(r"\1", user) if user is not None else None,
        smtputf8=protocol.startswith("UTF8"),
        client_address=m["ip"],
    )
    try:
        received_at = email.utils.parsedate_to_datetime(m["date"]).timestamp()
    except (TypeError, ValueError):
        received_at = os.path.getmtime(path)
    return MessageRecord(envelope, trace=b"".join(lines), path=path, received_at=received_at)


def _parse_received(trace: bytes) -> re.Match[str] | None:
    """The clauses of the sink's ``Received`` header in ``trace`` (its ``Return-Path`` line,
    then the header with its continuation lines), or None if it is not the sink's."""
    _, found, received = trace.partition(b"\r\nReceived: ")
    if not found:
        return None
    text = received.decode("utf-8", "replace").replace("\r\n\t", " ").rstrip("\r\n")
    return _RECEIVED.fullmatch(text)
