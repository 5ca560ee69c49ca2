"""The load generator's own cost per message, with no sockets and no event loop.

``python -m bench.client_micro`` runs messages the way ``LoadSession`` does with
``--pipeline-messages`` (each message's MAIL, RCPT and DATA behind the previous message's
content: one write and one read per message), answers with canned replies, and prints
microseconds per message twice: for the work a message needs (the message factory and the
client state machine, ``ClientConnection`` driven directly), and for the whole per-read work of
a session (``LoadProtocol``, which the session's task and the readiness hub's inline handler
call: the same state machine plus a latency record per timed reply, the whole-message record,
the counters and taking the next message). The difference is what measuring and deciding cost;
set it against the generator's run CPU per message in a bench report ("driver run CPU") to
state its share. Best of several rounds, so machine noise counts less; ``--bytecodes`` counts
bytecodes and calls per message instead, which do not vary from run to run.
"""

from __future__ import annotations

import argparse
import sys
import time
from types import FrameType
from typing import TYPE_CHECKING, cast

from mailstorm.load.config import LoadConfig, Target
from mailstorm.load.protocol import Action, LoadProtocol
from mailstorm.load.stats import RunStats
from mailstorm.load.workload import MessageFactory
from mailstorm.wire.client import ClientConfig, ClientConnection
from mailstorm.wire.client_events import MessageDone, NeedData, SessionReady

if TYPE_CHECKING:
    from _typeshed import TraceFunction

    from mailstorm.load.schedule import MessageTickets

EHLO = b"250-bench.sink\r\n250-PIPELINING\r\n250-SIZE 10485760\r\n250 8BITMIME\r\n"
#: The end of one message and the group of the next, as one read.
REPLIES = b"250 2.0.0 Ok: queued\r\n250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n354 End data\r\n"


def _ready_connection() -> ClientConnection:
    conn = ClientConnection(ClientConfig())
    conn.connection_made(0.0)
    for reply in (b"220 bench.sink ESMTP\r\n", EHLO):
        conn.receive_data(reply, 0.0)
        while (event := conn.next_event()) is not NeedData:
            last = event
        conn.data_to_send(0.0)
    assert type(last) is SessionReady
    return conn


def per_message_us(messages: int, *, measure: bool) -> float:
    """Microseconds per message for one round of ``messages`` pipelined messages: the
    client connection alone, or (``measure``) the session's whole protocol."""
    if measure:
        return _protocol_us(messages)
    conn = _ready_connection()
    factory = MessageFactory()
    msg = factory.message(0)
    conn.start_message(msg.mail_from, msg.rcpts, msg.payload, msg.head)
    conn.data_to_send(0.0)
    conn.receive_data(REPLIES.partition(b"\r\n")[2], 0.0)  # the first group: no message ends
    while conn.next_event() is not NeedData:
        pass
    delivered = 0
    started = time.perf_counter()
    for n in range(1, messages + 1):
        now = n * 0.001
        msg = factory.message(n)
        conn.start_message(msg.mail_from, msg.rcpts, msg.payload, msg.head)
        conn.data_to_send(now)
        conn.receive_data(REPLIES, now + 0.0005)
        while (event := conn.next_event()) is not NeedData:
            if type(event) is MessageDone:
                delivered += event.delivered
    elapsed = time.perf_counter() - started
    assert delivered == messages
    return elapsed / messages * 1e6


class _DueTickets:
    """Stands in for ``MessageTickets``: every message is due at once, up to ``last``."""

    def __init__(self, last: int) -> None:
        self.n = 0
        self.last = last

    def take_now(self) -> tuple[int, float] | None:
        if self.n >= self.last:
            return None
        self.n += 1
        return self.n, self.n * 0.001


def _protocol_us(messages: int) -> float:
    config = LoadConfig(target=Target("127.0.0.1", 25), pipeline_messages=True)
    stats = RunStats()
    protocol = LoadProtocol(config, stats, MessageFactory())
    protocol.connection_made(0.0, tls_active=False)
    for reply in (b"220 bench.sink ESMTP\r\n", EHLO):
        protocol.data_received(reply, 0.0)
        while protocol.next_action() is Action.SEND:
            protocol.data_to_send(0.0)
    protocol.add_message(0, 0.0)
    protocol.begin_chain(cast("MessageTickets", _DueTickets(messages)))
    assert protocol.next_action() is Action.SEND
    protocol.data_to_send(0.0)
    data = REPLIES.partition(b"\r\n")[2]  # the first group: no message ends
    send, receive = Action.SEND, Action.RECEIVE  # as the session holds them: globals
    started = time.perf_counter()
    for n in range(messages + 1):
        now = n * 0.001
        protocol.data_received(data, now)
        while (action := protocol.next_action()) is send:
            protocol.data_to_send(now)  # the content, and the next message behind it
        assert action is receive, action
        data = REPLIES
    elapsed = time.perf_counter() - started
    assert stats.delivered == messages, stats.delivered
    return elapsed / messages * 1e6


def bytecodes_per_message(*, measure: bool, messages: int = 1000) -> tuple[float, float]:
    """(bytecodes, Python-level calls) per message, counted with a tracer: slow, but the same
    on every run, so an A/B of a hot-path change can be read on a noisy shared machine
    where microseconds cannot. C functions (deque, dict, HdrHistogram) are not counted."""
    counts = [0, 0]

    def tracer(frame: FrameType, event: str, arg: object) -> TraceFunction:
        frame.f_trace_opcodes = True
        if event == "opcode":
            counts[0] += 1
        elif event == "call":
            counts[1] += 1
        return tracer

    def traced(n: int) -> tuple[int, int]:
        counts[:] = [0, 0]
        sys.settrace(tracer)
        try:
            per_message_us(n, measure=measure)
        finally:
            sys.settrace(None)
        return counts[0], counts[1]

    # The difference of two runs leaves out the set-up both have.
    small = traced(100)
    large = traced(100 + messages)
    return (large[0] - small[0]) / messages, (large[1] - small[1]) / messages


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.client_micro", description=__doc__)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--bytecodes", action="store_true",
                   help="count bytecodes and Python calls per message instead of timing")
    args = p.parse_args()
    if args.bytecodes:
        for measure, what in ((False, "work"), (True, "through LoadProtocol")):
            ops, calls = bytecodes_per_message(measure=measure)
            print(f"per pipelined message, {what}: {ops:.0f} bytecodes, {calls:.0f} calls")
        return
    work = min(per_message_us(args.messages, measure=False) for _ in range(args.rounds))
    full = min(per_message_us(args.messages, measure=True) for _ in range(args.rounds))
    print(f"load generator, per pipelined message: {work:.1f} us of work (message factory and "
          f"client state machine), {full:.1f} us through LoadProtocol (with measurement): "
          f"measuring and deciding cost {full - work:.1f} us per message")


if __name__ == "__main__":
    main()
