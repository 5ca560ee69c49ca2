"""Servers that refuse, drop, stall, reject or talk nonsense: every error is counted once, by
kind, every message ends delivered or failed, and nothing hangs (each run is bounded).

Also BDAT (CHUNKING) and coordinated omission, against the small trio server in conftest.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from load_fixtures import run_bounded as run

from mailstorm.load.config import LoadConfig
from mailstorm.load.workload import MessageFactory

pytest_plugins = ("load_fixtures",)



async def test_connection_refused(unused_port: int, load_config: Callable[..., LoadConfig]) -> None:
    stats = await run(load_config(unused_port, sessions=3, messages=9))
    assert stats.failed == 9 and stats.delivered == 0
    assert dict(stats.errors_by_kind) == {"refused": 9}
    assert stats.connections == 0


async def test_server_drops_the_connection_mid_session(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(drop_on="DATA", extensions=("8BITMIME",))
    stats = await run(load_config(server.port, sessions=2, messages=6))
    assert stats.failed == 6 and server.delivered == 0
    assert dict(stats.errors_by_kind) == {"reset": 6}
    # Each failure dropped the connection; the next message reconnected.
    assert stats.connections == 6
    assert any("data: connection closed" in e for e in stats.error_samples)


async def test_4xx_and_5xx_replies_are_counted_by_code(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(mail_reply=b"451 4.3.0 busy\r\n")
    stats = await run(load_config(server.port, sessions=2, messages=8))
    assert stats.failed == 8
    assert dict(stats.errors_by_kind) == {"4xx": 8}
    assert dict(stats.errors_by_code) == {451: 8}
    # A refused MAIL is a message-level error: the connections stay up.
    assert stats.connections == 2

    server = await fake_smtp(rcpt_reply=b"550 5.1.1 no such user\r\n")
    stats = await run(load_config(server.port, sessions=2, messages=8, rcpts=2))
    assert stats.failed == 8
    assert dict(stats.errors_by_kind) == {"5xx": 16}  # each refused recipient counts
    assert dict(stats.errors_by_code) == {550: 16}
    assert server.delivered == 0
    # No recipient accepted: the transaction was reset before the next one.
    assert any(c == "RSET" for c in server.commands)


async def test_some_messages_refused_at_end_of_data(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(nth=4, eod_reply_nth=b"554 5.6.0 rejected\r\n")
    stats = await run(load_config(server.port, sessions=3, messages=40))
    assert stats.delivered == server.delivered == 30
    assert stats.failed == 10
    assert dict(stats.errors_by_code) == {554: 10}
    assert stats.phases.by_phase["eod"].get_total_count() == 30  # only 2xx are timed


async def test_server_that_never_replies_times_out(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(banner=None)
    stats = await run(load_config(server.port, sessions=2, messages=4, timeout=0.3))
    assert stats.failed == 4
    assert dict(stats.errors_by_kind) == {"timeout": 4}
    assert any(e.startswith("banner: no reply") for e in stats.error_samples)


async def test_server_that_stalls_at_end_of_data_times_out(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    # The content is read, its reply never comes in time: a timeout in the middle of a message.
    server = await fake_smtp(eod_delay=10.0)
    stats = await run(load_config(server.port, sessions=2, messages=4, timeout=0.3))
    assert stats.failed == 4 and stats.delivered == 0
    assert dict(stats.errors_by_kind) == {"timeout": 4}
    assert all(e.startswith("eod: no reply within 0.3s") for e in stats.error_samples)
    assert server.ended == 4  # every content arrived whole
    assert stats.connections == 4  # a timed-out connection is not reused


async def test_server_that_never_answers_quit_times_out(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(hang_on="QUIT")
    stats = await run(load_config(server.port, sessions=2, messages=4, timeout=1.0))
    # The messages were delivered; only the QUITs went unanswered.
    assert stats.delivered == 4 == server.delivered
    assert dict(stats.errors_by_kind) == {"timeout": 2}


async def test_refused_banner_and_garbage_are_errors(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(banner=b"554 5.3.2 not now\r\n")
    stats = await run(load_config(server.port, sessions=2, messages=4))
    assert dict(stats.errors_by_kind) == {"5xx": 4}
    assert dict(stats.errors_by_code) == {554: 4}

    server = await fake_smtp(banner=b"SSH-2.0-OpenSSH_9.2\r\n")
    stats = await run(load_config(server.port, sessions=2, messages=4))
    assert dict(stats.errors_by_kind) == {"protocol": 4}

    server = await fake_smtp(banner=b"421 4.3.2 shutting down\r\n")
    stats = await run(load_config(server.port, sessions=1, messages=3))
    assert dict(stats.errors_by_code) == {421: 3}


async def test_bdat_delivers_exact_content(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp()
    config = load_config(server.port, sessions=2, messages=10, chunking=True)
    stats = await run(config)
    assert stats.delivered == server.delivered == 10 and stats.errors == 0
    assert server.pipelined_groups == 10  # MAIL, RCPT and BDAT in one write each
    assert not any(c.startswith("DATA") for c in server.commands)
    factory = MessageFactory()
    for body in server.bodies:
        # The stored content is the generated message: head + shared body, byte for byte.
        n = int(body.split(b"Subject: mailstorm load test ", 1)[1].split(b"\r\n", 1)[0])
        msg = factory.message(n)
        assert body.endswith(msg.payload.raw)


async def test_bdat_in_chunks_without_pipelining(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(extensions=("CHUNKING",))
    config = load_config(
        server.port, sessions=1, messages=3, chunking=True, chunk_size=300, size_mix=[(1000, 1.0)]
    )
    stats = await run(config)
    assert stats.delivered == server.delivered == 3
    assert stats.phases.by_phase["bdat"].get_total_count() == 9  # 3 chunks of 300, then LAST
    assert server.pipelined_groups == 0


async def test_chunking_not_offered_is_a_protocol_error(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(extensions=("PIPELINING",))
    stats = await run(load_config(server.port, sessions=1, messages=2, chunking=True))
    assert dict(stats.errors_by_kind) == {"protocol": 2}
    assert any("CHUNKING" in e for e in stats.error_samples)


async def test_open_loop_latency_includes_waiting_for_a_session(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    # One session, 20 messages due within 1 s, but the server takes 0.1 s per message: the
    # last messages start about a second late, and that wait is part of their latency
    # (coordinated omission would hide it and report ~0.1 s).
    server = await fake_smtp(eod_delay=0.1)
    stats = await run(load_config(server.port, sessions=1, rate=20.0, duration=1.0))
    assert stats.delivered == server.delivered == 20
    message = stats.phases.by_phase["message"]
    # us: the last message was due at 0.95 s and cannot end before 20 * 0.1 s.
    assert message.get_max_value() >= 1_000_000
