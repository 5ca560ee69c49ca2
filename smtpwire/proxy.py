"""The PROXY protocol, versions 1 and 2, receiving side: sans-IO, no sockets, no clocks.

A proxy in front of a server (HAProxy ``send-proxy`` / ``send-proxy-v2``, AWS NLB, ...) opens
each connection with one header naming the real client; the server must read it before
anything else (spec: haproxy's ``doc/proxy-protocol.txt``). ``ProxyHeaderParser.feed`` takes
bytes as they arrive and answers ``None`` (need more), a ``ProxyHeader``, or a ``ProxyRefusal``
with a reason; ``end_of_stream`` is what a closed stream before the header's end means.

Decisions are made as early as the bytes allow and always in the same order of positions, so
the answer for a byte string never depends on how it was split into reads. The octets that
followed the header in the last read are returned with it (``ProxyHeader.following``): a
client's first command or TLS ClientHello may share a segment with the header, and nothing
may be lost.

Bounds. A v1 line is at most 107 octets including CRLF (the spec's own maximum). A v2 header
may in principle carry 16 + 65535 octets; ``MAX_HEADER_SIZE`` caps it at 4 KiB, far more than
the address block (at most 216 octets) plus the TLVs real proxies send (ALPN, authority,
unique id, SSL details, cloud endpoint ids: a few hundred octets), yet small enough that a
connection that is not yet a session holds little. TLVs are skipped, never interpreted.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass

__all__ = [
    "MAX_HEADER_SIZE",
    "V1_MAX_LINE",
    "V2_SIGNATURE",
    "Command",
    "Family",
    "ProxyHeader",
    "ProxyHeaderParser",
    "ProxyRefusal",
    "Refusal",
]

#: The v1 line's maximum length including CRLF (spec 2.1: "PROXY UNKNOWN" with two full IPv6
#: addresses and ports).
V1_MAX_LINE = 107
#: The 12 octets that open a v2 header (spec 2.2).
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
#: The largest header accepted, in octets (see the module docstring for why 4 KiB).
MAX_HEADER_SIZE = 4096

_V1_PREFIX = b"PROXY "
_V2_FIXED = 16
#: Octets of a v2 address block, by address family nibble (INET, INET6, UNIX).
_V2_ADDRESS_SIZE = {1: 12, 2: 36, 3: 216}


class Command(enum.Enum):
    #: Relayed for a client: the addresses are the client's and the proxy's listener.
    PROXY = "PROXY"
    #: Made by the proxy itself (a health check): use the connection's own addresses.
    LOCAL = "LOCAL"


class Family(enum.Enum):
    TCP4 = "TCP4"
    TCP6 = "TCP6"
    #: v2 AF_UNSPEC (always so for LOCAL): no address information.
    UNSPEC = "UNSPEC"
    #: v1 UNKNOWN, or a v2 family a TCP server cannot use (UNIX sockets, datagrams).
    UNKNOWN = "UNKNOWN"


class Refusal(enum.Enum):
    """Why a header is refused: the connection must then be dropped (spec 2 and 2.2)."""

    BAD_SIGNATURE = "neither a v1 nor a v2 PROXY signature"
    V1_TOO_LONG = "v1 line longer than 107 octets"
    V1_BAD_LINE_END = "v1 line not ended by CRLF"
    V1_BAD_FIELDS = "v1 fields malformed"
    V1_BAD_ADDRESS = "v1 address malformed"
    V1_BAD_PORT = "v1 port malformed"
    V2_BAD_VERSION = "v2 version not 2"
    V2_BAD_COMMAND = "v2 command neither LOCAL nor PROXY"
    V2_BAD_FAMILY = "v2 address family or transport unassigned"
    V2_TOO_LONG = "v2 header longer than the bound"
    V2_SHORT_ADDRESSES = "v2 length shorter than its address block"
    TRUNCATED = "stream ended inside the header"

    @property
    def oversize(self) -> bool:
        return self in (Refusal.V1_TOO_LONG, Refusal.V2_TOO_LONG)


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int
    command: Command
    family: Family
    #: (address, port) of the client and of the proxy's listener; None without addresses.
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    #: Octets the header took.
    size: int
    #: The octets that followed the header in what was fed: the next layer's input.
    following: bytes = b""

    @property
    def client(self) -> tuple[str, int] | None:
        """The real client's address and port, or None to keep the connection's own
        (LOCAL, UNKNOWN, UNSPEC: health checks and families a TCP server cannot use)."""
        if self.command is Command.PROXY and self.family in (Family.TCP4, Family.TCP6):
            return self.source
        return None


@dataclass(frozen=True, slots=True)
class ProxyRefusal:
    reason: Refusal
    #: The offending value, quoted, when one helps a log reader ("" otherwise).
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.reason.value}{f' ({self.detail})' if self.detail else ''}"


class ProxyHeaderParser:
    """Reads one PROXY header (v1 or v2) from bytes fed in any pieces.

    After an answer other than ``None`` the parser is done: feeding it more is an error.
    It buffers at most ``max_size`` octets plus one read.
    """

    __slots__ = ("_buffer", "_done", "max_size")

    def __init__(self, max_size: int = MAX_HEADER_SIZE) -> None:
        if max_size < V1_MAX_LINE:
            raise ValueError(f"max_size must be at least {V1_MAX_LINE}")
        self.max_size = max_size
        self._buffer = bytearray()
        self._done = False

    def feed(self, data: bytes | bytearray) -> ProxyHeader | ProxyRefusal | None:
        """Add ``data``; the header, a refusal, or None while more octets are needed."""
        if self._done:
            raise RuntimeError("the PROXY header was already read")
        self._buffer += data
        answer = self._decide(bytes(self._buffer))
        if answer is not None:
            self._done = True
            self._buffer.clear()
        return answer

    def end_of_stream(self) -> ProxyRefusal:
        """The peer closed before the header was complete."""
        self._done = True
        return ProxyRefusal(Refusal.TRUNCATED, f"{len(self._buffer)} octets")

    # ---- decisions, from the whole buffer so far -----------------------------------------

    def _decide(self, buf: bytes) -> ProxyHeader | ProxyRefusal | None:
        n = min(len(buf), len(_V1_PREFIX))
        if buf[:n] == _V1_PREFIX[:n]:
            return _v1(buf) if n == len(_V1_PREFIX) else None
        n = min(len(buf), len(V2_SIGNATURE))
        if buf[:n] == V2_SIGNATURE[:n]:
            return _v2(buf, self.max_size) if n == len(V2_SIGNATURE) else None
        # The octets up to the first wrong one: the same however the input was split.
        expected = V2_SIGNATURE if buf[:1] == V2_SIGNATURE[:1] else _V1_PREFIX
        wrong = next(i for i, (a, b) in enumerate(zip(buf, expected, strict=False)) if a != b)
        return ProxyRefusal(Refusal.BAD_SIGNATURE, repr(buf[: wrong + 1]))


def _v1(buf: bytes) -> ProxyHeader | ProxyRefusal | None:
    """A v1 line: "PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n" or "PROXY UNKNOWN ...\\r\\n"."""
    window = buf[:V1_MAX_LINE]
    cr, lf = window.find(b"\r"), window.find(b"\n")
    if lf >= 0 and (cr < 0 or lf < cr):
        return ProxyRefusal(Refusal.V1_BAD_LINE_END, "bare LF")
    if cr < 0:
        return ProxyRefusal(Refusal.V1_TOO_LONG) if len(buf) >= V1_MAX_LINE else None
    if cr + 1 == len(window):
        return ProxyRefusal(Refusal.V1_TOO_LONG) if cr + 1 >= V1_MAX_LINE else None
    if window[cr + 1] != 0x0A:
        return ProxyRefusal(Refusal.V1_BAD_LINE_END, "bare CR")
    size = cr + 2
    line, following = buf[: size - 2], buf[size:]
    fields = line.split(b" ")
    protocol = fields[1] if len(fields) > 1 else b""
    if protocol == b"UNKNOWN":
        # Spec 2.1: the rest of an UNKNOWN line is ignored.
        return ProxyHeader(1, Command.PROXY, Family.UNKNOWN, None, None, size, following)
    if protocol not in (b"TCP4", b"TCP6") or len(fields) != 6:
        return ProxyRefusal(Refusal.V1_BAD_FIELDS, _quote(line))
    family = Family.TCP4 if protocol == b"TCP4" else Family.TCP6
    source = _v1_address(fields[2], family)
    destination = _v1_address(fields[3], family)
    if source is None or destination is None:
        return ProxyRefusal(Refusal.V1_BAD_ADDRESS, _quote(line))
    source_port, destination_port = _v1_port(fields[4]), _v1_port(fields[5])
    if source_port is None or destination_port is None:
        return ProxyRefusal(Refusal.V1_BAD_PORT, _quote(line))
    return ProxyHeader(
        1,
        Command.PROXY,
        family,
        (source, source_port),
        (destination, destination_port),
        size,
        following,
    )


def _v1_address(field: bytes, family: Family) -> str | None:
    """The address in its canonical text, or None unless it is one of ``family``."""
    if not field.isascii():
        return None
    try:
        if family is Family.TCP4:
            # Strict: four decimal octets, no leading zeros (not octal, spec 2.1).
            return str(ipaddress.IPv4Address(field.decode()))
        if b"%" in field:  # a scope id names an interface of the proxy, not an address
            return None
        return str(ipaddress.IPv6Address(field.decode()))
    except ValueError:
        return None


def _v1_port(field: bytes) -> int | None:
    """A decimal port 0..65535 without leading zeros (spec 2.1), or None."""
    if not (field.isascii() and field.isdigit()) or len(field) > 5:
        return None
    if len(field) > 1 and field[0] == 0x30:
        return None
    port = int(field)
    return port if port <= 65535 else None


def _v2(buf: bytes, max_size: int) -> ProxyHeader | ProxyRefusal | None:
    """A v2 header: signature, version/command, family/transport, length, then the rest."""
    if len(buf) < _V2_FIXED:
        if len(buf) > 12 and buf[12] >> 4 != 2:
            return ProxyRefusal(Refusal.V2_BAD_VERSION, hex(buf[12]))
        return None
    version_command, family_transport = buf[12], buf[13]
    if version_command >> 4 != 2:
        return ProxyRefusal(Refusal.V2_BAD_VERSION, hex(version_command))
    command_bits = version_command & 0x0F
    if command_bits > 1:
        return ProxyRefusal(Refusal.V2_BAD_COMMAND, hex(version_command))
    command = Command.LOCAL if command_bits == 0 else Command.PROXY
    address_family, transport = family_transport >> 4, family_transport & 0x0F
    # LOCAL: "the receiver must ... discard the protocol block including the family".
    if command is Command.PROXY and (address_family > 3 or transport > 2):
        return ProxyRefusal(Refusal.V2_BAD_FAMILY, hex(family_transport))
    length = int.from_bytes(buf[14:16], "big")
    size = _V2_FIXED + length
    if size > max_size:
        return ProxyRefusal(Refusal.V2_TOO_LONG, f"{size} > {max_size} octets")
    if len(buf) < size:
        return None
    block, following = buf[_V2_FIXED:size], buf[size:]
    if command is Command.LOCAL:
        return ProxyHeader(2, command, Family.UNSPEC, None, None, size, following)
    if length < _V2_ADDRESS_SIZE.get(address_family, 0):
        return ProxyRefusal(Refusal.V2_SHORT_ADDRESSES, f"{length} octets")
    if address_family == 0:
        return ProxyHeader(2, command, Family.UNSPEC, None, None, size, following)
    if transport != 1 or address_family == 3:
        # Datagrams or UNIX sockets: nothing a TCP server can name its client by.
        return ProxyHeader(2, command, Family.UNKNOWN, None, None, size, following)
    width = 4 if address_family == 1 else 16
    ports = block[2 * width : 2 * width + 4]
    source = (_ip_text(block[:width]), int.from_bytes(ports[:2], "big"))
    destination = (_ip_text(block[width : 2 * width]), int.from_bytes(ports[2:], "big"))
    family = Family.TCP4 if address_family == 1 else Family.TCP6
    return ProxyHeader(2, command, family, source, destination, size, following)


def _ip_text(packed: bytes) -> str:
    return str(ipaddress.ip_address(packed))


def _quote(line: bytes) -> str:
    """A header line as a log may show it: printable ASCII, bounded."""
    return repr(line[:V1_MAX_LINE])[2:-1]
