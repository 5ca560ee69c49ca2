"""Listening: several addresses at once, IPv6, and the periodic counters line."""

from __future__ import annotations

import logging
import socket

import pytest
import trio

from mailstorm.sink import Address


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv4_and_ipv6_listeners_at_once(start_sink, connect) -> None:
    server = await start_sink(listen=(Address("127.0.0.1", 0), Address("::1", 0)))
    assert {host for host, _ in server.addresses} == {"127.0.0.1", "::1"}
    for address in server.addresses:
        client = await connect(address)
        assert (await client.cmd("EHLO c.test")).code == 250
        await client.send("MAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
        assert [r.code for r in await client.replies(3)] == [250, 250, 354]
        assert (await client.cmd("hi\r\n.")).code == 250
    assert server.stats.messages == 2


async def test_stats_interval_logs_counters(start_sink, connect, caplog) -> None:
    caplog.set_level(logging.INFO, logger="mailstorm.sink")
    server = await start_sink(stats_interval=0.05)
    client = await connect(server.addresses[0])
    await client.send("EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<c@d>\r\nDATA\r\n")
    await client.replies(4)
    assert (await client.cmd("x\r\n.")).code == 250
    with trio.fail_after(10):
        while not any("messages 1," in r.getMessage() for r in caplog.records):
            await trio.sleep(0.02)
    line = next(r.getMessage() for r in caplog.records if "messages 1," in r.getMessage())
    assert "sessions 1 active / 1 total" in line and "msg/s" in line and "bytes 3" in line
