"""``--pipeline-messages``: each message's commands ride with the previous message's content.

Every message still ends exactly once, a connection that fails takes every message in flight
with it (each counted), ``--per-connection`` is kept exactly, and the stored content is exact.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from conftest import TaskSteps
from load_fixtures import run_bounded as run

from mailstorm._net.readiness import hub_enabled
from mailstorm.load.config import LoadConfig
from mailstorm.load.schedule import MessageTickets, OpenLoopSchedule

pytest_plugins = ("load_fixtures",)



async def test_messages_ride_with_the_content_before_them(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp()
    stats = await run(load_config(server.port, sessions=2, messages=40, pipeline_messages=True))
    assert stats.delivered == server.delivered == 40 and stats.errors == 0
    # Every message but each session's first came in the write of the one before (the server
    # sees that only where the write arrived in one read: TCP may split it).
    assert 0 < server.mail_behind_content <= 38
    for phase in ("mail", "rcpt", "data", "eod", "message"):
        assert stats.phases.by_phase[phase].get_total_count() == 40, phase

    server = await fake_smtp()
    stats = await run(load_config(server.port, sessions=2, messages=40))
    assert stats.delivered == 40 and server.mail_behind_content == 0  # off by default


async def test_without_pipelining_offered_the_report_says_it_did_nothing(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    import io

    from rich.console import Console

    from mailstorm.load.report import build_report, render_table

    server = await fake_smtp(extensions=("8BITMIME",))
    config = load_config(server.port, sessions=2, messages=10, pipeline_messages=True)
    stats = await run(config)
    assert stats.delivered == 10 and server.mail_behind_content == 0
    assert stats.unpipelined_connections == stats.connections == 2
    out = io.StringIO()
    render_table(build_report(config, stats), Console(file=out, width=200))
    assert "--pipeline-messages had no effect on 2 connection(s)" in out.getvalue()


async def test_per_connection_is_kept(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp()
    stats = await run(
        load_config(server.port, sessions=2, messages=70, per_connection=7, pipeline_messages=True)
    )
    assert stats.delivered == 70
    assert stats.connections == server.connections == 10
    # Within each connection the second to the seventh message may ride behind content (at
    # most 60); how many the server saw in the same read depends on TCP segmenting.
    assert 0 < server.mail_behind_content <= 60


async def test_a_dropped_connection_fails_every_message_in_flight(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    # The server hangs up after the first content, with the next message's commands read.
    server = await fake_smtp(drop_after_messages=1)
    stats = await run(load_config(server.port, sessions=1, messages=4, pipeline_messages=True))
    assert stats.delivered == 0 and stats.failed == 4
    assert dict(stats.errors_by_kind) == {"reset": 4}
    assert stats.connections == 2


async def test_a_timeout_fails_every_message_in_flight(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(eod_delay=10.0)
    stats = await run(
        load_config(server.port, sessions=1, messages=4, timeout=0.3, pipeline_messages=True)
    )
    assert stats.failed == 4
    assert dict(stats.errors_by_kind) == {"timeout": 4}
    assert stats.connections == 2  # two messages in flight on each connection


async def test_refusals_at_end_of_data_do_not_disturb_the_next_message(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(nth=3, eod_reply_nth=b"554 5.6.0 rejected\r\n")
    stats = await run(load_config(server.port, sessions=2, messages=30, pipeline_messages=True))
    assert stats.delivered == server.delivered == 20
    assert dict(stats.errors_by_code) == {554: 10}
    assert stats.connections == 2


async def test_open_loop_only_pipelines_messages_that_are_due(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp()
    stats = await run(
        load_config(server.port, sessions=1, rate=20, messages=10, pipeline_messages=True)
    )
    assert stats.delivered == 10
    # 50 ms apart, against a server that answers at once: never one due behind another.
    assert server.mail_behind_content == 0


async def test_take_now_never_waits() -> None:
    start = trio.current_time()
    tickets = MessageTickets(
        start=start, messages=3, duration=None, schedule=OpenLoopSchedule(rate=1.0)
    )
    assert tickets.take_now() == (0, start)
    assert tickets.take_now() is None  # due a second from now
    closed = MessageTickets(start=start, messages=2, duration=None)
    first, second = closed.take_now(), closed.take_now()
    assert first is not None and second is not None
    assert (first[0], second[0]) == (0, 1)
    assert closed.take_now() is None  # the run is over


async def test_own_sink_stores_every_message_exactly(
    start_sink: Callable[..., Any], load_config: Callable[..., LoadConfig], tmp_path: Path
) -> None:
    maildir = tmp_path / "Maildir"
    sink = await start_sink(store=f"maildir:{maildir}")
    stats = await run(
        load_config(sink.addresses[0][1], sessions=4, messages=120, pipeline_messages=True)
    )
    assert stats.delivered == 120 and stats.errors == 0
    assert sum(1 for p in (maildir / "new").iterdir() if p.is_file()) == 120


@pytest.mark.skipif(not hub_enabled(), reason="the readiness hub is off (no epoll, or NO_HUB)")
async def test_a_chain_of_messages_is_served_without_waking_the_session_task(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    # With every message one write and one read, the readiness hub does the reads (and the
    # writes they allow) in its own turn: the session's task wakes for the connection's set-up
    # and the chain's end, not once per message.
    server = await fake_smtp()
    config = load_config(server.port, sessions=1, messages=300, pipeline_messages=True)
    steps = TaskSteps("_session_main")
    trio.lowlevel.add_instrument(steps)
    try:
        stats = await run(config)
    finally:
        trio.lowlevel.remove_instrument(steps)
    assert stats.delivered == server.delivered == 300 and stats.errors == 0
    assert stats.phases.by_phase["message"].get_total_count() == 300
    assert steps.steps < 60, steps.steps  # one wake-up per message would be 300 or more
