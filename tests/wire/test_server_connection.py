"""The sans-IO server connection, fed bytes directly: every command, sequence and error path.

A small driver plays the trio shell's part: it answers ``MessageReceived`` by "storing" the
message in a list, ``AuthAttempt`` from a dict of users, and ``StartTLS`` by pretending the
handshake succeeded.
"""

from __future__ import annotations

import base64
from dataclasses import replace

import pytest
from core_driver import POLICY, Driver, code

from mailstorm.wire.data import BareLinefeedPolicy
from mailstorm.wire.events import Closed, MessageReceived


def test_full_session() -> None:
    d = Driver()
    ehlo = d.one("EHLO client.example")
    for keyword in ("PIPELINING", "SIZE 1000", "8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES",
                    "CHUNKING", "AUTH PLAIN LOGIN"):
        assert keyword in ehlo.split("|")
    assert "STARTTLS" not in ehlo
    assert d.one("MAIL FROM:<a@example.com>") == "250 2.1.0 Sender OK"
    assert d.one("RCPT TO:<b@example.com>") == "250 2.1.5 Recipient OK"
    assert d.one("RCPT TO:<c@example.com>") == "250 2.1.5 Recipient OK"
    assert d.one("DATA").startswith("354")
    assert d.feed("Subject: hi\r\n\r\n..dot\r\n.\r\n") == ["250 2.0.0 OK: queued as Q1"]
    (msg,) = d.messages
    assert msg.content == b"Subject: hi\r\n\r\n.dot\r\n"
    assert msg.envelope.mail_from == "a@example.com"
    assert msg.envelope.rcpt_tos == ["b@example.com", "c@example.com"]
    assert msg.envelope.helo == "client.example" and msg.envelope.protocol == "ESMTP"
    assert d.one("QUIT") == "221 2.0.0 sink.test Bye"
    assert d.closed


def test_helo_session_and_protocol_keyword() -> None:
    d = Driver()
    assert d.one("HELO client.example") == "250 sink.test"
    assert d.one("MAIL FROM:<a@b>") .startswith("250")
    assert d.one("MAIL FROM:<a@b>") == "503 5.5.1 Error: nested MAIL command"
    d.one("RSET")
    assert d.one("MAIL FROM:<a@b> SIZE=10") == "555 5.5.4 Error: parameters need EHLO"


def test_verbs_are_case_insensitive_and_arguments_kept_as_sent() -> None:
    d = Driver()
    d.one("ehlo Client.Example")
    assert d.one("mail from:<Mixed.Case@Example.COM>").startswith("250")
    assert d.one("rcpt to:<X@Y>").startswith("250")
    d.one("data")
    d.feed(".\r\n")
    assert d.messages[0].envelope.mail_from == "Mixed.Case@Example.COM"
    assert d.messages[0].envelope.rcpt_tos == ["X@Y"]
    assert d.messages[0].envelope.helo == "Client.Example"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("NOOP", "250 2.0.0"),
        ("NOOP anything", "250 2.0.0"),
        ("RSET", "250 2.0.0"),
        ("RSET x", "501 5.5.4"),
        ("VRFY alice", "252 2.5.0"),
        ("VRFY", "501 5.5.4"),
        ("EXPN staff", "252 2.5.0"),
        ("EXPN", "501 5.5.4"),
        ("HELP", "214 2.0.0"),
        ("HELP mail", "214 2.0.0"),
        ("HELP frobnicate", "504 5.5.1"),
        ("FROB", "500 5.5.2"),
        ("MAIL FROM:<a@b>", "503 5.5.1"),
        ("RCPT TO:<a@b>", "503 5.5.1"),
        ("DATA", "503 5.5.1"),
        ("HELO", "501 5.5.4"),
        ("EHLO", "501 5.5.4"),
        ("EHLO two words", "501 5.5.4"),
        ("AUTH PLAIN", "503 5.5.1"),
        ("STARTTLS", "454 4.7.0"),
        ("QUIT now", "501 5.5.4"),
        ("12345", "500 5.5.2"),
        ("", "500 5.5.2"),
    ],
)
def test_reply_codes_before_greeting(line: str, expected: str) -> None:
    assert code(Driver().one(line)) == expected


def test_sequence_errors_inside_a_transaction() -> None:
    d = Driver()
    d.one("EHLO c")
    assert code(d.one("RCPT TO:<a@b>")) == "503 5.5.1"
    assert code(d.one("DATA")) == "503 5.5.1"
    d.one("MAIL FROM:<a@b>")
    assert d.one("DATA") == "503 5.5.1 Error: need RCPT command"
    assert d.one("AUTH PLAIN") == "503 5.5.1 Error: AUTH not allowed during a mail transaction"
    assert d.one("RSET") == "250 2.0.0 Reset OK"
    assert code(d.one("RCPT TO:<a@b>")) == "503 5.5.1"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("MAIL FROM:a@b", "501 5.5.4"),
        ("MAIL FROM:<a@b> SIZE=abc", "501 5.5.4"),
        ("MAIL FROM:<a@b> SIZE=1001", "552 5.3.4"),
        ("MAIL FROM:<a@b> SIZE=1000", "250 2.1.0"),
        ("MAIL FROM:<a@b> BODY=8BITMIME", "250 2.1.0"),
        ("MAIL FROM:<a@b> BODY=7bit", "250 2.1.0"),
        ("MAIL FROM:<a@b> BODY=BINARYMIME", "504 5.5.4"),
        ("MAIL FROM:<a@b> RET=HDRS", "555 5.5.4"),
        ("MAIL FROM:<a@b> SIZE=1 SIZE=2", "501 5.5.4"),
        ("MAIL FROM:<a@b> SMTPUTF8=yes", "501 5.5.4"),
        ("MAIL FROM:<a@b> AUTH=<>", "250 2.1.0"),
        ("MAIL FROM:<用户@例子.广告>", "553 5.6.7"),
        ("MAIL FROM:<用户@例子.广告> SMTPUTF8", "250 2.1.0"),
        ("MAIL FROM:<" + "a" * 300 + "@b>", "501 5.1.3"),
    ],
)
def test_mail_parameters(line: str, expected: str) -> None:
    d = Driver()
    d.one("EHLO c")
    assert code(d.one(line)) == expected


def test_rcpt_errors_and_limits() -> None:
    d = Driver()
    d.one("EHLO c")
    d.one("MAIL FROM:<a@b>")
    assert code(d.one("RCPT TO:a@b")) == "501 5.5.4"
    assert code(d.one("RCPT TO:<a@b> NOTIFY=NEVER")) == "555 5.5.4"
    assert code(d.one("RCPT TO:<用户@例子.广告>")) == "553 5.6.7"
    for i in range(3):
        assert code(d.one(f"RCPT TO:<r{i}@b>")) == "250 2.1.5"
    assert d.one("RCPT TO:<r4@b>") == "452 4.5.3 Error: too many recipients"
    assert d.one("RCPT TO:<Postmaster>") .startswith("452")


def test_smtputf8_transaction_accepts_utf8_recipients() -> None:
    d = Driver()
    d.one("EHLO c")
    d.one("MAIL FROM:<a@b> SMTPUTF8")
    assert code(d.one("RCPT TO:<Pelé@exemplo.br>")) == "250 2.1.5"
    d.one("DATA")
    d.feed("x\r\n.\r\n")
    envelope = d.messages[0].envelope
    assert envelope.smtputf8 and envelope.rcpt_tos == ["Pelé@exemplo.br"]
    assert envelope.protocol == "UTF8SMTP"


def test_pipelined_group_is_answered_in_one_buffer() -> None:
    d = Driver()
    d.one("EHLO c")
    replies = d.feed(
        "MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nRCPT TO:<e@f>\r\nDATA\r\n"
    )
    assert [code(r) for r in replies] == ["250 2.1.0", "250 2.1.5", "250 2.1.5", "354 End"]
    # Body, end, and the next pipelined transaction in one buffer.
    replies = d.feed("body\r\n.\r\nMAIL FROM:<x@y>\r\nRCPT TO:<z@w>\r\nDATA\r\n")
    assert [code(r) for r in replies] == ["250 2.0.0", "250 2.1.0", "250 2.1.5", "354 End"]
    assert d.feed("b2\r\n.\r\nQUIT\r\n")[-1].startswith("221")
    assert [m.content for m in d.messages] == [b"body\r\n", b"b2\r\n"]


def test_command_split_across_reads() -> None:
    d = Driver()
    assert d.feed("EH") == []
    assert d.feed("LO c\r") == []
    assert d.feed("\nNO")[0].startswith("250")
    assert d.feed("OP\r\n") == ["250 2.0.0 OK"]


def test_lf_terminated_commands_are_accepted() -> None:
    d = Driver()
    assert d.feed("EHLO c\nNOOP\n")[1] == "250 2.0.0 OK"


def test_line_too_long() -> None:
    d = Driver()
    assert d.one("NOOP " + "x" * 600) == "500 5.5.2 Error: line too long"
    # An unterminated giant line is refused as it passes the limit, then dropped to its end.
    assert d.feed(b"x" * 20000) == ["500 5.5.2 Error: line too long"]
    assert d.feed(b"y" * 20000 + b"\r\nNOOP\r\n") == ["250 2.0.0 OK"]


def test_invalid_utf8_command() -> None:
    assert code(Driver().one("NOOP \udcff".encode("utf-8", "surrogateescape").decode(
        "latin-1"))) == "250 2.0.0"
    d = Driver()
    assert d.feed(b"EHLO \xff\xfe\r\n") == ["500 5.5.2 Error: command is not valid UTF-8"]


def test_too_many_errors_end_the_session() -> None:
    d = Driver()
    replies = d.feed("FROB\r\n" * 20)
    assert [code(r) for r in replies[:10]] == ["500 5.5.2"] * 10
    assert replies[10] == "421 4.7.0 sink.test Error: too many errors"
    assert len(replies) == 11 and d.closed


def test_oversize_message_is_refused_and_session_stays_usable() -> None:
    d = Driver()
    d.transaction()
    d.one("DATA")
    assert d.feed(b"x" * 5000 + b"\r\n" + b"y" * 5000) == []
    assert d.feed("\r\n.\r\n") == ["552 5.3.4 Error: message size exceeds fixed limit of 1000 "
                                  "octets"]
    assert d.messages == []
    d.transaction()
    d.one("DATA")
    assert code(d.feed("small\r\n.\r\n")[0]) == "250 2.0.0"


@pytest.mark.parametrize("policy", list(BareLinefeedPolicy))
def test_bare_lf_smuggling_cannot_end_data(policy: BareLinefeedPolicy) -> None:
    d = Driver(replace(POLICY, bare_linefeed=policy))
    d.transaction()
    d.one("DATA")
    smuggle = ("Subject: one\r\n\r\nfirst\n.\nMAIL FROM:<evil@x>\nRCPT TO:<victim@y>\nDATA\n"
               "Subject: smuggled\n\nsecond\n.\r\n.\r\n")
    replies = d.feed(smuggle)
    if policy is BareLinefeedPolicy.REJECT:
        assert [code(r) for r in replies] == ["550 5.6.0"]
        assert d.messages == []
    else:
        assert [code(r) for r in replies] == ["250 2.0.0"]
        (msg,) = d.messages
        assert b"MAIL FROM:<evil@x>\r\n" in msg.content  # content, not a command
        assert b"\n" not in msg.content.replace(b"\r\n", b"")
    # Either way exactly one transaction happened and the session continues in sequence.
    assert code(d.one("RCPT TO:<a@b>")) == "503 5.5.1"


def test_bdat_chunks_and_errors() -> None:
    d = Driver()
    d.transaction()
    assert d.feed("BDAT 6\r\nhello\n") == ["250 2.0.0 6 octets received"]
    assert d.one("DATA") == "503 5.5.1 Error: DATA not allowed during BDAT transfer"
    assert d.feed("BDAT 0 LAST\r\n") == ["250 2.0.0 OK: queued as Q1"]
    # BDAT has no unstuffing; the default policy (normalize) makes the bare LF a CRLF.
    assert d.messages[0].content == b"hello\r\n"
    # Out of sequence: the chunk is drained, then refused, and the stream stays in sync.
    assert d.feed("BDAT 5\r\n.\r\n\r\nNOOP\r\n") == ["503 5.5.1 Error: need MAIL command",
                                                     "250 2.0.0 OK"]
    d.one("MAIL FROM:<a@b>")
    d.one("RCPT TO:<c@d>")
    assert d.feed("BDAT 1001 LAST\r\n" + "z" * 1001) == [
        "552 5.3.4 Error: message size exceeds fixed limit of 1000 octets"]
    assert d.feed("BDAT x\r\n")[-1].startswith("421")
    assert d.closed


def test_auth_plain_with_and_without_initial_response() -> None:
    token = base64.b64encode(b"\0alice\0wonderland").decode()
    d = Driver()
    d.one("EHLO c")
    assert d.one(f"AUTH PLAIN {token}") == "235 2.7.0 Authentication successful"
    assert d.one(f"AUTH PLAIN {token}") == "503 5.5.1 Error: already authenticated"
    d.transaction()
    d.one("DATA")
    d.feed(".\r\n")
    assert d.messages[0].envelope.auth_user == "alice"
    assert d.messages[0].envelope.protocol == "ESMTPA"

    d = Driver()
    d.one("EHLO c")
    assert d.one("AUTH PLAIN") == "334 "
    assert d.one(token) == "235 2.7.0 Authentication successful"


def test_auth_login_exactly_as_in_the_notes() -> None:
    d = Driver()
    d.one("EHLO c")
    assert d.one("AUTH LOGIN") == "334 VXNlcm5hbWU6"
    assert d.one(base64.b64encode(b"alice").decode()) == "334 UGFzc3dvcmQ6"
    assert d.one(base64.b64encode(b"wonderland").decode()) == "235 2.7.0 Authentication " \
        "successful"
    # With the username as initial response (what smtplib sends).
    d = Driver()
    d.one("EHLO c")
    assert d.one("AUTH LOGIN " + base64.b64encode(b"alice").decode()) == "334 UGFzc3dvcmQ6"
    assert d.one(base64.b64encode(b"nope").decode()) == \
        "535 5.7.8 Authentication credentials invalid"
    assert d.auths[-1].password == "nope" and "nope" not in repr(d.auths[-1])


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["AUTH PLAIN *"], "501 5.7.0"),
        (["AUTH PLAIN", "*"], "501 5.7.0"),
        (["AUTH LOGIN", "*"], "501 5.7.0"),
        (["AUTH PLAIN !!notbase64"], "501 5.5.2"),
        (["AUTH LOGIN", "%%%"], "501 5.5.2"),
        (["AUTH PLAIN " + base64.b64encode(b"no-nuls").decode()], "501 5.5.2"),
        (["AUTH PLAIN ="], "501 5.5.2"),
        (["AUTH CRAM-MD5"], "504 5.5.4"),
        (["AUTH"], "501 5.5.4"),
        (["AUTH PLAIN " + base64.b64encode(b"\0alice\0wrong").decode()], "535 5.7.8"),
        (["AUTH PLAIN " + base64.b64encode(b"\0mallory\0x").decode()], "535 5.7.8"),
    ],
)
def test_auth_errors(lines: list[str], expected: str) -> None:
    d = Driver()
    d.one("EHLO c")
    for line in lines[:-1]:
        d.one(line)
    assert code(d.one(lines[-1])) == expected
    # The session is usable afterwards.
    assert d.one("NOOP") == "250 2.0.0 OK"


def test_auth_not_enabled_and_required() -> None:
    d = Driver(replace(POLICY, auth_enabled=False))
    assert "AUTH" not in d.one("EHLO c")
    assert code(d.one("AUTH PLAIN")) == "502 5.5.1"
    d = Driver(replace(POLICY, auth_required=True))
    d.one("EHLO c")
    assert d.one("MAIL FROM:<a@b>") == "530 5.7.0 Authentication required"
    d.one("AUTH PLAIN " + base64.b64encode(b"\0alice\0wonderland").decode())
    assert code(d.one("MAIL FROM:<a@b>")) == "250 2.1.0"


def test_auth_needs_tls_when_tls_is_configured() -> None:
    policy = replace(POLICY, tls_available=True)
    d = Driver(policy)
    ehlo = d.one("EHLO c")
    assert "STARTTLS" in ehlo and "AUTH" not in ehlo
    assert code(d.one("AUTH PLAIN")) == "538 5.7.11"
    d.one("STARTTLS")
    ehlo = d.one("EHLO c")
    assert "STARTTLS" not in ehlo and "AUTH PLAIN LOGIN" in ehlo
    assert Driver(replace(policy, insecure_auth=True)).one("EHLO c").count("AUTH") == 1


def test_starttls_discards_pipelined_plaintext_and_resets_state() -> None:
    d = Driver(replace(POLICY, tls_available=True))
    d.one("EHLO c")
    # The injected MAIL must never be answered (CVE-2011-0411).
    assert d.feed("STARTTLS\r\nMAIL FROM:<evil@x>\r\n") == ["220 2.0.0 Ready to start TLS"]
    assert d.tls_requests == 1
    assert code(d.one("MAIL FROM:<a@b>")) == "503 5.5.1"  # EHLO forgotten
    d.one("EHLO c")
    assert code(d.one("RCPT TO:<a@b>")) == "503 5.5.1"  # the injected MAIL never ran
    assert code(d.one("STARTTLS")) == "503 5.5.1"


def test_eof_mid_data_delivers_nothing() -> None:
    d = Driver()
    d.transaction()
    d.one("DATA")
    d.feed("half a message\r\n")
    d.conn.receive_data(b"")
    assert isinstance(d.conn.next_event(), Closed)
    assert d.messages == []


def test_storage_failure_gives_451_and_keeps_session() -> None:
    d = Driver()
    d.transaction()
    d.one("DATA")
    d.conn.receive_data(b"x\r\n.\r\n")
    assert isinstance(d.conn.next_event(), MessageReceived)
    d.conn.message_failed()
    assert d.feed("NOOP\r\n") == ["451 4.3.0 Error: local error in processing, message not "
                                  "stored", "250 2.0.0 OK"]


def test_close_with_reply_for_shutdown() -> None:
    d = Driver()
    d.conn.close(None)
    assert isinstance(d.conn.next_event(), Closed)
    d = Driver()
    d.conn.timed_out()
    assert d.feed("") == ["421 4.4.2 sink.test Error: timeout exceeded"]


def test_overlong_auth_response_is_refused_once_and_its_tail_never_runs() -> None:
    """A giant AUTH response is refused as it passes the limit and dropped to its end; the
    rest of it is never read as commands (it used to be: the buffer was dropped mid-line)."""
    d = Driver()
    d.one("EHLO c")
    assert d.one("AUTH PLAIN") == "334 "
    assert d.feed(b"A" * 20000) == ["500 5.5.2 Error: line too long"]
    assert d.feed(b"B" * 20000 + b"QUIT\r\n") == []
    assert not d.closed  # "QUIT" was part of the dropped line, not a command
    assert d.one("NOOP") == "250 2.0.0 OK"


@pytest.mark.parametrize(
    ("auth", "tls_available", "tls_active", "listed"),
    [
        (False, False, False, set()),
        (True, False, False, {"AUTH"}),
        (True, True, False, {"STARTTLS"}),  # AUTH only after STARTTLS
        (True, True, True, {"AUTH"}),
        (False, True, False, {"STARTTLS"}),
    ],
)
def test_help_lists_auth_and_starttls_only_where_offered(
    auth: bool, tls_available: bool, tls_active: bool, listed: set[str]
) -> None:
    policy = replace(POLICY, auth_enabled=auth, tls_available=tls_available)
    driver = Driver(policy, tls=tls_active)
    (reply,) = driver.feed("HELP\r\n")
    assert reply.startswith("214 ")
    commands = set(reply.split("|")[1].split())
    assert {"MAIL", "RCPT", "DATA", "QUIT"} <= commands
    assert commands & {"AUTH", "STARTTLS"} == listed
    for verb in ("AUTH", "STARTTLS"):
        (topic,) = driver.feed(f"HELP {verb}\r\n")
        assert topic.startswith("214" if verb in listed else "504"), topic
