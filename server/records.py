"""What an embedded sink received, as records a test can look at: ``MessageRecord``, the
bounded ``MessageLog`` that keeps them, and ``MemoryStore``, the store that fills it.

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
import math
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
