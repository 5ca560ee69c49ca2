"""The load generator against aiosmtpd, a server no one here wrote, over loopback.

Every run is bounded by ``trio.fail_after``; counts must match what aiosmtpd's handler saw.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from typing import Any

import trio

from mailstorm.load.config import LoadConfig, Target
from mailstorm.load.runner import run_load
from mailstorm.load.stats import RunStats

pytest_plugins = ("load_fixtures",)

LIMIT = 60


async def run(config: LoadConfig) -> RunStats:
    with trio.fail_after(LIMIT):
        return await run_load(config)


def count(stats: RunStats, phase: str) -> int:
    return stats.phases.by_phase[phase].get_total_count()


async def test_closed_loop_delivered_equals_server_count(
    aiosmtpd_server: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = aiosmtpd_server()
    stats = await run(load_config(server.port, sessions=5, messages=60, rcpts=2))
    assert stats.attempted == stats.delivered == 60
    assert server.handler.messages == 60
    assert server.handler.rcpts == 120
    assert stats.failed == 0 and stats.errors == 0
    assert count(stats, "eod") == count(stats, "message") == 60
    assert count(stats, "rcpt") == 120
    assert count(stats, "connect") == count(stats, "banner") == count(stats, "quit") == 5
    assert stats.connections == 5
    assert sum(stats.timeline.delivered) == 60
    assert stats.bytes_delivered > 60 * 900


async def test_per_connection_reconnects(
    aiosmtpd_server: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = aiosmtpd_server()
    stats = await run(load_config(server.port, sessions=3, messages=20, per_connection=1))
    assert stats.delivered == server.handler.messages == 20
    assert stats.connections == 20
    assert count(stats, "quit") == 20


async def test_open_loop_tracks_the_rate(
    aiosmtpd_server: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = aiosmtpd_server()
    rate, duration = 40.0, 2.0
    stats = await run(load_config(server.port, sessions=8, rate=rate, duration=duration))
    # Exactly the messages due in the window are sent: rate * duration.
    assert stats.attempted == 80
    assert stats.delivered == server.handler.messages == 80
    # Open loop, not a burst: the last message is due at 79 / 40 s and cannot end earlier.
    # (A lower bound only: a slow machine makes it easier, never flaky.)
    assert stats.elapsed >= (stats.attempted - 1) / rate
    assert len(stats.timeline.delivered) >= 2


async def test_pipelining_on_and_off(
    aiosmtpd_server: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = aiosmtpd_server(pipelining=True)
    for mode in ("auto", "on", "off"):
        stats = await run(
            load_config(server.port, sessions=4, messages=20, rcpts=3, pipelining=mode)
        )
        assert stats.delivered == 20 and stats.errors == 0
    assert server.handler.messages == 60
    assert server.handler.rcpts == 180


async def test_starttls_with_verification(
    aiosmtpd_server: Callable[..., Any],
    load_config: Callable[..., LoadConfig],
    server_tls_context: ssl.SSLContext,
    ca_file: str,
) -> None:
    server = aiosmtpd_server(tls_context=server_tls_context)
    config = load_config(
        server.port,
        sessions=3,
        messages=12,
        starttls=True,
        ca_file=ca_file,
        tls_server_name="localhost",
    )
    stats = await run(config)
    assert stats.delivered == server.handler.messages == 12
    assert count(stats, "starttls") == count(stats, "tls") == 3
    assert count(stats, "ehlo") == 6  # before and after the upgrade


async def test_starttls_verification_failure_is_a_tls_error(
    aiosmtpd_server: Callable[..., Any],
    load_config: Callable[..., LoadConfig],
    server_tls_context: ssl.SSLContext,
    ca_file: str,
) -> None:
    server = aiosmtpd_server(tls_context=server_tls_context)
    config = load_config(
        server.port,
        sessions=2,
        messages=4,
        starttls=True,
        ca_file=ca_file,
        tls_server_name="wrong.name.test",
    )
    stats = await run(config)
    assert stats.delivered == 0 and server.handler.messages == 0
    assert stats.errors_by_kind["tls"] == 4


async def test_implicit_tls(
    aiosmtpd_server: Callable[..., Any],
    load_config: Callable[..., LoadConfig],
    server_tls_context: ssl.SSLContext,
) -> None:
    server = aiosmtpd_server(ssl_context=server_tls_context)
    target = Target("127.0.0.1", server.port, implicit_tls=True)
    stats = await run(load_config(server.port, target=target, sessions=2, messages=10))
    assert stats.delivered == server.handler.messages == 10
    assert count(stats, "tls") == 2


async def test_auth_plain_and_login(
    aiosmtpd_server: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = aiosmtpd_server(auth=True)
    for mech in ("PLAIN", "LOGIN"):
        config = load_config(
            server.port,
            sessions=2,
            messages=10,
            auth_user="alice",
            auth_password="wonderland",
            auth_mech=mech,
        )
        stats = await run(config)
        assert stats.delivered == 10 and stats.errors == 0
        assert count(stats, "auth") == 2
    assert server.handler.messages == 20


async def test_auth_refused_counts_5xx(
    aiosmtpd_server: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = aiosmtpd_server(auth=True)
    config = load_config(
        server.port,
        sessions=2,
        messages=6,
        auth_user="alice",
        auth_password="wrong",
        auth_mech="LOGIN",
    )
    stats = await run(config)
    assert stats.delivered == 0 and stats.failed == 6
    assert stats.errors_by_code[535] == 6 and stats.errors_by_kind["5xx"] == 6
    assert server.handler.messages == 0


async def test_lmtp_reply_per_recipient(
    aiosmtpd_server: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = aiosmtpd_server(lmtp=True)
    stats = await run(load_config(server.port, sessions=3, messages=15, rcpts=3, lmtp=True))
    assert stats.delivered == server.handler.messages == 15
    assert count(stats, "eod") == 45  # one reply per accepted recipient
    assert stats.errors == 0


async def test_dot_stuffed_content_arrives_intact(
    aiosmtpd_server: Callable[..., Any], load_config: Callable[..., LoadConfig], tmp_path: Any
) -> None:
    server = aiosmtpd_server()
    eml = tmp_path / "dots.eml"
    eml.write_bytes(b"Subject: dots\r\n\r\n.starts with a dot\r\n..two\r\n.\r\nend\r\n")
    stats = await run(load_config(server.port, sessions=1, messages=2, eml=str(eml)))
    assert stats.delivered == 2
    assert server.handler.bodies[0] == eml.read_bytes()
