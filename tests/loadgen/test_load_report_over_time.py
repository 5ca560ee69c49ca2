"""The report over time (issue 15, item 4): latency per second (p50/p99 of end of data and of
whole messages) that shows a stall where it happened, the last partial second by its real
length, interruption and ramp-up said in the JSON, the table and the HTML, and the console
saying where the reports went.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from load_fixtures import run_bounded as run

import mailstorm.load.cli as load_cli
from mailstorm.load.config import LoadConfig, Target
from mailstorm.load.htmlreport import curve_groups, render_html
from mailstorm.load.report import build_report, timeline_rows
from mailstorm.load.stats import PhaseHistograms, RunStats

pytest_plugins = ("load_fixtures",)


def test_take_recent_gives_each_latency_once_across_flushes() -> None:
    phases = PhaseHistograms()
    for us in (100, 100, 250):
        phases.record("eod", us / 1e6)
    assert phases.take_recent("eod") == {100: 2, 250: 1}
    assert phases.take_recent("eod") == {}
    phases.record("eod", 100 / 1e6)
    phases.by_phase  # noqa: B018  # a flush (reading the histograms) in the middle
    phases.record("eod", 300 / 1e6)
    assert phases.take_recent("eod") == {100: 1, 300: 1}
    assert phases.by_phase["eod"].get_total_count() == 5


def test_the_last_partial_second_is_taken_over_its_real_length() -> None:
    stats = RunStats()
    for second, count in ((0, 100), (1, 100), (2, 25)):
        for _ in range(count):
            stats.message_delivered(second + 0.1, 0.001, 1000)
    stats.elapsed = 2.25
    rows = timeline_rows(stats)
    assert [r["length_s"] for r in rows] == [1.0, 1.0, 0.25]
    assert [r["msg_rate"] for r in rows] == [100.0, 100.0, 100.0]  # no drop at the end
    assert all(r["charted"] for r in rows)
    stats.elapsed = 2.1  # a sliver: kept in the JSON, left out of the charts
    assert timeline_rows(stats)[-1]["charted"] is False
    # After --duration nothing starts: the messages still finishing are the drain, which the
    # throughput charts leave out (a straggler's second is no drop in throughput).
    assert [r["drain"] for r in timeline_rows(stats, duration=2.0)] == [False, False, True]
    assert not any(r["drain"] for r in timeline_rows(stats))


async def test_a_stall_shows_in_the_second_it_happened(
    fake_smtp: Callable[..., Any], load_config: Callable[..., LoadConfig]
) -> None:
    stall = 0.3
    server = await fake_smtp(stall_at=20, stall=stall)
    config = load_config(server.port, sessions=1, messages=40)
    stats = await run(config)
    assert stats.delivered == 40
    rows = build_report(config, stats)["timeline"]
    # Every message's latencies are in exactly one second.
    timeline = stats.timeline
    for phase in ("message", "eod"):
        seconds = range(len(timeline.latency[phase]))
        assert sum(sum(timeline.latency_counts(phase, i).values()) for i in seconds) == 40
    # The stalled message's end of data waited at least `stall` in the server.
    stalled = [r for r in rows if r["latency_ms"]["eod"] and r["latency_ms"]["eod"]["p99"]]
    assert max(r["latency_ms"]["eod"]["p99"] for r in stalled) >= stall * 1000 * 0.99
    assert max(r["latency_ms"]["message"]["p99"] for r in stalled) >= stall * 1000 * 0.99
    assert max(r["latency_ms"]["message"]["max"] for r in stalled) >= stall * 1000 * 0.99


def test_coinciding_curves_are_one_group() -> None:
    same = [[50.0, 1.0], [100.0, 2.0]]
    groups = curve_groups({"mail": same, "rcpt": list(same), "data": same, "eod": [[50.0, 3.0]]})
    assert [g["phases"] for g in groups] == [["mail", "rcpt", "data"], ["eod"]]


def test_ramp_up_and_interruption_are_said() -> None:
    config = LoadConfig(Target("127.0.0.1", 25), rate=100.0, ramp_up=5.0, duration=10.0)
    stats = RunStats()
    report = build_report(config, stats, interrupted=True)
    assert report["interrupted"] is True
    # 250 messages due in the ramp, 500 after: 75 msg/s on average over 10 s.
    assert report["totals"]["ramp_up_note"] == (
        "the 5s ramp-up lowers the average: over 10s the schedule asks for 75.0 msg/s on "
        "average, against the target 100 msg/s"
    )
    page = render_html(report)
    assert "Interrupted." in page and "75.0 msg/s on average" in page
    assert build_report(LoadConfig(Target("127.0.0.1", 25)), stats)["interrupted"] is False


@pytest.fixture
def listening_port() -> Iterator[int]:
    """A loopback port that accepts connections (the probe's), and says nothing."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock.getsockname()[1]


def test_an_interrupted_run_says_so_and_the_console_says_where_reports_went(
    listening_port: int,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    def interrupted_run(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(load_cli, "_run_single", interrupted_run)
    json_path, html_path = tmp_path / "r.json", tmp_path / "r.html"
    argv = [f"127.0.0.1:{listening_port}", "-q", "--json", str(json_path)]
    assert load_cli.main([*argv, "--html", str(html_path)]) == 130
    out = capsys.readouterr().out
    assert "interrupted: these results cover only the part of the run before Ctrl-C" in out
    assert f"JSON report written to {json_path}" in out
    assert f"HTML report written to {html_path}" in out
    assert json.loads(json_path.read_text())["interrupted"] is True
    assert "Interrupted." in html_path.read_text()


def test_per_second_latencies_merge_exactly_across_processes() -> None:
    """--procs: each worker's seconds travel as plain data and add up bucket by bucket."""
    workers = []
    for latencies in ((0.001, 0.001, 0.250), (0.001, 0.500)):
        stats = RunStats()
        for seconds in latencies:
            stats.message_delivered(0.5, seconds, 1000)
        stats.close_second()
        stats.message_delivered(1.5, 0.002, 1000)
        stats.close_second()
        workers.append(RunStats.from_dict(stats.to_dict()))
    merged = RunStats()
    for worker in workers:
        merged.merge(worker)
    first = merged.timeline.latency_counts("message", 0)
    assert sum(first.values()) == 5
    # Kept as the middles of their buckets of two significant digits: 1 ms is in 1.0-1.1 ms.
    assert first == {1050: 3, 255_000: 1, 505_000: 1}
    assert merged.timeline.latency_counts("message", 1) == {2050: 2}

