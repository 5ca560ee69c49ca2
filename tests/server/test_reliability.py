"""The sink answers every command, however the client's bytes are cut into writes.

A client that sends a whole transaction in one write (EHLO, MAIL, RCPT, DATA, a large body,
the end marker, QUIT) hands the sink more than one full read of input while it reads nothing
back: the readiness hub's edge-triggered state must then keep the session reading until the
socket is empty. Sessions that parked with input waiting sat on their 354 until the client
sent something else (issue 14, the lost wake-up). Every test here runs with and without the
hub (``MAILSTORM_NO_HUB=1``); the 15 s bounds are hang detectors, not timing thresholds.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from conftest import SinkFactory, SMTPClient

from mailstorm._net.netstream import RECEIVE_SIZE
from mailstorm.wire.replies import ParsedReply, ReplyParser

Connect = Callable[..., Awaitable[SMTPClient]]

#: A bound on a whole test's network waits: only a hung session reaches it.
HANG = 15.0

ENVELOPE = b"MAIL FROM:<a@example.org>\r\nRCPT TO:<b@example.org>\r\nDATA\r\n"
#: The replies to EHLO, MAIL, RCPT, DATA, end of data and QUIT.
TRANSACTION_CODES = [250, 250, 250, 354, 250, 221]


def body(size: int, tag: str = "") -> bytes:
    """A message of about ``size`` bytes in 76-character lines, none starting with a dot."""
    line = b"x" * 74 + b"\r\n"
    return b"Subject: %s\r\n\r\n" % tag.encode() + line * (size // len(line))


async def read_replies(stream: trio.abc.Stream, parser: ReplyParser, n: int) -> list[ParsedReply]:
    """The next ``n`` replies (an EOF before them fails the test)."""
    replies: list[ParsedReply] = []
    while len(replies) < n:
        reply = parser.next_reply()
        if reply is not None:
            replies.append(reply)
            continue
        data = await stream.receive_some(65536)
        if not data:
            raise EOFError(f"closed after {[r.code for r in replies]}")
        parser.feed(data)
    return replies


async def one_write_transaction(address: tuple[str, int], size: int) -> list[int]:
    """Banner, then the whole transaction and QUIT in one write; the reply codes."""
    stream = await trio.open_tcp_stream(*address)
    parser = ReplyParser()
    try:
        assert [r.code for r in await read_replies(stream, parser, 1)] == [220]
        await stream.send_all(b"EHLO x.test\r\n" + ENVELOPE + body(size) + b".\r\nQUIT\r\n")
        return [r.code for r in await read_replies(stream, parser, 6)]
    finally:
        await trio.aclose_forcefully(stream)


async def test_whole_transactions_in_one_write_on_30_connections(
    start_sink: SinkFactory,
) -> None:
    # The prober's case: 4-5 of 30 sessions sat on their 354 with ~34 KB unread.
    server = await start_sink()
    codes: list[list[int]] = []

    async def one() -> None:
        codes.append(await one_write_transaction(server.addresses[0], 100_000))

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            for _ in range(30):
                nursery.start_soon(one)
    assert codes == [TRANSACTION_CODES] * 30
    assert server.stats.messages == 30


async def test_5_mb_bodies_written_after_354(start_sink: SinkFactory, connect: Connect) -> None:
    # Each body goes in writes of one full read each, every one once the sink has read all
    # before it and gone idle, and its last 100 KB (the end marker in it) in one write: that
    # arrives at a parked session with more than one full read in it (where the last wake-up
    # of a large body left the rest unread). A session parks in one of two waits depending on
    # how the reads before fell, so two bodies, one full read apart, cover both.
    server = await start_sink(max_size=0)
    client = await connect(server.addresses[0])
    with trio.fail_after(HANG):
        assert (await client.cmd("EHLO x.test")).code == 250
        for size in (5_000_000, 5_000_000 + RECEIVE_SIZE):
            await client.send(ENVELOPE)
            assert [r.code for r in await client.replies(3)] == [250, 250, 354]
            content = body(size) + b".\r\n"
            head, tail = content[:-100_000], content[-100_000:]
            cuts = range(len(head) % RECEIVE_SIZE, len(head) + 1, RECEIVE_SIZE)
            for start, end in itertools.pairwise([0, *cuts]):
                if end > start:
                    await client.send(head[start:end])
                    await trio.testing.wait_all_tasks_blocked()
            await client.send(tail)
            assert (await client.reply()).code == 250
        assert (await client.cmd("QUIT")).code == 221
    assert server.stats.messages == 2


def random_writes(rng: random.Random, messages: int) -> tuple[list[bytes], list[int]]:
    """A session's bytes cut at random points, and the reply codes it must get.

    Commands are pipelined (RFC 2920 allows a group after EHLO); whole transactions, several
    messages, small and large bodies (over one 64 KiB read) share writes.
    """
    stream = b"EHLO x.test\r\n"
    codes = [250]
    for i in range(messages):
        size = rng.choice((10, 1_000, 70_000, 200_000))
        if rng.random() < 0.3:
            stream += b"NOOP\r\n"
            codes.append(250)
        stream += ENVELOPE + body(size, f"m{i}") + b".\r\n"
        codes += [250, 250, 354, 250]
    stream += b"QUIT\r\n"
    codes.append(221)
    cuts = sorted(rng.sample(range(1, len(stream)), rng.randint(0, 12)))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    return pieces, codes


@pytest.mark.parametrize("seed", range(6))
async def test_random_write_sizes_and_timings_get_every_reply(
    start_sink: SinkFactory, seed: int
) -> None:
    # Eight sessions per run, each its own random cuts and pauses (sleeps only vary the
    # interleaving; nothing is asserted about time). A session reads its replies while it
    # writes, as a pipelining client does, so neither side's buffers fill up for good.
    rng = random.Random(seed)
    server = await start_sink(max_size=0)
    plans = [random_writes(rng, rng.randint(1, 4)) for _ in range(8)]
    pauses = [[rng.choice((0.0, 0.0, 0.001, 0.005)) for _ in pieces] for pieces, _ in plans]
    results: dict[int, list[int]] = {}

    async def session(index: int) -> None:
        pieces, codes = plans[index]
        stream = await trio.open_tcp_stream(*server.addresses[0])
        parser = ReplyParser()
        try:
            assert [r.code for r in await read_replies(stream, parser, 1)] == [220]
            async with trio.open_nursery() as nursery:

                async def write() -> None:
                    for piece, pause in zip(pieces, pauses[index], strict=True):
                        await stream.send_all(piece)
                        await trio.sleep(pause)

                nursery.start_soon(write)
                replies = await read_replies(stream, parser, len(codes))
            results[index] = [r.code for r in replies]
        finally:
            await trio.aclose_forcefully(stream)

    with trio.fail_after(HANG):
        async with trio.open_nursery() as nursery:
            for index in range(len(plans)):
                nursery.start_soon(session, index)
    assert results == {i: codes for i, (_, codes) in enumerate(plans)}
    assert server.stats.messages == sum(codes.count(354) for _, codes in plans)
