"""Failing targets (issue 15, item 1): the probe before the run, back-off after failed
connections, the open-loop schedule kept while sessions back off, no silent port 25, and no
saturation warning from failed connects alone.

Every run is bounded in messages and time; bounds on connection counts follow from the
back-off's minimum wait, which a slow machine can only lengthen.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from load_fixtures import run_bounded as run
from rich.console import Console

from mailstorm.load.cli import TARGET_UNREACHABLE, main
from mailstorm.load.config import LoadConfig, Target
from mailstorm.load.live import ProgressDisplay, ProgressSnapshot
from mailstorm.load.probe import probe_target
from mailstorm.load.procs import _snapshot_from_wire, _snapshot_to_wire
from mailstorm.load.protocol import LoadFailure, LoadProtocol
from mailstorm.load.report import build_report, render_table
from mailstorm.load.stats import RunStats
from mailstorm.load.workload import MessageFactory

pytest_plugins = ("load_fixtures",)


def test_a_closed_port_ends_at_once_with_one_line_and_status_4(
    unused_port: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    json_path, html_path = tmp_path / "r.json", tmp_path / "r.html"
    argv = [f"127.0.0.1:{unused_port}", "--json", str(json_path), "--html", str(html_path)]
    assert main([*argv, "--quiet"]) == TARGET_UNREACHABLE == 4
    captured = capsys.readouterr()
    assert captured.out == ""  # no report table
    assert captured.err == (
        f"mailstorm load: cannot connect to 127.0.0.1:{unused_port}: connection refused\n"
    )
    assert not json_path.exists() and not html_path.exists()


def test_help_documents_the_probe_status_and_backoff(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "4 target unreachable" in out
    assert "--backoff MIN:MAX" in out
    assert "--port PORT" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["localhost"], "no port; write localhost:PORT, add --port PORT"),
        (["localhost:2525", "--port", "25"], "--port 25 contradicts"),
        (["localhost", "--port", "70000"], "is not a port"),
        (["localhost:25", "--backoff", "5:1"], "MAX must not be less than MIN"),
        (["localhost:25", "--backoff", "x"], "is not MIN:MAX seconds"),
        (["localhost:25", "--backoff", "0:5"], "MIN must be more than 0"),
    ],
)
def test_target_and_backoff_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


async def test_a_port_that_accepts_and_closes_gets_backed_off(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp(close_at_once=True)
    sessions, duration, backoff_min = 4, 1.0, 0.1
    stats = await run(
        load_config(
            server.port,
            sessions=sessions,
            duration=duration,
            backoff_min=backoff_min,
            backoff_max=5.0,
        )
    )
    # Each session connects once, then waits at least backoff_min before each next connect:
    # without back-off this was thousands of connections a second.
    most = sessions * (math.floor(duration / backoff_min) + 2)
    assert 0 < server.connections <= most
    assert stats.connections == server.connections
    assert stats.delivered == 0 and stats.failed == stats.attempted == server.connections
    assert dict(stats.errors_by_kind) == {"reset": server.connections}
    assert stats.backoffs == server.connections  # every failed connection backed off
    assert stats.backoff_s >= backoff_min * stats.backoffs


async def test_open_loop_keeps_the_schedule_while_sessions_back_off(
    unused_port: int, load_config: Callable[..., LoadConfig]
) -> None:
    rate, duration = 50.0, 1.0
    stats = await run(
        load_config(unused_port, sessions=5, rate=rate, duration=duration, backoff_min=0.2)
    )
    scheduled = int(rate * duration)
    # Every scheduled message is attempted and fails: either its connect was refused, or it
    # came due while its session backed off and failed unstarted, at its scheduled time.
    assert stats.attempted == stats.failed == scheduled
    kinds = dict(stats.errors_by_kind)
    assert set(kinds) == {"refused", "backoff"}
    assert kinds["refused"] + kinds["backoff"] == scheduled
    # Refused connects are bounded by the back-off (at least 0.2 s between a session's tries).
    assert kinds["refused"] <= 5 * (math.floor(duration / 0.2) + 2)
    assert stats.connections == 0
    assert sum(stats.timeline.failed) == scheduled


async def test_backoff_off_with_zero(
    unused_port: int, load_config: Callable[..., LoadConfig]
) -> None:
    stats = await run(
        load_config(unused_port, sessions=2, messages=6, backoff_min=0.0, backoff_max=0.0)
    )
    assert dict(stats.errors_by_kind) == {"refused": 6}
    assert stats.backoffs == 0


class _TopOfRange:
    """A stand-in for random.Random: ``uniform`` gives the top of the range."""

    def uniform(self, low: float, high: float) -> float:
        return high


def test_backoff_ceiling_doubles_to_the_maximum_and_resets_after_messages() -> None:
    config = LoadConfig(Target("127.0.0.1", 25), backoff_min=0.1, backoff_max=1.0)
    stats = RunStats()
    protocol = LoadProtocol(
        config, stats, MessageFactory(), rng=_TopOfRange()  # type: ignore[arg-type]
    )
    failure = LoadFailure("refused", "connect: refused")
    waits = []
    for _ in range(6):
        assert protocol.connection_failed(failure, 100.0) is False
        waits.append(round(protocol.backoff_until - 100.0, 6))
    assert waits == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]
    assert protocol.backing_off(100.5) and not protocol.backing_off(101.0)
    # A connection that carried a message ends the streak: the next failure starts over.
    protocol.on_connection = 3
    protocol.connection_failed(failure, 200.0)
    assert round(protocol.backoff_until - 200.0, 6) == 0.1
    assert stats.backoffs == 7


def test_no_saturation_warning_from_failed_connects_alone() -> None:
    stats = RunStats()
    for _ in range(10):
        stats.record_loop_lag(0.2)
    config = LoadConfig(target=Target("127.0.0.1", 25))
    report = build_report(config, stats)
    assert report["generator"]["saturated"] is False
    out = io.StringIO()
    render_table(report, Console(file=out, width=200))
    assert "saturated" not in out.getvalue()
    stats.connections = 100  # connections that failed at once (accepted and closed)
    assert build_report(config, stats)["generator"]["saturated"] is False
    stats.message_delivered(1.0, 0.001, 1000)
    assert build_report(config, stats)["generator"]["saturated"] is True


async def test_the_run_connects_where_the_probe_did_without_resolving_again(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    server = await fake_smtp()
    config = load_config(
        server.port, target=Target("no-such-host.invalid", server.port), sessions=1, messages=2
    )
    config.probed_address = probe_target(Target("127.0.0.1", server.port), 5.0)
    stats = await run(config)
    assert stats.delivered == 2
    assert server.connections == 2  # the probe's and the run's: no second probe


def test_the_server_sees_the_probe_and_the_runs_connections_only(
    postfix_smtp_sink: Callable[..., Any], tmp_path: Path
) -> None:
    sink = postfix_smtp_sink()  # its fixture's own readiness check is its first session
    json_path = tmp_path / "r.json"
    argv = [f"127.0.0.1:{sink.port}", "--sessions", "3", "--messages", "12", "-q"]
    assert main([*argv, "--json", str(json_path)]) == 0
    totals = json.loads(json_path.read_text())["totals"]
    assert totals["probe_connections"] == 1 and totals["connections"] == 3
    assert sink.wait_for_messages(12) == 12
    deadline = time.monotonic() + 10
    while sink.counters()["sess"] < 1 + 1 + 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sink.counters()["sess"] == 1 + 1 + 3


def test_progress_lines_show_reconnects_and_backoffs() -> None:
    stats = RunStats()
    stats.reconnects["421"] += 2
    stats.backoffs = 5
    out = io.StringIO()
    display = ProgressDisplay(Console(file=out, width=200), live=False, plain_every=1.0)
    display.update(ProgressSnapshot.take(stats, 1.0))
    assert "reconnects 2 back-offs 5" in out.getvalue()
    merged = ProgressSnapshot(elapsed=0.0)
    merged.add(_snapshot_from_wire(_snapshot_to_wire(ProgressSnapshot.take(stats, 2.0))))
    assert (merged.reconnects, merged.backoffs) == (2, 5)  # through --procs workers
