"""The sans-IO server's limits, fed bytes: line lengths, STARTTLS in a transaction, the cap on
non-transaction commands, "0 means no limit", and back-pressure on unsent replies (issue 14).

Each test drives ``ServerConnection`` directly the way the trio shell does: feed bytes, pull
events until ``NeedData`` (sending whatever ``OutputFull`` asks for), parse what was sent.
"""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from core_driver import POLICY, Driver, code
from hypothesis import given, settings
from hypothesis import strategies as st

from mailstorm.wire.events import (
    NeedData,
    OutputFull,
)
from mailstorm.wire.replies import ReplyParser
from mailstorm.wire.server import MAX_AUTH_LINE, MAX_COMMAND_LINE, ServerConnection, SessionPolicy

TOO_LONG = "500 5.5.2 Error: line too long"


def b64(octets: int) -> str:
    """A base64 token exactly ``octets`` long (a multiple of 4)."""
    assert octets % 4 == 0
    return base64.b64encode(b"\0u\0" + b"p" * (octets // 4 * 3 - 3)).decode()


# ---- 1. every AUTH line has RFC 4954's limit, every other command line RFC 5321's ----------


def test_auth_login_response_over_the_limit_is_refused_when_it_arrives_whole() -> None:
    """Issue 14: a 60,000-octet AUTH LOGIN response arriving with its LF in one read was
    accepted as a username. It is refused, and the exchange is over."""
    d = Driver()
    d.one("EHLO c")
    assert d.one("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert d.feed(b64(60000) + "\r\nNOOP\r\n") == [TOO_LONG, "250 2.0.0 OK"]
    assert d.auths == []


def test_auth_command_line_over_the_limit_is_refused_when_it_arrives_whole() -> None:
    d = Driver()
    d.one("EHLO c")
    assert d.feed(f"AUTH PLAIN {b64(20000)}\r\nNOOP\r\n") == [TOO_LONG, "250 2.0.0 OK"]
    assert d.auths == []


def test_auth_lines_may_be_exactly_12288_octets() -> None:
    d = Driver()
    d.one("EHLO c")
    token = b64(12272)
    # "AUTH PLAIN" + 4 spaces + token + CRLF = 12288 octets: the password is checked.
    line = "AUTH PLAIN    " + token
    assert len(line) + 2 == MAX_AUTH_LINE
    assert code(d.one(line)) == "535 5.7.8"
    assert code(d.one(line + " ")) == "500 5.5.2"
    # A response line of 12288 octets with its CRLF (the username, for LOGIN).
    assert d.one("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    response = b64(12284) + "  "
    assert len(response) + 2 == MAX_AUTH_LINE
    assert d.one(response) == "334 UGFzc3dvcmQ6"
    assert d.one("*") == "501 5.7.0 Authentication cancelled"
    assert d.one("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert d.one(response + " ") == TOO_LONG
    assert d.one("NOOP") == "250 2.0.0 OK"  # back to commands


def test_other_command_lines_may_be_exactly_512_octets() -> None:
    d = Driver()
    line = "NOOP " + "x" * (MAX_COMMAND_LINE - 2 - 5)
    assert d.one(line) == "250 2.0.0 OK"
    assert d.one(line + "x") == TOO_LONG
    assert d.feed(line + "x\n") == [TOO_LONG]  # a bare LF ends it just the same
    # Only an AUTH verb gets the longer limit.
    assert d.one("AUTHX " + "x" * 600) == TOO_LONG


# ---- 2. refused as soon as the limit is passed; the rest of the line is never a command ----


def test_overlong_command_line_is_refused_before_its_end_arrives() -> None:
    d = Driver()
    assert d.feed("NOOP " + "x" * 600) == [TOO_LONG]
    assert d.feed("x" * 5000) == []
    # QUIT is still part of the refused line, and dropped silently with it.
    assert d.feed("QUIT\r\nNOOP\r\n") == ["250 2.0.0 OK"]
    assert not d.closed


def test_overlong_auth_response_is_refused_before_its_end_arrives() -> None:
    d = Driver()
    d.one("EHLO c")
    assert d.one("AUTH PLAIN") == "334 "
    assert d.feed(b"A" * (MAX_AUTH_LINE + 1)) == [TOO_LONG]
    assert d.feed(b"B" * 1000 + b"QUIT\r\n") == []
    assert d.one("NOOP") == "250 2.0.0 OK"
    assert d.auths == [] and not d.closed


@settings(max_examples=200, deadline=None)
@given(
    auth=st.booleans(),
    extra=st.integers(-3, 3),
    crlf=st.booleans(),
    cuts=st.lists(st.integers(0, MAX_AUTH_LINE + 8), max_size=4),
    near_limit=st.lists(st.integers(-4, 4), max_size=3),
)
def test_a_line_is_refused_exactly_when_over_its_limit_and_once_it_passes_it(
    auth: bool, extra: int, crlf: bool, cuts: list[int], near_limit: list[int]
) -> None:
    """Whatever the split: the line is refused iff its content is over limit - 2 octets; the
    500 has left by the time the limit is passed (not when the line ends); the rest of the line
    is never answered; the next command is."""
    limit = MAX_AUTH_LINE if auth else MAX_COMMAND_LINE
    prefix = b"AUTH PLAIN " if auth else b"NOOP "
    content = prefix + b"x" * (limit - 2 + extra - len(prefix))
    wire = content + (b"\r\n" if crlf else b"\n") + b"NOOP\r\n"
    d = Driver()
    d.one("EHLO c")
    replies: list[str] = []
    cuts += [limit + offset for offset in near_limit]
    points = sorted({c for c in cuts if 0 < c < len(wire)} | {len(wire)})
    start = 0
    for point in points:
        replies += d.feed(wire[start:point])
        start = point
        if min(point, len(content)) > limit - 2:
            assert replies, "no reply once the line's content passed its limit"
    if extra > 0:
        assert replies == [TOO_LONG, "250 2.0.0 OK"]
    else:
        assert replies[-1] == "250 2.0.0 OK" and TOO_LONG not in replies and len(replies) == 2


# ---- 3. STARTTLS is refused inside a transaction --------------------------------------------


def test_starttls_is_refused_inside_a_transaction() -> None:
    d = Driver(replace(POLICY, tls_available=True))
    d.one("EHLO c")
    d.one("MAIL FROM:<a@b>")
    assert d.one("STARTTLS") == "503 5.5.1 Error: MAIL transaction in progress"
    d.one("RCPT TO:<c@d>")
    assert d.one("STARTTLS") == "503 5.5.1 Error: MAIL transaction in progress"
    assert d.feed("BDAT 3\r\nabc") == ["250 2.0.0 3 octets received"]
    assert d.one("STARTTLS") == "503 5.5.1 Error: MAIL transaction in progress"
    assert d.tls_requests == 0
    # The transaction went on untouched.
    assert code(d.feed("BDAT 0 LAST\r\n")[0]) == "250 2.0.0"
    assert d.one("STARTTLS") == "220 2.0.0 Ready to start TLS"
    assert d.tls_requests == 1


# ---- 4. a cap on NOOP, RSET, VRFY, EXPN and HELP ------------------------------------------


JUNK = ["NOOP", "RSET", "VRFY a", "EXPN b", "HELP", "HELP mail", "VRFY", "NOOP x"]


def test_junk_commands_past_the_limit_end_the_session() -> None:
    d = Driver(replace(POLICY, max_junk_commands=len(JUNK)))
    d.one("EHLO c")
    for line in JUNK:
        assert not d.one(line).startswith("421")
    d.one("EHLO c")  # not junk: does not count
    d.one("MAIL FROM:<a@b>")
    assert d.feed("NOOP\r\nNOOP\r\n") == ["421 4.7.0 sink.test Error: too many commands"]
    assert d.closed


def test_junk_commands_are_counted_between_accepted_messages() -> None:
    d = Driver(replace(POLICY, max_junk_commands=2))
    d.one("EHLO c")
    for _ in range(3):
        assert d.feed("RSET\r\nNOOP\r\n") == ["250 2.0.0 Reset OK", "250 2.0.0 OK"]
        d.one("MAIL FROM:<a@b>")
        d.one("RCPT TO:<c@d>")
        d.one("DATA")
        assert code(d.feed("x\r\n.\r\n")[0]) == "250 2.0.0"
    d.feed("NOOP\r\nNOOP\r\n")
    assert d.one("RSET").startswith("421 4.7.0")


def test_junk_command_limit_defaults_to_100() -> None:
    d = Driver(SessionPolicy(hostname="sink.test"))
    replies = d.feed("NOOP\r\n" * 101)
    assert replies == ["250 2.0.0 OK"] * 100 + ["421 4.7.0 sink.test Error: too many commands"]


# ---- 5. 0 means no limit, for every limit -------------------------------------------------


def test_zero_recipients_means_no_limit() -> None:
    d = Driver(replace(POLICY, max_recipients=0))
    d.one("EHLO c")
    d.one("MAIL FROM:<a@b>")
    assert d.feed("".join(f"RCPT TO:<r{i}@b>\r\n" for i in range(2000))) == [
        "250 2.1.5 Recipient OK"] * 2000


def test_zero_errors_means_no_limit() -> None:
    d = Driver(replace(POLICY, max_errors=0))
    assert d.feed("FROB\r\n" * 1000) == ["500 5.5.2 Error: command not recognized"] * 1000
    assert not d.closed


def test_zero_means_no_limit_for_every_limit() -> None:
    d = Driver(SessionPolicy(hostname="sink.test", max_size=0, max_recipients=0, max_errors=0,
                             max_junk_commands=0, max_unsent_output=0))
    d.one("EHLO c")
    assert d.feed("NOOP\r\n" * 1000) == ["250 2.0.0 OK"] * 1000
    assert d.feed("FROB\r\n" * 1000) == ["500 5.5.2 Error: command not recognized"] * 1000
    d.one("MAIL FROM:<a@b>")
    assert d.feed("".join(f"RCPT TO:<r{i}@b>\r\n" for i in range(2000))) == [
        "250 2.1.5 Recipient OK"] * 2000
    d.one("DATA")
    assert code(d.feed(b"x" * 100_000 + b"\r\n.\r\n")[0]) == "250 2.0.0"
    assert d.full_sends == [] and not d.closed


# ---- 6. back-pressure: parsing pauses while unsent replies are over their bound -----------


# Commands with their (distinct) replies, so that order shows.
_ANSWERS = {
    b"HELP\n": "214 2.0.0 Commands supported:",
    b"NOOP\n": "250 2.0.0 OK",
    b"HELP mail\n": "214 2.0.0 MAIL FROM:<address>",
    b"VRFY a\n": "252 2.5.0 Cannot VRFY",
    b"EXPN b\n": "252 2.5.0 Cannot EXPN",
    b"RSET\n": "250 2.0.0 Reset OK",
    b"EHLO c\n": "250 sink.test|PIPELINING",
}


@pytest.mark.parametrize("commands", [[b"HELP\n"], list(_ANSWERS)], ids=["HELP", "mixed"])
def test_unsent_output_bound_pauses_parsing_and_loses_nothing(commands: list[bytes]) -> None:
    """Issue 14 defect 3: 64 KiB of commands from a client that never reads used to be
    answered into an unbounded buffer. With a bound, ``next_event`` returns ``OutputFull``
    with at most the bound plus one reply queued, parses nothing more until the replies are
    taken, and then goes on where it stopped: every command answered once, in order."""
    bound = 4096
    conn = ServerConnection(replace(POLICY, max_unsent_output=bound, max_junk_commands=0))
    sent: list[bytes] = []
    wire = bytearray()
    while len(wire) < 65536:
        command = commands[len(sent) % len(commands)]
        sent.append(command)
        wire += command
    conn.receive_data(bytes(wire))
    longest_reply = 256
    out = bytearray()
    fulls = 0
    while (event := conn.next_event()) is not NeedData:
        assert event is OutputFull
        fulls += 1
        # Not one more command is parsed before the replies are taken.
        assert conn.next_event() is OutputFull
        chunk = conn.data_to_send()
        assert bound <= len(chunk) < bound + longest_reply
        out += chunk
    out += conn.data_to_send()
    assert fulls >= len(out) // (bound + longest_reply)
    parser = ReplyParser()
    parser.feed(bytes(out))
    replies = []
    while (reply := parser.next_reply()) is not None:
        replies.append(f"{reply.code} " + "|".join(reply.lines))
    assert replies[0].startswith("220 ")
    assert len(replies) == len(sent) + 1
    for command, reply in zip(sent, replies[1:], strict=True):
        assert reply.startswith(_ANSWERS[command]), (command, reply)


# The same, with an error, a nested MAIL and an overlong line among them.
_MIX = [*_ANSWERS, b"FROB\n", b"MAIL FROM:<a@b>\n", b"x" * 700 + b"\n"]


@settings(max_examples=100, deadline=None)
@given(
    bound=st.integers(1, 3000),
    commands=st.lists(st.sampled_from(_MIX), max_size=80),
    cuts=st.lists(st.integers(0, 60000), max_size=5),
)
def test_a_bound_on_unsent_output_changes_when_replies_leave_never_what_they_are(
    bound: int, commands: list[bytes], cuts: list[int]
) -> None:
    policy = replace(POLICY, max_junk_commands=0, max_errors=0)
    wire = b"".join(commands)
    points = sorted({c for c in cuts if c < len(wire)} | {len(wire)})

    def run(policy: SessionPolicy) -> tuple[bytes, int]:
        conn = ServerConnection(policy)
        out = bytearray()
        start = 0
        largest = 0
        for point in points:
            if point > start:  # b"" would mean the peer closed
                conn.receive_data(wire[start:point])
            start = point
            while (event := conn.next_event()) is OutputFull:
                chunk = conn.data_to_send()
                largest = max(largest, len(chunk))
                out += chunk
            assert event is NeedData
            out += conn.data_to_send()
        return bytes(out), largest

    unbounded, _ = run(policy)
    bounded, largest = run(replace(policy, max_unsent_output=bound))
    assert bounded == unbounded
    assert largest < bound + 256
