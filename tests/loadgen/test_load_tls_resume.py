"""TLS as real clients do it (issue 15, item 3): a session resumes its TLS session on its next
connection (on by default, ``tls_resume=False`` / ``--no-tls-resume`` turns it off); full and
resumed handshakes are timed apart, and the version and cipher are counted. Against aiosmtpd
over implicit TLS and STARTTLS, one message per connection so every message reconnects.
"""

from __future__ import annotations

import io
import ssl
from collections.abc import Callable
from typing import Any

import pytest
from load_fixtures import run_bounded as run
from rich.console import Console

from mailstorm.load.cli import build_parser
from mailstorm.load.config import LoadConfig, Target
from mailstorm.load.htmlreport import render_html
from mailstorm.load.report import build_report, render_table
from mailstorm.load.stats import RunStats

pytest_plugins = ("load_fixtures",)


def handshakes(stats: RunStats) -> tuple[int, int]:
    by_phase = stats.phases.by_phase
    return by_phase["tls"].get_total_count(), by_phase["tls_resumed"].get_total_count()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_reconnects_resume_the_tls_session(
    aiosmtpd_server: Callable[..., Any],
    load_config: Callable[..., LoadConfig],
    server_tls_context: ssl.SSLContext,
    version: ssl.TLSVersion,
) -> None:
    server_tls_context.minimum_version = server_tls_context.maximum_version = version
    server = aiosmtpd_server(ssl_context=server_tls_context)
    target = Target("127.0.0.1", server.port, implicit_tls=True)
    config = load_config(server.port, target=target, sessions=2, messages=10, per_connection=1)
    stats = await run(config)
    assert stats.delivered == server.handler.messages == 10
    full, resumed = handshakes(stats)
    # Each session's first connection is a full handshake; its next ones resume.
    assert (full, resumed) == (2, 8)
    (name,) = stats.tls_ciphers
    assert name.startswith(version.name.replace("v1_", "v1."))
    assert stats.tls_ciphers[name] == 10
    report = build_report(config, stats)
    assert report["tls"]["full_handshakes"] == 2 and report["tls"]["resumed_handshakes"] == 8
    assert report["phases"]["tls_resumed"]["count"] == 8
    out = io.StringIO()
    render_table(report, Console(file=out, width=200))
    assert "TLS: 2 full handshakes, 8 resumed (resumption on)" in out.getvalue()
    assert "TLS resumed handshakes" in render_html(report)


async def test_no_tls_resume_makes_every_handshake_full(
    aiosmtpd_server: Callable[..., Any],
    load_config: Callable[..., LoadConfig],
    server_tls_context: ssl.SSLContext,
) -> None:
    server = aiosmtpd_server(ssl_context=server_tls_context)
    target = Target("127.0.0.1", server.port, implicit_tls=True)
    config = load_config(
        server.port, target=target, sessions=2, messages=6, per_connection=1, tls_resume=False
    )
    stats = await run(config)
    assert stats.delivered == 6
    assert handshakes(stats) == (6, 0)


async def test_starttls_reconnects_resume_too(
    aiosmtpd_server: Callable[..., Any],
    load_config: Callable[..., LoadConfig],
    server_tls_context: ssl.SSLContext,
) -> None:
    server = aiosmtpd_server(tls_context=server_tls_context)
    config = load_config(server.port, sessions=1, messages=4, per_connection=1, starttls=True)
    stats = await run(config)
    assert stats.delivered == server.handler.messages == 4
    assert handshakes(stats) == (1, 3)


def test_the_option_turns_resumption_off() -> None:
    parser = build_parser("mailstorm load")
    assert parser.parse_args(["127.0.0.1:25"]).tls_resume is True
    assert parser.parse_args(["127.0.0.1:25", "--no-tls-resume"]).tls_resume is False
