"""The sink's lifecycle over real sockets: connection limits, many concurrent sessions,
timeouts, and graceful shutdown (in-process and through the real CLI with signals).

No test asserts how long anything takes; every wait is bounded by ``TEST_TIMEOUT`` (or the
subprocess timeout), so a broken server fails the test instead of hanging it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from conftest import TEST_TIMEOUT, SMTPClient

from mailstorm.ports import free_port
from mailstorm.sink import Address, SinkConfig, SinkServer

Connect = Callable[..., Awaitable[SMTPClient]]
StartSink = Callable[..., Awaitable[SinkServer]]

#: Generous bound on a child process's start-up and exit (a loaded 2-core machine).
PROCESS_TIMEOUT = 60.0


async def greet_and_send(client: SMTPClient, subject: str = "t") -> None:
    """EHLO and one complete transaction, every reply positive."""
    assert (await client.cmd("EHLO client.test")).code == 250
    assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250
    assert (await client.cmd("RCPT TO:<b@example.org>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    reply = await client.cmd(f"Subject: {subject}\r\n\r\nhello\r\n.")
    assert reply.code == 250, reply


def assert_shutdown_reply(reply: Any) -> None:
    assert (reply.code, reply.enhanced) == (421, "4.3.2"), reply


# ---- connection limit ------------------------------------------------------------------


async def test_max_connections(start_sink: StartSink, connect: Connect) -> None:
    """Over ``max_connections`` a client gets 421 4.7.0 and is closed; once a session ends,
    a new client is served again."""
    server = await start_sink(max_connections=2)
    address = server.addresses[0]
    first = await connect(address)
    second = await connect(address)

    third = await connect(address, banner=False)
    reply = await third.reply()
    assert (reply.code, reply.enhanced) == (421, "4.7.0"), reply
    await third.expect_closed()
    assert server.stats.sessions_refused == 1

    # The two admitted sessions work.
    await greet_and_send(second)
    assert (await first.cmd("QUIT")).code == 221
    await first.expect_closed()
    # Let the server finish tearing the session down before knocking again.
    await trio.testing.wait_all_tasks_blocked()

    fourth = await connect(address)
    await greet_and_send(fourth)
    assert server.stats.sessions_refused == 1


# ---- many concurrent sessions ------------------------------------------------------------

SESSIONS = 1000


async def test_thousand_concurrent_sessions(start_sink: StartSink) -> None:
    """1,000 clients are connected at the same moment (all banners read before anyone sends a
    command); each then sends one message; all get 250 and the server counts 1,000."""
    server = await start_sink()
    address = server.addresses[0]
    all_connected = trio.Event()
    connected = 0
    delivered = 0
    body = b"Subject: load\r\n\r\n" + b"x" * 200 + b"\r\n.\r\n"

    async def one_session(n: int) -> None:
        nonlocal connected, delivered
        client = await SMTPClient.connect(address)
        try:
            assert (await client.reply()).code == 220
            connected += 1
            if connected == SESSIONS:
                all_connected.set()
            with trio.fail_after(TEST_TIMEOUT):
                await all_connected.wait()
            assert (await client.cmd(f"EHLO c{n}.test")).code == 250
            # PIPELINING keeps the test quick: two groups, DATA last in the first one.
            await client.send(
                f"MAIL FROM:<s{n}@example.org>\r\nRCPT TO:<r{n}@example.org>\r\nDATA\r\n"
            )
            assert [r.code for r in await client.replies(3)] == [250, 250, 354]
            await client.send(body + b"QUIT\r\n")
            reply, bye = await client.replies(2)
            assert reply.code == 250, reply
            assert bye.code == 221, bye
            delivered += 1
        finally:
            await client.aclose()

    async with trio.open_nursery() as nursery:
        for n in range(SESSIONS):
            nursery.start_soon(one_session, n)
        with trio.fail_after(TEST_TIMEOUT * 3):
            await all_connected.wait()
        # Every one of them is a live session on the server at this point.
        assert server.stats.sessions_active == SESSIONS
    assert delivered == SESSIONS
    assert server.stats.messages == SESSIONS
    assert server.stats.sessions_total == SESSIONS
    assert server.stats.sessions_refused == 0


# ---- timeouts ------------------------------------------------------------------------------


async def test_command_timeout(start_sink: StartSink, connect: Connect) -> None:
    """An idle client gets 421 4.4.2 and is disconnected; other sessions are not affected."""
    server = await start_sink(command_timeout=0.5)
    idle = await connect(server.addresses[0])
    assert (await idle.cmd("EHLO client.test")).code == 250
    reply = await idle.reply()
    assert (reply.code, reply.enhanced) == (421, "4.4.2"), reply
    await idle.expect_closed()

    # A session that keeps talking is still served.
    fresh = await connect(server.addresses[0])
    await greet_and_send(fresh)


async def test_data_timeout(start_sink: StartSink, connect: Connect) -> None:
    """A client that stalls inside DATA gets 421 4.4.2, is disconnected, and nothing of its
    message is counted."""
    server = await start_sink(data_timeout=0.5)
    client = await connect(server.addresses[0])
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<a@example.org>")
    await client.cmd("RCPT TO:<b@example.org>")
    assert (await client.cmd("DATA")).code == 354
    await client.send("Subject: stalled\r\n\r\nhalf a mess")
    reply = await client.reply()
    assert (reply.code, reply.enhanced) == (421, "4.4.2"), reply
    await client.expect_closed()
    assert server.stats.messages == 0


# ---- graceful shutdown, in-process ---------------------------------------------------------


class Running:
    """A sink served in a nursery, with an event set when ``serve`` returns."""

    def __init__(self, server: SinkServer) -> None:
        self.server = server
        self.returned = trio.Event()

    @classmethod
    async def start(cls, nursery: trio.Nursery, tmp_path: Path, **overrides: Any) -> Running:
        overrides.setdefault("hostname", "sink.test")
        overrides.setdefault("listen", (Address("127.0.0.1", 0),))
        overrides.setdefault("store", f"maildir:{tmp_path / 'mail'}")
        config = SinkConfig(**overrides)
        running = cls(SinkServer.from_config(config))
        await nursery.start(running._serve)
        return running

    async def _serve(
        self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.server.serve(task_status=task_status)
        self.returned.set()

    async def wait_returned(self) -> None:
        with trio.fail_after(TEST_TIMEOUT):
            await self.returned.wait()


def stored(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "mail" / "new").iterdir())


async def test_graceful_shutdown(nursery: trio.Nursery, connect: Connect, tmp_path: Path) -> None:
    """``shutdown()``: listeners close; an idle session gets 421 4.3.2 at once (while another
    is still mid-DATA, so it waited for neither that session nor the grace period); the
    mid-DATA session finishes its message (250, stored) and then gets 421; ``serve`` returns."""
    running = await Running.start(nursery, tmp_path, grace_period=3600.0)
    server = running.server
    address = server.addresses[0]
    idle = await connect(address)
    assert (await idle.cmd("EHLO idle.test")).code == 250
    busy = await connect(address)
    await busy.cmd("EHLO busy.test")
    await busy.cmd("MAIL FROM:<a@example.org>")
    await busy.cmd("RCPT TO:<b@example.org>")
    assert (await busy.cmd("DATA")).code == 354
    await busy.send("Subject: in flight\r\n\r\nfirst half, ")

    server.shutdown()
    assert_shutdown_reply(await idle.reply())
    await idle.expect_closed()
    # New clients are no longer accepted.
    with pytest.raises(OSError):
        await SMTPClient.connect(address)
    assert not running.returned.is_set()

    await busy.send("second half\r\n.\r\n")
    reply = await busy.reply()
    assert reply.code == 250, reply
    assert_shutdown_reply(await busy.reply())
    await busy.expect_closed()
    await running.wait_returned()

    files = stored(tmp_path)
    assert len(files) == 1
    assert files[0].read_bytes().endswith(b"Subject: in flight\r\n\r\nfirst half, second half\r\n")
    assert server.stats.messages == 1


async def test_graceful_shutdown_lets_open_transaction_continue(
    nursery: trio.Nursery, connect: Connect, tmp_path: Path
) -> None:
    """A session between MAIL and DATA at shutdown may still add recipients and send its
    message; only then does it get 421."""
    running = await Running.start(nursery, tmp_path, grace_period=3600.0)
    client = await connect(running.server.addresses[0])
    await client.cmd("EHLO client.test")
    assert (await client.cmd("MAIL FROM:<a@example.org>")).code == 250

    running.server.shutdown()
    await trio.testing.wait_all_tasks_blocked()
    assert (await client.cmd("RCPT TO:<b@example.org>")).code == 250
    assert (await client.cmd("DATA")).code == 354
    assert (await client.cmd("Subject: late\r\n\r\nok\r\n.")).code == 250
    assert_shutdown_reply(await client.reply())
    await client.expect_closed()
    await running.wait_returned()
    assert len(stored(tmp_path)) == 1


async def test_grace_period_expires(
    nursery: trio.Nursery, connect: Connect, tmp_path: Path
) -> None:
    """A session that never finishes its message gets 421 4.3.2 once the grace period is
    over, nothing of it is stored, and ``serve`` returns."""
    running = await Running.start(nursery, tmp_path, grace_period=0.5)
    client = await connect(running.server.addresses[0])
    await client.cmd("EHLO client.test")
    await client.cmd("MAIL FROM:<a@example.org>")
    await client.cmd("RCPT TO:<b@example.org>")
    assert (await client.cmd("DATA")).code == 354
    await client.send("Subject: never finished\r\n\r\n")

    running.server.shutdown()
    assert_shutdown_reply(await client.reply())
    await client.expect_closed()
    await running.wait_returned()
    assert stored(tmp_path) == []
    assert list((tmp_path / "mail" / "tmp").iterdir()) == []
    assert running.server.stats.messages == 0


async def test_shutdown_with_no_sessions(nursery: trio.Nursery, tmp_path: Path) -> None:
    """``shutdown()`` on an idle server makes ``serve`` return; calling it again is harmless."""
    running = await Running.start(nursery, tmp_path)
    running.server.shutdown()
    running.server.shutdown()
    await running.wait_returned()


# ---- graceful shutdown through the real CLI --------------------------------------------------


async def wait_until_accepting(port: int, process: trio.Process) -> SMTPClient:
    """Connect to the child's port, retrying while it starts; the banner is read."""
    with trio.fail_after(PROCESS_TIMEOUT):
        while True:
            if process.poll() is not None:
                raise AssertionError(f"sink exited early with status {process.returncode}")
            try:
                client = await SMTPClient.connect(("127.0.0.1", port))
            except OSError:
                await trio.sleep(0.05)
                continue
            reply = await client.reply()
            assert reply.code == 220, reply
            return client


@asynccontextmanager
async def cli_sink(tmp_path: Path, *args: str) -> AsyncIterator[tuple[trio.Process, int]]:
    """``python -m mailstorm.sink`` on a free port, storing to ``tmp_path/mail``, stderr to
    ``tmp_path/stderr.txt``; killed at the end if it is still running."""
    port = free_port()
    with (tmp_path / "stderr.txt").open("wb") as stderr:
        process = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "mailstorm.sink",
                "--listen",
                f"127.0.0.1:{port}",
                "--hostname",
                "sink.test",
                "--store",
                f"maildir:{tmp_path / 'mail'}",
                *args,
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        yield process, port
    finally:
        if process.poll() is None:
            process.kill()
            with trio.move_on_after(PROCESS_TIMEOUT):
                await process.wait()


async def exit_status(process: trio.Process, tmp_path: Path) -> int:
    """Wait (bounded) for the child to exit; its stderr must hold no traceback."""
    with trio.fail_after(PROCESS_TIMEOUT):
        status = await process.wait()
    errors = (tmp_path / "stderr.txt").read_text(errors="replace")
    assert "Traceback" not in errors, errors
    return status


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_cli_signal_shuts_down_gracefully(signum: int, tmp_path: Path) -> None:
    """``python -m mailstorm.sink`` on SIGTERM or SIGINT: an idle client gets 421 4.3.2, a client
    mid-transaction finishes its message, and the process exits with status 0."""
    async with cli_sink(tmp_path) as (process, port):
        idle = await wait_until_accepting(port, process)
        busy = await SMTPClient.connect(("127.0.0.1", port))
        try:
            assert (await idle.cmd("EHLO idle.test")).code == 250
            assert (await busy.reply()).code == 220
            await busy.cmd("EHLO busy.test")
            assert (await busy.cmd("MAIL FROM:<a@example.org>")).code == 250

            process.send_signal(signum)
            assert_shutdown_reply(await idle.reply())
            await idle.expect_closed()
            # The listener was closed before the idle session was told.
            with pytest.raises(OSError):
                await SMTPClient.connect(("127.0.0.1", port))
            assert (await busy.cmd("RCPT TO:<b@example.org>")).code == 250
            assert (await busy.cmd("DATA")).code == 354
            assert (await busy.cmd("Subject: x\r\n\r\nlast one\r\n.")).code == 250
            assert_shutdown_reply(await busy.reply())
            await busy.expect_closed()
        finally:
            await idle.aclose()
            await busy.aclose()
        assert await exit_status(process, tmp_path) == 0
    assert len(os.listdir(tmp_path / "mail" / "new")) == 1


async def test_cli_grace_period_expires(tmp_path: Path) -> None:
    """With ``--grace-period``, a client that stalls mid-DATA after SIGTERM gets 421 4.3.2
    when the period ends, nothing of its message is stored, and the exit status is 0."""
    async with cli_sink(tmp_path, "--grace-period", "0.5") as (process, port):
        client = await wait_until_accepting(port, process)
        try:
            await client.send("EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@x.org>\r\n")
            assert [r.code for r in await client.replies(3)] == [250, 250, 250]
            assert (await client.cmd("DATA")).code == 354
            await client.send("Subject: stalled\r\n\r\nnever ends")
            process.send_signal(signal.SIGTERM)
            assert_shutdown_reply(await client.reply())
            await client.expect_closed()
        finally:
            await client.aclose()
        assert await exit_status(process, tmp_path) == 0
    assert os.listdir(tmp_path / "mail" / "new") == []
    assert os.listdir(tmp_path / "mail" / "tmp") == []


async def test_cli_second_signal_still_sends_421(tmp_path: Path) -> None:
    """A second signal skips the grace period: a session stalled mid-DATA gets 421 4.3.2 at
    once (as when the grace period ends) and the process exits 0."""
    async with cli_sink(tmp_path, "--grace-period", "3600") as (process, port):
        client = await wait_until_accepting(port, process)
        try:
            await client.send("EHLO c.test\r\nMAIL FROM:<a@example.org>\r\nRCPT TO:<b@x.org>\r\n")
            assert [r.code for r in await client.replies(3)] == [250, 250, 250]
            assert (await client.cmd("DATA")).code == 354
            await client.send("Subject: stalled\r\n\r\nnever ends")
            process.send_signal(signal.SIGTERM)
            # The first signal has been handled once the sink logs the shutdown.
            with trio.fail_after(PROCESS_TIMEOUT):
                while b"shutting down:" not in (tmp_path / "stderr.txt").read_bytes():
                    await trio.sleep(0.05)
            process.send_signal(signal.SIGTERM)
            reply = await client.reply()
        finally:
            await client.aclose()
        assert await exit_status(process, tmp_path) == 0
    assert_shutdown_reply(reply)
