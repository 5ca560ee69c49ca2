"""The sink's admission limits: ``--max-connections-per-ip`` over real loopback sockets, and
the bookkeeping behind it and behind the accept-error log (``server.admission``)."""

from __future__ import annotations

import logging
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trio
from conftest import TEST_TIMEOUT, SMTPClient

from mailstorm.ports import free_port
from mailstorm.sink import SinkServer
from mailstorm.sink.admission import AcceptErrorEpisode, AddressSlots

StartSink = Callable[..., Awaitable[SinkServer]]
OpenClient = Callable[..., Awaitable[SMTPClient]]

#: The global cap of the per-address tests, and how many idle clients one address opens.
GLOBAL_CAP = 50
#: The per-address cap of those tests.
PER_IP_CAP = 5
#: A second loopback address (Linux routes all of 127.0.0.0/8 to lo).
OTHER_ADDRESS = "127.0.0.2"
#: Bound on a child sink's start-up (a Python process on a loaded machine).
PROCESS_TIMEOUT = 60.0


@pytest.fixture
async def open_client() -> AsyncIterator[OpenClient]:
    """Raw clients (no banner read), optionally bound to a source address; closed at the end."""
    clients: list[SMTPClient] = []

    async def open_(address: tuple[str, int], source: str | None = None) -> SMTPClient:
        with trio.fail_after(TEST_TIMEOUT):
            stream = await trio.open_tcp_stream(*address, local_address=source)
        client = SMTPClient(stream)
        clients.append(client)
        return client

    yield open_
    for client in clients:
        await client.aclose()


async def test_one_address_cannot_fill_the_server(
    start_sink: StartSink, open_client: OpenClient
) -> None:
    """50 idle clients from one address no longer fill ``--max-connections 50`` when the
    per-address cap is 5: the first 5 get the banner, the rest 421 4.7.0 and a closed
    connection, and a client from another address still gets in."""
    server = await start_sink(max_connections=GLOBAL_CAP, max_connections_per_ip=PER_IP_CAP)
    address = server.addresses[0]
    clients = [await open_client(address) for _ in range(GLOBAL_CAP)]
    replies = [await client.reply() for client in clients]
    assert [reply.code for reply in replies].count(220) == PER_IP_CAP, replies
    for client, reply in zip(clients, replies, strict=True):
        if reply.code != 220:
            assert (reply.code, reply.enhanced) == (421, "4.7.0"), reply
            await client.expect_closed()

    other = await open_client(address, source=OTHER_ADDRESS)
    assert (await other.reply()).code == 220
    assert (await other.cmd("EHLO other.test")).code == 250
    assert server.stats.sessions_refused_per_ip == GLOBAL_CAP - PER_IP_CAP
    assert server.stats.sessions_refused == GLOBAL_CAP - PER_IP_CAP


async def test_a_slot_is_given_back_when_a_session_ends(
    start_sink: StartSink, open_client: OpenClient
) -> None:
    """When one of an address's sessions ends, that address may open another."""
    server = await start_sink(max_connections_per_ip=2)
    address = server.addresses[0]
    first, second = await open_client(address), await open_client(address)
    assert [(await first.reply()).code, (await second.reply()).code] == [220, 220]
    third = await open_client(address)
    assert (await third.reply()).code == 421
    await third.expect_closed()

    assert (await first.cmd("QUIT")).code == 221
    await first.expect_closed()
    # The slot is released when the server's session task ends, just after the close the
    # client saw: retry (each refusal is immediate) until a banner comes.
    with trio.fail_after(TEST_TIMEOUT):
        while True:
            client = await open_client(address)
            reply = await client.reply()
            if reply.code == 220:
                break
            assert reply.code == 421, reply
            await client.aclose()
            await trio.sleep(0.01)
    assert (await second.cmd("NOOP")).code == 250


async def test_no_per_address_cap_by_default(
    start_sink: StartSink, open_client: OpenClient
) -> None:
    """By default (0) one address may open as many sessions as the global cap allows, as the
    load generator does."""
    server = await start_sink(max_connections=GLOBAL_CAP)
    address = server.addresses[0]
    clients = [await open_client(address) for _ in range(GLOBAL_CAP)]
    assert [(await client.reply()).code for client in clients] == [220] * GLOBAL_CAP
    extra = await open_client(address)
    assert (await extra.reply()).code == 421
    assert server.stats.sessions_refused_per_ip == 0
    assert server.stats.sessions_refused == 1


async def test_per_ip_flag_of_the_sink_process(open_client: OpenClient) -> None:
    """``mailstorm sink --max-connections-per-ip 1`` as a real process: a second session from
    the same address gets 421 4.7.0, one from another address the banner."""
    port = free_port()
    process = await trio.lowlevel.open_process(
        [
            sys.executable, "-m", "mailstorm.sink", "--listen", f"127.0.0.1:{port}",
            "--max-connections-per-ip", "1", "--quiet",
        ],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(PROCESS_TIMEOUT):
            while True:
                try:
                    first = await open_client(("127.0.0.1", port))
                    break
                except OSError:
                    assert process.poll() is None, "the sink exited"
                    await trio.sleep(0.05)
        assert (await first.reply()).code == 220
        second = await open_client(("127.0.0.1", port))
        reply = await second.reply()
        assert (reply.code, reply.enhanced) == (421, "4.7.0"), reply
        other = await open_client(("127.0.0.1", port), source=OTHER_ADDRESS)
        assert (await other.reply()).code == 220
    finally:
        process.terminate()
        with trio.move_on_after(TEST_TIMEOUT):
            await process.wait()
        if process.poll() is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0


async def test_junk_command_limit_reaches_the_core(
    start_sink: StartSink, connect: OpenClient
) -> None:
    """``max_junk_commands`` is the core's limit: past it, a NOOP ends the session with 421."""
    server = await start_sink(max_junk_commands=3)
    client = await connect(server.addresses[0])
    assert (await client.cmd("EHLO client.test")).code == 250
    for _ in range(3):
        assert (await client.cmd("NOOP")).code == 250
    reply = await client.cmd("NOOP")
    assert (reply.code, reply.enhanced) == (421, "4.7.0"), reply
    await client.expect_closed()


# ---- AddressSlots ------------------------------------------------------------------------


def test_address_slots_cap_each_address() -> None:
    slots = AddressSlots(2)
    assert slots.acquire("a") and slots.acquire("a")
    assert not slots.acquire("a")
    assert slots.acquire("b")
    slots.release("a")
    assert slots.open_sessions("a") == 1
    assert slots.acquire("a")


def test_address_slots_forget_addresses_without_sessions() -> None:
    slots = AddressSlots(3)
    for n in range(100):
        assert slots.acquire(f"10.0.0.{n}")
    for n in range(100):
        slots.release(f"10.0.0.{n}")
    assert len(slots) == 0


def test_address_slots_zero_is_no_limit_and_no_counting() -> None:
    slots = AddressSlots(0)
    assert all(slots.acquire("a") for _ in range(10_000))
    assert len(slots) == 0
    slots.release("a")


# ---- AcceptErrorEpisode ------------------------------------------------------------------


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def episode_log() -> tuple[logging.Logger, ListHandler]:
    logger = logging.getLogger("mailstorm.test.admission")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    handler = ListHandler()
    logger.addHandler(handler)
    yield logger, handler  # type: ignore[misc]
    logger.removeHandler(handler)


EMFILE = OSError(24, "Too many open files")


def test_an_episode_is_logged_once_at_each_end(
    episode_log: tuple[logging.Logger, ListHandler],
) -> None:
    logger, handler = episode_log
    now = [100.0]
    episode = AcceptErrorEpisode(logger, lambda: now[0], 0.1)
    for _ in range(136):
        episode.failed(EMFILE)
        now[0] += 0.1
    assert [r.levelno for r in handler.records] == [logging.ERROR]
    assert "Too many open files" in handler.records[0].getMessage()
    episode.succeeded()
    episode.succeeded()
    assert len(handler.records) == 2
    end = handler.records[1].getMessage()
    assert "recovered after 136 failed accepts over 13.6s" in end, end
    assert "Too many open files" in end


def test_a_new_episode_starts_over(episode_log: tuple[logging.Logger, ListHandler]) -> None:
    logger, handler = episode_log
    now = [0.0]
    episode = AcceptErrorEpisode(logger, lambda: now[0], 0.1)
    episode.failed(EMFILE)
    episode.succeeded()
    now[0] = 50.0
    episode.failed(EMFILE)
    now[0] = 52.0
    episode.close()
    messages = [r.getMessage() for r in handler.records]
    assert len(messages) == 4, messages
    assert "after 1 failed accept over 0.0s" in messages[1]
    assert "stopped accepting after 1 failed accept over 2.0s" in messages[3]


def test_no_episode_no_lines(episode_log: tuple[logging.Logger, ListHandler]) -> None:
    logger, handler = episode_log
    episode = AcceptErrorEpisode(logger, lambda: 0.0, 0.1)
    episode.succeeded()
    episode.close()
    assert handler.records == []
