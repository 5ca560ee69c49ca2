"""``mailstorm report merge`` (issue 13, item 5): reports of runs on several machines merged
into one, counts summed and histograms added, so its percentiles are exactly those of the
histograms merged by hand; associative; bad files refused in one line with exit status 2; and
end to end, two real ``mailstorm load --json`` runs against sinks with different latencies.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hdrh.histogram import HdrHistogram

from mailstorm.load.config import LoadConfig, Target
from mailstorm.load.merge import main as merge_main
from mailstorm.load.merge import merge_reports
from mailstorm.load.report import (
    CURVE_PERCENTILES,
    OVER_TIME_PERCENTILES,
    PERCENTILES,
    build_report,
    percentile_curve,
    phase_summary,
)
from mailstorm.load.stats import RunStats, counts_percentile, value_at_percentiles
from mailstorm.sink import SinkThread

#: Every subprocess here ends within this many seconds.
RUN_LIMIT = 60


def _run_report(
    eod_ms: list[float], *, started_at: float, failed: int = 0, port: int = 2525
) -> dict[str, Any]:
    """A report made by the load generator's own code from a run with these latencies."""
    stats = RunStats()
    for i, ms in enumerate(eod_ms):
        stats.attempted += 1
        stats.phases.record("eod", ms / 1000)
        stats.phases.record("connect", 0.0002)
        stats.message_delivered(i * 0.01, ms / 1000 + 0.001, 1000)
    for _ in range(failed):
        stats.attempted += 1
        stats.message_failed(0.5)
        stats.reply_error("eod", 452, "4.3.1 busy")
    stats.connections = 3
    stats.reconnects["421"] += 1
    stats.elapsed = stats.wall = len(eod_ms) * 0.01 + 0.5
    stats.close_second()
    config = LoadConfig(Target("127.0.0.1", port), sessions=3, messages=len(eod_ms) + failed)
    return build_report(config, stats, started_at=started_at, probe_connections=1)


def _fast() -> dict[str, Any]:
    return _run_report([0.3 + 0.01 * i for i in range(150)], started_at=1_700_000_000.25)


def _slow() -> dict[str, Any]:
    return _run_report(
        [20 + 0.5 * i for i in range(100)], started_at=1_700_000_001.5, failed=4, port=2526
    )


def _hand_merged(reports: list[dict[str, Any]], phase: str) -> HdrHistogram:
    hists = [HdrHistogram.decode(r["histograms"][phase].encode()) for r in reports]
    merged = hists[0]
    for hist in hists[1:]:
        merged.add(hist)
    return merged


def test_merged_percentiles_are_those_of_the_histograms_merged_by_hand() -> None:
    fast, slow = _fast(), _slow()
    merged = merge_reports([fast, slow], ["fast.json", "slow.json"])
    assert set(merged["phases"]) == {"connect", "eod", "message"}
    for phase in merged["phases"]:
        by_hand = _hand_merged([fast, slow], phase)
        assert merged["phases"][phase] == phase_summary(by_hand)
        assert merged["percentile_curves"][phase] == percentile_curve(by_hand)
        # And against hdrh's own percentile walk, for every percentile the report has.
        percentiles = [p for p, _ in PERCENTILES] + list(CURVE_PERCENTILES)
        ours = value_at_percentiles(by_hand, percentiles)
        assert ours == [by_hand.get_value_at_percentile(p) for p in percentiles]
    eod = merged["phases"]["eod"]
    assert eod["count"] == 250
    # Not the average of the two p50s: 150 fast of 250, so the merged median is a fast one.
    assert (
        fast["phases"]["eod"]["p50_ms"] < eod["p50_ms"] < 2 < 20 <= slow["phases"]["eod"]["min_ms"]
    )
    assert eod["p90_ms"] > 20  # the slow run's tail
    assert eod["max_ms"] == slow["phases"]["eod"]["max_ms"]
    assert eod["min_ms"] == fast["phases"]["eod"]["min_ms"]


def test_counts_sum_and_rates_span_the_earliest_start_to_the_latest_end() -> None:
    fast, slow = _fast(), _slow()
    warnings: list[str] = []
    merged = merge_reports([fast, slow], ["fast.json", "slow.json"], warnings)
    totals = merged["totals"]
    assert totals["attempted"] == 254 and totals["delivered"] == 250 and totals["failed"] == 4
    assert totals["errors"] == 4 and totals["error_rate"] == round(4 / 254, 6)
    assert totals["bytes"] == 250_000
    assert totals["connections"] == 6 and totals["probe_connections"] == 2
    assert totals["reconnects"] == {"421": 2}
    assert merged["errors"]["by_kind"] == {"4xx": 4}
    assert merged["errors"]["by_code"] == {"452": 4}
    assert merged["errors"]["samples"] == [{"error": "eod: 452 4.3.1 busy", "count": 4}]
    # fast: 0.25 .. 2.25; slow: 1.5 .. 3.0 (elapsed 1.5): 2.75 s from first start to last end.
    assert totals["elapsed_s"] == 2.75
    assert totals["msg_rate"] == round(250 / 2.75, 2)
    assert merged["started_at_unix"] == 1_700_000_000.25
    assert merged["config"]["sessions"] == 6
    assert merged["config"]["messages"] == 254
    assert merged["config"]["target"] == "smtp://127.0.0.1:2525 + smtp://127.0.0.1:2526"
    assert warnings == [
        'the runs differ in target: "smtp://127.0.0.1:2525", "smtp://127.0.0.1:2526"'
    ]
    # Timelines by absolute second: the slow run started a second later (1.25 s, rounded).
    timeline = merged["timeline"]
    assert sum(row["delivered"] for row in timeline) == 250
    assert sum(row["failed"] for row in timeline) == 4
    assert [row["delivered"] for row in timeline] == [100, 150]
    # Only the slow run kept latencies for that second (the fast one closed one second).
    assert timeline[1]["latency_ms"]["eod"] == slow["timeline"][0]["latency_ms"]["eod"]
    assert timeline[0]["latency_ms"]["eod"] == fast["timeline"][0]["latency_ms"]["eod"]
    assert [run["file"] for run in merged["merged_from"]] == ["fast.json", "slow.json"]
    assert merged["merged_from"][1]["delivered"] == 100


def test_reports_without_start_times_take_the_longest_run_and_say_so() -> None:
    fast, slow = _fast(), _slow()
    del fast["started_at_unix"]
    merged = merge_reports([fast, slow], ["fast.json", "slow.json"])
    assert merged["totals"]["elapsed_s"] == 2.0  # the fast run's, the longer one
    assert "longest run" in merged["totals"]["span_note"]
    assert "aligned at their starts" in merged["timeline_note"]
    timeline = merged["timeline"]
    assert [row["delivered"] for row in timeline] == [200, 50]
    # A second both runs kept latencies for: the percentiles of both runs' counts together.
    counts: Counter[int] = Counter()
    for report in (fast, slow):
        flat = report["timeline_latency_counts"]["eod"][0]
        counts.update(dict(zip(flat[::2], flat[1::2], strict=True)))
    assert timeline[0]["latency_ms"]["eod"] == {
        key: counts_percentile(counts, p) / 1000 for p, key in OVER_TIME_PERCENTILES
    }
    assert (
        timeline[0]["latency_ms"]["eod"]["p50"] < 2 < 20 < timeline[0]["latency_ms"]["eod"]["p99"]
    )


def test_reports_without_per_second_counts_give_no_latency_per_second() -> None:
    fast, slow = _fast(), _slow()
    del slow["timeline_latency_counts"]
    merged = merge_reports([fast, slow], ["fast.json", "slow.json"])
    assert all(row["latency_ms"] == {"eod": None, "message": None} for row in merged["timeline"])
    assert "no latency per second" in merged["timeline_note"]
    assert "timeline_latency_counts" not in merged


def test_merging_is_associative_in_counts_and_histograms() -> None:
    # (Timelines are too, but for the rounding of each run's start to the second.)
    a, b, c = _fast(), _slow(), _run_report([5.0] * 40, started_at=1_700_000_000.0)
    left = merge_reports([merge_reports([a, b], ["a", "b"]), c], ["ab", "c"])
    right = merge_reports([a, merge_reports([b, c], ["b", "c"])], ["a", "bc"])
    for key in ("totals", "phases", "percentile_curves", "errors", "histograms", "backoff"):
        assert left[key] == right[key], key
    assert [run["file"] for run in left["merged_from"]] == ["a", "b", "c"]
    assert left["merged_from"] == right["merged_from"]


def _write(tmp_path: Path, name: str, content: str) -> str:
    path = tmp_path / name
    path.write_text(content)
    return str(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not JSON"),
        ('{"hello": 1}', "not a mailstorm load --json report"),
        ("[1, 2]", "not a mailstorm load --json report"),
        (
            json.dumps({**_fast(), "report_version": 99}),
            "report_version 99 is not supported",
        ),
        (
            json.dumps({**_fast(), "histograms": {"eod": "HISTFAAAAbad"}}),
            "histogram 'eod' does not decode",
        ),
        (json.dumps({k: v for k, v in _fast().items() if k != "totals"}), "malformed report"),
        (json.dumps({**_fast(), "timeline": [{"second": 0}]}), "malformed report: no 'delivered'"),
        (json.dumps({**_fast(), "totals": {"attempted": "many"}}), "malformed report"),
    ],
)
def test_bad_files_are_one_line_and_exit_status_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    good = _write(tmp_path, "good.json", json.dumps(_fast()))
    bad = _write(tmp_path, "bad.json", content)
    assert merge_main([good, bad]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "bad.json" in err


def test_missing_file_and_bad_fail_if_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = _write(tmp_path, "good.json", json.dumps(_fast()))
    assert merge_main([good, str(tmp_path / "nope.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot read" in err
    (tmp_path / "latin1.json").write_bytes(b'{"tool": "caf\xe9"}')
    assert merge_main([good, str(tmp_path / "latin1.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "latin1.json: cannot read" in err
    assert merge_main([good, "--fail-if", "p99(eod)>50mss"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    assert merge_main([good, "--json", str(tmp_path / "no" / "m.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.count("--json") == 1 and "no such folder" in err


def test_fail_if_gates_on_the_merged_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fast = _write(tmp_path, "fast.json", json.dumps(_fast()))
    slow = _write(tmp_path, "slow.json", json.dumps(_slow()))
    out = tmp_path / "m.json"
    assert merge_main([fast, "--fail-if", "p99(eod)>10ms"]) == 0
    assert merge_main([fast, slow, "--fail-if", "p99(eod)>10ms", "--json", str(out)]) == 1
    merged = json.loads(out.read_text())
    assert merged["fail_if"]["failed"] is True
    assert "FAILED" in capsys.readouterr().out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The checkout under test wins over an installed copy, in the subprocesses too.
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _mailstorm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mailstorm", *args],
        capture_output=True,
        text=True,
        timeout=RUN_LIMIT,
        env=_env(),
        check=False,
    )


def test_two_real_runs_against_sinks_with_different_latencies(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    with (
        SinkThread(store="discard", delays=["EOD:20ms"]) as slow_sink,
        SinkThread(store="discard") as fast_sink,
    ):
        for sink, path in ((slow_sink, a), (fast_sink, b)):
            done = _mailstorm(
                "load", f"{sink.host}:{sink.port}", "--sessions", "4", "--messages", "200",
                "--quiet", "--json", str(path),
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
    m, html = tmp_path / "m.json", tmp_path / "m.html"
    done = _mailstorm("report", "merge", str(a), str(b), "--json", str(m), "--html", str(html))
    assert done.returncode == 0, done.stderr
    assert "merged from 2 run(s)" in done.stdout
    assert "the runs differ in target" in done.stderr  # two sinks, two ports
    runs = [json.loads(a.read_text()), json.loads(b.read_text())]
    merged = json.loads(m.read_text())
    assert merged["totals"]["delivered"] == 400 == sum(r["totals"]["delivered"] for r in runs)
    assert merged["totals"]["attempted"] == 400
    assert merged["totals"]["bytes"] == sum(r["totals"]["bytes"] for r in runs)
    assert sum(row["delivered"] for row in merged["timeline"]) == 400
    assert any(row["latency_ms"]["eod"] for row in merged["timeline"])
    by_hand = _hand_merged(runs, "eod")
    assert merged["phases"]["eod"] == phase_summary(by_hand)
    slow_p50, fast_p50 = (r["phases"]["eod"]["p50_ms"] for r in runs)
    assert fast_p50 < 20 <= slow_p50
    assert fast_p50 <= merged["phases"]["eod"]["p50_ms"] <= slow_p50
    assert merged["phases"]["eod"]["max_ms"] >= 20
    assert merged["merged_from"][0]["file"] == str(a)
    page = html.read_text()
    assert "Merged from 2 run(s)" in page and "report-data" in page
    assert "the runs did not overlap" in done.stderr  # one after the other, here
    # The merged report merges again, with itself: every count doubles.
    again = tmp_path / "again.json"
    done = _mailstorm("report", "merge", str(m), str(m), "--json", str(again))
    assert done.returncode == 0, done.stderr
    assert json.loads(again.read_text())["totals"]["delivered"] == 800


def test_help_lists_merge() -> None:
    done = _mailstorm("report", "--help")
    assert done.returncode == 0 and "merge" in done.stdout
    assert "report" in _mailstorm("--help").stdout
    done = _mailstorm("report", "merge", "--help")
    assert done.returncode == 0 and "--fail-if" in done.stdout and "--html" in done.stdout


def test_one_report_merged_alone_is_itself() -> None:
    run = _slow()
    merged = merge_reports([run], ["slow.json"])
    for key in ("phases", "percentile_curves", "histograms", "timeline", "errors", "tls"):
        assert merged[key] == run[key], key
    assert merged["totals"] == run["totals"]
    assert merged["timeline_latency_counts"] == run["timeline_latency_counts"]


def test_differing_workloads_and_a_run_given_twice_are_warned_about() -> None:
    fast, slow = _fast(), _slow()
    slow["config"]["size_text"] = "10k"
    warnings: list[str] = []
    merge_reports([fast, slow, fast], ["fast.json", "slow.json", "copy.json"], warnings)
    assert "fast.json and copy.json hold the same run: it is counted twice" in warnings
    assert 'the runs differ in size_text: "1k", "10k"' in warnings


def test_the_run_start_in_wall_time_survives_procs_merging() -> None:
    """--procs workers each note the wall time their clock started; the run's is the earliest
    (it is the report's started_at_unix, after the workers were spawned)."""
    first, second, parent = (
        RunStats(started_wall=1000.5),
        RunStats(started_wall=1000.25),
        RunStats(),
    )
    for worker in (first, second):
        parent.merge(RunStats.from_dict(worker.to_dict()))
    assert parent.started_wall == 1000.25
    config = LoadConfig(Target("127.0.0.1", 2525))
    assert (
        build_report(config, parent, started_at=parent.started_wall)["started_at_unix"] == 1000.25
    )
