"""SMTP replies: the server's reply type, the reply table, and the client's reply parser.

This module owns the wire form of replies in both directions, so that the sink (which formats
them) and the load generator (which parses them) cannot disagree. It never does I/O.

Replies carry RFC 3463 enhanced status codes; ``Reply.to_bytes`` is cached per instance because
most replies on the hot path are module-level constants that are sent thousands of times.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = [
    "ParsedReply",
    "ProtocolViolation",
    "Reply",
    "ReplyParser",
    "ReplyTooLong",
]

#: RFC 5321 4.5.3.1.5: a reply line is at most 512 octets including CRLF. Peers exceed it in
#: practice (long EHLO keyword lists), so the parser allows more, but still bounds it.
MAX_REPLY_LINE = 4096
#: A multi-line reply with more lines than this is treated as a protocol violation.
MAX_REPLY_LINES = 256


class Reply:
    """One SMTP reply: a three-digit code, an optional enhanced code, and one or more text lines."""

    __slots__ = ("_wire", "code", "enhanced", "lines")

    def __init__(self, code: int, enhanced: str | None, *lines: str) -> None:
        self.code = code
        self.enhanced = enhanced
        self.lines: tuple[str, ...] = lines or ("",)
        self._wire: bytes | None = None

    def to_bytes(self) -> bytes:
        """The reply as it goes on the wire: ``250-first``, ..., ``250 last``, CRLF-terminated."""
        wire = self._wire
        if wire is None:
            prefix = f"{self.code}"
            enh = f"{self.enhanced} " if self.enhanced else ""
            last = len(self.lines) - 1
            parts = []
            for i, text in enumerate(self.lines):
                sep = " " if i == last else "-"
                # The enhanced code goes on every line (RFC 2034 section 4).
                # No stripping: RFC 4954 wants "334 " (with the space) for an empty challenge.
                parts.append(f"{prefix}{sep}{enh}{text}\r\n")
            wire = self._wire = "".join(parts).encode("utf-8")
        return wire

    def __repr__(self) -> str:
        return f"Reply({self.code}, {self.enhanced!r}, {' / '.join(self.lines)!r})"


# --------------------------------------------------------------------------------------------
# Client side: parsing replies from a byte stream.
# --------------------------------------------------------------------------------------------

_REPLY_LINE = re.compile(rb"([2-5][0-9][0-9])([ -])?([^\r\n]*)\r?\n")


class ReplyTooLong(ValueError):
    """The peer sent a reply line or a multi-line reply beyond our bounds."""


@dataclass(slots=True)
class ParsedReply:
    """A reply as received by a client: code plus text lines (enhanced code left in the text)."""

    code: int
    lines: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    @property
    def enhanced(self) -> str | None:
        """The RFC 3463 enhanced status code at the start of the first line, if any."""
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        return m.group(1) if m else None

    def to_bytes(self) -> bytes:
        last = len(self.lines) - 1
        return b"".join(
            f"{self.code}{' ' if i == last else '-'}{t}\r\n".encode()
            for i, t in enumerate(self.lines)
        )


_ENHANCED = re.compile(r"([245]\.\d{1,3}\.\d{1,3})(?: |$)")


class ProtocolViolation(ValueError):
    """The peer sent bytes that are not an SMTP reply."""


class ReplyParser:
    """Incremental parser for server replies (RFC 5321 4.2), tolerant of split reads.

    Feed bytes with ``feed``; take complete replies with ``next_reply`` until it returns None.
    A reply is complete at its first line whose separator is a space (or absent).
    """

    __slots__ = ("_buf", "_code", "_lines", "_pos")

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0
        #: The code of the reply whose lines are in ``_lines`` (meaningful while there are any).
        self._code = 0
        self._lines: list[str] = []

    def feed(self, data: bytes | bytearray) -> None:
        if self._pos and self._pos == len(self._buf):
            self._buf.clear()
            self._pos = 0
        self._buf += data

    def next_reply(self) -> ParsedReply | None:
        # Runs for every reply a load generator reads: locals instead of attribute writes, and
        # one ``groups()`` call per line.
        buf = self._buf
        pos = self._pos
        lines = self._lines
        while True:
            end = buf.find(b"\n", pos)
            if end < 0:
                self._pos = pos
                if len(buf) - pos > MAX_REPLY_LINE:
                    raise ReplyTooLong("reply line too long")
                return None
            m = _REPLY_LINE.match(buf, pos, end + 1)
            if m is None:
                raise ProtocolViolation(f"not an SMTP reply line: {bytes(buf[pos:end])!r}")
            pos = end + 1
            digits, separator, text = m.groups()
            code = int(digits)
            if lines and code != self._code:
                raise ProtocolViolation("reply code changed within a multi-line reply")
            self._code = code
            lines.append(text.decode("utf-8", "replace"))
            if len(lines) > MAX_REPLY_LINES:
                raise ReplyTooLong("too many lines in one reply")
            if separator != b"-":
                self._lines = []
                if pos == len(buf):
                    buf.clear()
                    pos = 0
                self._pos = pos
                return ParsedReply(code, lines)

    @property
    def buffered(self) -> int:
        """Bytes received but not yet part of a complete reply."""
        return len(self._buf) - self._pos
