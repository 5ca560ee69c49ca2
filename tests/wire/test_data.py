"""The DATA reader and dot-stuffing: end-of-data across any chunk split, exact unstuffing,
the size bound while streaming, and the bare-LF policies (no smuggling). The bare CR/LF
detector and the policy's rule are tested in depth in test_line_endings.py."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mailstorm.wire.data import (
    BareLinefeedPolicy,
    BdatReader,
    DataFailure,
    DataReader,
    dot_stuff,
    normalize_line_endings,
)


def feed_in_chunks(
    reader: DataReader, wire: bytes, cuts: list[int]
) -> tuple[tuple[bytes | None, DataFailure | None], bytes]:
    """Feed ``wire`` split at ``cuts``; return the result and what is left in the buffer."""
    buf = bytearray()
    result = None
    pos = 0
    for cut in [*sorted(set(cuts)), len(wire)]:
        buf += wire[pos:cut]
        pos = cut
        if result is None:
            result = reader.read(buf)
    assert result is not None, "end of data not found"
    return result, bytes(buf)


# Bodies of "lines": dots, CR, LF, and 8-bit bytes are what matter, so they are frequent.
_bodies = st.lists(
    st.binary(max_size=40) | st.sampled_from([b".", b"..", b".\r\n", b"\r\n.", b"\n.\n", b"\r"]),
    max_size=30,
).map(b"".join)


@settings(max_examples=400, deadline=None)
@given(body=_bodies, cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
       trailer=st.binary(max_size=20))
def test_any_body_survives_stuffing_and_any_chunk_split(
    body: bytes, cuts: list[int], trailer: bytes
) -> None:
    wire = dot_stuff(body)
    reader = DataReader(0, BareLinefeedPolicy.NORMALIZE)
    cuts = [c % (len(wire) + 1) for c in cuts]
    (content, failure), rest = feed_in_chunks(reader, wire + trailer, cuts)
    expected = normalize_line_endings(body)
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert failure is None
    assert content == expected
    # Whatever followed the end marker (the next pipelined command) is left untouched.
    assert rest == trailer


def test_empty_message() -> None:
    (content, failure), rest = feed_in_chunks(DataReader(100, BareLinefeedPolicy.REJECT),
                                              b".\r\nQUIT\r\n", [1, 2])
    assert (content, failure, rest) == (b"", None, b"QUIT\r\n")


def test_unstuffing_removes_exactly_one_leading_dot() -> None:
    wire = b"..a\r\n...b\r\n.c\r\nd.\r\n.\r\n"
    (content, _), _ = feed_in_chunks(DataReader(0, BareLinefeedPolicy.REJECT), wire, [])
    assert content == b".a\r\n..b\r\nc\r\nd.\r\n"


def test_stuffed_lines_after_many_dots_in_lines_are_unstuffed() -> None:
    # The scan steps from dot to dot, then hands a dotty read to the three-byte search: a
    # stuffed line and the marker must be found the same way either side of that switch.
    prose = b"One. Two. Three. Four. Five. Six. Seven. Eight. Nine. Ten.\r\n"
    body = b"Subject: dots\r\n\r\n" + prose + b".stuffed\r\n" + prose * 3 + b"..two\r\n"
    for cuts in ([], [len(body) // 2], list(range(0, len(body), 7))):
        reader = DataReader(0, BareLinefeedPolicy.REJECT)
        (content, failure), rest = feed_in_chunks(reader, dot_stuff(body) + b"NOOP\r\n", cuts)
        assert (content, failure, rest) == (body, None, b"NOOP\r\n")


def test_a_body_without_dots_ends_at_the_marker() -> None:
    body = b"Subject: none\r\n\r\n" + b"QUJD" * 19 + b"\r\n"
    reader = DataReader(0, BareLinefeedPolicy.REJECT)
    (content, failure), rest = feed_in_chunks(reader, body * 500 + b".\r\nQUIT\r\n", [4000])
    assert (content, failure, rest) == (body * 500, None, b"QUIT\r\n")


def test_only_crlf_dot_crlf_ends_data() -> None:
    # Every bare-LF/CR variant of the marker is content, never an end (SMTP smuggling).
    wire = (b"a\n.\nMAIL FROM:<x@y>\r\nb\r\n.\nc\n.\r\nd\r.\r\n"
            b"e\r\n.\rf\r\n.\r\n")
    reader = DataReader(0, BareLinefeedPolicy.NORMALIZE)
    (content, failure), rest = feed_in_chunks(reader, wire, [])
    assert failure is None and rest == b""
    assert content is not None and content.endswith(b"f\r\n")
    assert b"MAIL FROM:<x@y>" in content


def test_bare_linefeed_rejected_under_reject_policy() -> None:
    reader = DataReader(0, BareLinefeedPolicy.REJECT)
    (content, failure), rest = feed_in_chunks(reader, b"a\nb\r\n.\r\nNOOP\r\n", [3])
    assert content is None and failure is DataFailure.BARE_LINEFEED and rest == b"NOOP\r\n"


def test_bare_cr_rejected_under_reject_policy() -> None:
    reader = DataReader(0, BareLinefeedPolicy.REJECT)
    (_, failure), _ = feed_in_chunks(reader, b"a\rb\r\n.\r\n", [])
    assert failure is DataFailure.BARE_LINEFEED


def test_oversize_body_is_drained_with_bounded_memory() -> None:
    reader = DataReader(1000, BareLinefeedPolicy.NORMALIZE)
    buf = bytearray()
    line = b"x" * 98 + b"\r\n"
    peak = 0
    for _ in range(500):  # 50 kB against a 1 kB limit
        buf += line
        assert reader.read(buf) is None
        peak = max(peak, len(buf))
    buf += b".\r\nNOOP\r\n"
    assert reader.read(buf) == (None, DataFailure.TOO_BIG)
    assert bytes(buf) == b"NOOP\r\n"
    assert peak < 10_000


def test_size_limit_counts_unstuffed_octets() -> None:
    body = b".\r\n" * 100  # 300 octets, 400 on the wire
    (content, failure), _ = feed_in_chunks(DataReader(300, BareLinefeedPolicy.REJECT),
                                           dot_stuff(body), [])
    assert failure is None and content == body
    (content, failure), _ = feed_in_chunks(DataReader(299, BareLinefeedPolicy.REJECT),
                                           dot_stuff(body), [])
    assert content is None and failure is DataFailure.TOO_BIG


def test_marker_split_at_every_position() -> None:
    wire = b"hello\r\n.\r\nNEXT"
    for cut in range(len(wire) + 1):
        (content, _), rest = feed_in_chunks(DataReader(0, BareLinefeedPolicy.REJECT), wire,
                                            [cut])
        assert content == b"hello\r\n" and rest == b"NEXT"


def test_dot_stuff_wire_form() -> None:
    assert dot_stuff(b"") == b".\r\n"
    assert dot_stuff(b".a\nb") == b"..a\r\nb\r\n.\r\n"


def test_bdat_reader_counts_octets_and_drains() -> None:
    reader = BdatReader(5, keep=True)
    buf = bytearray(b"ab")
    assert reader.read(buf) is None
    buf += b"c\r\n.QUIT"
    assert reader.read(buf) == b"abc\r\n"
    assert bytes(buf) == b".QUIT"
    drain = BdatReader(4, keep=False)
    buf = bytearray(b"ab")
    assert drain.read(buf) is None and buf == b""
    buf += b"cdNOOP"
    assert drain.read(buf) == b"" and bytes(buf) == b"NOOP"


@settings(max_examples=400, deadline=None)
@given(
    raw=st.lists(st.sampled_from([b"\r", b"\n", b".", b"x", b"\r\n", b"\r\n."]), max_size=40)
    .map(b"".join),
    cuts=st.lists(st.integers(min_value=0, max_value=300), max_size=10),
)
def test_data_ends_exactly_at_the_first_marker(raw: bytes, cuts: list[int]) -> None:
    """Whatever mix of dots, CRs and LFs comes first, and however it is split, the reader
    stops right after the first CRLF "." CRLF (or a leading "." CRLF) and no later."""
    wire = raw + b"\r\n.\r\nNEXT"
    end = 3 if wire.startswith(b".\r\n") else wire.find(b"\r\n.\r\n") + 5
    reader = DataReader(0, BareLinefeedPolicy.NORMALIZE)
    _, rest = feed_in_chunks(reader, wire, [c % (len(wire) + 1) for c in cuts])
    assert rest == wire[end:]
