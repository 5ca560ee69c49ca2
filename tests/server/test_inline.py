"""The sink's inline path: the readiness hub runs a session's steady state on its own turn.

With a discarding store, a lock-step client's commands and messages are read, answered and
counted by ``Session._on_readable`` without waking the session's task. These tests pin down
that this really happens, and every way back to the task: replies that do not fit the socket
buffer, more input than one read (a large body, which the task reads on), timeouts, shutdown
mid-message, a store that writes, and a peer that resets.

Only the first test is about the hub itself; the others pin down session behaviour and run on
whichever path the environment selects (the hub, or trio's waits with ``MAILSTORM_NO_HUB=1``).
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from conftest import TEST_TIMEOUT, SinkFactory, SMTPClient, TaskSteps
from test_lifecycle import Running, assert_shutdown_reply

from mailstorm._net.readiness import hub_enabled
from mailstorm.sink import SinkServer

Connect = Callable[..., Awaitable[SMTPClient]]


#: For the tests about the hub itself; the rest run on either path.
needs_hub = pytest.mark.skipif(
    not hub_enabled(), reason="the readiness hub is off (no epoll, or MAILSTORM_NO_HUB)"
)

TRANSACTION = (
    b"MAIL FROM:<a@example.org>\r\n",
    b"RCPT TO:<b@example.org>\r\n",
    b"DATA\r\n",
    b"Subject: inline\r\n\r\nbody\r\n.\r\n",
)


async def lock_step(client: SMTPClient, messages: int) -> None:
    """Send ``messages`` transactions one command per write, reading each reply first."""
    for _ in range(messages):
        for chunk in TRANSACTION:
            await client.send(chunk)
            reply = await client.reply()
            assert reply.code in (250, 354), reply


@needs_hub
async def test_lock_step_commands_do_not_wake_the_session_task(
    start_sink: SinkFactory, connect: Connect
) -> None:
    server = await start_sink()
    client = await connect(server.addresses[0])
    assert (await client.cmd("EHLO c.test")).code == 250
    await lock_step(client, 3)  # the session is now in its steady state
    steps = TaskSteps("SinkServer._run_session")
    trio.lowlevel.add_instrument(steps)
    try:
        await lock_step(client, 50)
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert server.stats.messages == 53
    # 200 commands and contents, each answered: without the inline path, 200 or more steps.
    assert steps.steps < 10, steps.steps


async def test_replies_that_do_not_fit_the_socket_buffer_are_all_sent(
    start_sink: SinkFactory,
) -> None:
    # A client pipelines far more commands than the server can answer into the socket buffer
    # while it reads nothing: the inline path hands the rest of a send to the task. EHLO has
    # a long reply: 40,000 of them are about 8 MB, more than the 4 MB a socket buffers.
    server = await start_sink()
    count = 40_000
    with trio.fail_after(TEST_TIMEOUT):
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await sock.connect(server.addresses[0])
        stream = trio.SocketStream(sock)
        client = SMTPClient(stream)
        assert (await client.reply()).code == 220
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.send_all, b"EHLO c.test\r\n" * count)
            await trio.sleep(0.3)  # let the server's send buffer fill up
            replies = await client.replies(count)
    assert all(reply.code == 250 for reply in replies)
    await client.aclose()


async def test_a_streaming_client_takes_turns_with_others(
    start_sink: SinkFactory, connect: Connect, tmp_path: Path
) -> None:
    # 8 MiB in one write is over 16 full reads: the inline path gives the rest to the task,
    # which yields between turns. The message arrives whole while another session is served.
    folder = tmp_path / "md"
    server = await start_sink(store=f"maildir:{folder}", max_size=0)
    big = await connect(server.addresses[0])
    small = await connect(server.addresses[0])
    for client in (big, small):
        assert (await client.cmd("EHLO c.test")).code == 250
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 8400
    assert (await big.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await big.cmd("RCPT TO:<b@example.org>")).code == 250
    assert (await big.cmd("DATA")).code == 354
    async with trio.open_nursery() as nursery:
        nursery.start_soon(big.send, body + b".\r\n")
        await lock_step(small, 20)
    assert (await big.reply()).code == 250
    assert server.stats.messages == 21
    stored = [path.read_bytes() for path in (folder / "new").iterdir()]
    assert sum(1 for message in stored if message.endswith(body)) == 1


async def test_a_session_served_inline_still_times_out(
    start_sink: SinkFactory, connect: Connect
) -> None:
    server = await start_sink(command_timeout=0.5)
    client = await connect(server.addresses[0])
    assert (await client.cmd("EHLO c.test")).code == 250
    await lock_step(client, 5)
    reply = await client.reply()
    assert (reply.code, reply.enhanced) == (421, "4.4.2"), reply
    await client.expect_closed()
    assert server.stats.messages == 5


async def test_shutdown_mid_message_served_inline(
    nursery: trio.Nursery, connect: Connect, tmp_path: Path
) -> None:
    # The session is asleep in the inline wait, inside a transaction, when shutdown comes: the
    # hub finishes its message (250, counted), and then the task says 421.
    running = await Running.start(nursery, tmp_path, store="discard", grace_period=3600.0)
    client = await connect(running.server.addresses[0])
    await client.cmd("EHLO c.test")
    await lock_step(client, 2)
    for chunk in TRANSACTION[:3]:
        await client.send(chunk)
        await client.reply()
    await client.send(b"Subject: in flight\r\n\r\nfirst half, ")
    running.server.shutdown()
    await trio.testing.wait_all_tasks_blocked()
    await client.send(b"second half\r\n.\r\n")
    assert (await client.reply()).code == 250
    assert_shutdown_reply(await client.reply())
    await client.expect_closed()
    await running.wait_returned()
    assert running.server.stats.messages == 3


async def test_a_store_that_writes_wakes_the_task(
    start_sink: SinkFactory, connect: Connect, tmp_path: Path
) -> None:
    folder = tmp_path / "md"
    server = await start_sink(store=f"maildir:{folder}")
    client = await connect(server.addresses[0])
    assert (await client.cmd("EHLO c.test")).code == 250
    await lock_step(client, 10)
    assert len(list((folder / "new").iterdir())) == 10
    assert server.stats.messages == 10


async def test_a_reset_while_served_inline_ends_the_session_quietly(
    start_sink: SinkFactory, connect: Connect
) -> None:
    server: SinkServer = await start_sink()
    client = await connect(server.addresses[0])
    assert (await client.cmd("EHLO c.test")).code == 250
    await lock_step(client, 2)
    stream = client.stream
    assert isinstance(stream, trio.SocketStream)
    # SO_LINGER 0: close sends a reset, after data the server has not read yet.
    stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.send_all(b"MAIL FROM:<a@example.org>\r\n")
    await client.aclose()
    with trio.fail_after(TEST_TIMEOUT):
        while server.stats.sessions_active:
            await trio.sleep(0.01)
    # The server still serves others.
    other = await connect(server.addresses[0])
    assert (await other.cmd("EHLO c.test")).code == 250
    await lock_step(other, 1)
    assert server.stats.messages == 3


@pytest.mark.parametrize("store", ["discard", "maildir"])
async def test_last_command_and_close_in_one_go_end_the_session_at_once(
    start_sink: SinkFactory, tmp_path: Path, store: str
) -> None:
    # The command and the FIN leave in one scheduler turn, so the sink's hub sees them as one
    # edge: the session must answer, see the end of the stream and close now, not after its
    # command timeout (an hour here).
    spec = "discard" if store == "discard" else f"maildir:{tmp_path / 'md'}"
    server = await start_sink(store=spec, command_timeout=3600.0)
    sock = socket.create_connection(server.addresses[0])
    sock.setblocking(False)
    received = b""

    async def read_until(marker: bytes) -> None:
        nonlocal received
        while marker not in received:
            await trio.lowlevel.wait_readable(sock)
            data = sock.recv(4096)
            if not data:
                raise EOFError(received)
            received += data

    with trio.fail_after(TEST_TIMEOUT):
        await read_until(b"220 ")
        sock.send(b"EHLO c.test\r\n")
        await read_until(b"\r\n250 ")
        received = b""
        sock.send(b"NOOP\r\n")
        sock.shutdown(socket.SHUT_WR)
        with pytest.raises(EOFError) as closed:
            await read_until(b"never sent")
        while server.stats.sessions_active:
            await trio.sleep(0.01)
    assert closed.value.args[0].startswith(b"250 ")
    sock.close()
