"""Network options: source addresses spread round-robin, IPv6 targets, closed-loop ramp-up,
and the progress display in both its forms."""

from __future__ import annotations

import io
import socket
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import trio
from rich.console import Console

from mailstorm.load.config import LoadConfig, Target
from mailstorm.load.live import ProgressDisplay, ProgressSnapshot
from mailstorm.load.runner import run_load
from mailstorm.load.stats import RunStats

pytest_plugins = ("load_fixtures",)


async def test_source_addresses_round_robin(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp()
    config = load_config(
        server.port,
        sessions=4,
        messages=12,
        per_connection=1,
        source_addresses=["127.0.0.2", "127.0.0.3"],
    )
    with trio.fail_after(30):
        stats = await run_load(config)
    assert stats.delivered == 12 and stats.errors == 0
    assert Counter(server.peers) == {"127.0.0.2": 6, "127.0.0.3": 6}


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this machine")
async def test_ipv6_target(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(host="::1")
    config = load_config(server.port, target=Target("::1", server.port), sessions=2, messages=6)
    with trio.fail_after(30):
        stats = await run_load(config)
    assert stats.delivered == server.delivered == 6
    assert set(server.peers) == {"::1"}


async def test_closed_loop_ramp_up_staggers_sessions(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp()
    config = load_config(server.port, sessions=4, duration=1.0, ramp_up=0.6)
    with trio.fail_after(30):
        stats = await run_load(config)
    assert stats.delivered == server.delivered > 0
    assert server.connections == 4
    # Starts are staggered over the ramp (offsets 0, 0.15, 0.3, 0.45 s): the connections
    # cannot come much closer together than that, however slow the machine.
    assert max(server.connected_at) - min(server.connected_at) >= 0.2
    assert stats.timeline.delivered[0] > 0 and stats.failed == 0


def _snapshot(elapsed: float, delivered: int) -> ProgressSnapshot:
    stats = RunStats()
    stats.attempted = delivered
    for _ in range(delivered):
        stats.message_delivered(0.0, 0.004, 1000)
    return ProgressSnapshot.take(stats, elapsed)


def test_plain_progress_lines_when_not_a_terminal() -> None:
    out = io.StringIO()
    display = ProgressDisplay(Console(file=out, width=80), live=False, plain_every=2.0)
    display.start()
    for second in range(1, 7):
        display.update(_snapshot(float(second), 100 * second))
    display.stop()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # at 2, 4 and 6 seconds
    assert "delivered 600" in lines[-1] and "100.0 msg/s" in lines[-1]
    assert "p99(message) 4.00ms" in lines[-1]
    assert "\x1b[" not in out.getvalue()


def test_live_panel_on_a_terminal() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=100)
    display = ProgressDisplay(console, live=True, target="smtp://127.0.0.1:25", target_rate=50)
    display.start()
    display.update(_snapshot(1.0, 50))
    display.update(_snapshot(2.0, 100))
    display.stop()
    text = out.getvalue()
    assert "mailstorm load" in text and "50.0 msg/s" in text and "50 target" in text
    assert "\x1b[" in text  # a live, redrawn panel
