"""The PROXY header parser (``mailstorm.wire.proxy``): v1 and v2, every malformation, and
properties: any split of the input gives the answer of one piece, random bytes only ever get
a refusal, and the v1 and v2 encodings of one connection parse alike."""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstorm.wire.proxy import (
    MAX_HEADER_SIZE,
    V1_MAX_LINE,
    V2_SIGNATURE,
    Command,
    Family,
    ProxyHeader,
    ProxyHeaderParser,
    ProxyRefusal,
    Refusal,
)


def v2(
    command: int = 1,
    family: int = 0x11,
    addresses: bytes = b"",
    tlvs: bytes = b"",
    version: int = 2,
    length: int | None = None,
) -> bytes:
    """A v2 header, built from the spec's fields (possibly wrong ones)."""
    body = addresses + tlvs
    size = len(body) if length is None else length
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", size) + body


def inet(src: str, dst: str, sport: int, dport: int) -> bytes:
    packed = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
    return packed + struct.pack("!HH", sport, dport)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def parse(data: bytes) -> ProxyHeader | ProxyRefusal | None:
    return ProxyHeaderParser().feed(data)


def parse_pieces(pieces: list[bytes], end: bool = True) -> ProxyHeader | ProxyRefusal | None:
    """Feed pieces until an answer; the rest of the pieces are appended to ``following``
    (they are what the next layer reads next)."""
    parser = ProxyHeaderParser()
    for index, piece in enumerate(pieces):
        answer = parser.feed(piece)
        if isinstance(answer, ProxyHeader):
            rest = b"".join(pieces[index + 1 :])
            return ProxyHeader(
                answer.version,
                answer.command,
                answer.family,
                answer.source,
                answer.destination,
                answer.size,
                answer.following + rest,
            )
        if answer is not None:
            return answer
    return parser.end_of_stream() if end else None


# ---- v1 ----------------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 192.0.2.7 198.51.100.1 56324 25\r\n"
    header = parse(line)
    assert header == ProxyHeader(
        1, Command.PROXY, Family.TCP4, ("192.0.2.7", 56324), ("198.51.100.1", 25), len(line)
    )
    assert header.client == ("192.0.2.7", 56324)


def test_v1_tcp6_is_canonical() -> None:
    header = parse(b"PROXY TCP6 2001:DB8:0:0::7 ::1 65535 0\r\n")
    assert isinstance(header, ProxyHeader)
    assert header.family is Family.TCP6
    assert header.source == ("2001:db8::7", 65535)
    assert header.destination == ("::1", 0)


@pytest.mark.parametrize(
    "line", [b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ffff::2 65535 65535\r\n"]
)
def test_v1_unknown_keeps_the_connections_address(line: bytes) -> None:
    header = parse(line)
    assert isinstance(header, ProxyHeader)
    assert header.family is Family.UNKNOWN
    assert header.client is None
    assert header.size == len(line)


def test_v1_longest_line_is_accepted() -> None:
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY UNKNOWN {full} {full} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX_LINE
    assert isinstance(parse(line), ProxyHeader)


def test_v1_following_bytes_are_returned() -> None:
    header = parse(b"PROXY TCP4 192.0.2.7 192.0.2.8 1 2\r\nEHLO client\r\n")
    assert isinstance(header, ProxyHeader)
    assert header.following == b"EHLO client\r\n"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"EHLO client\r\n", Refusal.BAD_SIGNATURE),
        (b"proxy TCP4 1.2.3.4 1.2.3.4 1 2\r\n", Refusal.BAD_SIGNATURE),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2" + b" " * 80 + b"\r\n", Refusal.V1_TOO_LONG),
        (b"PROXY UNKNOWN " + b"x" * 200, Refusal.V1_TOO_LONG),
        (b"PROXY UNKNOWN " + b"x" * (V1_MAX_LINE - 15) + b"\r\n", Refusal.V1_TOO_LONG),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\n", Refusal.V1_BAD_LINE_END),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2\rX", Refusal.V1_BAD_LINE_END),
        (b"PROXY TCP5 1.2.3.4 1.2.3.4 1 2\r\n", Refusal.V1_BAD_FIELDS),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1\r\n", Refusal.V1_BAD_FIELDS),
        (b"PROXY TCP4  1.2.3.4 1.2.3.4 1 2\r\n", Refusal.V1_BAD_FIELDS),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2 \r\n", Refusal.V1_BAD_FIELDS),
        (b"PROXY \r\n", Refusal.V1_BAD_FIELDS),
        (b"PROXY TCP4 1.2.3.400 1.2.3.4 1 2\r\n", Refusal.V1_BAD_ADDRESS),
        (b"PROXY TCP4 01.2.3.4 1.2.3.4 1 2\r\n", Refusal.V1_BAD_ADDRESS),
        (b"PROXY TCP4 ::1 1.2.3.4 1 2\r\n", Refusal.V1_BAD_ADDRESS),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", Refusal.V1_BAD_ADDRESS),
        (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", Refusal.V1_BAD_ADDRESS),
        (b"PROXY TCP4 1.2.3.\xc4 1.2.3.4 1 2\r\n", Refusal.V1_BAD_ADDRESS),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 65536 2\r\n", Refusal.V1_BAD_PORT),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 025 2\r\n", Refusal.V1_BAD_PORT),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 -1 2\r\n", Refusal.V1_BAD_PORT),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 1 +2\r\n", Refusal.V1_BAD_PORT),
        (b"PROXY TCP4 1.2.3.4 1.2.3.4 \xd9\xa1 2\r\n", Refusal.V1_BAD_PORT),
    ],
)
def test_v1_malformations_are_refused(data: bytes, reason: Refusal) -> None:
    answer = parse(data)
    assert isinstance(answer, ProxyRefusal), answer
    assert answer.reason is reason
    assert str(answer)  # a log line can say it


@pytest.mark.parametrize(
    "data", [b"", b"P", b"PROXY ", b"PROXY TCP4 1.2.3.4 1.2.3.4 1 2", b"PROXY TCP4 1.2\r"]
)
def test_v1_truncated(data: bytes) -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(data) is None
    assert parser.end_of_stream().reason is Refusal.TRUNCATED


# ---- v2 ----------------------------------------------------------------------------------


def test_v2_proxy_tcp4() -> None:
    data = v2(addresses=inet("192.0.2.7", "198.51.100.1", 56324, 25))
    header = parse(data + b"EHLO x\r\n")
    assert header == ProxyHeader(
        2,
        Command.PROXY,
        Family.TCP4,
        ("192.0.2.7", 56324),
        ("198.51.100.1", 25),
        len(data),
        b"EHLO x\r\n",
    )


def test_v2_proxy_tcp6_with_tlvs() -> None:
    tlvs = tlv(0x01, b"smtp") + tlv(0x05, b"x" * 128) + tlv(0x20, b"\x07" + b"\0" * 4)
    data = v2(family=0x21, addresses=inet("2001:db8::7", "2001:db8::1", 1, 2), tlvs=tlvs)
    header = parse(data)
    assert isinstance(header, ProxyHeader)
    assert header.family is Family.TCP6
    assert header.client == ("2001:db8::7", 1)
    assert header.size == len(data) and header.following == b""


@pytest.mark.parametrize("family", [0x00, 0x11, 0x21, 0x31, 0x12, 0x5F])
def test_v2_local_keeps_the_connections_address(family: int) -> None:
    # LOCAL: a health check by the proxy; its family and addresses, even absent, are ignored.
    header = parse(v2(command=0, family=family))
    assert isinstance(header, ProxyHeader)
    assert header.command is Command.LOCAL
    assert header.client is None


@pytest.mark.parametrize(
    ("family", "size", "expected"),
    [(0x00, 0, Family.UNSPEC), (0x12, 12, Family.UNKNOWN), (0x31, 216, Family.UNKNOWN)],
)
def test_v2_families_without_a_tcp_client(family: int, size: int, expected: Family) -> None:
    header = parse(v2(family=family, addresses=b"\0" * size))
    assert isinstance(header, ProxyHeader)
    assert header.family is expected
    assert header.client is None


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (V2_SIGNATURE[:11] + b"X", Refusal.BAD_SIGNATURE),
        (v2(version=1), Refusal.V2_BAD_VERSION),
        (v2(version=3, command=0), Refusal.V2_BAD_VERSION),
        (V2_SIGNATURE + b"\x11", Refusal.V2_BAD_VERSION),
        (v2(command=2), Refusal.V2_BAD_COMMAND),
        (v2(family=0x41, addresses=b"\0" * 12), Refusal.V2_BAD_FAMILY),
        (v2(family=0x13, addresses=b"\0" * 12), Refusal.V2_BAD_FAMILY),
        (v2(family=0x11, addresses=b"\0" * 11), Refusal.V2_SHORT_ADDRESSES),
        (v2(family=0x21, addresses=b"\0" * 12), Refusal.V2_SHORT_ADDRESSES),
        (v2(length=MAX_HEADER_SIZE - 15), Refusal.V2_TOO_LONG),
        (v2(length=65535), Refusal.V2_TOO_LONG),
    ],
)
def test_v2_malformations_are_refused(data: bytes, reason: Refusal) -> None:
    answer = parse(data)
    assert isinstance(answer, ProxyRefusal), answer
    assert answer.reason is reason


def test_v2_largest_header_within_the_bound() -> None:
    addresses = inet("192.0.2.7", "192.0.2.8", 1, 2)
    data = v2(addresses=addresses, tlvs=tlv(0xEE, b"x" * (MAX_HEADER_SIZE - 16 - 12 - 3)))
    assert len(data) == MAX_HEADER_SIZE
    assert isinstance(parse(data), ProxyHeader)


def test_v2_truncated_waits_then_is_refused_at_end() -> None:
    data = v2(addresses=inet("192.0.2.7", "192.0.2.8", 1, 2))
    for cut in range(len(data)):
        parser = ProxyHeaderParser()
        assert parser.feed(data[:cut]) is None, cut
        assert parser.end_of_stream().reason is Refusal.TRUNCATED


def test_feeding_after_the_answer_is_an_error() -> None:
    parser = ProxyHeaderParser()
    assert parser.feed(b"PROXY UNKNOWN\r\n") is not None
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


# ---- properties ------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).map(str)
ports = st.integers(0, 65535)


@st.composite
def connections(draw: st.DrawFn) -> tuple[Family, str, str, int, int]:
    family = draw(st.sampled_from([Family.TCP4, Family.TCP6]))
    addresses = ipv4 if family is Family.TCP4 else ipv6
    return family, draw(addresses), draw(addresses), draw(ports), draw(ports)


def encode_v1(family: Family, src: str, dst: str, sport: int, dport: int) -> bytes:
    return f"PROXY {family.value} {src} {dst} {sport} {dport}\r\n".encode()


def encode_v2(family: Family, src: str, dst: str, sport: int, dport: int, tlvs: bytes) -> bytes:
    return v2(
        family=0x11 if family is Family.TCP4 else 0x21,
        addresses=inet(src, dst, sport, dport),
        tlvs=tlvs,
    )


valid_headers = st.one_of(
    connections().map(lambda c: encode_v1(*c)),
    st.builds(
        lambda c, t: encode_v2(*c, t),
        connections(),
        st.lists(st.binary(max_size=40).map(lambda b: tlv(0xE0, b)), max_size=4).map(b"".join),
    ),
    st.just(b"PROXY UNKNOWN\r\n"),
    st.just(v2(command=0)),
)
#: Headers, broken ones and random bytes alike.
any_input = st.one_of(
    valid_headers,
    valid_headers.flatmap(lambda h: st.integers(0, len(h)).map(lambda n: h[:n])),
    valid_headers.flatmap(
        lambda h: st.tuples(st.integers(0, len(h) - 1), st.integers(0, 255)).map(
            lambda m: h[: m[0]] + bytes([m[1]]) + h[m[0] + 1 :]
        )
    ),
    st.binary(max_size=300),
)


def splits(data: bytes) -> st.SearchStrategy[list[bytes]]:
    return st.lists(st.integers(0, len(data)), max_size=6).map(
        lambda cuts: [
            data[a:b] for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(data)], strict=True)
        ]
    )


@given(
    st.tuples(any_input, st.binary(max_size=20)).flatmap(
        lambda d: st.tuples(st.just(d[0] + d[1]), splits(d[0] + d[1]))
    )
)
def test_any_split_gives_the_answer_of_one_piece(case: tuple[bytes, list[bytes]]) -> None:
    data, pieces = case
    assert parse_pieces(pieces) == parse_pieces([data])


@given(any_input)
def test_random_input_only_ever_gets_an_answer(data: bytes) -> None:
    answer = parse_pieces([data])
    assert isinstance(answer, ProxyHeader | ProxyRefusal)
    if isinstance(answer, ProxyHeader):
        assert answer.size + len(answer.following) == len(data)


@given(connections(), st.binary(max_size=30))
def test_v1_and_v2_encodings_parse_alike(
    connection: tuple[Family, str, str, int, int], following: bytes
) -> None:
    one = parse(encode_v1(*connection) + following)
    two = parse(encode_v2(*connection, tlv(0x04, b"")) + following)
    assert isinstance(one, ProxyHeader) and isinstance(two, ProxyHeader)
    family, src, dst, sport, dport = connection
    for header in (one, two):
        assert header.family is family
        assert header.client == (src, sport)
        assert header.destination == (dst, dport)
        assert header.following == following
