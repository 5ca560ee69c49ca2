"""Bare CR and LF (issue 14, defect 2): one detector, checked against a plain byte loop, and
one policy for DATA and BDAT, checked against a plain model of the rule in ``data``'s
docstring: unstuff the lines the client ended with CRLF, then make every bare CR and LF a CRLF
(``normalize``) or refuse the message (``reject``).

Hypothesis draws content rich in CR, LF and dots, and splits it at every kind of boundary a
reader may see (reads for DATA, chunks for BDAT, the detector's own pieces)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstorm.wire import data
from mailstorm.wire.data import (
    BareLinefeedPolicy,
    BdatReader,
    DataFailure,
    DataReader,
    LineEndingScan,
    apply_line_ending_policy,
    has_bare_line_ending,
    normalize_line_endings,
)

CR, LF = 13, 10
REJECT, NORMALIZE = BareLinefeedPolicy.REJECT, BareLinefeedPolicy.NORMALIZE


# --- The reference: byte loops, obviously correct and slow. ---------------------------------


def reference_has_bare(content: bytes) -> bool:
    """A CR whose next byte is not LF, or an LF whose previous byte is not CR."""
    for i, byte in enumerate(content):
        if byte == CR and (i + 1 == len(content) or content[i + 1] != LF):
            return True
        if byte == LF and (i == 0 or content[i - 1] != CR):
            return True
    return False


def reference_normalize(content: bytes) -> bytes:
    """Every CRLF, bare CR and bare LF written as CRLF."""
    out = bytearray()
    i = 0
    while i < len(content):
        byte = content[i]
        if byte == CR and content[i + 1 : i + 2] == b"\n":
            out += b"\r\n"
            i += 2
        elif byte in (CR, LF):
            out += b"\r\n"
            i += 1
        else:
            out.append(byte)
            i += 1
    return bytes(out)


def reference_data_content(raw: bytes, policy: BareLinefeedPolicy) -> bytes | None:
    """What DATA stores for ``raw`` (the wire bytes before the marker's "." CRLF): the wire's
    lines are split on CRLF only, each loses one leading dot, and then the policy applies."""
    lines = [line[1:] if line.startswith(b".") else line for line in raw.split(b"\r\n")]
    unstuffed = b"\r\n".join(lines)
    if reference_has_bare(unstuffed):
        return None if policy is REJECT else reference_normalize(unstuffed)
    return unstuffed


# --- Strategies. -----------------------------------------------------------------------------

_ATOMS = [b"\r", b"\n", b"\r\n", b".", b"x", b"\r.\n", b"\n.\n", b"\r\n.", b"\x00", b"\xff"]
#: Content where CR, LF and dots meet in every order.
_content = st.lists(st.sampled_from(_ATOMS), max_size=60).map(b"".join) | st.binary(max_size=80)
_cuts = st.lists(st.integers(min_value=0, max_value=1000), max_size=12)


def split_at(content: bytes, cuts: list[int]) -> list[bytes]:
    """``content`` cut at the given offsets (taken modulo its length, duplicates ignored)."""
    points = sorted({c % (len(content) + 1) for c in cuts} | {0, len(content)})
    return [content[a:b] for a, b in itertools.pairwise(points)]


def scan_pieces(pieces: list[bytes]) -> bool:
    scan = LineEndingScan()
    for piece in pieces:
        scan.feed(piece)
    return scan.end()


# --- The detector. ---------------------------------------------------------------------------


@settings(max_examples=1000, deadline=None)
@given(content=_content, cuts=_cuts)
def test_detector_matches_the_byte_loop_whole_and_in_pieces(
    content: bytes, cuts: list[int]
) -> None:
    expected = reference_has_bare(content)
    assert has_bare_line_ending(content) is expected
    assert scan_pieces(split_at(content, cuts)) is expected


@pytest.mark.parametrize(
    "content",
    [b"foo\rbar\nbaz", b"a\r.\nb", b"\r\n\r", b"\n\r\n", b"\r\r\n", b"\n\r", b"x\r", b"\nx",
     b"a\r\nb\r\n", b"", b"no line ends"],
)
def test_detector_at_every_one_and_two_cut_split(content: bytes) -> None:
    """Every boundary a reader may see, one or two at a time, on the shapes that matter."""
    expected = reference_has_bare(content)
    n = len(content)
    for cuts in itertools.chain(itertools.combinations(range(n + 1), 1),
                                itertools.combinations(range(n + 1), 2)):
        assert scan_pieces(split_at(content, list(cuts))) is expected, cuts


@pytest.mark.parametrize("offset", [-2, -1, 0, 1])
@pytest.mark.parametrize("ending", [b"\r\n", b"\r", b"\n", b"\rx\n"])
def test_detector_across_its_own_pieces(offset: int, ending: bytes) -> None:
    """A large body is scanned in pieces: an ending that straddles a piece boundary is judged
    as a whole (a CRLF split there is clean, a bare CR there is bare)."""
    at = data._SCAN_PIECE + offset
    body = b"y" * at + ending + b"z" * (2 * data._SCAN_PIECE)
    assert has_bare_line_ending(body) is (ending != b"\r\n")
    assert has_bare_line_ending(body + b"\r\n" + body) is (ending != b"\r\n")


@settings(max_examples=300, deadline=None)
@given(content=_content)
def test_normalize_matches_the_byte_loop(content: bytes) -> None:
    assert normalize_line_endings(content) == reference_normalize(content)
    assert apply_line_ending_policy(content, NORMALIZE) == reference_normalize(content)
    assert apply_line_ending_policy(content, REJECT) == (
        None if reference_has_bare(content) else content)


# --- DATA. -----------------------------------------------------------------------------------


def read_in_pieces(wire: bytes, policy: BareLinefeedPolicy, cuts: list[int]) -> tuple[
        bytes | None, DataFailure | None]:
    """Feed ``wire`` to a DataReader read by read, as the connection does; its result."""
    reader = DataReader(0, policy)
    buf = bytearray()
    for piece in split_at(wire, cuts):
        buf += piece
        result = reader.read(buf)
        if result is not None:
            return result
    raise AssertionError("end of data not found")


@settings(max_examples=600, deadline=None)
@given(body=_content, cuts=_cuts, policy=st.sampled_from([REJECT, NORMALIZE]))
def test_data_content_matches_the_model_under_any_split(
    body: bytes, cuts: list[int], policy: BareLinefeedPolicy
) -> None:
    wire = body + b"\r\n.\r\n"
    # The reader stops at the first marker; a body that starts with "." CRLF is empty.
    raw = b"" if wire.startswith(b".\r\n") else wire[: wire.find(b"\r\n.\r\n") + 2]
    expected = reference_data_content(raw, policy)
    result = read_in_pieces(wire, policy, cuts)
    if expected is None:
        assert result == (None, DataFailure.BARE_LINEFEED)
    else:
        assert result == (expected, None)


@pytest.mark.parametrize(
    ("body", "normalized"),
    [
        # A bare CR, then later a bare LF: no pair, however the CRs and LFs are counted.
        (b"foo\rbar\nbaz", b"foo\r\nbar\r\nbaz\r\n"),
        # The smuggling shape: the dot starts a line only after normalization, so it stays.
        (b"a\r.\nb", b"a\r\n.\r\nb\r\n"),
        (b"a\n.\nb", b"a\r\n.\r\nb\r\n"),
        # A dot after a CRLF the client sent is a stuffing dot, whatever ends its line.
        (b"a\r\n..\nb", b"a\r\n.\r\nb\r\n"),
        (b"a\n..b", b"a\r\n..b\r\n"),
    ],
)
def test_data_shapes(body: bytes, normalized: bytes) -> None:
    wire = body + b"\r\n.\r\n"
    assert read_in_pieces(wire, REJECT, []) == (None, DataFailure.BARE_LINEFEED)
    assert read_in_pieces(wire, NORMALIZE, []) == (normalized, None)


def test_a_crlf_split_between_reads_is_clean() -> None:
    wire = b"one\r\ntwo\r\n.\r\n"
    for cut in range(len(wire) + 1):
        assert read_in_pieces(wire, REJECT, [cut]) == (b"one\r\ntwo\r\n", None), cut


def test_normalize_counts_the_added_octets_against_the_size_limit() -> None:
    wire = b"a\n" * 9 + b"a\r\n.\r\n"  # 21 octets of content on the wire, 30 stored
    assert DataReader(30, NORMALIZE).read(bytearray(wire)) == (b"a\r\n" * 10, None)
    assert DataReader(29, NORMALIZE).read(bytearray(wire)) == (None, DataFailure.TOO_BIG)


# --- BDAT. -----------------------------------------------------------------------------------


@settings(max_examples=400, deadline=None)
@given(content=_content, cuts=_cuts, policy=st.sampled_from([REJECT, NORMALIZE]))
def test_bdat_content_under_any_chunking(
    content: bytes, cuts: list[int], policy: BareLinefeedPolicy
) -> None:
    """BDAT has no stuffing: the joined chunks, with the policy applied to line ends only."""
    chunks = split_at(content, cuts)
    result = BdatReader.finish(chunks, policy, 0)
    if reference_has_bare(content):
        expected = ((None, DataFailure.BARE_LINEFEED) if policy is REJECT
                    else (reference_normalize(content), None))
    else:
        expected = (content, None)
    assert result == expected


def test_bdat_shape_and_its_dots() -> None:
    content = b"line1\nline2\rline3\n.\nend"
    assert BdatReader.finish([content], REJECT, 0) == (None, DataFailure.BARE_LINEFEED)
    assert BdatReader.finish([content], NORMALIZE, 0) == (
        b"line1\r\nline2\r\nline3\r\n.\r\nend", None)
    # Chunks are one message: a CRLF split between two of them is a CRLF.
    assert BdatReader.finish([b"a\r", b"\nb\r\n"], REJECT, 0) == (b"a\r\nb\r\n", None)
    assert BdatReader.finish([b"..x\r\n"], REJECT, 0) == (b"..x\r\n", None)


def test_bdat_normalize_respects_the_size_limit() -> None:
    assert BdatReader.finish([b"a\nb\n"], NORMALIZE, 6) == (b"a\r\nb\r\n", None)
    assert BdatReader.finish([b"a\nb\n"], NORMALIZE, 5) == (None, DataFailure.TOO_BIG)
