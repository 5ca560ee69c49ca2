"""LMTP in the sans-IO core (RFC 2033): LHLO, and one reply per accepted recipient at the end
of data, under the same bound on unsent output as every other reply.

The driver below is the stand-in of ``core_driver`` with the few things LMTP tests need: it
keeps every event the core returned, stores or fails messages as told, and records the size of
each send the core asked for.
"""

from __future__ import annotations

import random

import pytest

from mailstorm.wire.events import (
    REFUSED_FOR_EVERY_RECIPIENT,
    Closed,
    Delay,
    Dropped,
    Envelope,
    Event,
    FaultReplied,
    MessageReceived,
    MessageRefused,
    NeedData,
    OutputFull,
    StartTLS,
)
from mailstorm.wire.faults import FaultPlan
from mailstorm.wire.replies import ReplyParser
from mailstorm.wire.server import ServerConnection, SessionPolicy

HELLO = "LHLO client.test\r\n"
ENVELOPE = "MAIL FROM:<s@example.com>\r\n"


def policy(*, faults: list[str] | None = None, **options: object) -> SessionPolicy:
    plan = None
    if faults:
        plan = FaultPlan.from_specs(faults=faults, random=random.Random(1).random)
    settings: dict[str, object] = {"hostname": "lmtp.test", "lmtp": True, "faults": plan}
    settings.update(options)
    return SessionPolicy(**settings)  # type: ignore[arg-type]


class LMTPDriver:
    """Feeds bytes, answers what the core asks, returns the replies as "code text" strings."""

    def __init__(self, pol: SessionPolicy, *, store_fails: bool = False) -> None:
        self.conn = ServerConnection(pol)
        self.parser = ReplyParser()
        self.store_fails = store_fails
        self.events: list[Event] = []
        self.stored: list[MessageReceived] = []
        self.sends: list[int] = []
        self.closed = False
        self.banner = self.feed("")

    def feed(self, data: str | bytes) -> list[str]:
        if isinstance(data, str):
            data = data.encode()
        if data:
            self.conn.receive_data(data)
        out = bytearray()
        while True:
            event = self.conn.next_event()
            if event is NeedData:
                break
            self.events.append(event)
            if event is OutputFull:
                chunk = self.conn.data_to_send()
                self.sends.append(len(chunk))
                out += chunk
            elif isinstance(event, MessageReceived):
                if self.store_fails:
                    self.conn.message_failed()
                else:
                    self.stored.append(event)
                    self.conn.message_stored(f"Q{len(self.stored)}")
            elif isinstance(event, StartTLS):
                self.conn.tls_started()  # the handshake, as the shell would do it
            elif isinstance(event, Closed):
                self.closed = True
                break
        out += self.conn.data_to_send()
        self.parser.feed(bytes(out))
        replies = []
        while (reply := self.parser.next_reply()) is not None:
            replies.append(f"{reply.code} " + "|".join(reply.lines))
        return replies

    def of(self, kind: type[Event]) -> list[Event]:
        return [event for event in self.events if isinstance(event, kind)]


def transaction(*rcpts: str, body: str = "Subject: t\r\n\r\nhello\r\n.\r\n") -> str:
    return ENVELOPE + "".join(f"RCPT TO:<{r}>\r\n" for r in rcpts) + "DATA\r\n" + body


def test_the_greeting_says_lmtp_and_lhlo_lists_the_extensions() -> None:
    d = LMTPDriver(policy())
    assert d.banner == ["220 lmtp.test LMTP mailstorm"]
    (reply,) = d.feed(HELLO)
    lines = reply.split("|")
    assert lines[0] == "250 lmtp.test"
    # RFC 2033 5: PIPELINING and ENHANCEDSTATUSCODES are required; the rest as in EHLO.
    for keyword in ("PIPELINING", "ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "CHUNKING"):
        assert keyword in lines
    assert "SIZE 10485760" in lines


def test_helo_and_ehlo_are_refused_and_mail_needs_lhlo() -> None:
    d = LMTPDriver(policy())
    assert d.feed("HELO client.test\r\nEHLO client.test\r\nMAIL FROM:<s@example.com>\r\n") == [
        "500 5.5.1 Error: this is an LMTP server, send LHLO",
        "500 5.5.1 Error: this is an LMTP server, send LHLO",
        "503 5.5.1 Error: send LHLO first",
    ]
    assert d.feed("LHLO\r\n") == ["501 5.5.4 Syntax: LHLO hostname"]
    assert d.feed("HELP\r\n")[0].split("|")[1].startswith("2.0.0 LHLO MAIL")


def test_lhlo_stays_unknown_in_smtp_mode() -> None:
    d = LMTPDriver(policy(lmtp=False))
    assert d.banner == ["220 lmtp.test ESMTP mailstorm"]
    assert d.feed(HELLO) == ["500 5.5.2 Error: command not recognized"]
    assert d.feed("EHLO client.test\r\n")[0].startswith("250 lmtp.test|")


def test_one_reply_per_accepted_recipient_in_rcpt_order() -> None:
    d = LMTPDriver(policy(max_recipients=3))
    d.feed(HELLO)
    replies = d.feed(transaction("a@x.test", "b@x.test", "c@x.test", "d@x.test"))
    assert replies == [
        "250 2.1.0 Sender OK",
        "250 2.1.5 Recipient OK",
        "250 2.1.5 Recipient OK",
        "250 2.1.5 Recipient OK",
        "452 4.5.3 Error: too many recipients",  # not accepted: no reply at the end of data
        "354 End data with <CR><LF>.<CR><LF>",
        "250 2.0.0 <a@x.test> OK: queued as Q1",
        "250 2.0.0 <b@x.test> OK: queued as Q1",
        "250 2.0.0 <c@x.test> OK: queued as Q1",
    ]
    (message,) = d.stored
    assert message.envelope.rcpt_tos == ["a@x.test", "b@x.test", "c@x.test"]
    assert message.envelope.greeting == "LMTP"
    assert message.content == b"Subject: t\r\n\r\nhello\r\n"


def test_the_whole_session_pipelined_in_one_feed() -> None:
    d = LMTPDriver(policy())
    replies = d.feed(
        HELLO + transaction("a@x.test", "b@x.test") + transaction("c@x.test") + "QUIT\r\n"
    )
    assert [r.split(" ", 2)[0] + " " + r.split(" ", 2)[1] for r in replies[1:]] == [
        "250 2.1.0", "250 2.1.5", "250 2.1.5", "354 End", "250 2.0.0", "250 2.0.0",
        "250 2.1.0", "250 2.1.5", "354 End", "250 2.0.0", "221 2.0.0",
    ]
    assert "<c@x.test> OK: queued as Q2" in replies[-2]
    assert len(d.stored) == 2 and d.closed


def test_no_recipient_means_no_data_and_rset_ends_the_transaction() -> None:
    d = LMTPDriver(policy())
    d.feed(HELLO)
    assert d.feed(ENVELOPE + "DATA\r\n") == [
        "250 2.1.0 Sender OK",
        "503 5.5.1 Error: need RCPT command",
    ]
    assert d.feed("RCPT TO:<a@x.test>\r\nRSET\r\nDATA\r\n") == [
        "250 2.1.5 Recipient OK",
        "250 2.0.0 Reset OK",
        "503 5.5.1 Error: need MAIL command",
    ]
    assert d.stored == []


def test_bdat_last_gets_a_reply_per_recipient() -> None:
    d = LMTPDriver(policy())
    d.feed(HELLO)
    replies = d.feed(
        ENVELOPE + "RCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\n"
        "BDAT 7\r\nHello\r\nBDAT 8 LAST\r\n world\r\n"
    )
    assert replies[3:] == [
        "250 2.0.0 7 octets received",
        "250 2.0.0 <a@x.test> OK: queued as Q1",
        "250 2.0.0 <b@x.test> OK: queued as Q1",
    ]
    assert d.stored[0].content == b"Hello\r\n world\r\n"


def test_a_message_refused_by_policy_is_refused_per_recipient() -> None:
    d = LMTPDriver(policy(max_size=10))
    d.feed(HELLO)
    replies = d.feed(transaction("a@x.test", "b@x.test", body="x" * 20 + "\r\n.\r\n"))
    assert replies[-2:] == [
        "552 5.3.4 <a@x.test> Error: message size exceeds fixed limit of 10 octets",
        "552 5.3.4 <b@x.test> Error: message size exceeds fixed limit of 10 octets",
    ]
    # BDAT LAST over the limit: the same, once per recipient.
    replies = d.feed(ENVELOPE + "RCPT TO:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nBDAT 20 LAST\r\n"
                     + "y" * 20)
    assert [r[:9] for r in replies[-2:]] == ["552 5.3.4", "552 5.3.4"]
    assert d.stored == [] and len(d.of(MessageRefused)) == 2
    assert d.feed("NOOP\r\n") == ["250 2.0.0 OK"]


def test_a_storage_failure_is_a_451_for_each_recipient() -> None:
    d = LMTPDriver(policy(), store_fails=True)
    d.feed(HELLO)
    replies = d.feed(transaction("a@x.test", "b@x.test"))
    assert replies[-2:] == [
        "451 4.3.0 <a@x.test> Error: local error in processing, message not stored",
        "451 4.3.0 <b@x.test> Error: local error in processing, message not stored",
    ]


def test_an_eod_fault_naming_a_recipient_refuses_only_that_recipient() -> None:
    d = LMTPDriver(policy(faults=[r"EOD to=~@full\.test:452 4.2.2 mailbox full"]))
    d.feed(HELLO)
    replies = d.feed(transaction("a@x.test", "b@full.test", "c@x.test"))
    assert replies[-3:] == [
        "250 2.0.0 <a@x.test> OK: queued as Q1",
        "452 4.2.2 <b@full.test> mailbox full",
        "250 2.0.0 <c@x.test> OK: queued as Q1",
    ]
    # Stored once, for the recipients answered 250 (their RCPT parameters kept in step).
    (message,) = d.stored
    assert message.envelope.rcpt_tos == ["a@x.test", "c@x.test"]
    assert len(message.envelope.rcpt_options) == 2
    faults = d.of(FaultReplied)
    assert [(f.point, f.code, f.recipient) for f in faults] == [("EOD", 452, "b@full.test")]  # type: ignore[attr-defined]


def test_a_fault_for_every_recipient_stores_nothing() -> None:
    d = LMTPDriver(policy(faults=[r"EOD to=~@full\.test:452 4.2.2 mailbox full"]))
    d.feed(HELLO)
    replies = d.feed(transaction("a@full.test", "b@full.test") + "NOOP\r\n")
    assert replies[-3:] == [
        "452 4.2.2 <a@full.test> mailbox full",
        "452 4.2.2 <b@full.test> mailbox full",
        "250 2.0.0 OK",
    ]
    assert d.stored == []
    (refused,) = d.of(MessageRefused)
    assert refused.reason == REFUSED_FOR_EVERY_RECIPIENT  # type: ignore[attr-defined]


def test_every_n_counts_recipients_in_lmtp() -> None:
    d = LMTPDriver(policy(faults=["EOD:450:every=2"]))
    d.feed(HELLO)
    replies = d.feed(transaction("a@x.test", "b@x.test", "c@x.test", "d@x.test"))
    assert [r[:3] for r in replies[-4:]] == ["250", "450", "250", "450"]
    assert d.stored[0].envelope.rcpt_tos == ["a@x.test", "c@x.test"]


def test_a_421_for_one_recipient_answers_all_then_closes() -> None:
    d = LMTPDriver(policy(faults=[r"EOD to=b@*:421"]))
    d.feed(HELLO)
    replies = d.feed(transaction("a@x.test", "b@x.test", "c@x.test") + "NOOP\r\n")
    assert [r[:3] for r in replies[-3:]] == ["250", "421", "250"]
    assert d.closed and len(d.stored) == 1


def test_a_drop_at_eod_stores_nothing() -> None:
    d = LMTPDriver(policy())
    d.conn = ServerConnection(
        SessionPolicy(
            hostname="lmtp.test",
            lmtp=True,
            faults=FaultPlan.from_specs(drops=["EOD to=b@*"], random=random.random),
        )
    )
    d.feed(HELLO)
    d.feed(transaction("a@x.test", "b@x.test"))
    assert d.stored == [] and len(d.of(Dropped)) == 1 and d.closed


def test_a_delay_at_eod_comes_before_the_replies() -> None:
    d = LMTPDriver(policy())
    d.conn = ServerConnection(
        SessionPolicy(
            hostname="lmtp.test",
            lmtp=True,
            faults=FaultPlan.from_specs(delays=["EOD:2s"], random=random.random),
        )
    )
    d.feed(HELLO)
    conn = d.conn
    conn.receive_data(transaction("a@x.test", "b@x.test").encode())
    events = []
    while True:
        event = conn.next_event()
        if isinstance(event, MessageReceived):
            conn.message_stored("Q1")
            # The replies wait: the delay is the next event, before any is queued.
            pending = conn.data_to_send()
            assert b"queued as" not in pending
            events.append(conn.next_event())
            break
    assert isinstance(events[0], Delay) and events[0].seconds == 2.0
    rest = bytearray()
    while (event := conn.next_event()) is not NeedData:
        assert event is OutputFull
        rest += conn.data_to_send()
    rest += conn.data_to_send()
    assert rest.count(b"OK: queued as Q1") == 2


@pytest.mark.parametrize("bound", [4096, 100, 0])
def test_a_thousand_recipients_are_all_answered_within_the_output_bound(bound: int) -> None:
    d = LMTPDriver(policy(max_unsent_output=bound, max_recipients=1000))
    d.feed(HELLO)
    rcpts = [f"user{i}@x.test" for i in range(1000)]
    replies = d.feed(transaction(*rcpts) + "QUIT\r\n")
    eod = [r for r in replies if "queued as" in r]
    assert eod == [f"250 2.0.0 <{r}> OK: queued as Q1" for r in rcpts]
    assert replies[-1].startswith("221")
    if bound:
        # Each send asked for is the bound plus at most one reply (about 40 octets).
        assert d.sends and max(d.sends) < bound + 100
    assert d.stored[0].envelope.rcpt_tos == rcpts


def test_replies_still_owed_are_sent_before_a_closing_421() -> None:
    d = LMTPDriver(policy(max_unsent_output=100))
    d.feed(HELLO)
    conn = d.conn
    conn.receive_data(transaction(*(f"u{i}@x.test" for i in range(50))).encode())
    while not isinstance(event := conn.next_event(), MessageReceived):
        if event is OutputFull:
            conn.data_to_send()
    conn.message_stored("Q1")
    assert conn.next_event() is OutputFull  # the replies have begun, not all queued
    conn.timed_out()  # the session ends now, as on a timeout or a forced shutdown
    out = conn.data_to_send()
    assert out.count(b"OK: queued as Q1") == 50
    assert out.endswith(b"421 4.4.2 lmtp.test Error: timeout exceeded\r\n")


@pytest.mark.parametrize(
    ("tls", "auth_user", "smtputf8", "keyword"),
    [
        (False, None, False, "LMTP"),
        (True, None, False, "LMTPS"),
        (False, "alice", False, "LMTPA"),
        (True, "alice", False, "LMTPSA"),
        (False, None, True, "UTF8LMTP"),
    ],
)
def test_the_received_with_keyword_is_lmtp(
    tls: bool, auth_user: str | None, smtputf8: bool, keyword: str
) -> None:
    envelope = Envelope(greeting="LMTP", tls=tls, auth_user=auth_user, smtputf8=smtputf8)
    assert envelope.protocol == keyword


def test_starttls_starts_over_at_lhlo() -> None:
    d = LMTPDriver(policy(tls_available=True))
    assert "STARTTLS" in d.feed(HELLO)[0].split("|")
    assert d.feed("STARTTLS\r\n") == ["220 2.0.0 Ready to start TLS"]
    assert d.feed(ENVELOPE) == ["503 5.5.1 Error: send LHLO first"]
    assert "STARTTLS" not in d.feed(HELLO)[0].split("|")
    d.feed(transaction("a@x.test"))
    assert d.stored[0].envelope.protocol == "LMTPS"


def test_lhlo_is_a_fault_point() -> None:
    d = LMTPDriver(policy(faults=["LHLO:421"]))
    (reply,) = d.feed(HELLO)
    assert reply.startswith("421 4.3.0 ")
    assert d.closed
