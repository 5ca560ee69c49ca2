"""The load generator against Postfix's smtp-sink (Debian package postfix), started by the test
on a loopback port. Its running counters (-c) say how many messages it received."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from mailstorm.load.config import LoadConfig
from mailstorm.load.runner import run_load
from mailstorm.load.stats import RunStats

pytest_plugins = ("load_fixtures",)

LIMIT = 60


async def run(config: LoadConfig) -> RunStats:
    with trio.fail_after(LIMIT):
        return await run_load(config)


async def counted(sink: Any, expected: int) -> int:
    return await trio.to_thread.run_sync(sink.wait_for_messages, expected)


async def test_closed_loop_count_matches(
    postfix_smtp_sink: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    sink = postfix_smtp_sink()
    stats = await run(load_config(sink.port, sessions=50, messages=2000))
    assert stats.delivered == 2000 and stats.errors == 0
    assert await counted(sink, 2000) == 2000
    # smtp-sink offers PIPELINING: MAIL, RCPT and DATA were answered for every message.
    for phase in ("mail", "rcpt", "data", "eod", "message"):
        assert stats.phases.by_phase[phase].get_total_count() == 2000


async def test_connection_rate_mode(
    postfix_smtp_sink: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    sink = postfix_smtp_sink()
    stats = await run(load_config(sink.port, sessions=10, messages=200, per_connection=1))
    assert stats.delivered == 200 and stats.connections == 200
    assert await counted(sink, 200) == 200


async def test_open_loop_count(
    postfix_smtp_sink: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    sink = postfix_smtp_sink()
    stats = await run(load_config(sink.port, sessions=20, rate=200.0, duration=1.5, ramp_up=0.5))
    # 200/s for 1.5 s after a 0.5 s ramp: 50 during the ramp, then 200 more.
    assert stats.attempted == 250
    assert stats.delivered == 250
    assert await counted(sink, 250) == 250


async def test_lmtp_mode(
    postfix_smtp_sink: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    sink = postfix_smtp_sink("-L")
    stats = await run(load_config(sink.port, sessions=5, messages=100, rcpts=2, lmtp=True))
    assert stats.delivered == 100 and stats.errors == 0
    assert stats.phases.by_phase["eod"].get_total_count() == 200
    assert await counted(sink, 100) == 100


async def test_auth_and_size_mix(
    postfix_smtp_sink: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    sink = postfix_smtp_sink()
    config = load_config(
        sink.port,
        sessions=4,
        messages=40,
        auth_user="u",
        auth_password="p",
        size_mix=[(1024, 3.0), (100 * 1024, 1.0)],
    )
    stats = await run(config)
    assert stats.delivered == 40 and stats.errors == 0
    assert stats.phases.by_phase["auth"].get_total_count() == 4
    assert 10 * 100 * 1024 < stats.bytes_delivered < 40 * 100 * 1024
    assert await counted(sink, 40) == 40


async def test_soft_rejections_are_counted(
    postfix_smtp_sink: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    sink = postfix_smtp_sink("-r", "RCPT")
    stats = await run(load_config(sink.port, sessions=2, messages=10))
    assert stats.delivered == 0 and stats.failed == 10
    assert stats.errors_by_kind["4xx"] == 10
