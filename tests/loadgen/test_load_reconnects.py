"""Servers that end connections between messages (issue 15, item 2): a 421 after N messages
per connection (Exim's smtp_accept_max_per_connection, Postfix's rate limits) or a close after
N (idle timeouts). The session reconnects and sends the turned-away message again, counted as a
reconnect by reason, instead of failing it. Against the small trio server in load_fixtures.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import pytest
from load_fixtures import run_bounded as run
from rich.console import Console

from mailstorm.load.config import LoadConfig
from mailstorm.load.report import build_report, render_table

pytest_plugins = ("load_fixtures",)

NO_PIPELINING = ("8BITMIME", "SIZE 100000000")


@pytest.mark.parametrize(
    ("options", "extensions"),
    [
        ({}, None),
        ({"pipeline_messages": True}, None),
        ({}, NO_PIPELINING),
    ],
    ids=["pipelining", "pipeline-messages", "no-pipelining"],
)
async def test_a_421_after_n_messages_per_connection_means_reconnect(
    fake_smtp: Callable[..., Any],
    load_config: Callable[..., LoadConfig],
    options: dict[str, Any],
    extensions: tuple[str, ...] | None,
) -> None:
    behavior: dict[str, Any] = {"max_messages_per_connection": 10}
    if extensions is not None:
        behavior["extensions"] = extensions
    server = await fake_smtp(**behavior)
    stats = await run(load_config(server.port, sessions=2, messages=60, **options))
    # Every message arrives once; none fails for the server's limit.
    assert stats.delivered == server.delivered == 60
    assert stats.failed == 0 and stats.errors == 0
    assert server.limited >= 1
    assert dict(stats.reconnects) == {"421": server.limited}
    # One connection per session, and one more per 421.
    assert stats.connections == server.connections == 2 + server.limited
    assert stats.backoffs == 0  # a connection that carried messages is no failure streak


async def test_a_close_after_n_messages_means_reconnect(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(close_after_messages=5)
    stats = await run(load_config(server.port, sessions=2, messages=40))
    assert stats.delivered == server.delivered == 40
    assert stats.failed == 0 and stats.errors == 0
    assert server.limited >= 1
    # The session finds the close when it sends the next MAIL: reconnects for each close
    # it ran into (the last connection of each session may close after its final message).
    assert set(stats.reconnects) == {"closed"}
    assert server.limited - 2 <= stats.reconnects["closed"] <= server.limited
    assert stats.connections == server.connections


async def test_a_421_to_every_first_mail_is_a_failure_not_a_loop(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    """A message is sent again only after its connection carried others: a server that
    turns every connection's first message away fails them, with back-off, no retry loop."""
    server = await fake_smtp(mail_reply=b"421 4.7.0 go away\r\n")
    stats = await run(load_config(server.port, sessions=2, messages=6))
    assert stats.failed == 6 and stats.delivered == 0
    assert dict(stats.errors_by_code) == {421: 6}
    assert not stats.reconnects
    assert stats.connections == 6 and stats.backoffs == 6


async def test_the_report_counts_reconnects_by_reason(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(max_messages_per_connection=3)
    config = load_config(server.port, sessions=1, messages=10)
    stats = await run(config)
    report = build_report(config, stats)
    assert report["totals"]["reconnects"] == {"421": 3}
    out = io.StringIO()
    render_table(report, Console(file=out, width=200))
    assert "reconnects (the server ended a connection between messages" in out.getvalue()
    assert "3 after a 421" in out.getvalue()
