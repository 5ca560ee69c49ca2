"""Message content on the wire: the server's DATA and BDAT readers, the client's dot-stuffing.

Theory of operation (DATA, RFC 5321 4.5.2): the body is kept in the connection's receive buffer,
exactly as it arrived, until the end-of-data marker CRLF "." CRLF is found. Each new chunk is
scanned once with ``bytearray.find`` starting four bytes before its beginning, so a marker split
across reads is still found and no byte is looked at twice. When the marker is found the body is
copied out once and unstuffed as a whole block with ``bytes.replace`` (C speed); no Python code
ever runs per line.

Bounds: a body larger than the limit is not kept. Its bytes are dropped as they arrive (all but
the last four, which may begin the marker) until the marker shows up, so the session survives
and memory stays bounded.

Line endings, in one place (smuggling, CVE-2023-51764 and kin). A bare CR is a CR not followed
by LF; a bare LF is an LF not preceded by CR; ``has_bare_line_ending`` is the one detector, and
``apply_line_ending_policy`` the one place the policy is applied, to DATA and BDAT content alike:

- Only CRLF "." CRLF ends DATA, never LF "." LF or any mix, so a bare-LF sequence cannot end a
  message early or smuggle a second one.
- ``reject`` refuses every message that holds a bare CR or LF anywhere (550 5.6.0).
- ``normalize`` turns every bare CR and every bare LF into CRLF, and never touches a dot. The
  lines of the wire are the ones the client ended with CRLF, so in DATA a line starts at the
  beginning of the content or right after a CRLF the client sent, and only there is a leading
  "." a stuffing dot: unstuffing runs on the content as received, and normalization after it.
  A dot at the start of a line that normalization creates (after a bare CR or LF) is kept as
  sent: "a" LF "." LF "b" is stored as "a" CRLF "." CRLF "b". The order is safe because
  removing a stuffing dot never changes which endings are bare: the dot follows the LF of a
  CRLF, which is paired already. BDAT content has no stuffing: normalize only fixes its line
  endings.
- The check runs once over the whole content (DATA keeps the body in one buffer until the
  marker; BDAT joins its chunks first), so a CR at the end of one read or chunk and an LF at
  the start of the next are a CRLF, as they are on the wire.

This module does no I/O.
"""

from __future__ import annotations

import re
from enum import Enum
from io import IncrementalNewlineDecoder

__all__ = [
    "BareLinefeedPolicy",
    "BdatReader",
    "DataFailure",
    "DataReader",
    "LineEndingScan",
    "apply_line_ending_policy",
    "dot_stuff",
    "has_bare_line_ending",
    "normalize_line_endings",
]

END_OF_DATA = b"\r\n.\r\n"
#: What the DATA reader looks for: the start of every line that begins with "." (a stuffed
#: line, or the end marker when CRLF follows).
_DOT_LINE = b"\r\n."
_EMPTY_BODY_END = b".\r\n"
#: Dots ``DataReader._find_end`` steps to one at a time before it turns to the three-byte
#: search for the rest of a read (prose has a dot in every sentence).
_DOT_STEPS = 8
#: How many bytes of a dropped oversize body to keep: a marker may begin in them.
_MARKER_TAIL = len(END_OF_DATA) - 1
_ANY_EOL = re.compile(rb"\r\n|\r|\n")


class BareLinefeedPolicy(Enum):
    """What to do with a bare CR or LF inside message content."""

    #: Treat it as a line end: it is stored as CRLF.
    NORMALIZE = "normalize"
    #: Refuse the message with 550 5.6.0; the session stays usable.
    REJECT = "reject"


class DataFailure(Enum):
    """Why a complete body is not delivered."""

    TOO_BIG = "too big"
    BARE_LINEFEED = "bare linefeed"


#: What ``IncrementalNewlineDecoder.newlines`` says after a scan when every CR and LF was
#: part of a CRLF (None: there were none at all).
_CRLF_ONLY = (None, "\r\n")
#: ``has_bare_line_ending`` scans a large body in pieces of this size: one 100 KiB temporary
#: string per body cost more in fresh memory (page faults) than the scan itself.
_SCAN_PIECE = 16 * 1024


class LineEndingScan:
    """Finds bare CRs (not followed by LF) and bare LFs (not preceded by CR) in content fed in
    pieces of any size: a CR that ends one piece and an LF that starts the next are a CRLF.

    The scan is the standard library's universal-newline decoder, run without translating: it
    notes which kinds of line end it met (CR, LF, CRLF) in one C loop that pairs a CR with the
    character right after it, holds back a CR that ends a piece until it sees the next one,
    and passes over a piece without CR with memchr. Decoding as Latin-1 maps each byte to one
    character, so adjacency is kept. Counting CR and LF apart from their adjacency is what let
    "foo" CR "bar" LF pass as a pair; three ``count`` calls (CR, LF, CRLF) would be correct
    but cost four times as much on clean CRLF content.
    """

    __slots__ = ("_decoder",)

    def __init__(self) -> None:
        self._decoder = IncrementalNewlineDecoder(None, translate=False)

    def feed(self, piece: bytes | bytearray | memoryview) -> None:
        """Scan the next piece of the content."""
        self._decoder.decode(str(piece, "latin-1"))

    def end(self) -> bool:
        """The content is complete: True if it held a bare CR or LF anywhere (a CR at the
        very end is bare)."""
        decoder = self._decoder
        decoder.decode("", True)
        return decoder.newlines not in _CRLF_ONLY


def has_bare_line_ending(content: bytes) -> bool:
    """True if ``content`` holds a bare CR (not followed by LF) or a bare LF (not preceded by
    CR). A ``LineEndingScan`` over the whole content, in pieces of ``_SCAN_PIECE``."""
    if len(content) <= _SCAN_PIECE:
        # Most messages: one call, without the pieces' view and loop, which would double the
        # cost of a 1 KiB body's check.
        decoder = IncrementalNewlineDecoder(None, translate=False)
        decoder.decode(content.decode("latin-1"), True)
        return decoder.newlines not in _CRLF_ONLY
    scan = LineEndingScan()
    view = memoryview(content)
    for start in range(0, len(content), _SCAN_PIECE):
        scan.feed(view[start : start + _SCAN_PIECE])
    return scan.end()


def normalize_line_endings(content: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF becomes CRLF. Returns ``content`` itself when clean."""
    if not has_bare_line_ending(content):
        return content
    return _ANY_EOL.sub(b"\r\n", content)


def apply_line_ending_policy(content: bytes, policy: BareLinefeedPolicy) -> bytes | None:
    """``content`` under ``policy``: itself when clean, None when refused (``reject``), or
    with every bare CR and LF made CRLF (``normalize``). The DATA reader unstuffs first."""
    if policy is BareLinefeedPolicy.REJECT:
        return None if has_bare_line_ending(content) else content
    return normalize_line_endings(content)


def unstuff(raw: bytes, *, dot_lines: bool | None = None) -> bytes:
    """Undo dot-stuffing on a whole body: the first "." of every line is removed.

    ``dot_lines`` says whether any line after the first starts with "." when the caller
    already knows (the DATA reader learns it while looking for the end marker); None scans.
    """
    if raw[:1] == b".":
        raw = raw[1:]
    if dot_lines is None:
        dot_lines = b"\r\n." in raw
    if dot_lines:
        raw = raw.replace(b"\r\n.", b"\r\n")
    return raw


def dot_stuff(body: bytes) -> bytes:
    """The DATA wire form of ``body``: CRLF line ends, stuffed dots, and the end marker.

    Bare CR/LF are normalized to CRLF first (as smtplib does), and a final CRLF is added if the
    body does not end with one, so the server stores exactly ``normalize_line_endings(body)``
    (plus that CRLF).
    """
    body = normalize_line_endings(body)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    if body[:1] == b".":
        body = b"." + body
    if b"\r\n." in body:
        body = body.replace(b"\r\n.", b"\r\n..")
    return body + _EMPTY_BODY_END


class DataReader:
    """Reads one DATA body out of a receive buffer, consuming it from the front.

    Call ``read(buf)`` each time bytes were added. It returns None while the end is not yet
    there, and ``(content, failure)`` once it is: ``content`` is the unstuffed body (CRLF
    line ends) or None if ``failure`` says why it is refused.
    """

    __slots__ = (
        "_at_start",
        "_dot_lines",
        "_failure",
        "_max_raw",
        "_scan_from",
        "max_size",
        "policy",
    )

    def __init__(self, max_size: int, policy: BareLinefeedPolicy) -> None:
        self.max_size = max_size
        self.policy = policy
        # Stuffing adds at most one byte per line; allow for it while streaming, check the
        # exact unstuffed size at the end.
        self._max_raw = max_size + (max_size >> 3) + 4096 if max_size else 0
        self._scan_from = 0
        self._at_start = True
        # Whether a line after the first begins with "." (so unstuffing has work to do).
        self._dot_lines = False
        self._failure: DataFailure | None = None

    def read(self, buf: bytearray) -> tuple[bytes | None, DataFailure | None] | None:
        if self._at_start:
            # The CRLF that ends the DATA command line counts as the marker's first CRLF.
            if len(buf) < 3:
                if _EMPTY_BODY_END.startswith(buf):
                    return None
            elif buf.startswith(_EMPTY_BODY_END):
                del buf[:3]
                return b"", None
            self._at_start = False

        end = self._find_end(buf)
        if end < 0:
            size = len(buf)
            if self._max_raw and size > self._max_raw:
                self._failure = DataFailure.TOO_BIG
            if self._failure is not None:
                # Drain: keep only what may begin the marker.
                del buf[: size - _MARKER_TAIL]
                self._scan_from = 0
            else:
                self._scan_from = max(0, size - _MARKER_TAIL)
            return None

        if self._failure is not None:
            del buf[: end + len(END_OF_DATA)]
            return None, self._failure
        raw = bytes(memoryview(buf)[: end + 2])
        del buf[: end + len(END_OF_DATA)]
        return self.finish(raw)

    def _find_end(self, buf: bytearray) -> int:
        """Where the end marker starts, or -1; notes dot-stuffed lines on the way.

        One scan for CRLF "." finds both the marker (CRLF follows) and every stuffed line, so
        unstuffing needs no second pass over a body that has none. The scan goes from "." to
        "." first: a one-byte find is memchr, many times faster than the three-byte search,
        so a body with few dots (base64 parts have none) is passed over at memory speed. After
        ``_DOT_STEPS`` dots (prose, or many stuffed lines), the three-byte search takes over.
        """
        pos = self._scan_from
        steps = _DOT_STEPS
        while True:
            if steps:
                steps -= 1
                dot = buf.find(b".", pos + 2)
                if dot < 0:
                    return -1
                pos = dot - 2
                if buf[pos:dot] != b"\r\n":
                    pos += 1  # the next "." searched for is after this one
                    continue
            else:
                pos = buf.find(_DOT_LINE, pos)
                if pos < 0:
                    return -1
            after = buf[pos + 3 : pos + 5]
            if after == b"\r\n":
                return pos
            if len(after) < 2 and b"\r\n".startswith(after):
                # Too few bytes yet to tell a stuffed line from the marker; ``read`` resumes
                # the scan four bytes before the end, which is at or before ``pos``.
                return -1
            self._dot_lines = True
            pos += 3

    def finish(self, raw: bytes) -> tuple[bytes | None, DataFailure | None]:
        """Unstuffing, then the line-ending policy, then the exact size check, on a raw body.

        Unstuffing comes first so that it sees only the lines the client ended with CRLF: a
        dot after a bare CR or LF is content (see the module docstring).
        """
        return _checked(unstuff(raw, dot_lines=self._dot_lines), self.policy, self.max_size)


class BdatReader:
    """Reads the octets of one BDAT chunk (RFC 3030): no markers, no stuffing, just a count.

    ``read(buf)`` returns None until ``size`` octets are buffered, then the chunk (``b""`` when
    ``keep`` is False, so that refused or oversize chunks are drained without being kept).
    """

    __slots__ = ("_remaining", "keep")

    def __init__(self, size: int, keep: bool) -> None:
        self._remaining = size
        self.keep = keep

    def read(self, buf: bytearray) -> bytes | None:
        if not self.keep:
            take = min(self._remaining, len(buf))
            del buf[:take]
            self._remaining -= take
            return b"" if self._remaining == 0 else None
        if len(buf) < self._remaining:
            return None
        chunk = bytes(memoryview(buf)[: self._remaining])
        del buf[: self._remaining]
        self._remaining = 0
        return chunk

    @staticmethod
    def finish(
        chunks: list[bytes], policy: BareLinefeedPolicy, max_size: int
    ) -> tuple[bytes | None, DataFailure | None]:
        """A message from all its chunks: joined (so a CRLF split between two chunks is a
        CRLF), then the line-ending policy and the exact size check (``normalize`` may add
        octets), as ``DataReader.finish`` does. There is no stuffing to undo."""
        return _checked(b"".join(chunks), policy, max_size)


def _checked(
    content: bytes, policy: BareLinefeedPolicy, max_size: int
) -> tuple[bytes | None, DataFailure | None]:
    """A whole message's content under the line-ending policy, then the exact size check
    (``normalize`` may add octets): what both readers' ``finish`` end with."""
    checked = apply_line_ending_policy(content, policy)
    if checked is None:
        return None, DataFailure.BARE_LINEFEED
    if max_size and len(checked) > max_size:
        return None, DataFailure.TOO_BIG
    return checked, None
