"""Tests for mailstorm.sink.trace: the Return-Path and Received headers prepended to stored
messages."""

from __future__ import annotations

import datetime
import email.parser
import email.policy
import email.utils
import re

import pytest

from mailstorm.sink.trace import trace_headers
from mailstorm.wire.events import Envelope

WHEN = datetime.datetime(2025, 11, 29, 10, 0, 0, tzinfo=datetime.UTC)


def make(envelope: Envelope, **overrides: object) -> bytes:
    kwargs: dict[str, object] = {
        "hostname": "sink.example.net",
        "peer_name": "client.example.com",
        "peer_ip": "192.0.2.7",
        "queue_id": "Q1234",
        "tls_version": None,
        "tls_cipher": None,
        "when": WHEN,
    }
    kwargs.update(overrides)
    return trace_headers(envelope, **kwargs)  # type: ignore[arg-type]


def unfold(block: bytes) -> dict[str, str]:
    """Header name -> unfolded value, parsed the way a mail reader would."""
    message = email.parser.BytesParser(policy=email.policy.compat32).parsebytes(block + b"\r\n")
    return {name: re.sub(r"\r?\n[ \t]", " ", value) for name, value in message.items()}


def envelope(**fields: object) -> Envelope:
    defaults: dict[str, object] = {
        "mail_from": "alice@example.org",
        "rcpt_tos": ["bob@example.com"],
        "helo": "client.example.com",
        "greeting": "ESMTP",
    }
    defaults.update(fields)
    return Envelope(**defaults)  # type: ignore[arg-type]


def test_shape_and_line_endings() -> None:
    block = make(envelope())
    assert block.startswith(b"Return-Path: <alice@example.org>\r\n")
    assert block.endswith(b"\r\n")
    assert not block.endswith(b"\r\n\r\n")
    # Every LF is part of a CRLF, every CR is followed by LF.
    assert block.count(b"\n") == block.count(b"\r\n") == block.count(b"\r")
    headers = unfold(block)
    assert list(headers) == ["Return-Path", "Received"]
    received = headers["Received"]
    assert received.startswith("from client.example.com (client.example.com [192.0.2.7])")
    assert "by sink.example.net (mailstorm)" in received
    assert "with ESMTP " in received
    assert "id Q1234" in received


def test_date_is_rfc5322_and_last() -> None:
    received = unfold(make(envelope()))["Received"]
    head, _, date = received.rpartition(";")
    assert head.rstrip().endswith("for <bob@example.com>")
    assert email.utils.parsedate_to_datetime(date.strip()) == WHEN
    assert date.strip() == "Sat, 29 Nov 2025 10:00:00 +0000"


def test_default_date_is_now_and_aware() -> None:
    before = datetime.datetime.now(datetime.UTC).replace(microsecond=0)
    block = make(envelope(), when=None)
    after = datetime.datetime.now(datetime.UTC)
    date = unfold(block)["Received"].rpartition(";")[2].strip()
    parsed = email.utils.parsedate_to_datetime(date)
    assert parsed.tzinfo is not None
    assert before <= parsed <= after


@pytest.mark.parametrize(
    ("fields", "keyword"),
    [
        ({"greeting": "SMTP"}, "SMTP"),
        ({"greeting": "ESMTP"}, "ESMTP"),
        ({"greeting": "LMTP"}, "LMTP"),
        ({"tls": True}, "ESMTPS"),
        ({"auth_user": "alice"}, "ESMTPA"),
        ({"tls": True, "auth_user": "alice"}, "ESMTPSA"),
        ({"smtputf8": True, "tls": True}, "UTF8SMTPS"),
    ],
)
def test_protocol_keyword(fields: dict[str, object], keyword: str) -> None:
    received = unfold(make(envelope(**fields)))["Received"]
    assert re.search(rf"\bwith {keyword}\b", received), received


def test_tls_comment() -> None:
    received = unfold(
        make(envelope(tls=True), tls_version="TLSv1.3", tls_cipher="TLS_AES_256_GCM_SHA384")
    )["Received"]
    assert "with ESMTPS (version=TLSv1.3 cipher=TLS_AES_256_GCM_SHA384)" in received


def test_no_tls_comment_without_tls() -> None:
    received = unfold(make(envelope(), tls_version=None, tls_cipher=None))["Received"]
    assert "version=" not in received
    assert "cipher=" not in received


def test_authenticated_user_mentioned() -> None:
    received = unfold(make(envelope(auth_user="alice@example.org")))["Received"]
    assert "(authenticated as alice@example.org)" in received


def test_for_clause_only_with_one_recipient() -> None:
    one = unfold(make(envelope(rcpt_tos=["bob@example.com"])))["Received"]
    assert "for <bob@example.com>;" in one
    two = unfold(make(envelope(rcpt_tos=["bob@example.com", "carol@example.com"])))["Received"]
    assert " for " not in two
    assert "bob@example.com" not in two
    assert "carol@example.com" not in two


def test_null_sender() -> None:
    assert make(envelope(mail_from="")).startswith(b"Return-Path: <>\r\n")


def test_header_injection_via_helo_is_neutralized() -> None:
    block = make(envelope(helo="evil\r\nBcc: x"))
    headers = unfold(block)
    assert list(headers) == ["Return-Path", "Received"]
    assert b"\r\nBcc" not in block
    assert b"\nBcc" not in block
    # The HELO also cannot split into several tokens or forge a clause.
    assert headers["Received"].startswith("from evil??Bcc:?x (")


@pytest.mark.parametrize(
    "helo",
    [
        "evil\nBcc: x",
        "evil\rBcc: x",
        "evil\x00\x1b[31m\x7f",
        "evil\u2028Bcc: x",
        "x; Mon, 1 Jan 2001 00:00:00 +0000",
        "x (forged comment) by mx.example.com",
    ],
)
def test_helo_cannot_add_lines_or_clauses(helo: str) -> None:
    block = make(envelope(helo=helo))
    text = block.decode("utf-8")
    assert len(unfold(block)) == 2
    # Only CRLF followed by TAB (a continuation) or by the next header may appear.
    for match in re.finditer(r"\r\n", text):
        following = text[match.end() : match.end() + 1]
        assert following in ("\t", "R", ""), repr(text)
    received = unfold(block)["Received"]
    assert received.count(";") == 1
    assert received.count("(") == received.count(")")
    from_clause = received.split(" (", 1)[0]
    assert " " not in from_clause.removeprefix("from ")
    assert all(ch.isprintable() for ch in from_clause)


def test_header_injection_via_username_is_neutralized() -> None:
    block = make(envelope(auth_user="bob)\r\nBcc: victim@example.com\r\n("))
    headers = unfold(block)
    assert list(headers) == ["Return-Path", "Received"]
    received = headers["Received"]
    # The ")" is escaped as a quoted pair, so the comment stays one comment.
    assert "(authenticated as bob\\)??Bcc: victim@example.com??\\()" in received


def test_injection_via_addresses_is_neutralized() -> None:
    block = make(envelope(mail_from="a@x\r\nBcc: y", rcpt_tos=["b@y\nBcc: z"]))
    assert list(unfold(block)) == ["Return-Path", "Received"]
    assert b"\nBcc" not in block


def test_folding_keeps_lines_short() -> None:
    env = envelope(
        tls=True,
        auth_user="a-rather-long-user-name@customer-domain.example.org",
        helo="a-long-client-host-name.with-several.subdomains.example.com",
        rcpt_tos=["recipient-with-a-long-name@another-long-domain.example.org"],
    )
    block = make(
        env,
        peer_name="a-long-client-host-name.with-several.subdomains.example.com",
        peer_ip="2001:db8:1234:5678:9abc:def0:1234:5678",
        tls_version="TLSv1.3",
        tls_cipher="TLS_CHACHA20_POLY1305_SHA256",
        queue_id="4Z0123456789ABCDEF",
    )
    lines = block.split(b"\r\n")
    assert lines[-1] == b""
    received_lines = lines[1:-1]
    assert len(received_lines) > 1
    assert all(len(line) <= 78 for line in received_lines), received_lines
    assert all(line.startswith(b"\t") for line in received_lines[1:])
    received = unfold(block)["Received"]
    assert "[IPv6:2001:db8:1234:5678:9abc:def0:1234:5678]" in received
    assert "(authenticated as a-rather-long-user-name@customer-domain.example.org)" in received


def test_short_header_is_not_folded() -> None:
    block = make(envelope(rcpt_tos=["a@b", "c@d"]), hostname="h", queue_id="q")
    assert block.count(b"\r\n") == 3
    assert all(len(line) <= 78 for line in block.split(b"\r\n"))


def test_overlong_helo_is_bounded() -> None:
    block = make(envelope(helo="h" * 2000, auth_user="u" * 5000))
    assert all(len(line) <= 998 for line in block.split(b"\r\n"))


def test_smtputf8_addresses_are_utf8() -> None:
    env = envelope(mail_from="jörg@exämple.de", rcpt_tos=["用户@例子.广告"], smtputf8=True)
    block = make(env)
    assert block.startswith("Return-Path: <jörg@exämple.de>\r\n".encode())
    assert "for <用户@例子.广告>;".encode() in block
    assert b"with UTF8SMTP " in block


def test_empty_helo_and_peer_name() -> None:
    received = unfold(make(envelope(helo=""), peer_name=""))["Received"]
    assert received.startswith("from unknown (unknown [192.0.2.7])")
