"""The fault plan (``mailstorm.wire.faults``) and the core carrying it out, fed bytes.

Spec parsing (good specs, one-line errors naming the problem, a hypothesis property), the
exactness of ``every=N``, seeded probabilities, address conditions, magic addresses, and the
events and replies of ``ServerConnection`` at each point.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mailstorm.wire.events import (
    Closed,
    Delay,
    Dropped,
    Event,
    FaultReplied,
    MessageReceived,
    NeedData,
)
from mailstorm.wire.faults import (
    MAX_ONCE_KEYS,
    POINTS,
    FaultPlan,
    FaultSpecError,
    Kind,
    default_reply,
    parse_rule,
)
from mailstorm.wire.server import ServerConnection, SessionPolicy


def plan(*faults: str, delays: tuple[str, ...] = (), drops: tuple[str, ...] = (),
         magic: bool = False, seed: int = 1) -> FaultPlan:
    made = FaultPlan.from_specs(faults=faults, delays=delays, drops=drops,
                                magic_addresses=magic, random=random.Random(seed).random,
                                hostname="sink.test")
    assert made is not None
    return made


# ---- parsing -----------------------------------------------------------------------------

def test_the_issue_examples_parse() -> None:
    rule = parse_rule(Kind.REPLY, "RCPT:450 4.2.0 mailbox busy:10%")
    assert (rule.point, rule.probability, rule.every) == ("RCPT", 0.1, 0)
    assert rule.reply is not None
    assert rule.reply.to_bytes() == b"450 4.2.0 mailbox busy\r\n"
    rule = parse_rule(Kind.REPLY, r"RCPT to=~@reject\.test:550")
    assert rule.reply is not None and rule.reply.code == 550
    assert rule.matches("a@b", ["x@reject.test"]) and not rule.matches("a@b", ["x@rejectXtest"])
    rule = parse_rule(Kind.REPLY, "MAIL from=bounce@*:451")
    assert rule.matches("bounce@example.com", []) and not rule.matches("xbounce@example.com", [])
    assert parse_rule(Kind.REPLY, "EOD:452:every=5").every == 5
    assert parse_rule(Kind.DELAY, "EOD:2s").delay == 2.0
    assert parse_rule(Kind.DELAY, "RCPT:100ms:5%").delay == pytest.approx(0.1)
    assert parse_rule(Kind.DELAY, "BANNER:10s").point == "BANNER"
    assert parse_rule(Kind.DROP, "DATA:1%").probability == 0.01
    assert parse_rule(Kind.DROP, "EOD:every=100").every == 100
    assert parse_rule(Kind.DROP, "eod").point == "EOD"


def test_a_regex_condition_may_contain_colons() -> None:
    rule = parse_rule(Kind.REPLY, "RCPT to=~^(?:a|b)@x:550:every=2")
    assert rule.every == 2 and rule.matches(None, ["b@x"]) and not rule.matches(None, ["c@x"])


def test_a_code_alone_gets_an_enhanced_code_and_text() -> None:
    for code in (421, 450, 451, 452, 454, 500, 550, 552, 553, 554, 499, 599):
        reply = default_reply(code)
        assert reply.enhanced is not None and reply.enhanced[0] == str(code)[0]
        assert reply.lines[0]
    assert default_reply(550, "RCPT").enhanced == "5.1.1"
    assert default_reply(421, hostname="sink.test").lines[0].startswith("sink.test ")
    rule = parse_rule(Kind.REPLY, "RCPT:450 try later")
    assert rule.reply is not None and rule.reply.to_bytes() == b"450 4.2.0 try later\r\n"


@pytest.mark.parametrize(
    ("kind", "spec", "problem"),
    [
        (Kind.REPLY, "RCPT:250", "not a failure"),
        (Kind.REPLY, "RCPT:650", "not a failure"),
        (Kind.REPLY, "RCPT", "expected POINT:REPLY"),
        (Kind.REPLY, "RCPT:45", "bad reply"),
        (Kind.REPLY, "FOO:550", "unknown point 'FOO'"),
        (Kind.REPLY, ":550", "the point is missing"),
        (Kind.REPLY, "RCPT:450 5.1.1 x", "does not match"),
        (Kind.REPLY, "RCPT to=~(:550", "bad regular expression"),
        (Kind.REPLY, "RCPT cc=x:550", "bad condition"),
        (Kind.REPLY, "MAIL to=x@y:550", "to= cannot be known at MAIL"),
        (Kind.REPLY, "EHLO from=x*:550", "from= cannot be known at EHLO"),
        (Kind.REPLY, "EOD:452:every=0", "at least 1"),
        (Kind.REPLY, "EOD:452:0%", "bad probability"),
        (Kind.DELAY, "EOD", "expected POINT:DURATION"),
        (Kind.DELAY, "EOD:soon", "bad duration"),
        (Kind.DELAY, "EOD:0s", "more than 0"),
        (Kind.DROP, "DATA:101%", "bad probability"),
        (Kind.DROP, "DATA:junk", "unknown point"),
    ],
)
def test_bad_specs_are_one_line_errors_naming_the_problem(
    kind: Kind, spec: str, problem: str
) -> None:
    with pytest.raises(FaultSpecError) as info:
        parse_rule(kind, spec)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"bad --{kind.value} {spec!r}: ")
    assert problem in message


@given(st.text(max_size=40), st.sampled_from(list(Kind)))
def test_any_text_parses_or_gives_a_spec_error(text: str, kind: Kind) -> None:
    try:
        rule = parse_rule(kind, text)
    except FaultSpecError as exc:
        assert "\n" not in str(exc).replace(repr(text), "")
    else:
        assert rule.point in POINTS


@given(
    point=st.sampled_from(["RCPT", "EOD", "DATA"]),
    code=st.integers(400, 599),
    trigger=st.one_of(st.none(), st.integers(1, 100)),
    every=st.booleans(),
)
def test_generated_fault_specs_round_trip(
    point: str, code: int, trigger: int | None, every: bool
) -> None:
    spec = f"{point}:{code}"
    if trigger is not None:
        spec += f":every={trigger}" if every else f":{trigger}%"
    rule = parse_rule(Kind.REPLY, spec)
    assert rule.point == point and rule.reply is not None and rule.reply.code == code
    if trigger is None:
        assert rule.every == 0 and rule.probability is None
    elif every:
        assert rule.every == trigger
    else:
        assert rule.probability == pytest.approx(trigger / 100)


# ---- decisions ---------------------------------------------------------------------------

def test_every_n_is_exact_and_counts_only_matching_occurrences() -> None:
    p = plan("RCPT to=*@a.test:450:every=3")
    fired = [p.decide("RCPT", "s@x", [f"r{i}@{'a' if i % 2 else 'b'}.test"]) for i in range(60)]
    # 30 recipients match; every third of those fires, at the 3rd, 6th, ... matching one.
    hits = [i for i, verdict in enumerate(fired) if verdict is not None]
    assert len(hits) == 10
    assert hits[0] == 5 and all(i % 2 for i in hits)


def test_probability_is_reproducible_with_a_seed() -> None:
    def run(seed: int) -> list[bool]:
        p = plan("RCPT:450:30%", seed=seed)
        return [p.decide("RCPT", "s", ["r"]) is not None for _ in range(1000)]

    first = run(7)
    assert first == run(7)
    assert 200 < sum(first) < 400  # 30% of 1000, far outside any plausible deviation
    assert first != run(8)


def test_kinds_combine_and_a_drop_makes_the_reply_moot() -> None:
    p = plan("RCPT:450", delays=("RCPT:1s",))
    verdict = p.decide("RCPT", "s", ["r"])
    assert verdict is not None and verdict.reply is not None and verdict.delay == 1.0
    p = plan("RCPT:450", drops=("RCPT",))
    verdict = p.decide("RCPT", "s", ["r"])
    assert verdict is not None and verdict.drop and verdict.reply is None


def test_no_specs_no_plan() -> None:
    assert FaultPlan.from_specs(random=random.random) is None


def test_magic_addresses() -> None:
    p = plan(magic=True)
    first = p.decide("RCPT", "s", ["450-once+k1@fault.invalid"])
    assert first is not None and first.reply is not None and first.reply.code == 450
    assert p.decide("RCPT", "s", ["450-once+k1@fault.invalid"]) is None  # the retry
    assert p.decide("RCPT", "s", ["450-once+K1@FAULT.INVALID"]) is None  # keys ignore case
    other = p.decide("RCPT", "s", ["450-once+k2@fault.invalid"])
    assert other is not None and other.reply is not None
    verdict = p.decide("RCPT", "s", ["550@fault.invalid"])
    assert verdict is not None and verdict.reply is not None
    assert verdict.reply.to_bytes().startswith(b"550 5.1.1 ")
    verdict = p.decide("RCPT", "s", ["delay-250ms@fault.invalid"])
    assert verdict is not None and verdict.reply is None and verdict.delay == 0.25
    verdict = p.decide("RCPT", "s", ["drop@fault.invalid"])
    assert verdict is not None and verdict.drop
    unknown = p.decide("RCPT", "s", ["hello@fault.invalid"])
    assert unknown is not None and unknown.reply is not None and unknown.reply.code == 550
    assert p.decide("RCPT", "s", ["someone@example.com"]) is None
    assert plan("EOD:452").decide("RCPT", "s", ["550@fault.invalid"]) is None  # off


def test_magic_once_keys_are_bounded() -> None:
    p = plan(magic=True)
    for i in range(MAX_ONCE_KEYS + 10):
        assert p.decide("RCPT", "s", [f"450-once+{i}@fault.invalid"]) is not None
    assert len(p._once_keys) == MAX_ONCE_KEYS
    # The oldest keys were forgotten: they fail once more.
    assert p.decide("RCPT", "s", ["450-once+0@fault.invalid"]) is not None


# ---- the core carrying it out -------------------------------------------------------------

def connection(p: FaultPlan) -> ServerConnection:
    return ServerConnection(SessionPolicy(hostname="sink.test", faults=p))


def events_for(conn: ServerConnection, data: bytes) -> list[Event]:
    conn.receive_data(data)
    events: list[Event] = []
    while True:
        event = conn.next_event()
        events.append(event)
        if event is NeedData or isinstance(event, Closed | Dropped | MessageReceived | Delay):
            return events


TRANSACTION = b"EHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<r@x>\r\nDATA\r\n"
BODY = b"Subject: t\r\n\r\nhi\r\n.\r\n"


def test_eod_fault_every_n_refuses_without_a_message() -> None:
    conn = connection(plan("EOD:452:every=2"))
    conn.data_to_send()
    events_for(conn, TRANSACTION)
    first = events_for(conn, BODY)
    assert isinstance(first[0], MessageReceived)
    conn.message_stored("Q1")
    conn.data_to_send()
    assert conn.next_event() is NeedData
    events_for(conn, b"MAIL FROM:<s@x>\r\nRCPT TO:<r@x>\r\nDATA\r\n")
    conn.data_to_send()
    second = events_for(conn, BODY)
    assert isinstance(second[0], FaultReplied) and second[0].point == "EOD"
    assert not any(isinstance(e, MessageReceived) for e in second)
    assert conn.data_to_send().startswith(b"452 4.3.1 ")
    assert not conn.in_transaction


def test_rcpt_fault_matches_the_address_and_keeps_the_transaction() -> None:
    conn = connection(plan(r"RCPT to=~@reject\.test:550"))
    events_for(conn, b"EHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<a@reject.test>\r\n"
                     b"RCPT TO:<b@ok.test>\r\n")
    replies = conn.data_to_send().split(b"\r\n")
    assert replies[-3].startswith(b"550 5.1.1 ") and replies[-2].startswith(b"250 2.1.5")
    assert conn.envelope is not None and conn.envelope.rcpt_tos == ["b@ok.test"]


def test_a_421_fault_ends_the_session() -> None:
    conn = connection(plan("EHLO:421"))
    events = events_for(conn, b"EHLO c\r\nMAIL FROM:<s@x>\r\n")
    assert isinstance(events[0], FaultReplied) and isinstance(events[-1], Closed)
    assert conn.data_to_send().endswith(b"421 4.3.0 sink.test Service not available, "
                                        b"closing transmission channel\r\n")


def test_a_delay_comes_before_its_answer_is_released() -> None:
    conn = connection(plan(delays=("RCPT:2s",)))
    events = events_for(conn, b"EHLO c\r\nMAIL FROM:<s@x>\r\nRCPT TO:<r@x>\r\n")
    assert events[-1] == Delay("RCPT", 2.0, "delay 'RCPT:2s'")
    assert conn.data_to_send().endswith(b"250 2.1.5 Recipient OK\r\n")


def test_banner_delay_fault_and_drop() -> None:
    conn = connection(plan(delays=("BANNER:3s",)))
    assert conn.next_event() == Delay("BANNER", 3.0, "delay 'BANNER:3s'")
    assert conn.data_to_send().startswith(b"220 ")
    assert conn.next_event() is NeedData

    conn = connection(plan("BANNER:554"))
    assert isinstance(conn.next_event(), FaultReplied)
    assert conn.data_to_send() == b"554 5.3.2 No SMTP service here\r\n"
    events_for(conn, b"EHLO c\r\n")
    assert conn.data_to_send().startswith(b"503 5.5.1 ")
    assert isinstance(events_for(conn, b"QUIT\r\n")[-1], Closed)

    conn = connection(plan(drops=("BANNER",)))
    assert isinstance(conn.next_event(), Dropped)
    assert conn.data_to_send() == b""
    assert isinstance(conn.next_event(), Closed)


def test_banner_faults_outlive_an_implicit_tls_handshake() -> None:
    conn = ServerConnection(SessionPolicy(faults=plan(delays=("BANNER:3s",))), tls_active=True)
    conn.tls_started()  # implicit TLS: the handshake comes before the banner leaves
    assert isinstance(conn.next_event(), Delay)
    assert conn.data_to_send().startswith(b"220 ")
    conn = ServerConnection(SessionPolicy(faults=plan(drops=("BANNER",))), tls_active=True)
    conn.tls_started()
    assert isinstance(conn.next_event(), Dropped)
    assert isinstance(conn.next_event(), Closed)
    conn = ServerConnection(SessionPolicy(faults=plan("BANNER:554")), tls_active=True)
    conn.tls_started()
    assert isinstance(conn.next_event(), FaultReplied)
    events_for(conn, b"EHLO c\r\n")
    assert conn.data_to_send().endswith(b"503 5.5.1 Error: no SMTP service here, send QUIT\r\n")


def test_drop_at_data_closes_once_content_arrives() -> None:
    conn = connection(plan(drops=("DATA",)))
    events = events_for(conn, TRANSACTION)
    assert events[-1] is NeedData
    assert conn.data_to_send().endswith(b"354 End data with <CR><LF>.<CR><LF>\r\n")
    events = events_for(conn, BODY)
    assert isinstance(events[0], Dropped) and events[0].point == "DATA"
    assert conn.data_to_send() == b""


def test_drop_at_eod_stores_nothing() -> None:
    conn = connection(plan(drops=("EOD",)))
    events_for(conn, TRANSACTION)
    conn.data_to_send()
    events = events_for(conn, BODY)
    assert [type(e) for e in events] == [Dropped]
    assert conn.data_to_send() == b""


def test_eod_delay_holds_the_250_after_the_store() -> None:
    conn = connection(plan(delays=("EOD:2s",)))
    events_for(conn, TRANSACTION)
    conn.data_to_send()
    assert isinstance(events_for(conn, BODY)[0], MessageReceived)
    conn.message_stored("Q7")
    assert conn.next_event() == Delay("EOD", 2.0, "delay 'EOD:2s'")
    assert conn.data_to_send() == b"250 2.0.0 OK: queued as Q7\r\n"
    assert conn.next_event() is NeedData


def test_a_held_delay_comes_before_output_full() -> None:
    # 150 queued replies of 30 octets are over the 4 KiB bound when the EOD delay is owed.
    conn = ServerConnection(SessionPolicy(faults=plan(delays=("EOD:1s",))))
    conn.data_to_send()
    events_for(conn, TRANSACTION)
    conn.data_to_send()
    assert isinstance(events_for(conn, BODY)[0], MessageReceived)
    conn._out.extend([b"250 2.0.0 OK padding padding\r\n"] * 150)
    conn._unsent += 30 * 150
    conn.message_stored("Q")
    assert isinstance(conn.next_event(), Delay)


def test_syntax_and_sequence_errors_come_before_faults() -> None:
    conn = connection(plan("RCPT:450", "MAIL:451"))
    events_for(conn, b"EHLO c\r\nRCPT TO:<r@x>\r\nMAIL FROM:bad\r\n")
    replies = conn.data_to_send()
    assert b"503 5.5.1 Error: need MAIL command" in replies
    assert b"501 5.5.4 Syntax: MAIL" in replies
    assert b"451" not in replies and b"450" not in replies
