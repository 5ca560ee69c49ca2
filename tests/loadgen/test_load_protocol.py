"""LoadProtocol, the load session's decisions and counts, driven by feeding it reply bytes.

The protocol is synchronous and sans-IO: these tests play the driver (the session's task or the
readiness hub's inline handler) by hand and check the actions it returns and what it counts.
The session over real sockets is tested in the other test_load_* modules.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

from mailstorm.load.config import LoadConfig, Target
from mailstorm.load.protocol import Action, LoadProtocol
from mailstorm.load.stats import RunStats
from mailstorm.load.workload import MessageFactory

SEND, RECEIVE, READY, IDLE, QUIT, CLOSE, FAIL = (
    Action.SEND, Action.RECEIVE, Action.READY, Action.IDLE, Action.QUIT, Action.CLOSE, Action.FAIL
)

if TYPE_CHECKING:
    from mailstorm.load.schedule import MessageTickets

EHLO = b"250-sink.test\r\n250-PIPELINING\r\n250-STARTTLS\r\n250 8BITMIME\r\n"
EHLO_PLAIN = b"250-sink.test\r\n250 8BITMIME\r\n"
GROUP_OK = b"250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 Go on\r\n"
EOD_OK = b"250 2.0.0 queued\r\n"


class DueTickets:
    """Stands in for ``MessageTickets``: messages 1..last, each due at once."""

    def __init__(self, last: int) -> None:
        self.n = 0
        self.last = last

    def take_now(self) -> tuple[int, float] | None:
        if self.n >= self.last:
            return None
        self.n += 1
        return self.n, 0.0


def make(**options: Any) -> tuple[LoadProtocol, RunStats]:
    config = LoadConfig.from_options(Target("127.0.0.1", 25), **options)
    stats = RunStats()
    return LoadProtocol(config, stats, MessageFactory()), stats


def play(protocol: LoadProtocol, data: bytes, now: float = 1.0) -> tuple[object, list[bytes]]:
    """Feed ``data`` and carry out SEND actions; the first other action and what was sent."""
    protocol.data_received(data, now)
    sent = []
    while (action := protocol.next_action()) is SEND:
        sent.append(protocol.data_to_send(now))
    return action, sent


def flush(protocol: LoadProtocol, now: float = 1.0) -> list[bytes]:
    """Carry out the SEND actions due before anything is read (the first write of a chain)."""
    sent = []
    while protocol.next_action() is SEND:
        sent.append(protocol.data_to_send(now))
    return sent


def ready(**options: Any) -> tuple[LoadProtocol, RunStats]:
    protocol, stats = make(**options)
    protocol.connection_made(0.0, tls_active=False)
    assert play(protocol, b"220 sink.test ESMTP\r\n") == (RECEIVE, [b"EHLO mailstorm.test\r\n"])
    assert play(protocol, EHLO)[0] is READY
    return protocol, stats


def test_a_message_is_counted_once_and_the_connection_stays() -> None:
    protocol, stats = ready()
    protocol.add_message(0, 0.0)
    protocol.begin_chain(None)
    assert stats.attempted == 1
    assert protocol.next_action() is SEND
    assert protocol.data_to_send(1.0).startswith(b"MAIL FROM:")
    action, sent = play(protocol, GROUP_OK, 2.0)
    assert action is RECEIVE and len(sent) == 1  # the content
    assert play(protocol, EOD_OK, 3.0) == (IDLE, [])
    assert (stats.delivered, stats.failed, protocol.on_connection) == (1, 0, 1)
    assert not protocol.inflight


def test_per_connection_limit_says_quit_then_close() -> None:
    protocol, stats = ready(per_connection=1)
    protocol.add_message(0, 0.0)
    protocol.begin_chain(None)
    flush(protocol)
    play(protocol, GROUP_OK)
    assert play(protocol, EOD_OK)[0] is QUIT
    protocol.quit()
    assert protocol.next_action() is SEND and protocol.data_to_send(4.0) == b"QUIT\r\n"
    assert play(protocol, b"221 bye\r\n")[0] is CLOSE
    assert protocol.quit_answered and stats.delivered == 1


def test_pipelined_chain_ends_each_message_in_order() -> None:
    protocol, stats = ready(pipeline_messages=True)
    protocol.add_message(0, 0.0)
    protocol.begin_chain(cast("MessageTickets", DueTickets(2)))
    flush(protocol)
    # Each 354: the content goes out with the next message's commands behind it.
    action, sent = play(protocol, GROUP_OK)
    assert action is RECEIVE and b"MAIL FROM:" in sent[0]
    assert play(protocol, EOD_OK + GROUP_OK)[0] is RECEIVE
    assert stats.delivered == 1 and len(protocol.inflight) == 2
    play(protocol, EOD_OK + GROUP_OK)
    assert play(protocol, EOD_OK) == (IDLE, [])
    assert (stats.attempted, stats.delivered) == (3, 3)


def test_a_421_fails_every_message_in_flight_once() -> None:
    protocol, stats = ready()
    protocol.add_message(0, 0.0)
    protocol.begin_chain(None)
    flush(protocol)
    action, _ = play(protocol, b"421 4.3.2 going down\r\n")
    assert action is FAIL
    failure = protocol.failure_of(action)
    assert failure.kind is None  # counted as the reply
    protocol.fail_inflight(failure, 5.0)
    assert (stats.failed, stats.errors_by_code[421]) == (1, 1)
    assert sum(stats.errors_by_kind.values()) == 1


def test_starttls_asks_for_a_handshake() -> None:
    protocol, _ = make(starttls=True)
    protocol.connection_made(0.0, tls_active=False)
    play(protocol, b"220 sink.test ESMTP\r\n")
    assert play(protocol, EHLO) == (RECEIVE, [b"STARTTLS\r\n"])
    assert play(protocol, b"220 go ahead\r\n")[0] is Action.START_TLS
    protocol.tls_done(0.01)
    protocol.tls_started()
    assert protocol.next_action() is SEND


def test_pipeline_messages_without_pipelining_is_counted() -> None:
    protocol, stats = make(pipeline_messages=True)
    protocol.connection_made(0.0, tls_active=False)
    play(protocol, b"220 sink.test ESMTP\r\n")
    assert play(protocol, EHLO_PLAIN)[0] is READY
    assert stats.unpipelined_connections == 1


def test_failures_are_named_by_the_pending_phase() -> None:
    protocol, _ = make(timeout=3.0)
    assert protocol.timed_out().detail == "connect: no reply within 3s"
    protocol.connection_made(0.0, tls_active=False)
    assert protocol.timed_out().kind == "timeout"
    assert protocol.broken(ConnectionResetError(104, "Connection reset by peer")).detail == (
        "banner: Connection reset by peer"
    )
    assert protocol.connect_failed(ConnectionRefusedError(111, "refused")).kind == "refused"
    assert protocol.failure_of(IDLE).kind == "protocol"
