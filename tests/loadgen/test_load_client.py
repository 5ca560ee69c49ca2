"""The sans-IO client connection, driven by feeding it reply bytes: no sockets, no clock."""

from __future__ import annotations

import base64
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstorm.wire.client import (
    Capabilities,
    ClientConfig,
    ClientConnection,
    Payload,
)
from mailstorm.wire.client_events import (
    ClientEvent,
    MessageDone,
    NeedData,
    PhaseDone,
    ReadyForTLS,
    SessionClosed,
    SessionFailed,
    SessionReady,
)
from mailstorm.wire.replies import ParsedReply

EHLO_PIPELINING = (
    b"250-sink.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n"
    b"250-CHUNKING\r\n250-STARTTLS\r\n250-AUTH PLAIN LOGIN\r\n250 SMTPUTF8\r\n"
)
EHLO_PLAIN = b"250-sink.test\r\n250 8BITMIME\r\n"


class Driver:
    """Feeds replies and collects what the connection sends and reports."""

    def __init__(self, config: ClientConfig, *, tls_active: bool = False) -> None:
        self.conn = ClientConnection(config, tls_active=tls_active)
        self.now = 0.0
        self.conn.connection_made(self.now)
        self.sent: list[bytes] = []

    def flush(self) -> bytes:
        data = self.conn.data_to_send(self.now)
        self.sent.append(data)
        return data

    def feed(self, data: bytes, advance: float = 1.0) -> list[ClientEvent]:
        self.now += advance
        self.conn.receive_data(data, self.now)
        events = []
        while (ev := self.conn.next_event()) is not NeedData:
            events.append(ev)
        return events


def phases(events: list[ClientEvent]) -> list[tuple[str, int, bool]]:
    return [(e.phase, e.reply.code, e.ok) for e in events if isinstance(e, PhaseDone)]


def ready_driver(config: ClientConfig, ehlo: bytes = EHLO_PIPELINING) -> Driver:
    d = Driver(config)
    d.feed(b"220 sink.test ESMTP\r\n")
    assert d.flush() == f"EHLO {config.ehlo_name}\r\n".encode()
    events = d.feed(ehlo)
    assert events[-1] == SessionReady()
    return d


PAYLOAD = Payload(b"Subject: t\r\n\r\n.leading dot\r\nbody\r\n")


def test_ehlo_capabilities_parsed() -> None:
    caps = Capabilities.from_ehlo(
        ParsedReply(
            250,
            ["sink.test hello", "pipelining", "SIZE 1000", "CHUNKING", "AUTH=LOGIN", "AUTH plain"],
        )
    )
    assert caps.greeting == "sink.test hello"
    assert caps.pipelining and caps.chunking
    assert caps.size == 1000
    assert caps.auth == {"LOGIN", "PLAIN"}
    assert not caps.starttls and not caps.smtputf8 and not caps.eightbitmime


def test_banner_ehlo_and_elapsed_times() -> None:
    d = Driver(ClientConfig(ehlo_name="client.test"))
    events = d.feed(b"220 hi\r\n", advance=0.5)
    assert phases(events) == [("banner", 220, True)]
    assert events[0].elapsed == 0.5
    d.now = 10.0
    assert d.flush() == b"EHLO client.test\r\n"
    events = d.feed(EHLO_PIPELINING, advance=0.25)
    assert phases(events) == [("ehlo", 250, True)]
    assert events[0].elapsed == 0.25
    assert events[-1] == SessionReady()
    assert d.conn.pipelining
    assert d.conn.capabilities.size == 1000000


def test_pipelined_message_is_one_write_per_group() -> None:
    d = ready_driver(ClientConfig())
    d.conn.start_message("a@x.test", ["b@y.test", "c@y.test"], PAYLOAD, head=b"X-N: 1\r\n")
    group = d.flush()
    assert group == (
        b"MAIL FROM:<a@x.test> SIZE=%d\r\nRCPT TO:<b@y.test>\r\nRCPT TO:<c@y.test>\r\nDATA\r\n"
        % (len(PAYLOAD) + 8)
    )
    events = d.feed(b"250 ok\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert phases(events) == [
        ("mail", 250, True),
        ("rcpt", 250, True),
        ("rcpt", 250, True),
        ("data", 354, True),
    ]
    body = d.flush()
    assert body == b"X-N: 1\r\nSubject: t\r\n\r\n..leading dot\r\nbody\r\n.\r\n"
    events = d.feed(b"250 queued\r\n", advance=2.0)
    assert phases(events) == [("eod", 250, True)]
    assert events[0].elapsed == 2.0
    done = events[-1]
    assert isinstance(done, MessageDone) and done.delivered and done.accepted_rcpts == 2
    assert d.conn.is_ready


STUFFED = b"Subject: t\r\n\r\n..leading dot\r\nbody\r\n.\r\n"
GROUP = b"MAIL FROM:<%s> SIZE=%d\r\nRCPT TO:<b@y.test>\r\nDATA\r\n"


def _in_data(d: Driver, sender: bytes = b"a@x.test") -> None:
    """Start a message and answer its group up to the 354."""
    d.conn.start_message(sender.decode(), ["b@y.test"], PAYLOAD)
    assert d.flush() == GROUP % (sender, len(PAYLOAD))
    d.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")


def test_next_message_rides_with_the_content() -> None:
    # RFC 2920 3.1: content first, then the next message's MAIL, RCPT and DATA, in one write.
    d = ready_driver(ClientConfig())
    assert not d.conn.can_start_next
    _in_data(d)
    assert d.conn.can_start_next
    d.conn.start_message("n@x.test", ["b@y.test"], PAYLOAD)
    assert not d.conn.can_start_next  # one message deep
    assert d.flush() == STUFFED + GROUP % (b"n@x.test", len(PAYLOAD))
    events = d.feed(b"250 queued\r\n250 ok\r\n250 ok\r\n354 go\r\n", advance=3.0)
    assert phases(events) == [
        ("eod", 250, True),
        ("mail", 250, True),
        ("rcpt", 250, True),
        ("data", 354, True),
    ]
    assert all(e.elapsed == 3.0 for e in events if isinstance(e, PhaseDone))
    done = [e for e in events if isinstance(e, MessageDone)]
    assert len(done) == 1 and done[0].delivered
    # The second message is current now, its content queued: a third may follow it.
    assert not d.conn.is_ready and d.conn.can_start_next
    assert d.flush() == STUFFED
    events = d.feed(b"250 queued\r\n")
    assert isinstance(events[-1], MessageDone) and events[-1].delivered
    assert d.conn.is_ready and not d.conn.can_start_next


def test_next_message_refused_after_the_previous_was_delivered() -> None:
    d = ready_driver(ClientConfig())
    _in_data(d)
    d.conn.start_message("n@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    events = d.feed(b"250 queued\r\n550 no\r\n503 need mail\r\n503 need mail\r\n")
    # The 503s only follow from the refused MAIL: one error, counted where it happened.
    assert phases(events) == [("eod", 250, True), ("mail", 550, False)]
    done = [e for e in events if isinstance(e, MessageDone)]
    assert [m.delivered for m in done] == [True, False]
    assert done[1].failed_phase == "mail"
    assert d.conn.is_ready and d.flush() == b""  # no RSET: no transaction was opened


def test_previous_message_refused_at_end_of_data_next_goes_on() -> None:
    d = ready_driver(ClientConfig())
    _in_data(d)
    d.conn.start_message("n@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    events = d.feed(b"554 rejected\r\n250 ok\r\n250 ok\r\n354 go\r\n")
    assert phases(events)[0] == ("eod", 554, False)
    done = [e for e in events if isinstance(e, MessageDone)]
    assert len(done) == 1 and not done[0].delivered and done[0].failed_phase == "eod"
    assert d.flush() == STUFFED
    events = d.feed(b"250 queued\r\n")
    assert isinstance(events[-1], MessageDone) and events[-1].delivered


def test_421_with_a_message_queued_behind_ends_the_session() -> None:
    d = ready_driver(ClientConfig())
    _in_data(d)
    d.conn.start_message("n@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    events = d.feed(b"421 closing\r\n")
    assert isinstance(events[-1], SessionFailed)
    assert not d.conn.can_start_next and d.flush() == b""


@pytest.mark.parametrize(
    ("config", "ehlo"),
    [
        (ClientConfig(pipelining="off"), EHLO_PIPELINING),
        (ClientConfig(), EHLO_PLAIN),  # auto, and the server does not offer PIPELINING
    ],
)
def test_no_next_message_without_pipelined_data(config: ClientConfig, ehlo: bytes) -> None:
    d = ready_driver(config, ehlo)
    d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    for reply in (b"250 ok\r\n", b"250 ok\r\n", b"354 go\r\n"):
        assert not d.conn.can_start_next
        d.feed(reply)
        d.flush()
    assert not d.conn.can_start_next
    with pytest.raises(RuntimeError):
        d.conn.start_message("n@x.test", ["b@y.test"], PAYLOAD)


def test_no_next_message_with_lmtp() -> None:
    # LMTP answers end of data once per recipient: not worth the bookkeeping.
    d = Driver(ClientConfig(lmtp=True))
    d.feed(b"220 lmtp.test\r\n")
    assert d.flush().startswith(b"LHLO ")
    assert d.feed(EHLO_PIPELINING)[-1] == SessionReady()
    _in_data(d)
    assert not d.conn.can_start_next


def test_no_next_message_with_bdat() -> None:
    d = ready_driver(ClientConfig(chunking=True))
    d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    assert not d.conn.can_start_next


def test_replies_split_across_reads() -> None:
    d = ready_driver(ClientConfig())
    d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    assert d.feed(b"25") == []
    events = d.feed(b"0 ok\r\n250 o")
    assert phases(events) == [("mail", 250, True)]
    events = d.feed(b"k\r\n354 go\r\n")
    assert phases(events) == [("rcpt", 250, True), ("data", 354, True)]


def test_unpipelined_message_waits_for_each_reply() -> None:
    d = ready_driver(ClientConfig(pipelining="off"))
    assert not d.conn.pipelining
    d.conn.start_message("a@x.test", ["b@y.test", "c@y.test"], PAYLOAD)
    assert d.flush() == b"MAIL FROM:<a@x.test> SIZE=%d\r\n" % len(PAYLOAD)
    d.feed(b"250 ok\r\n")
    assert d.flush() == b"RCPT TO:<b@y.test>\r\n"
    d.feed(b"250 ok\r\n")
    assert d.flush() == b"RCPT TO:<c@y.test>\r\n"
    d.feed(b"550 no such user\r\n")
    assert d.flush() == b"DATA\r\n"
    d.feed(b"354 go\r\n")
    assert d.flush().endswith(b"\r\n.\r\n")
    events = d.feed(b"250 ok\r\n")
    done = events[-1]
    assert isinstance(done, MessageDone)
    assert done.delivered and done.accepted_rcpts == 1
    assert done.failed_phase == "rcpt" and done.reply.code == 550


def test_pipelining_auto_off_when_not_offered_and_forced_on() -> None:
    assert not ready_driver(ClientConfig(), EHLO_PLAIN).conn.pipelining
    assert ready_driver(ClientConfig(pipelining="on"), EHLO_PLAIN).conn.pipelining
    assert not ready_driver(ClientConfig(pipelining="off")).conn.pipelining


def test_pipelined_mail_refused_counts_once_and_needs_no_rset() -> None:
    d = ready_driver(ClientConfig())
    d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    events = d.feed(b"451 4.3.0 try later\r\n503 5.5.1 need MAIL\r\n503 5.5.1 need RCPT\r\n")
    assert phases(events) == [("mail", 451, False)]
    done = events[-1]
    assert isinstance(done, MessageDone) and not done.delivered
    assert done.failed_phase == "mail" and done.reply.code == 451
    assert d.flush() == b""
    assert d.conn.is_ready


def test_pipelined_all_rcpts_refused_then_rset() -> None:
    d = ready_driver(ClientConfig())
    d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    events = d.feed(b"250 ok\r\n550 5.1.1 unknown\r\n554 5.5.1 no valid recipients\r\n")
    assert phases(events) == [("mail", 250, True), ("rcpt", 550, False)]
    assert d.flush() == b"RSET\r\n"
    events = d.feed(b"250 flushed\r\n")
    done = events[-1]
    assert isinstance(done, MessageDone) and not done.delivered and done.failed_phase == "rcpt"


def test_pipelined_data_354_without_recipients_sends_lone_dot() -> None:
    d = ready_driver(ClientConfig())
    d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    d.feed(b"250 ok\r\n550 unknown\r\n354 go ahead anyway\r\n")
    assert d.flush() == b".\r\n"
    events = d.feed(b"554 no recipients\r\n")
    assert isinstance(events[-1], MessageDone) and not events[-1].delivered
    assert phases(events) == []


def test_eod_refused_is_a_failed_message_without_rset() -> None:
    d = ready_driver(ClientConfig())
    d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    d.feed(b"250 ok\r\n250 ok\r\n354 go\r\n")
    d.flush()
    events = d.feed(b"552 5.3.4 too big\r\n")
    assert phases(events) == [("eod", 552, False)]
    assert isinstance(events[-1], MessageDone) and not events[-1].delivered
    assert d.flush() == b""


def test_data_refused_then_rset() -> None:
    d = ready_driver(ClientConfig())
    d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    events = d.feed(b"250 ok\r\n250 ok\r\n451 4.3.0 no\r\n")
    assert phases(events)[-1] == ("data", 451, False)
    assert d.flush() == b"RSET\r\n"
    events = d.feed(b"250 ok\r\n")
    assert isinstance(events[-1], MessageDone) and events[-1].failed_phase == "data"


def test_bdat_pipelined_single_chunk() -> None:
    d = ready_driver(ClientConfig(chunking=True))
    d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD, head=b"X-N: 1\r\n")
    content = b"X-N: 1\r\n" + PAYLOAD.raw
    assert d.flush() == (
        b"MAIL FROM:<a@x.test> SIZE=%d\r\nRCPT TO:<b@y.test>\r\n" % len(content)
        + b"BDAT %d LAST\r\n" % len(content)
        + content
    )
    events = d.feed(b"250 ok\r\n250 ok\r\n250 2.0.0 queued\r\n")
    assert phases(events) == [("mail", 250, True), ("rcpt", 250, True), ("eod", 250, True)]
    assert isinstance(events[-1], MessageDone) and events[-1].delivered


def test_bdat_chunks_framed_by_size() -> None:
    d = ready_driver(ClientConfig(chunking=True, chunk_size=16))
    d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD)
    wire = d.flush()
    raw = PAYLOAD.raw
    expected = b"MAIL FROM:<a@x.test> SIZE=%d\r\nRCPT TO:<b@y.test>\r\n" % len(raw)
    expected += b"BDAT 16\r\n" + raw[:16] + b"BDAT 16\r\n" + raw[16:32]
    expected += b"BDAT %d LAST\r\n" % len(raw[32:]) + raw[32:]
    assert wire == expected
    events = d.feed(b"250 ok\r\n250 ok\r\n250 16 octets\r\n250 16 octets\r\n250 done\r\n")
    assert phases(events) == [
        ("mail", 250, True),
        ("rcpt", 250, True),
        ("bdat", 250, True),
        ("bdat", 250, True),
        ("eod", 250, True),
    ]
    assert events[-1].delivered


def test_bdat_unpipelined_sends_chunks_one_by_one() -> None:
    d = ready_driver(ClientConfig(chunking=True, chunk_size=30, pipelining="off"))
    d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    d.feed(b"250 ok\r\n")
    d.flush()
    d.feed(b"250 ok\r\n")
    assert d.flush() == b"BDAT 30\r\n" + PAYLOAD.raw[:30]
    d.feed(b"250 ok\r\n")
    assert d.flush() == b"BDAT %d LAST\r\n" % len(PAYLOAD.raw[30:]) + PAYLOAD.raw[30:]
    events = d.feed(b"250 ok\r\n")
    assert events[-1].delivered


def test_chunking_required_but_not_offered() -> None:
    d = Driver(ClientConfig(chunking=True))
    d.feed(b"220 hi\r\n")
    d.flush()
    events = d.feed(EHLO_PLAIN)
    assert isinstance(events[-1], SessionFailed)
    assert events[-1].kind == "protocol" and "CHUNKING" in events[-1].detail


def test_lmtp_one_reply_per_accepted_recipient() -> None:
    d = Driver(ClientConfig(lmtp=True))
    d.feed(b"220 lmtp\r\n")
    assert d.flush() == b"LHLO mailstorm.test\r\n"
    d.feed(b"250-lmtp\r\n250 PIPELINING\r\n")
    d.conn.start_message("a@x.test", ["b@y.test", "c@y.test", "d@y.test"], PAYLOAD)
    d.flush()
    d.feed(b"250 ok\r\n250 ok\r\n550 unknown\r\n250 ok\r\n354 go\r\n")
    d.flush()
    events = d.feed(b"250 delivered to b\r\n")
    assert phases(events) == [("eod", 250, True)]
    assert not any(isinstance(e, MessageDone) for e in events)
    events = d.feed(b"452 mailbox full for d\r\n")
    assert phases(events) == [("eod", 452, False)]
    done = events[-1]
    assert isinstance(done, MessageDone) and done.delivered and done.accepted_rcpts == 2
    assert d.conn.is_ready


def test_starttls_then_ehlo_again() -> None:
    d = Driver(ClientConfig(starttls=True))
    d.feed(b"220 hi\r\n")
    d.flush()
    d.feed(EHLO_PIPELINING)
    assert d.flush() == b"STARTTLS\r\n"
    events = d.feed(b"220 go ahead\r\n")
    assert phases(events) == [("starttls", 220, True)]
    assert events[-1] == ReadyForTLS()
    d.conn.tls_started()
    assert d.conn.tls_active
    assert d.flush() == b"EHLO mailstorm.test\r\n"
    events = d.feed(EHLO_PLAIN)
    assert events[-1] == SessionReady()


def test_starttls_injection_is_refused() -> None:
    d = Driver(ClientConfig(starttls=True))
    d.feed(b"220 hi\r\n")
    d.flush()
    d.feed(EHLO_PIPELINING)
    d.flush()
    events = d.feed(b"220 go ahead\r\n250 injected\r\n")
    assert isinstance(events[-1], SessionFailed) and events[-1].kind == "protocol"


def test_starttls_not_offered() -> None:
    d = Driver(ClientConfig(starttls=True))
    d.feed(b"220 hi\r\n")
    d.flush()
    events = d.feed(EHLO_PLAIN)
    assert isinstance(events[-1], SessionFailed)
    assert events[-1].phase == "starttls" and events[-1].kind == "protocol"


def test_auth_plain() -> None:
    d = Driver(ClientConfig(auth_user="alice", auth_password="s3cret"))
    d.feed(b"220 hi\r\n")
    d.flush()
    d.feed(EHLO_PIPELINING)
    token = base64.b64encode(b"\0alice\0s3cret")
    assert d.flush() == b"AUTH PLAIN " + token + b"\r\n"
    events = d.feed(b"235 2.7.0 ok\r\n")
    assert phases(events) == [("auth", 235, True)]
    assert events[-1] == SessionReady()


def test_auth_login_elapsed_covers_the_whole_exchange() -> None:
    d = Driver(ClientConfig(auth_user="alice", auth_password="s3cret", auth_mech="LOGIN"))
    d.feed(b"220 hi\r\n")
    d.flush()
    d.feed(EHLO_PIPELINING)
    assert d.flush() == b"AUTH LOGIN\r\n"
    assert d.feed(b"334 VXNlcm5hbWU6\r\n") == []
    assert d.flush() == base64.b64encode(b"alice") + b"\r\n"
    assert d.feed(b"334 UGFzc3dvcmQ6\r\n") == []
    assert d.flush() == base64.b64encode(b"s3cret") + b"\r\n"
    events = d.feed(b"235 ok\r\n")
    assert phases(events) == [("auth", 235, True)]
    assert events[0].elapsed == 3.0
    assert events[-1] == SessionReady()


def test_auth_refused_fails_the_session() -> None:
    d = Driver(ClientConfig(auth_user="alice", auth_password="bad"))
    d.feed(b"220 hi\r\n")
    d.flush()
    d.feed(EHLO_PIPELINING)
    d.flush()
    events = d.feed(b"535 5.7.8 bad credentials\r\n")
    assert phases(events) == [("auth", 535, False)]
    assert isinstance(events[-1], SessionFailed) and events[-1].kind is None


def test_auth_mechanism_not_offered() -> None:
    d = Driver(ClientConfig(auth_user="alice", auth_password="x"))
    d.feed(b"220 hi\r\n")
    d.flush()
    events = d.feed(EHLO_PLAIN)
    assert isinstance(events[-1], SessionFailed) and "AUTH PLAIN" in events[-1].detail


def test_banner_refused() -> None:
    d = Driver(ClientConfig())
    events = d.feed(b"554 5.3.2 go away\r\n")
    assert phases(events) == [("banner", 554, False)]
    assert isinstance(events[-1], SessionFailed) and events[-1].phase == "banner"


def test_helo_fallback() -> None:
    d = Driver(ClientConfig())
    d.feed(b"220 old\r\n")
    d.flush()
    assert d.feed(b"502 what\r\n") == []
    assert d.flush() == b"HELO mailstorm.test\r\n"
    events = d.feed(b"250 old\r\n")
    assert events[-1] == SessionReady() and not d.conn.pipelining


def test_421_ends_the_session_anywhere() -> None:
    d = ready_driver(ClientConfig())
    d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    events = d.feed(b"421 4.3.2 shutting down\r\n")
    assert phases(events) == [("mail", 421, False)]
    assert isinstance(events[-1], SessionFailed) and events[-1].kind is None
    assert d.conn.is_closed


def test_connection_closed_mid_message() -> None:
    d = ready_driver(ClientConfig())
    d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD)
    d.flush()
    events = d.feed(b"250 ok\r\n")
    events = d.feed(b"")
    assert isinstance(events[-1], SessionFailed)
    assert events[-1].kind == "reset" and events[-1].phase == "rcpt"


def test_garbage_is_a_protocol_violation() -> None:
    d = Driver(ClientConfig())
    events = d.feed(b"HTTP/1.1 400 Bad Request\r\n")
    assert isinstance(events[-1], SessionFailed) and events[-1].kind == "protocol"


def test_unsolicited_reply_is_a_protocol_violation() -> None:
    d = ready_driver(ClientConfig())
    events = d.feed(b"250 surprise\r\n")
    assert isinstance(events[-1], SessionFailed) and events[-1].kind == "protocol"


def test_quit() -> None:
    d = ready_driver(ClientConfig())
    d.conn.quit()
    assert d.flush() == b"QUIT\r\n"
    events = d.feed(b"221 bye\r\n")
    assert phases(events) == [("quit", 221, True)]
    assert events[-1] == SessionClosed()
    assert d.feed(b"") == []


def test_eof_after_quit_is_a_clean_close() -> None:
    d = ready_driver(ClientConfig())
    d.conn.quit()
    d.flush()
    assert d.feed(b"") == [SessionClosed()]


def test_mail_parameters_follow_capabilities() -> None:
    eight_bit = Payload("Subject: é\r\n\r\nbody\r\n".encode())
    d = ready_driver(ClientConfig())
    d.conn.start_message("ü@x.test", ["b@y.test"], eight_bit)
    first = d.flush().split(b"\r\n")[0]
    assert first == "MAIL FROM:<ü@x.test> SIZE=21 BODY=8BITMIME SMTPUTF8".encode()
    d = ready_driver(ClientConfig(), EHLO_PLAIN)
    d.conn.start_message("a@x.test", ["b@y.test"], eight_bit)
    assert d.flush().split(b"\r\n")[0] == b"MAIL FROM:<a@x.test> BODY=8BITMIME"


def test_payload_normalizes_and_stuffs_once() -> None:
    p = Payload(b".a\nb\rc")
    assert p.raw == b".a\r\nb\r\nc\r\n"
    assert p.stuffed == b"..a\r\nb\r\nc\r\n.\r\n"
    assert p.stuffed is p.stuffed
    assert len(p) == len(p.raw)


def test_start_message_requires_ready() -> None:
    d = Driver(ClientConfig())
    with pytest.raises(RuntimeError):
        d.conn.start_message("a@x.test", ["b@y.test"], PAYLOAD)


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_any_split_of_the_reply_stream_gives_the_same_events(cuts: list[int]) -> None:
    stream = (
        b"220 hi\r\n"
        + EHLO_PIPELINING
        + b"250 ok\r\n250 ok\r\n550 5.1.1 unknown\r\n354 go\r\n250-2.0.0 queued\r\n250 as X\r\n"
    )
    points = sorted({min(c, len(stream)) for c in cuts} | {0, len(stream)})

    def run(chunks: list[bytes]) -> list[str]:
        conn = ClientConnection(ClientConfig())
        conn.connection_made(0.0)
        seen: list[str] = []
        conn.data_to_send(0.0)
        for chunk in chunks:
            conn.receive_data(chunk, 1.0)
            while (ev := conn.next_event()) is not NeedData:
                seen.append(repr(ev) if not isinstance(ev, PhaseDone) else f"{ev.phase}{ev.ok}")
                if ev == SessionReady():
                    conn.start_message("a@x.test", ["b@y.test", "c@y.test"], PAYLOAD)
                # Whatever the client wants to send goes out before the next reply is read.
                conn.data_to_send(1.0)
        return seen

    whole = run([stream])
    assert whole[-1].startswith("MessageDone(delivered=True, accepted_rcpts=1")
    assert run([stream[a:b] for a, b in itertools.pairwise(points)]) == whole


def test_one_vocabulary_with_the_server() -> None:
    """'Need data' is the server's own sentinel; no client event borrows a server event's name
    for something else."""
    from mailstorm.wire import client_events, events

    d = ready_driver(ClientConfig())
    assert d.conn.next_event() is events.NeedData
    assert set(client_events.__all__) & set(events.__all__) == {"NeedData"}
