"""What the load generator sends: sizes, size mixes, address templates and the message factory.

This module owns message content. Bodies are built once per distinct size (or read once per
replayed file) and reused for every message; per message only a short header block (From, To,
Subject, Date, Message-ID) is formatted. It never does I/O after construction, never touches
the network, and never decides when a message is sent (that is ``schedule``).
"""

from __future__ import annotations

import base64
import email.utils
import os
import random
import re
import time
from dataclasses import dataclass
from math import gcd
from pathlib import Path

from mailstorm.cliutil import parse_size as parse_shared_size
from mailstorm.wire.client import Payload

__all__ = [
    "AddressTemplate",
    "MessageFactory",
    "OutgoingMessage",
    "WorkloadError",
    "make_text_body",
    "parse_size",
    "parse_size_mix",
]


class WorkloadError(ValueError):
    """Bad workload input (size, size mix, template, message files); the text is user-facing."""


#: The largest message (or BDAT chunk) the generator builds: each distinct size's body is made
#: once, in memory, and its dot-stuffed copy beside it.
MAX_MESSAGE_SIZE = 100 << 20


def parse_size(text: str) -> int:
    """A message or chunk size (one byte to ``MAX_MESSAGE_SIZE``), as
    ``mailstorm.cliutil.parse_size`` reads it; errors are WorkloadErrors like the rest of the
    workload's."""
    try:
        return parse_shared_size(text, minimum=1, maximum=MAX_MESSAGE_SIZE)
    except ValueError as exc:
        raise WorkloadError(str(exc)) from None


def parse_size_mix(text: str) -> list[tuple[int, float]]:
    """``"1k:70,10k:25,1m:5"`` to ``[(1024, 70.0), (10240, 25.0), (1048576, 5.0)]``.

    A plain size is a mix of one; in a mix of several, every size needs its weight.
    """
    mix: list[tuple[int, float]] = []
    parts = text.split(",")
    for part in parts:
        if not part.strip():
            raise WorkloadError(f"bad size mix {text!r}: empty entry")
        size_text, sep, weight_text = part.partition(":")
        size = parse_size(size_text)
        weight = 1.0
        if not sep and len(parts) > 1:
            raise WorkloadError(
                f"bad size mix {text!r}: missing weight for {size_text.strip()!r} "
                "(write SIZE:WEIGHT for every size, as 1k:70,10k:25,1m:5)"
            )
        if sep:
            try:
                weight = float(weight_text)
            except ValueError:
                weight = -1.0
            if not weight > 0 or weight == float("inf"):
                bad = weight_text.strip()
                raise WorkloadError(f"bad size mix {text!r}: weight {bad!r} must be positive")
        mix.append((size, weight))
    return mix


def make_text_body(length: int, seed: int = 0) -> bytes:
    """Exactly ``length`` bytes of printable text in CRLF lines of at most 78 octets.

    Lines are base64 of pseudo-random bytes (deterministic per seed), so no line starts with
    "." and the text does not compress to nothing on the way.
    """
    if length <= 2:
        return b"\r\n"[:length] if length < 2 else b"\r\n"
    rng = random.Random(seed)
    # base64.encodebytes wraps at 76 characters with LF; 57 input bytes make one line.
    lines = (length // 78) + 1
    text = base64.encodebytes(rng.randbytes(57 * lines)).replace(b"\n", b"\r\n")
    body = text[: length - 2]
    # The cut may leave a lone CR at the end; the line always ends with exactly CRLF.
    if body.endswith(b"\r"):
        body = body[:-1] + b"x"
    return body + b"\r\n"


class AddressTemplate:
    """An address with ``{n}`` (message number) and ``{r}`` (recipient number, from 1)."""

    __slots__ = ("_parts", "constant", "text")

    _FIELD = re.compile(r"\{(\w*)\}")

    def __init__(self, text: str) -> None:
        self.text = text
        parts: list[str] = []
        pos = 0
        for m in self._FIELD.finditer(text):
            if m.group(1) not in ("n", "r"):
                raise WorkloadError(
                    f"bad address template {text!r}: unknown field {m.group(0)}; use {{n}} or {{r}}"
                )
            parts.append(text[pos : m.start()])
            parts.append(m.group(1))
            pos = m.end()
        parts.append(text[pos:])
        literal = "".join(parts[0::2])
        if "{" in literal or "}" in literal:
            raise WorkloadError(f"bad address template {text!r}: unbalanced braces")
        if not literal.strip() or any(c in literal for c in "<> \t\r\n"):
            raise WorkloadError(f"bad address template {text!r}: not an address")
        self._parts = parts
        #: The address itself when the template has no fields (rendered once, reused).
        self.constant: str | None = literal if len(parts) == 1 else None

    def render(self, n: int, r: int = 1) -> str:
        if self.constant is not None:
            return self.constant
        parts = self._parts
        out = [parts[0]]
        for i in range(1, len(parts), 2):
            out.append(str(n) if parts[i] == "n" else str(r))
            out.append(parts[i + 1])
        return "".join(out)

    @property
    def uses_n(self) -> bool:
        return "n" in self._parts[1::2]


@dataclass(slots=True)
class OutgoingMessage:
    """One message as the session hands it to the client connection."""

    mail_from: str
    rcpts: list[str]
    payload: Payload
    head: bytes

    @property
    def size(self) -> int:
        return len(self.head) + len(self.payload.raw)


#: The MIME part of every generated message: same for all, so it lives in the shared payload.
_STATIC_HEADERS = (
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=us-ascii\r\n"
    b"Content-Transfer-Encoding: 7bit\r\n"
    b"\r\n"
)


def _selection_table(weights: list[float], limit: int = 1000) -> list[int]:
    """Indexes repeated in proportion to their weights, interleaved: picking ``table[n % len]``
    follows the mix exactly over every window of ``len`` messages without a random draw."""
    scale = limit / sum(weights)
    counts = [max(1, round(w * scale)) for w in weights]
    common = 0
    for c in counts:
        common = gcd(common, c)
    counts = [c // common for c in counts]
    table = [i for i, c in enumerate(counts) for _ in range(c)]
    random.Random(0).shuffle(table)
    return table


class MessageFactory:
    """Builds the n-th message of a run. Cheap per call: bodies are shared."""

    def __init__(
        self,
        *,
        sizes: list[tuple[int, float]] | None = None,
        eml_paths: list[Path] | None = None,
        mail_from: str = "loadgen@mailstorm.test",
        rcpt_to: str = "user{r}@mailstorm.test",
        rcpts: int = 1,
    ) -> None:
        if rcpts < 1:
            raise WorkloadError("--rcpts must be at least 1")
        self.from_template = AddressTemplate(mail_from)
        self.to_template = AddressTemplate(rcpt_to)
        self.rcpt_count = rcpts
        # Message-IDs stay unique across runs and worker processes.
        self.run_id = f"{os.getpid():x}{int(time.time() * 1000):x}"
        self.replay = bool(eml_paths)
        self._date_second = -1
        self._date = ""
        self._fixed_rcpts: list[str] | None = None
        if not self.to_template.uses_n:
            # Recipients do not depend on the message number: one list for every message.
            self._fixed_rcpts = [self.to_template.render(0, r) for r in range(1, rcpts + 1)]
        if eml_paths:
            try:
                self.payloads = [Payload(p.read_bytes()) for p in eml_paths]
            except OSError as exc:
                raise WorkloadError(f"--eml: cannot read {exc.filename}: {exc.strerror}") from None
            weights = [1.0] * len(self.payloads)
        else:
            mix = sizes or [(1024, 1.0)]
            overhead = len(self._head(10**9)) + len(_STATIC_HEADERS)
            self.payloads = [
                Payload(_STATIC_HEADERS + make_text_body(max(size - overhead, 2), seed=size))
                for size, _ in mix
            ]
            weights = [w for _, w in mix]
        self._table = _selection_table(weights)

    @classmethod
    def eml_files(cls, path: Path) -> list[Path]:
        """The messages to replay: the file itself, or every regular file in the folder."""
        if not str(path).strip():
            raise WorkloadError("--eml needs a file or folder name")
        try:
            if path.is_file():
                return [path]
            if not path.is_dir():
                raise WorkloadError(f"--eml {str(path)!r}: no such file or directory")
            files = sorted(
                p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
            )
        except (OSError, ValueError) as exc:
            raise WorkloadError(f"--eml {str(path)!r}: {exc}") from None
        if not files:
            raise WorkloadError(f"--eml {str(path)!r}: the folder holds no message files")
        return files

    def _head(self, n: int, mail_from: str = "", first_rcpt: str = "") -> bytes:
        now = int(time.time())
        if now != self._date_second:
            self._date_second = now
            self._date = email.utils.formatdate(now, usegmt=True)
        return (
            f"From: <{mail_from}>\r\nTo: <{first_rcpt}>\r\n"
            f"Subject: mailstorm load test {n}\r\nDate: {self._date}\r\n"
            f"Message-ID: <{n}.{self.run_id}@mailstorm.test>\r\n"
        ).encode()

    def message(self, n: int) -> OutgoingMessage:
        """The message with number ``n`` (numbers are unique across a run, even with --procs)."""
        mail_from = self.from_template.render(n)
        rcpts = self._fixed_rcpts
        if rcpts is None:
            rcpts = [self.to_template.render(n, r) for r in range(1, self.rcpt_count + 1)]
        table = self._table
        payload = self.payloads[table[n % len(table)]]
        head = b"" if self.replay else self._head(n, mail_from, rcpts[0])
        return OutgoingMessage(mail_from, rcpts, payload, head)
