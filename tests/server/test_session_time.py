"""Time in a sink session, over real sockets: whose time a deadline counts, and what it ends.

- A store's time is the server's: a slow store (one held by a lock, a slow disk) never turns a
  stored message into a 421, whose retry would duplicate it; nor does a grace period that ends
  while a store is writing. Plain and TLS.
- A command line has one deadline from the moment the session is ready for it: a client that
  trickles a byte at a time cannot hold the session by keeping each read inside the timeout.
- Message content must keep up a minimum rate (``min_data_rate``), not just one byte per
  ``data_timeout``.
- A session older than ``max_session_time`` ends with 421 at its next command boundary.

The timeouts here are short so the tests finish quickly; each assertion is about what
happened (which reply, how many bytes got through), never about how long something took.
"""

from __future__ import annotations

import mailbox
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import TLSFiles

from mailstorm.sink import Address, SinkConfig, SinkServer
from mailstorm.sink.stores import MaildirStore
from mailstorm.wire.events import Envelope

Connect = Callable[..., Awaitable[Any]]

MESSAGE = "Subject: t\r\n\r\nhello\r\n.\r\n"


class SlowStore(MaildirStore):
    """A Maildir whose every delivery first waits ``hold`` seconds (a locked or slow disk)."""

    def __init__(self, path: Path, hold: float) -> None:
        super().__init__(path)
        self.hold = hold
        self.started = trio.Event()

    async def deliver(self, envelope: Envelope, content: bytes, trace: bytes) -> None:
        self.started.set()
        await trio.sleep(self.hold)
        await super().deliver(envelope, content, trace)


async def serve(nursery: trio.Nursery, store: Any, **overrides: Any) -> SinkServer:
    overrides.setdefault("listen", (Address("127.0.0.1", 0),))
    overrides.setdefault("hostname", "sink.test")
    config = SinkConfig(**overrides)
    if "tls_cert" in overrides:
        probe = SinkServer.from_config(config)  # builds the TLS context
        server = SinkServer(config, store=store, ssl_context=probe._ctx.ssl_context)
    else:
        server = SinkServer(config, store=store)
    await nursery.start(server.serve)
    return server


async def send_message(client: Any) -> None:
    assert (await client.cmd("EHLO c.test")).code == 250
    assert (await client.cmd("MAIL FROM:<a@c.test>")).code == 250
    assert (await client.cmd("RCPT TO:<b@sink.test>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    await client.send(MESSAGE)


async def open_client(connect: Connect, server: SinkServer, tls_files: TLSFiles, tls: bool) -> Any:
    client = await connect(server.addresses[0])
    if tls:
        assert (await client.cmd("EHLO c.test")).code == 250
        assert (await client.cmd("STARTTLS")).code == 220
        await client.starttls(tls_files.client_context())
    return client


def tls_options(tls_files: TLSFiles, tls: bool) -> dict[str, Any]:
    return {"tls_cert": str(tls_files.cert), "tls_key": str(tls_files.key)} if tls else {}


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
async def test_a_store_slower_than_every_timeout_still_answers_250(
    nursery: trio.Nursery, connect: Connect, tmp_path: Path, tls_files: TLSFiles, tls: bool
) -> None:
    store = SlowStore(tmp_path / "mail", hold=1.5)
    server = await serve(
        nursery, store, command_timeout=0.4, data_timeout=0.4, **tls_options(tls_files, tls)
    )
    client = await open_client(connect, server, tls_files, tls)
    await send_message(client)
    reply = await client.reply()
    assert reply.code == 250, reply  # before: 421 4.4.2 while the message was being stored
    assert (await client.cmd("QUIT")).code == 221
    assert len(mailbox.Maildir(tmp_path / "mail")) == 1


async def test_a_grace_period_that_ends_during_a_store_still_sends_the_250(
    nursery: trio.Nursery, connect: Connect, tmp_path: Path
) -> None:
    store = SlowStore(tmp_path / "mail", hold=1.0)
    server = await serve(nursery, store, grace_period=0.1)
    client = await connect(server.addresses[0])
    await send_message(client)
    await store.started.wait()
    server.shutdown()
    stored, goodbye = await client.replies(2)
    assert stored.code == 250, stored
    assert (goodbye.code, goodbye.lines[0][:5]) == (421, "4.3.2"), goodbye
    assert len(mailbox.Maildir(tmp_path / "mail")) == 1


@pytest.mark.parametrize("tls", [False, True], ids=["plain", "starttls"])
async def test_an_mbox_locked_by_another_process_past_the_timeout(
    start_sink: Any, connect: Connect, tmp_path: Path, tls_files: TLSFiles, tls: bool
) -> None:
    path = tmp_path / "sink.mbox"
    path.touch()
    server = await start_sink(
        store=f"mbox:{path}", command_timeout=0.4, data_timeout=0.4, **tls_options(tls_files, tls)
    )
    client = await open_client(connect, server, tls_files, tls)
    locker = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys, time\n"
         f"fd = os.open({str(path)!r}, os.O_RDWR)\n"
         "fcntl.lockf(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "time.sleep(1.5)\n"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        await send_message(client)
        reply = await client.reply()
        assert reply.code == 250, reply  # before, over TLS: only 421 4.4.2
        # Before: the 421 followed the 250, and the session was over.
        assert (await client.cmd("QUIT")).code == 221
    finally:
        locker.wait(timeout=20)
    assert len(mailbox.mbox(path)) == 1


async def trickle(client: Any, data: bytes, interval: float, sent: list[int]) -> None:
    """Send ``data`` one byte per ``interval``, counting in ``sent``; stop when the peer
    is gone."""
    for byte in data:
        try:
            await client.send(bytes([byte]))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        sent[0] += 1
        await trio.sleep(interval)


async def test_a_command_trickled_byte_by_byte_times_out(
    start_sink: Any, connect: Connect, nursery: trio.Nursery
) -> None:
    server = await start_sink(command_timeout=0.6)
    client = await connect(server.addresses[0])
    line = b"NOOP " + b"x" * 60  # never ends: no CRLF
    sent = [0]
    nursery.start_soon(trickle, client, line, 0.1, sent)
    reply = await client.reply()
    assert (reply.code, reply.lines[0][:5]) == (421, "4.4.2"), reply
    # Each byte came well inside the timeout, so a per-read timeout never fired; the line's
    # deadline did, long before the client ran out of bytes to trickle.
    assert sent[0] < len(line)


async def test_content_below_the_minimum_rate_times_out(
    start_sink: Any, connect: Connect, nursery: trio.Nursery
) -> None:
    server = await start_sink(data_timeout=0.6, min_data_rate=1000.0)
    client = await connect(server.addresses[0])
    assert (await client.cmd("EHLO c.test")).code == 250
    assert (await client.cmd("MAIL FROM:<a@c.test>")).code == 250
    assert (await client.cmd("RCPT TO:<b@sink.test>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    body = b"x" * 60
    sent = [0]
    nursery.start_soon(trickle, client, body, 0.1, sent)
    reply = await client.reply()
    assert (reply.code, reply.lines[0][:5]) == (421, "4.4.2"), reply
    assert sent[0] < len(body)


async def test_content_at_a_good_rate_is_not_cut(start_sink: Any, connect: Connect) -> None:
    """Many reads, each inside the data timeout and together above the minimum rate."""
    server = await start_sink(data_timeout=2.0, min_data_rate=1000.0)
    client = await connect(server.addresses[0])
    assert (await client.cmd("EHLO c.test")).code == 250
    assert (await client.cmd("MAIL FROM:<a@c.test>")).code == 250
    assert (await client.cmd("RCPT TO:<b@sink.test>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    for _ in range(8):
        await client.send(b"y" * 20_000 + b"\r\n")
        await trio.sleep(0.1)
    await client.send(b".\r\n")
    assert (await client.reply()).code == 250


async def test_a_session_past_its_maximum_time_ends_after_its_transaction(
    start_sink: Any, connect: Connect
) -> None:
    server = await start_sink(max_session_time=0.5)
    client = await connect(server.addresses[0])
    assert (await client.cmd("EHLO c.test")).code == 250
    assert (await client.cmd("MAIL FROM:<a@c.test>")).code == 250
    assert (await client.cmd("RCPT TO:<b@sink.test>")).code == 250
    await trio.sleep(1.0)  # the session's time runs out inside the transaction
    assert (await client.cmd("DATA")).code == 354
    await client.send(MESSAGE)
    stored, goodbye = await client.replies(2)
    assert stored.code == 250, stored
    assert goodbye.code == 421 and "too long" in goodbye.lines[0], goodbye
    await client.expect_closed()
    assert server.stats.messages == 1
