"""The command line: help, one-line usage errors (exit 2), reports, --fail-if, --procs.

Full runs go against Postfix smtp-sink (a separate process), through ``mailstorm.load.cli.main``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hdrh.histogram import HdrHistogram

from mailstorm.load.cli import main

pytest_plugins = ("load_fixtures",)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


def test_module_help_explains_itself() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mailstorm.load", "--help"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0
    out = result.stdout
    assert out.startswith("usage: python -m mailstorm.load")
    for needle in (
        "examples:",
        "--rate",
        "--fail-if",
        "coordinated-omission",
        "NOT verified",
        "smtps://",
        "--source-address",
        "--pipeline-messages",
        "exit status",
    ):
        assert needle in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        ([], "the following arguments are required: TARGET"),
        (["localhost:"], "bad target"),
        (["ftp://x:21"], "unknown scheme"),
        (["127.0.0.1:25", "--size", "1k:x"], "bad size mix"),
        (["127.0.0.1:25", "--size", "huge"], "bad size"),
        (["127.0.0.1:25", "--fail-if", "p99(eod) > 5"], "needs a duration"),
        (["127.0.0.1:25", "--fail-if", "p99(eod) >"], "bad --fail-if"),
        (["127.0.0.1:25", "--sessions", "0"], "must be at least 1"),
        (["127.0.0.1:25", "--rate", "-3"], "more than 0"),
        (["127.0.0.1:25", "--bogus"], "unrecognized arguments: --bogus"),
        (["127.0.0.1:25", "--auth", "nocolon"], "USER:PASS"),
        (["127.0.0.1:25", "--pipelining", "maybe"], "invalid choice"),
        (["127.0.0.1:25", "--eml", "/nonexistent/x"], "no such file"),
        (["127.0.0.1:25", "--from", "a{x}@b"], "unknown field"),
        (["127.0.0.1:25", "--source-address", "nope"], "not an IP address"),
        (["127.0.0.1:25", "--sessions", "10000000"], "open files"),
        (["smtps://127.0.0.1:25", "--starttls"], "makes no sense"),
        (["127.0.0.1:25", "--ehlo", "two words"], "bad --ehlo"),
        (["127.0.0.1:25", "--chunk-size", "1k"], "needs --chunking"),
        (["127.0.0.1:25", "--pipeline-messages", "--chunking"], "needs pipelining with DATA"),
        (["lmtp://127.0.0.1:24", "--pipeline-messages"], "needs pipelining with DATA"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("mailstorm load: error: ")
    assert message in lines[0]


def test_unresolvable_host_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["no-such-host.invalid:25", "--messages", "1", "-q"]) == 2
    assert "cannot resolve" in capsys.readouterr().err


def test_json_report_is_complete_and_fail_if_sets_the_status(
    postfix_smtp_sink: Callable[..., Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sink = postfix_smtp_sink()
    report_path = tmp_path / "run.json"
    argv = [
        f"127.0.0.1:{sink.port}",
        "--sessions",
        "5",
        "--messages",
        "200",
        "--rcpts",
        "2",
        "--size",
        "1k:3,4k:1",
        "--json",
        str(report_path),
        "-q",
    ]
    assert main([*argv, "--fail-if", "p99(eod) > 60s or error_rate > 1%"]) == 0
    assert main([*argv, "--fail-if", "delivered >= 200 and errors == 0"]) == 1
    out = capsys.readouterr().out
    assert "latency (ms)" in out and "FAILED" in out
    report = json.loads(report_path.read_text())
    assert set(report) >= {
        "config",
        "totals",
        "phases",
        "percentile_curves",
        "timeline",
        "errors",
        "histograms",
        "fail_if",
        "started_at",
    }
    assert report["config"]["sessions"] == 5 and report["config"]["rcpts"] == 2
    assert report["config"]["mode"] == "closed-loop"
    totals = report["totals"]
    assert totals["delivered"] == totals["attempted"] == 200 and totals["failed"] == 0
    assert totals["msg_rate"] > 0 and totals["mb_rate"] > 0
    for phase in ("connect", "banner", "ehlo", "mail", "rcpt", "data", "eod", "quit", "message"):
        summary = report["phases"][phase]
        assert set(summary) == {
            "count",
            "min_ms",
            "mean_ms",
            "p50_ms",
            "p90_ms",
            "p99_ms",
            "p99_9_ms",
            "max_ms",
        }
        assert summary["min_ms"] <= summary["p50_ms"] <= summary["p99_ms"] <= summary["max_ms"]
    assert report["phases"]["rcpt"]["count"] == 400
    assert sum(t["delivered"] for t in report["timeline"]) == 200
    assert sum(t["bytes"] for t in report["timeline"]) == totals["bytes"]
    assert report["errors"] == {"by_kind": {}, "by_code": {}, "samples": []}
    assert report["fail_if"]["failed"] is True
    assert len(report["fail_if"]["explanation"]) == 2
    eod = HdrHistogram.decode(report["histograms"]["eod"].encode())
    assert eod.get_total_count() == 200
    assert sink.wait_for_messages(400) == 400


def test_procs_merge_exactly(
    postfix_smtp_sink: Callable[..., Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sink = postfix_smtp_sink()
    report_path = tmp_path / "procs.json"
    status = main(
        [
            f"127.0.0.1:{sink.port}",
            "--procs",
            "2",
            "--sessions",
            "6",
            "--messages",
            "301",
            "--per-connection",
            "10",
            "--json",
            str(report_path),
            "-q",
        ]
    )
    assert status == 0
    report = json.loads(report_path.read_text())
    totals = report["totals"]
    assert totals["delivered"] == totals["attempted"] == 301
    assert sink.wait_for_messages(301) == 301
    for phase in ("eod", "message", "mail"):
        hist = HdrHistogram.decode(report["histograms"][phase].encode())
        assert hist.get_total_count() == 301 == report["phases"][phase]["count"]
    # Connections: 301 messages, 10 per connection, over 6 sessions in 2 processes.
    assert report["phases"]["connect"]["count"] == totals["connections"] >= 31
    assert sum(t["delivered"] for t in report["timeline"]) == 301
    # The workers' own CPU for the run, summed; the per-message figure follows from it.
    generator = report["generator"]
    assert generator["cpu_s"] > 0
    assert generator["cpu_per_1000_messages"] == pytest.approx(
        generator["cpu_s"] * 1000 / 301, abs=0.01
    )


def test_progress_lines_without_a_terminal(
    postfix_smtp_sink: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    sink = postfix_smtp_sink()
    status = main(
        [
            f"127.0.0.1:{sink.port}",
            "--sessions",
            "2",
            "--rate",
            "50",
            "--duration",
            "1.2",
            "--progress-interval",
            "0.2",
        ]
    )
    assert status == 0
    err = capsys.readouterr().err
    # Not a terminal: plain lines, not a live panel.
    assert "delivered" in err and "msg/s" in err and "\x1b[" not in err


def test_html_report_renders_in_chromium(
    postfix_smtp_sink: Callable[..., Any], tmp_path: Path
) -> None:
    if not Path(CHROMIUM).exists():
        pytest.skip("chromium not installed (Debian package chromium)")
    sink = postfix_smtp_sink()
    html_path = tmp_path / "report.html"
    assert (
        main(
            [
                f"127.0.0.1:{sink.port}",
                "--sessions",
                "4",
                "--rate",
                "100",
                "--duration",
                "2",
                "--html",
                str(html_path),
                "-q",
            ]
        )
        == 0
    )
    page = html_path.read_text()
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [
                CHROMIUM,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                f"--user-data-dir={profile}",
                "--dump-dom",
                html_path.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    dom = result.stdout
    assert 'data-charts-rendered="4"' in dom, result.stderr[-2000:]
    assert "rendered " not in page and "render-status" not in page  # no debug text
    # Throughput (delivered, failed), MB/s, latency over time (p50/p99 of end of data and of
    # whole messages), and one latency curve per phase, coinciding ones once.
    assert 'data-series="end of data p99"' in dom and 'data-series="whole message p50"' in dom
    assert 'data-series="eod"' in dom and 'data-series="delivered"' in dom
    # smtp-sink offers PIPELINING: MAIL, RCPT and DATA share one measurement, drawn once.
    assert 'data-series="mail = rcpt = data"' in dom and 'data-series="mail"' not in dom
    assert "Drawn once: mail = rcpt = data" in page


def test_a_run_that_delivers_nothing_exits_3(postfix_smtp_sink: Callable[..., Any]) -> None:
    """A server that is up but takes nothing fails the run even without --fail-if (exit
    status 3). (A server that is down does not get a run: exit status 4, see
    test_load_failing_targets.)"""
    import subprocess
    import sys

    sink = postfix_smtp_sink("-Q", "MAIL")  # every MAIL gets a 421 and the connection closes
    result = subprocess.run(
        [sys.executable, "-m", "mailstorm.load", f"127.0.0.1:{sink.port}", "--sessions", "2",
         "--messages", "4", "--quiet"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 3, result.stderr
    assert "no message was delivered" in result.stderr


def test_options_reach_the_config_through_its_fields() -> None:
    """Every option's destination is a LoadConfig or ClientConfig field, or derived by name in
    config_from_args: a new option cannot be dropped on the way (no field-by-field copy)."""
    from mailstorm.load.cli import build_parser, config_from_args
    from mailstorm.load.config import OPTION_NAMES
    from mailstorm.wire.client import ClientConfig

    parser = build_parser("mailstorm load")
    # --config and --print-config are used up by parsing (mailstorm.configfile); logging is
    # set up by main() for the process (mailstorm.logsetup), not part of a run.
    dests = {action.dest for action in parser._actions} - {
        "help", "config", "print_config", "log_format", "log_level"
    }
    derived = {"target", "size", "auth", "insecure", "source_address", "port", "backoff"}
    assert dests - derived <= OPTION_NAMES
    config = config_from_args(
        parser.parse_args(
            ["lmtp://127.0.0.1:24", "--ehlo", "client.test", "--auth", "alice:s:ecret",
             "--auth-mech", "login", "--pipelining", "on", "--chunking", "--chunk-size", "1k",
             "--sessions", "7", "--rcpts", "2", "--source-address", "127.0.0.2"]
        )
    )
    assert config.client == ClientConfig(
        ehlo_name="client.test", lmtp=True, auth_user="alice", auth_password="s:ecret",
        auth_mech="LOGIN", pipelining="on", chunking=True, chunk_size=1024,
    )
    assert (config.sessions, config.rcpts, config.source_addresses) == (7, 2, ["127.0.0.2"])
    assert config.duration == 10.0 and config.progress_interval == 1.0
    report = config.to_report()
    assert report["ehlo"] == "client.test" and report["auth_password"] == "***"
    assert "client" not in report and report["lmtp"] is True


def test_a_closed_stdout_keeps_the_status_and_the_reports(
    postfix_smtp_sink: Callable[..., Any], tmp_path: Path
) -> None:
    """`mailstorm load ... | head` (issue 15, item 6): the reader goes away before the table;
    the run still exits with its own status, silently, and writes its reports (rich's default
    was exit status 1, before the reports)."""
    sink = postfix_smtp_sink()
    json_path = tmp_path / "r.json"
    process = subprocess.Popen(
        [sys.executable, "-m", "mailstorm.load", f"127.0.0.1:{sink.port}", "--sessions", "2",
         "--messages", "20", "--quiet", "--json", str(json_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # as `| head` does once it has its lines: here, before any
    try:
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=60) == 0, stderr
    finally:
        process.kill()
        process.wait()
    assert "Traceback" not in stderr and "BrokenPipe" not in stderr
    assert json.loads(json_path.read_text())["totals"]["delivered"] == 20
